"""Random well-formed and malformed checks and records through the HTTP API, each answer compared
with the one built from the domain functions (``state.derive_status``, ``state.is_allowed``,
``crypto.normalize_email``) over a model of what was recorded; on SQLite and PostgreSQL (the
``client`` fixture runs on both), through whichever executor the service picks (the batched
reader and, on PostgreSQL, the group commit)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from consent import crypto
from consent.ledger.state import derive_status, is_allowed

from .helpers import make_tenant

PURPOSES = {"marketing_email": "consent", "analytics": "consent", "product_updates": "consent",
            "strictly_necessary": "notice"}
DOUBLE_OPT_IN = {"product_updates"}
EMAILS = ["ada@example.com", "ADA@Example.com", " bob@example.com", "cy@EXAMPLE.com"]
USERS = ["u-1"]
ANONS = ["anon-1"]

identifier = st.one_of(st.tuples(st.just("email"), st.sampled_from(EMAILS)),
                       st.tuples(st.just("user"), st.sampled_from(USERS)),
                       st.tuples(st.just("anon"), st.sampled_from(ANONS)))
purpose = st.sampled_from([*PURPOSES, "nope"])
decision = st.sampled_from(["granted", "denied", "withdrawn", "acknowledged"])

record_op = st.tuples(st.just("record"), identifier, purpose, decision)
check_op = st.tuples(st.just("check"), identifier, purpose, st.sampled_from(["param", "ref", "id", "at"]))
BAD_CHECKS = [
    ({"email": "ada@example.com"}, {}, 422),  # no purpose
    ({"purpose": "analytics"}, {}, 422),  # no subject
    ({"purpose": "analytics", "email": "ada@example.com", "anonymous_id": "anon-1"}, {}, 422),
    ({"purpose": "analytics", "emial": "ada@example.com"}, {}, 422),
    ({"purpose": "analytics", "email": "a" * 321}, {}, 422),
    ({"purpose": "analytics", "email": "ada\x00@example.com"}, {}, 422),
    ({"purpose": "analytics", "email": "ada@example.com", "at": "yesterday"}, {}, 422),
    ({"purpose": "analytics", "email": "ada@example.com"}, {"Authorization": ""}, 401),
    ({"purpose": "analytics", "email": "ada@example.com"}, {"Authorization": "Basic abc"}, 401),
    ({"purpose": "analytics", "email": "ada@example.com"}, {"Authorization": "Bearer sk_nope"}, 401),
    ({"purpose": "analytics", "email": "ada@example.com"}, "publishable", 403),
]
BAD_RECORDS = [
    ({"subject": {"email": "ada@example.com"}, "purpose": "analytics", "decision": "maybe"}, {}, 422),
    ({"subject": {"email": "ada@example.com"}, "purpose": "analytics", "decision": "granted", "x": 1}, {}, 422),
    ({"subject": {}, "purpose": "analytics", "decision": "granted"}, {}, 422),
    ({"subject": {"email": "not-an-email"}, "purpose": "analytics", "decision": "granted"}, {}, 422),
    ({"subject": {"email": "ada@example.com"}, "purpose": "analytics", "decision": "granted",
      "policy_version": "v9"}, {}, 422),
    (b'{"subject": ', {"Content-Type": "application/json"}, 400),
    ({"subject": {"email": "ada@example.com"}, "purpose": "analytics", "decision": "granted"},
     {"Content-Type": "text/plain"}, 415),
    ({"subject": {"email": "ada@example.com"}, "purpose": "analytics", "decision": "granted"},
     {"Authorization": "Bearer sk_nope"}, 401),
    ({"subject": {"email": "ada@example.com"}, "purpose": "analytics", "decision": "granted"}, "publishable", 403),
]
bad_check = st.tuples(st.just("bad_check"), st.sampled_from(range(len(BAD_CHECKS))))
bad_record = st.tuples(st.just("bad_record"), st.sampled_from(range(len(BAD_RECORDS))))
operations = st.lists(st.one_of(record_op, record_op, check_op, check_op, check_op, bad_check, bad_record),
                      min_size=2, max_size=16)


def key_of(kind: str, value: str) -> tuple[str, str]:
    """The model's name for an identifier: the service's one email spelling."""
    return kind, crypto.normalize_email(value) if kind == "email" else value


def expected_record(purpose: str, decision: str) -> tuple[int, str | None]:
    """The status code and the status the domain rules give a record (the 422 cases by rule)."""
    kind = PURPOSES.get(purpose)
    if kind is None or decision == "acknowledged" and kind != "notice":
        return 422, None
    if kind == "notice" and decision not in ("acknowledged", "withdrawn"):
        return 422, None
    confirmed = not (decision == "granted" and purpose in DOUBLE_OPT_IN)
    return 201, derive_status(decision, confirmed=confirmed, stale=False)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations)
@example(ops=[("record", ("email", "ada@example.com"), "analytics", "granted"),  # a known subject ...
              ("check", ("email", "ADA@example.com"), "marketing_email", "param"),  # ... with no decision here
              ("check", ("email", "ada@example.com"), "marketing_email", "at"),
              ("check", ("email", "ada@example.com"), "marketing_email", "id")])
def test_random_checks_and_records_answer_as_the_domain_rules_say(client: TestClient, ops: list[Any]) -> None:
    t = make_tenant(client)
    subjects: dict[tuple[str, str], str] = {}  # identifier -> subject id
    latest: dict[tuple[str, str], dict[str, Any]] = {}  # (subject id, purpose) -> last record
    for op in ops:
        if op[0] == "record":
            _, (kind, value), purpose, dec = op
            field = {"email": "email", "user": "user_id", "anon": "anonymous_id"}[kind]
            r = t.post("/v1/consents", json={"subject": {field: value}, "purpose": purpose, "decision": dec})
            code, status = expected_record(purpose, dec)
            assert r.status_code == code, (op, r.text)
            if code != 201:
                assert r.headers["content-type"] == "application/problem+json"
                continue
            body = r.json()
            assert body["status"] == status and body["decision"] == dec and body["purpose"] == purpose, body
            known = subjects.setdefault(key_of(kind, value), body["subject"])
            assert body["subject"] == known
            latest[(known, purpose)] = body
        elif op[0] == "check":
            _, (kind, value), purpose, form = op
            sid = subjects.get(key_of(kind, value))
            if form == "id":
                if sid is None:
                    continue
                params = {"subject": sid}
            elif form == "ref":
                params = {"subject": f"{kind}:{value}"}
            else:
                params = {{"email": "email", "user": "subject", "anon": "anonymous_id"}[kind]: value}
            if form == "at":
                params["at"] = datetime.now(UTC).isoformat()
            r = t.get("/v1/check", params={"purpose": purpose, **params})
            if purpose not in PURPOSES:
                assert r.status_code == 422 and r.json()["code"] == "validation_failed", (op, r.text)
                continue
            assert r.status_code == 200, (op, r.text)
            rec = latest.get((sid, purpose)) if sid else None
            status = rec["status"] if rec else "none"  # no newer material version: never stale here
            want = {"allowed": is_allowed(status), "status": status, "purpose": purpose, "subject": sid,
                    "policy_version": rec["policy"]["version"] if rec else None,
                    "record_id": rec["id"] if rec else None, "receipt": rec["receipt"] if rec else None,
                    "gpc": False}
            assert r.json() == want, (op, r.json(), want)
        else:
            table = BAD_CHECKS if op[0] == "bad_check" else BAD_RECORDS
            what, headers, code = table[op[1]]
            headers = {"Authorization": f"Bearer {t.publishable_key}"} if headers == "publishable" else headers
            headers = {**t.h, **headers}
            if not headers.get("Authorization"):
                headers.pop("Authorization", None)
            if op[0] == "bad_check":
                r = t.client.get("/v1/check", params=what, headers=headers)
            elif isinstance(what, bytes):
                r = t.client.post("/v1/consents", content=what, headers=headers)
            else:
                r = t.client.post("/v1/consents", json=what, headers=headers)
            assert r.status_code == code, (op, r.text)
            problem = r.json()
            assert r.headers["content-type"] == "application/problem+json" and problem["status"] == code, problem
            assert r.headers["x-request-id"] and problem["instance"] in ("/v1/check", "/v1/consents"), problem
