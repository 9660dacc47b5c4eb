"""Property test of state derivation: any sequence of policy versions, purpose changes and
decisions gives, for every (subject, purpose), the status a plain reference model computes.

The model below is written from the documented status rules, not from the service's code:
- the latest accepted decision counts;
- a grant or acknowledgement is ``stale`` when a material version covering the purpose, newer
  than the version the decision was made under, is in effect (every version here takes effect
  at once: the tenant has notice_days=0); a denial or withdrawal never is: a no stays a no;
- a grant of a double-opt-in purpose is ``pending_confirmation`` until confirmed;
- nothing recorded is ``none``; only ``granted`` allows.
Every answer is compared over GET /v1/check, GET /v1/subjects/{s}/consents and POST /v1/check.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .helpers import DOC_SHA, make_tenant

KINDS = {"necessary": "notice", "marketing": "consent", "analytics": "consent", "updates": "consent"}
DOI_AT_START = {"updates"}
PURPOSES = sorted(KINDS)
SUBJECTS = ["u1", "u2", "u3"]
DECISIONS = ["granted", "denied", "withdrawn", "acknowledged"]


@dataclass
class Version:
    label: str
    material: bool
    purposes: frozenset[str]


@dataclass
class Model:
    """The reference: a list of versions and the latest decision per (subject, purpose)."""

    versions: list[Version] = field(default_factory=list)
    doi: set[str] = field(default_factory=lambda: set(DOI_AT_START))
    latest: dict[tuple[str, str], tuple[str, int | None, bool]] = field(default_factory=dict)

    def publish(self, material: bool, purposes: frozenset[str]) -> str:
        label = f"v{len(self.versions)}"
        self.versions.append(Version(label, material, purposes))
        return label

    def record(self, subject: str, purpose: str, decision: str, named: int | None) -> bool:
        """Apply a decision; False when the service must refuse it (422)."""
        withdrawal = decision == "withdrawn"  # always accepted
        if decision == "acknowledged" and KINDS[purpose] != "notice":
            return False
        if decision in ("granted", "denied") and KINDS[purpose] == "notice":
            return False
        if named is not None:
            version: int | None = named
            if purpose not in self.versions[named].purposes:
                if not withdrawal:
                    return False
                version = None
        else:
            covering = [i for i, v in enumerate(self.versions) if purpose in v.purposes]
            version = covering[-1] if covering else None
            if version is None and not withdrawal:
                return False
        confirmed = not (decision == "granted" and purpose in self.doi)
        self.latest[(subject, purpose)] = (decision, version, confirmed)
        return True

    def status(self, subject: str, purpose: str) -> str:
        if (subject, purpose) not in self.latest:
            return "none"
        decision, version, confirmed = self.latest[(subject, purpose)]
        if decision in ("granted", "acknowledged") and version is not None and any(
            v.material and purpose in v.purposes for v in self.versions[version + 1:]
        ):
            return "stale"
        if decision == "granted" and not confirmed:
            return "pending_confirmation"
        return decision


publish_op = st.tuples(st.just("publish"), st.booleans(),
                       st.frozensets(st.sampled_from(PURPOSES), min_size=1))
record_op = st.tuples(st.just("record"), st.sampled_from(SUBJECTS), st.sampled_from(PURPOSES),
                      st.sampled_from(DECISIONS), st.none() | st.integers(0, 1000))
doi_op = st.tuples(st.just("doi"), st.sampled_from(["marketing", "updates"]), st.booleans())
operations = st.lists(st.one_of(publish_op, record_op, record_op, record_op, doi_op), max_size=14)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(first_material=st.booleans(), ops=operations)
def test_status_matches_reference_model(client, first_material: bool, ops: list[tuple]) -> None:
    t = make_tenant(client, catalog=False, notice_days=0)
    for key, kind in KINDS.items():
        spec = {"kind": kind, "double_opt_in": key in DOI_AT_START,
                "legal_basis": "legitimate_interest" if kind == "notice" else "consent"}
        assert t.put(f"/v1/purposes/{key}", json=spec).status_code == 201
    model = Model()

    def publish(material: bool, purposes: frozenset[str]) -> None:
        label = model.publish(material, purposes)
        r = t.post("/v1/policies/privacy/versions", json={
            "version": label, "document_url": f"https://acme.test/{label}", "document_sha256": DOC_SHA,
            "material": material, "purposes": sorted(purposes)})
        assert r.status_code == 201, r.text

    publish(first_material, frozenset(PURPOSES))
    for op in ops:
        if op[0] == "publish":
            publish(op[1], op[2])
        elif op[0] == "doi":
            _, key, flag = op
            r = t.put(f"/v1/purposes/{key}", json={"kind": "consent", "double_opt_in": flag})
            assert r.status_code == 200, r.text
            model.doi.discard(key)
            if flag:
                model.doi.add(key)
        else:
            _, subject, purpose, decision, pick = op
            named = None if pick is None else pick % len(model.versions)
            body = {"subject": {"user_id": subject, "email": f"{subject}@example.com"},
                    "purpose": purpose, "decision": decision}
            if named is not None:
                body["policy_version"] = model.versions[named].label
            accepted = model.record(subject, purpose, decision, named)
            r = t.post("/v1/consents", json=body)
            assert r.status_code == (201 if accepted else 422), (op, r.text)
            if accepted:
                assert r.json()["status"] == model.status(subject, purpose), op
            else:
                assert r.headers["content-type"] == "application/problem+json" and r.json()["errors"]

    for purpose in PURPOSES:
        bulk = t.post("/v1/check", json={"purpose": purpose, "subjects": SUBJECTS}).json()
        by_email = t.post("/v1/check", json={
            "purpose": purpose, "emails": [f"{s}@example.com" for s in SUBJECTS]}).json()
        for i, subject in enumerate(SUBJECTS):
            expected = model.status(subject, purpose)
            one = t.check(purpose, subject=subject)
            assert one["status"] == expected, (subject, purpose, ops)
            assert one["allowed"] is (expected == "granted")
            assert bulk["results"][i] == {"id": subject, "allowed": expected == "granted", "status": expected}
            assert by_email["results"][i]["status"] == expected
        assert bulk["allowed_count"] == sum(model.status(s, purpose) == "granted" for s in SUBJECTS)
    for subject in SUBJECTS:
        r = t.get(f"/v1/subjects/{subject}/consents")
        if not any(s == subject for s, _ in model.latest):
            # every attempt was refused, so the subject was never created
            assert r.status_code == 404 and r.json()["code"] == "not_found", r.text
            continue
        assert r.status_code == 200, r.text
        states = {s["purpose"]: s for s in r.json()["purposes"]}
        assert set(states) == set(PURPOSES)
        for purpose in PURPOSES:
            expected = model.status(subject, purpose)
            assert states[purpose]["status"] == expected, (subject, purpose, ops)
            assert states[purpose]["allowed"] is (expected == "granted")
