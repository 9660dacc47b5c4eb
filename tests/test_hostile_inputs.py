"""Small hostile inputs: evidence nested too deep, a repeated or empty export filter, and
Markdown/HTML typed by people in an access export."""

from __future__ import annotations

import pytest

from .helpers import Tenant


@pytest.mark.parametrize("depth", [40, 300, 1000])
def test_evidence_nested_too_deep_is_a_422(tenant: Tenant, depth: int) -> None:
    raw = ('{"subject": {"email": "deep@example.com"}, "purpose": "marketing_email", "decision": "granted", '
           '"evidence": {"deep": ' + '{"a":' * depth + '1' + '}' * depth + '}}')
    r = tenant.post("/v1/consents", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text[:300]
    assert r.json()["errors"][0]["field"] == "evidence"
    assert tenant.check(email="deep@example.com")["status"] == "none"
    ok = '{"a":' * 20 + '1' + '}' * 20
    tenant.record(email="deep@example.com", evidence={"deep": ok})  # 201: ordinary nesting is fine


@pytest.mark.parametrize("query", [
    [("purpose", "marketing_email"), ("purpose", "")],
    [("purpose", "")],
    [("policy_version", "")],
    [("purpose", "marketing_email"), ("purpose", "analytics")],
])
def test_empty_or_repeated_export_filter_is_a_422(tenant: Tenant, query: list) -> None:
    tenant.record(email="f@example.com")
    tenant.record("analytics", email="f@example.com")
    r = tenant.get("/v1/exports/consents", params=query)
    assert r.status_code == 422, r.text[:300]
    assert r.json()["errors"][0]["field"] == query[0][0]


def test_access_export_markdown_escapes_what_people_typed(tenant: Tenant) -> None:
    ua = "Mozilla <img src=x onerror=alert(1)> [click](javascript:alert(1)) ![t](https://t.example/p.gif) |x|"
    tenant.record(user_id="md-1", evidence={"user_agent": ua, "note": "**bold** `code` <b>tag</b>\n# heading"})
    md = tenant.get("/v1/subjects/md-1/export", headers={"Accept": "text/markdown"}).text
    for raw in ("<img", "<b>", "](javascript:", "![t](", "**bold**", "`code`", "\n# heading", "|x|"):
        assert raw not in md, raw
    assert "&lt;img src=x onerror=alert\\(1\\)&gt;" in md or "&lt;img src=x onerror=alert\\(1\\)\\>" in md
