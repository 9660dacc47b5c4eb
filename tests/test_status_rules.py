"""A material policy version re-asks a yes, never a no: denials and withdrawals read back as
``denied`` / ``withdrawn`` on every path (single check on the fast path and on the route, bulk
by email and by subject, the subject's state, as-of checks and the change feed)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from starlette.testclient import TestClient

from consent.web.app import create_app

from .conftest import settings_for
from .helpers import Tenant, make_tenant


@pytest.fixture(scope="module")
def route_client(db_url: str) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(db_url))) as c:
        yield c


def statuses(t: Tenant, route: TestClient, purpose: str, who: dict[str, str]) -> set[str]:
    """The status of one (subject, purpose) as every read path answers it."""
    key, value = next(iter(who.items()))
    seen = {t.check(purpose, **who)["status"]}
    r = route.get("/v1/check", params={"purpose": purpose, **who}, headers=t.h)
    seen.add(r.json()["status"])
    field = {"email": "emails", "subject": "subjects"}[key]
    bulk = t.post("/v1/check", json={"purpose": purpose, field: [value, "nobody@example.com"
                                                                 if key == "email" else "nobody"]})
    seen.add(bulk.json()["results"][0]["status"])
    later = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()
    seen.add(t.check(purpose, at=later, **who)["status"])
    subject = t.check(purpose, **who)["subject"]
    states = {s["purpose"]: s for s in t.get(f"/v1/subjects/{subject}/consents").json()["purposes"]}
    seen.add(states[purpose]["status"])
    return seen


def test_a_material_version_keeps_a_no(client: TestClient, route_client: TestClient) -> None:
    t = make_tenant(client)
    t.record("marketing_email", "granted", email="yes@example.com")
    t.record("marketing_email", "denied", email="no@example.com")
    t.record("marketing_email", "withdrawn", email="bye@example.com")  # no version named
    t.record("marketing_email", "withdrawn", user_id="named", policy_version="v1")
    t.record("strictly_necessary", "acknowledged", email="ack@example.com")
    t.publish("v2", material=True)
    # A withdrawal naming the superseded version, recorded after v2 took effect (an old link).
    late = t.record("analytics", "withdrawn", email="late@example.com", policy_version="v1")
    assert late["status"] == "withdrawn"

    assert statuses(t, route_client, "marketing_email", {"email": "yes@example.com"}) == {"stale"}
    assert statuses(t, route_client, "strictly_necessary", {"email": "ack@example.com"}) == {"stale"}
    assert statuses(t, route_client, "marketing_email", {"email": "no@example.com"}) == {"denied"}
    assert statuses(t, route_client, "marketing_email", {"email": "bye@example.com"}) == {"withdrawn"}
    assert statuses(t, route_client, "marketing_email", {"subject": "named"}) == {"withdrawn"}
    assert statuses(t, route_client, "analytics", {"email": "late@example.com"}) == {"withdrawn"}
    for who in ({"email": "no@example.com"}, {"email": "bye@example.com"}):
        assert t.check("marketing_email", **who)["allowed"] is False

    feed = t.get("/v1/events", params={"after": 0, "limit": 100}).json()["items"]
    last = [e for e in feed if e["data"]["record_id"] == late["id"]]
    assert last and last[0]["data"]["status"] == "withdrawn"
