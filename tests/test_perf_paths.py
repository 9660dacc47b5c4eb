"""The fast paths give the same answers as the plain ones: hand-built JWS receipts, precomputed
HMAC states, one-statement bulk checks (staleness by join), checks on the event loop with the
tenant read in the key query (a revoked key is refused on the very next request)."""

from __future__ import annotations

import hashlib
import hmac
import random
import re
from datetime import UTC, datetime, timedelta, timezone

import jwt
import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consent import crypto
from consent.errors import BadToken
from consent.ledger import checks, statements
from consent.store import db

from .helpers import make_tenant


@settings(max_examples=60, deadline=None)
@given(key=st.binary(min_size=1, max_size=100), kind=st.sampled_from(["email", "user", "anon", "subject"]),
       value=st.text(max_size=80))
def test_keyed_hash_is_hmac_sha256(key: bytes, kind: str, value: str) -> None:
    expected = hmac.new(key, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()
    assert crypto.keyed_hash(key.hex(), kind, value) == expected
    assert crypto.keyed_hashes(key.hex(), kind, [value, value + "x"]) == [
        expected, hmac.new(key, f"{kind}:{value}x".encode(), hashlib.sha256).hexdigest()]


def test_hand_built_receipt_is_a_standard_eddsa_jwt() -> None:
    pair = crypto.generate_signing_key()
    token = crypto.Signer(pair.kid, pair.private_pem).sign({"sub": "s", "n": 1, "t": "é\u2028", "x": None})
    assert jwt.get_unverified_header(token) == {"alg": "EdDSA", "kid": pair.kid, "typ": "JWT"}
    key = jwt.PyJWK(pair.public_jwk, algorithm="EdDSA")
    assert jwt.decode(token, key, algorithms=["EdDSA"]) == {"sub": "s", "n": 1, "t": "é\u2028", "x": None}
    assert crypto.verify_jwt(token, {"keys": [pair.public_jwk]})["sub"] == "s"
    other = crypto.generate_signing_key()
    with pytest.raises(BadToken):  # another key under the same kid does not verify it
        crypto.verify_jwt(token, {"keys": [{**other.public_jwk, "kid": pair.kid}]})


def test_bulk_agrees_with_single_checks_including_stale(client) -> None:
    t = make_tenant(client)
    t.record(email="g@example.com")
    t.record(email="d@example.com", decision="denied")
    t.record(email="w@example.com")
    t.record(email="w@example.com", decision="withdrawn")
    t.record("product_updates", email="g@example.com")
    t.publish("v2", material=True)  # notice_days 0: in effect now, earlier grants are stale, a no stays a no
    t.record(email="n@example.com", policy_version="v2")
    emails = ["g@example.com", "d@example.com", "w@example.com", "n@example.com", "none@example.com"]
    bulk = t.post("/v1/check", json={"purpose": "marketing_email", "emails": emails}).json()
    single = [t.check(email=e)["status"] for e in emails]
    assert [r["status"] for r in bulk["results"]] == single == ["stale", "denied", "withdrawn", "granted", "none"]
    assert bulk["allowed_count"] == 1
    sids = [t.check(email=e)["subject"] for e in emails[:4]]
    by_id = t.post("/v1/check", json={"purpose": "marketing_email",
                                      "subjects": sids + ["sub_unknown", "email:n@example.com"]}).json()
    assert [r["status"] for r in by_id["results"]] == single[:4] + ["none", "granted"]
    pending = t.post("/v1/check", json={"purpose": "product_updates", "emails": ["g@example.com"]}).json()
    assert pending["results"][0]["status"] == "pending_confirmation"


def test_large_bulk_keeps_input_order(client) -> None:
    """Thousands of keys, repeated and shuffled (more than 1,000: on PostgreSQL the generic plan
    with hash joins; SQLite sorts the distinct keys before it probes): every answer is the single
    check's for that input, in input order."""
    t = make_tenant(client)
    decisions = ["granted", "denied", "withdrawn"]
    for i in range(24):
        t.record(email=f"o{i}@example.com", decision=decisions[i % 3])
    t.record("product_updates", email="o0@example.com")  # another purpose: not in this answer
    expected = {f"o{i}@example.com": t.check(email=f"o{i}@example.com")["status"] for i in range(24)}
    assert set(expected.values()) == set(decisions)
    rng = random.Random(7)
    emails = [rng.choice([f"O{rng.randrange(24)}@Example.com ", f"x{rng.randrange(10**6)}@example.com"])
              for _ in range(3000)]
    got = t.post("/v1/check", json={"purpose": "marketing_email", "emails": emails}).json()
    want = [expected.get(e.strip().lower(), "none") for e in emails]
    assert [r["status"] for r in got["results"]] == want
    assert [r["id"] for r in got["results"]] == [e.strip() for e in emails]
    assert got["allowed_count"] == want.count("granted") > 0
    sids = {t.check(email=e)["subject"]: s for e, s in expected.items()}
    refs = [rng.choice([*sids, "sub_missing"]) for _ in range(2000)]
    by_id = t.post("/v1/check", json={"purpose": "marketing_email", "subjects": refs}).json()
    assert [r["status"] for r in by_id["results"]] == [sids.get(r, "none") for r in refs]


def test_large_bulk_stale_and_escaped_subject_ids(client) -> None:
    """More than 1,000 references of three kinds in one call (PostgreSQL: subject ids travel as
    a quoted text[] literal, hashes comma-joined; the answer is a JSON object either way): stale
    grants stay stale, a no stays a no, and ids holding quotes, backslashes, commas, braces,
    spaces or the word NULL find nothing without breaking their neighbours' answers."""
    t = make_tenant(client)
    for i in range(6):
        t.record(email=f"s{i}@example.com", decision=["granted", "denied", "withdrawn"][i % 3])
    t.record(user_id="u-1")
    t.publish("v2", material=True)  # notice_days 0: in effect now, earlier grants are stale
    t.record(email="fresh@example.com", policy_version="v2")
    expected = {f"email:{e}": t.check(email=e)["status"] for e in [f"s{i}@example.com" for i in range(6)]
                + ["fresh@example.com"]}
    expected["user:u-1"] = t.check(subject="user:u-1")["status"]
    expected.update({t.check(email=r[6:])["subject"]: s for r, s in list(expected.items()) if r.startswith("email:")})
    assert set(expected.values()) == {"stale", "denied", "withdrawn", "granted"}
    assert expected["user:u-1"] == "stale"
    odd = ['sub_"quote', "sub_back\\slash", "sub_{brace},comma", "sub_NULL", "sub_", 'sub_a","b', "sub_ spaced",
           "sub_\u00e9", "user:nobody", "email:nobody@example.com"]
    odd += [f"{r[:4]}\\{r[4:]}" for r in expected if r.startswith("sub_")]  # a real id if the backslash were lost
    rng = random.Random(11)
    refs = [rng.choice([*expected, *odd]) for _ in range(4000)]
    got = t.post("/v1/check", json={"purpose": "marketing_email", "subjects": refs}).json()
    want = [expected.get(r, "none") for r in refs]
    assert [r["status"] for r in got["results"]] == want
    assert [r["id"] for r in got["results"]] == [r.strip() for r in refs]  # as the body's strings are read
    assert got["allowed_count"] == want.count("granted") > 0
    emails = [rng.choice([r[6:] for r in expected if r.startswith("email:")] + ["n@example.com"]) for _ in range(1500)]
    by_email = t.post("/v1/check", json={"purpose": "marketing_email", "emails": emails}).json()
    assert [r["status"] for r in by_email["results"]] == [expected.get(f"email:{e}", "none") for e in emails]


def test_bulk_plan_on_postgresql(client, backend, db_url) -> None:
    """The plan the bulk statement gets in the transaction ``checks.bulk_codes`` sets up (run as
    a prepared statement, as psycopg runs a statement after 5 runs): for more than 1,000 keys a
    generic plan (the keys a parameter) with no nested loop, so no index probe per key; for fewer,
    a plan made for the keys given."""
    if backend != "postgresql":
        pytest.skip("PostgreSQL's planner")
    t = make_tenant(client)
    t.record(email="p@example.com")
    sql = str(statements.BULK[(True, False)])
    names = list(dict.fromkeys(re.findall(r"(?<!:):(\w+)", sql)))
    numbered = re.sub(r"(?<!:):(\w+)", lambda m: f"${names.index(m.group(1)) + 1}", sql)
    engine = db.create_db_engine(db_url)
    try:
        for n, generic in ((1500, True), (20, False)):
            keys = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]
            with engine.connect() as conn, conn.begin():
                assert checks.bulk_codes(conn, t.id, "marketing_email", "email", keys, datetime.now(UTC)) == {}
                raw = conn.connection.driver_connection
                raw.execute(f"PREPARE bulk_plan AS {numbered}")
                values = {"t": t.id, "p": "marketing_email", "k": "email", "keys": ",".join(keys),
                          "now": datetime.now(UTC)}
                plan = "\n".join(r[0] for r in psycopg.ClientCursor(raw).execute(
                    "EXPLAIN EXECUTE bulk_plan(%s::text, %s::text, %s::timestamptz, %s::text, %s::text)",
                    [values[x] for x in names]))
                raw.execute("DEALLOCATE bulk_plan")
            assert ("$1" in plan) is generic, plan
            assert ("Nested Loop" in plan) is not generic, plan
    finally:
        engine.dispose()


def test_bulk_keys_with_json_metacharacters(tenant) -> None:
    odd = ['sub_"quote', "sub_back\\slash", "sub_{brace},comma", "user:\u00e9\u2028"]
    r = tenant.post("/v1/check", json={"purpose": "marketing_email", "subjects": odd})
    assert r.status_code == 200 and [x["status"] for x in r.json()["results"]] == ["none"] * 4
    sid = tenant.record(email="q@example.com")["subject"]
    r = tenant.post("/v1/check", json={"purpose": "marketing_email", "subjects": [sid, sid], "emails": None})
    assert [x["status"] for x in r.json()["results"]] == ["granted", "granted"]


def test_revoked_key_is_refused_by_the_next_check(client) -> None:
    t = make_tenant(client)
    t.record(email="r@example.com")
    assert t.check(email="r@example.com")["allowed"] is True
    old = t.secret_key
    t.secret_key = t.post("/v1/keys/rotate", json={"kind": "secret", "leaked": True}).json()["secret_key"]
    r = client.get("/v1/check", params={"purpose": "marketing_email", "email": "r@example.com"},
                   headers={"Authorization": f"Bearer {old}"})
    assert r.status_code == 401 and r.headers["content-type"] == "application/problem+json"
    assert t.check(email="r@example.com")["allowed"] is True
    r = client.get("/v1/check", params={"purpose": "nope", "email": "r@example.com"}, headers=t.h)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "purpose"


@settings(max_examples=300, deadline=None)
@given(at=st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30))]))
       | st.datetimes())
def test_iso_is_the_strftime_form(at: datetime) -> None:
    """``crypto.iso`` goes inside record hashes: its cheaper form must be the very same text."""
    assert crypto.iso(at) == at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
