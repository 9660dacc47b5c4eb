# ruff: noqa: F811  (the live-server and browser fixtures are imported from test_browser)
"""The dashboard in a real headless Chromium (Playwright, Debian's /usr/bin/chromium) against a
live uvicorn: sign-in with the cookie's flags, charts, search, the verified history, both
downloads, the verifier with a good and a tampered receipt and an uploaded export, erasure,
the API reference, sign-out, and the read-only pages with JavaScript off. Screenshots of every
page go to screens/ (gitignored) to be looked at."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from .helpers import Tenant
from .test_browser import ROOT, Live, browser, context, live  # noqa: F401 (fixtures)

pytestmark = pytest.mark.browser

SCREENS = ROOT / "screens"


UNLABELLED = """() => [...document.querySelectorAll('input:not([type=hidden]), select, textarea, button')]
  .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label') && !el.textContent.trim())
  .map(el => el.outerHTML)"""


def shot(page: Any, live: Live, name: str, *, ours: bool = True) -> None:
    """Every page of ours checked on the way: each control has a label, one h1, a main landmark
    (``ours=False``: the API reference, whose controls Swagger UI draws)."""
    if ours:
        assert page.evaluate(UNLABELLED) == [], name
        assert page.locator("h1").count() == 1 and page.locator("main").count() == 1, name
    if live.backend == "sqlite":
        SCREENS.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENS / f"{name}.png"), full_page=True)


def populated(live: Live) -> tuple[Tenant, dict[str, Any]]:
    t = live.tenant()
    assert t.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/hook", "event_types": ["consent.withdrawn"],
                                        "description": "stop marketing mail"}).status_code == 201
    ada = t.record(email="ada@example.com", user_id="u-ada")
    t.record("analytics", "granted", email="ada@example.com")
    t.record(decision="withdrawn", email="ada@example.com")
    for i in range(6):
        t.record(email=f"person{i}@example.com", decision="granted" if i % 3 else "denied")
    t.record("analytics", "denied", anonymous_id="anon-gpc", source="gpc")
    t.record("product_updates", email="pending@example.com")
    return t, ada


def sign_in(page: Any, live: Live, t: Tenant) -> None:
    page.goto(live.api + "/dashboard")
    assert "/dashboard/sign-in" in page.url
    page.get_by_label("Secret key", exact=True).fill(t.secret_key)
    page.get_by_label("Secret key", exact=True).press("Enter")
    page.wait_for_url(re.compile(r"/dashboard$"))


def test_dashboard_end_to_end(live: Live, context: Any, tmp_path: Path) -> None:
    t, ada = populated(live)
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(live.api + "/")
    assert page.get_by_role("link", name=re.compile("API reference")).count() >= 1
    shot(page, live, "landing")
    page.goto(live.api + "/dashboard/sign-in")
    shot(page, live, "sign-in")
    page.get_by_label("Secret key", exact=True).fill("sk_wrong")
    page.get_by_label("Secret key", exact=True).press("Enter")
    assert page.get_by_role("alert").inner_text().startswith("That is not a live secret key")
    shot(page, live, "sign-in-error")

    page.keyboard.press("Tab")  # the first stop is the skip link
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    sign_in(page, live, t)
    cookie = next(c for c in context.cookies() if c["name"] == "consent_dashboard")
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict" and cookie["secure"] is False
    assert cookie["path"] == "/dashboard" and cookie["expires"] == -1  # a session cookie
    assert page.evaluate("document.cookie") == ""  # HttpOnly: invisible to scripts

    # overview: charts and numbers
    assert page.locator("svg.bar rect").count() >= 3
    assert page.locator("svg.days rect").count() >= 1
    assert page.locator("[data-opt-in=marketing_email]").inner_text() == "57.1 %"  # 4 granted of 7
    assert page.locator("[data-gpc-share]").inner_text() != "–"
    shot(page, live, "overview")

    # search by keyboard, the verified history
    page.get_by_role("link", name="People").click()
    page.get_by_label("Value").fill("ada@example.com")
    page.get_by_label("Value").press("Enter")
    page.wait_for_url(re.compile(rf"/dashboard/people/{ada['subject']}$"))
    assert page.locator("[data-chain]").get_attribute("data-chain") == "verified"
    assert page.locator("[data-verified=yes]").count() == 3
    assert page.locator("[data-purpose=marketing_email] [data-status]").inner_text() == "withdrawn"
    shot(page, live, "person")

    # downloads
    with page.expect_download() as dl:
        page.get_by_role("link", name="Access export (JSON)").click()
    data = json.loads(Path(dl.value.path()).read_text())
    assert data["subject"] == ada["subject"] and len(data["records"]) == 3
    with page.expect_download() as dl:
        page.get_by_role("link", name="Access export (Markdown)").click()
    assert "ada@example.com" in Path(dl.value.path()).read_text()

    # the verifier: a good receipt, a tampered one, an uploaded export
    page.get_by_role("link", name="Verify").click()
    page.get_by_label("Receipt (a JWT)").fill(ada["receipt"])
    page.get_by_role("button", name="Verify receipt").click()
    assert page.locator("[data-result]").get_attribute("data-result") == "verified"
    assert ada["record_hash"] in page.locator("[data-result]").inner_text()
    shot(page, live, "verify-good")
    head, payload, sig = ada["receipt"].split(".")
    page.get_by_label("Receipt (a JWT)").fill(f"{head}.{payload}.{sig[:-4]}{'AAAA' if sig[-4:] != 'AAAA' else 'BBBB'}")
    page.get_by_role("button", name="Verify receipt").click()
    assert page.locator("[data-result]").get_attribute("data-result") == "failed"
    assert "signature does not match" in page.locator("[data-problem]").inner_text()
    shot(page, live, "verify-tampered")
    export = tmp_path / "ledger.jsonl"
    export.write_bytes(t.get("/v1/exports/consents").content)
    page.get_by_label("Export file (JSONL, or CSV)").set_input_files(str(export))
    page.get_by_role("button", name="Verify export").click()
    assert page.locator("[data-result]").get_attribute("data-result") == "verified"
    shot(page, live, "verify-export")

    # erasure behind the typed confirmation
    page.goto(f"{live.api}/dashboard/people/{ada['subject']}")
    page.get_by_label(re.compile("to confirm")).fill(ada["subject"])
    page.get_by_role("button", name="Erase permanently").click()
    assert "Erased" in page.get_by_role("status").inner_text()
    assert page.locator("[data-chain]").get_attribute("data-chain") == "verified"
    assert "ada@example.com" not in page.content()
    shot(page, live, "person-erased")

    page.get_by_role("link", name="Policies").click()
    assert page.locator("tr[data-version=v1]").count() == 1
    assert page.locator("[data-earliest]").inner_text()
    shot(page, live, "policies")
    page.get_by_role("link", name="Exports").click()
    page.get_by_label("Purpose").select_option("marketing_email")
    with page.expect_download() as dl:
        page.get_by_role("button", name="Download export").click()
    assert b'"purpose":"marketing_email"' in Path(dl.value.path()).read_bytes()
    page.goto(live.api + "/dashboard/exports")
    assert page.locator("tr[data-export]").count() == 2  # this one and the one uploaded above
    assert "purpose=marketing_email" in page.locator("tr[data-export]").first.inner_text()
    shot(page, live, "exports")
    page.get_by_role("link", name="Webhooks").click()
    shot(page, live, "webhooks")
    page.get_by_role("link", name="Settings").click()
    assert t.id in page.locator("main").inner_text()
    shot(page, live, "settings")
    page.get_by_role("link", name="Users").click()
    shot(page, live, "users")
    page.get_by_role("link", name="Audit trail").click()
    trail = page.locator("main").inner_text()
    assert all(a in trail for a in ("sign_in", "search", "export_subject", "verify_receipt", "erase_subject",
                                    "start_export"))
    shot(page, live, "audit")

    # sign-out: the cookie is gone and the pages need a sign-in again
    page.get_by_role("button", name="Sign out").click()
    assert "You are signed out" in page.get_by_role("status").inner_text()
    assert not [c for c in context.cookies() if c["name"] == "consent_dashboard"]
    page.goto(live.api + "/dashboard/audit")
    assert "/dashboard/sign-in" in page.url
    assert [e for e in errors if "status of 401" not in e] == []  # only the wrong key's page


def test_api_reference_renders(live: Live, context: Any) -> None:
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(live.api + "/docs")
    page.wait_for_selector(".swagger-ui .opblock-tag", timeout=20_000)
    assert page.locator(".opblock").count() > 30
    assert page.get_by_text("Record one decision").count() >= 1
    shot(page, live, "docs", ours=False)
    assert not errors, errors


def test_read_only_pages_work_without_javascript(live: Live, browser: Any) -> None:
    if live.backend != "sqlite":
        pytest.skip("runs on SQLite; the end-to-end flow also runs on PostgreSQL")
    t, _ = populated(live)
    ctx = browser.new_context(java_script_enabled=False)
    try:
        page = ctx.new_page()
        sign_in(page, live, t)
        assert page.locator("svg.bar rect").count() >= 3
        page.goto(f"{live.api}/dashboard/people?kind=user&q=u-ada")
        assert page.locator("[data-chain]").get_attribute("data-chain") == "verified"
        page.goto(live.api + "/docs")
        assert page.locator("noscript").count() == 1
        page.goto(live.api + "/dashboard/people/sub_nope")
        assert "subject not found" in page.get_by_role("alert").inner_text()
        shot(page, live, "not-found")
    finally:
        ctx.close()


def test_settings_one_audit_trail_versions_chart_and_retry(live: Live, context: Any, db_url: str) -> None:
    from datetime import UTC, datetime, timedelta

    import sqlalchemy as sa

    from consent.store.db import create_db_engine
    from consent.store.models import WebhookDelivery

    t, _ = populated(live)
    t.publish("v2")
    t.record(email="later@example.com")
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    sign_in(page, live, t)

    # the overview's records per day, split by policy version
    assert page.locator("svg.versions rect[data-version=v1]").count() == 1
    assert page.locator("svg.versions rect[data-version=v2]").get_attribute("data-n") == "1"
    assert [s.strip() for s in page.locator("[data-version-key]").all_inner_texts()] == ["v1", "v2"]
    shot(page, live, "overview-versions")

    # settings: an error shows next to its field and saves nothing; fixed, it saves
    page.get_by_role("link", name="Settings").click()
    page.get_by_label("Name").fill("Acme Shop")
    origins = page.get_by_label("Allowed origins")
    origins.fill(origins.input_value() + "\nhttps://shop.example/")
    page.get_by_label("Notice period (days)").fill("21")
    page.get_by_role("button", name="Save settings").click()
    assert "trailing" in page.locator("#allowed_origins-error").inner_text()
    assert origins.get_attribute("aria-invalid") == "true"
    assert page.get_by_label("Name").input_value() == "Acme Shop"  # what was typed stays
    assert t.get("/v1/tenant").json()["name"] == "Acme"
    shot(page, live, "settings-error")
    origins.fill(origins.input_value().replace("https://shop.example/", "https://shop.example"))
    page.get_by_label("Keep the browser's user agent in the evidence").uncheck()
    page.get_by_role("button", name="Save settings").click()
    assert "4 settings changed" in page.get_by_role("status").inner_text()
    got = t.get("/v1/tenant").json()
    assert (got["name"], got["notice_days"], got["store_user_agent"]) == ("Acme Shop", 21, False)
    assert got["allowed_origins"][-1] == "https://shop.example"
    shot(page, live, "settings-saved")
    # rotating: the old publishable key works until the end of its grace period
    page.get_by_label("Rotate").select_option("publishable")
    page.get_by_role("button", name="Rotate").click()
    assert page.locator(f"tr[data-key-prefix='{t.publishable_key[:7]}']").inner_text().count("works until") == 1
    shot(page, live, "settings-rotated")

    # webhooks: one failed delivery retried
    endpoints = t.get("/v1/webhooks").json()
    ep = (endpoints["items"] if isinstance(endpoints, dict) else endpoints)[0]
    delivery = t.get(f"/v1/webhooks/{ep['id']}/deliveries").json()["items"][0]
    engine = create_db_engine(db_url)
    try:
        with engine.begin() as conn:  # what the worker does when a delivery's retry window is over
            conn.execute(sa.update(WebhookDelivery).where(WebhookDelivery.id == delivery["id"]).values(
                status="failed", last_error="connection refused",
                created_at=datetime.now(UTC) - timedelta(days=2)))
    finally:
        engine.dispose()
    page.get_by_role("link", name="Webhooks").click()
    page.get_by_role("button", name=re.compile(rf"Retry delivery {delivery['id']} ")).click()
    assert f"Delivery {delivery['id']} is due again" in page.get_by_role("status").inner_text()
    shot(page, live, "webhooks-retry")

    # one audit trail: the dashboard's events and the tenant's changes, each change once
    page.get_by_role("link", name="Audit trail").click()
    actions = page.locator("tr[data-action]").evaluate_all("rows => rows.map(r => r.dataset.action)")
    assert actions[:3] == ["dashboard.retry_delivery", "keys.rotate", "settings.update"], actions
    assert actions.count("settings.update") == 1 and actions[-1] == "dashboard.sign_in"
    row = page.locator("tr[data-action='settings.update']").inner_text()
    assert "dashboard key:" in row and "Acme Shop" in row
    shot(page, live, "audit-merged")
    assert [e for e in errors if "status of 422" not in e] == []  # only the refused settings form


def test_banner_save_shows_in_the_live_preview(live: Live, context: Any) -> None:
    t = live.tenant()
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    sign_in(page, live, t)
    page.get_by_role("link", name="Banner", exact=True).click()
    page.wait_for_url(re.compile(r"/dashboard/banner$"))
    preview = page.frame_locator("#banner-preview")
    # the real snippet in the frame, with the built-in English texts
    assert preview.get_by_role("dialog").get_by_text("Your privacy choices").first.is_visible()
    page.get_by_label("Language").select_option("de")
    page.get_by_role("button", name="Show").click()
    page.wait_for_url(re.compile(r"lang=de"))
    assert preview.get_by_text("Ihre Datenschutz-Einstellungen").first.is_visible()
    page.get_by_label("Brand colour").fill("#eeeeee")
    page.get_by_role("button", name="Save banner").click()
    assert page.locator("#brand-error").inner_text().startswith("brand #eeeeee is too light")
    shot(page, live, "banner-error")
    page.get_by_label("title", exact=True).fill("Ihre Wahl bei Acme")
    page.get_by_label("Brand colour").fill("#7a1f5c")
    page.get_by_label("Layout").select_option("bar")
    page.get_by_role("button", name="Save banner").click()
    page.wait_for_url(re.compile(r"saved=1"))
    assert page.get_by_role("status").first.inner_text().startswith("Saved as settings version 1")
    title = preview.get_by_text("Ihre Wahl bei Acme").first
    title.wait_for()
    assert title.is_visible()
    brand = preview.get_by_role("button", name="Alle akzeptieren").evaluate("b => getComputedStyle(b).backgroundColor")
    assert brand == "rgb(122, 31, 92)"
    shot(page, live, "banner")
    # a choice in the preview goes nowhere (the preview has no consents route: a 404, which the
    # snippet drops), and the next load asks again
    page.locator("#banner-preview").scroll_into_view_if_needed()
    with page.expect_response(lambda r: "/dashboard/banner/preview/v1/snippet/consents" in r.url) as sent:
        preview.get_by_role("button", name="Alle akzeptieren").click()
    assert sent.value.status == 404
    page.reload()
    preview.get_by_text("Ihre Wahl bei Acme").first.wait_for()
    assert [e for e in errors if "status of 422" not in e and "status of 404" not in e] == [], errors
