"""The demo tenant created on first start of the embedded default: a typical small SaaS."""

from __future__ import annotations

import hashlib
from typing import Any

from sqlalchemy.orm import Session

from consent.ledger import catalog, tenants
from consent.ledger.schemas import CookieIn, PolicyVersionIn, PurposeIn, TenantIn, Translation

DEMO_POLICY_TEXT = b"Demo privacy policy: one HttpOnly session cookie; marketing email is opt-in only."


def seed_demo(db: Session, origins: list[str]) -> dict[str, Any]:
    """Create the demo tenant with purposes, a session cookie and a policy version."""
    tenant, keys = tenants.create_tenant(db, TenantIn(name="Demo", allowed_origins=origins, notice_days=30))
    purposes = {
        "strictly_necessary": PurposeIn(kind="notice", legal_basis="legitimate_interest",
                                        title="Strictly necessary",
                                        description="Keeps you signed in. Cannot be switched off.",
                                        translations={"de": Translation(title="Unbedingt erforderlich",
                                                                        description="Hält Sie angemeldet.")}),
        "marketing_email": PurposeIn(kind="consent", legal_basis="consent", gpc=True,
                                     title="Marketing email",
                                     description="News and offers by email. You can unsubscribe at any time.",
                                     translations={"de": Translation(
                                         title="Marketing-E-Mails",
                                         description="Neuigkeiten und Angebote per E-Mail.")}),
        "product_updates": PurposeIn(kind="consent", legal_basis="consent", double_opt_in=True,
                                     title="Product updates",
                                     description="Occasional email about new features.",
                                     translations={"de": Translation(title="Produkt-Updates")}),
        "analytics": PurposeIn(kind="consent", legal_basis="consent", gpc=True, title="Analytics",
                               description="Anonymous usage statistics that help us improve.",
                               translations={"de": Translation(title="Statistik")}),
    }
    for key, spec in purposes.items():
        catalog.put_purpose(db, tenant.id, key, spec)
    catalog.put_cookie(db, tenant.id, "session", CookieIn(
        provider="demo.example", purpose="strictly_necessary", http_only=True, secure=True,
        same_site="Lax", lifetime="session", description="Keeps you signed in; ends at sign-out."))
    catalog.publish_version(db, tenant.id, tenant.notice_days, "privacy", PolicyVersionIn(
        version="2026-01", document_url="https://demo.example/privacy",
        document_sha256=hashlib.sha256(DEMO_POLICY_TEXT).hexdigest(), material=False,
        purposes=list(purposes)))
    return {"tenant_id": tenant.id, "secret_key": keys["secret"], "publishable_key": keys["publishable"]}
