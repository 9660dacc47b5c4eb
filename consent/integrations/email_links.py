"""Signed email links: RFC 8058 one-click unsubscribe and double-opt-in confirmation.

A token is an itsdangerous payload ``{t: tenant, s: subject, p: purpose, n: link id[, e: expiry]}``
signed with the tenant's link secrets (``Tenant.token_secret`` then the rotated-in
``email_link_secret`` rows, newest last: new links use the newest, old links keep working), with
one salt per use (``unsubscribe`` / ``confirm``) so one kind can never be replayed as the other.
The payload holds our subject id, never an email address. Acting on a link is idempotent per
link id (it becomes the record's Idempotency-Key).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from consent import crypto
from consent.errors import BadToken, Conflict, Gone, IdempotencyConflict, ValidationFailed
from consent.ledger import recorder
from consent.ledger.catalog import get_purpose
from consent.ledger.schemas import ConsentIn, Evidence, SubjectRef
from consent.store.models import ConsentState, EmailLinkSecret, Purpose, Subject, Tenant, utcnow
from consent.store.tables import EMAIL_LINK_SECRET, RECORD, TENANT

SALTS = ("unsubscribe", "confirm")
ONE_CLICK = "List-Unsubscribe=One-Click"


@dataclass(frozen=True)
class Link:
    """A verified link: whose, for what, and its id."""

    kind: str
    tenant: Tenant
    subject_id: str
    purpose: Purpose
    link_id: str
    expires_at: datetime | None


def link_secrets(db: Session, tenant: Tenant) -> list[str]:
    """The tenant's link secrets, oldest first (itsdangerous signs with the last)."""
    t = EMAIL_LINK_SECRET
    extra = db.execute(sa.select(t.c.secret).where(t.c.tenant_id == tenant.id)
                       .order_by(t.c.created_at, t.c.id)).scalars()
    return [tenant.token_secret, *extra]


def rotate_secret(db: Session, tenant: Tenant) -> int:
    """Add a new newest link secret; links signed with older ones stay valid. Returns the count."""
    db.add(EmailLinkSecret(id=crypto.new_id("els", 8), tenant_id=tenant.id, secret=crypto.new_secret_hex(),
                           created_at=utcnow()))
    db.flush()
    return len(link_secrets(db, tenant))


def retire_secrets(db: Session, tenant: Tenant) -> int:
    """Keep only the newest link secret: links signed with any older one stop working (after a
    leak, or once the links sent before a rotation have expired). Returns the count (1)."""
    newest = link_secrets(db, tenant)[-1]
    t = EMAIL_LINK_SECRET
    db.execute(sa.update(TENANT).where(TENANT.c.id == tenant.id)
               .values(token_secret=newest))
    db.execute(sa.delete(t).where(t.c.tenant_id == tenant.id))
    tenant.token_secret = newest
    db.flush()
    return len(link_secrets(db, tenant))


def make_links(db: Session, tenant: Tenant, ref: SubjectRef, purpose_key: str, *, issuer: str,
               confirm_days: int) -> dict[str, Any]:
    """Unsubscribe URL and List-Unsubscribe headers, plus a confirm URL for double-opt-in purposes."""
    purpose = get_purpose(db, tenant.id, purpose_key)
    if purpose is None:
        raise ValidationFailed.field("purpose", f"unknown purpose {purpose_key!r}")
    if purpose.kind != "consent":
        raise ValidationFailed.field("purpose", "email links are for consent purposes, not notices")
    subject = recorder.resolve_subject(db, tenant, ref)  # a link may precede the first record
    secrets = link_secrets(db, tenant)
    base = {"t": tenant.id, "s": subject.id, "p": purpose.key}
    unsub = crypto.serializer(secrets, "unsubscribe").dumps({**base, "n": crypto.new_secret_hex(8)})
    url = f"{issuer}/u/{unsub}"
    out: dict[str, Any] = {
        "subject": subject.id, "purpose": purpose.key, "unsubscribe_url": url,
        "headers": {"List-Unsubscribe": f"<{url}>", "List-Unsubscribe-Post": ONE_CLICK},
        "confirm_url": None, "confirm_expires_at": None,
    }
    if purpose.double_opt_in:
        expires = utcnow().replace(microsecond=0) + timedelta(days=confirm_days)
        tok = crypto.serializer(secrets, "confirm").dumps(
            {**base, "n": crypto.new_secret_hex(8), "e": int(expires.timestamp())})
        out.update(confirm_url=f"{issuer}/c/{tok}", confirm_expires_at=expires)
    return out


def verify(db: Session, token: str, kind: str) -> Link:
    """Check a link token's signature against its tenant's secrets; BadToken / Gone otherwise."""
    assert kind in SALTS
    if not token or len(token) > 1000:
        raise BadToken("not a link this service issued")
    claimed = crypto.peek_token(token)
    if not isinstance(claimed, dict) or not isinstance(claimed.get("t"), str):
        raise BadToken("not a link this service issued")
    tenant = db.get(Tenant, claimed["t"])
    if tenant is None or tenant.closed_at is not None:
        raise BadToken("not a link this service issued")
    payload = crypto.loads_token(crypto.serializer(link_secrets(db, tenant), kind), token)
    if not isinstance(payload, dict) or payload.get("t") != tenant.id:
        raise BadToken("not a link this service issued")
    expires = None
    if "e" in payload:
        expires = datetime.fromtimestamp(int(payload["e"]), UTC)
        if time.time() > payload["e"]:
            raise Gone(f"this link expired on {expires.isoformat()}; ask for a new confirmation email",
                       code="token_expired", expired_at=crypto.iso(expires))
    purpose = get_purpose(db, tenant.id, str(payload.get("p")))
    if purpose is None:
        raise Gone("the subscription this link was for no longer exists", code="link_gone")
    # Checked here, before any page or action: an erased person's link (even one already
    # used, whose withdrawal would otherwise be answered as "already done") is gone.
    subject = recorder.follow_merges(db, db.get(Subject, str(payload.get("s"))))
    if subject is None or subject.tenant_id != tenant.id or subject.erased_at is not None:
        raise Gone("the person this link was for has been erased", code="link_gone")
    return Link(kind, tenant, subject.id, purpose, str(payload.get("n")), expires)


def _subject_ref(db: Session, link: Link) -> SubjectRef:
    subject = db.get(Subject, link.subject_id)
    if subject is None or subject.tenant_id != link.tenant.id or subject.erased_at is not None:
        raise Gone("the person this link was for has been erased", code="link_gone")
    rows = db.execute(sa.select(recorder.SI.c.kind, recorder.SI.c.value).where(
        recorder.SI.c.tenant_id == link.tenant.id, recorder.SI.c.subject_id == subject.id,
        recorder.SI.c.value.is_not(None))).all()
    by_kind = {r.kind: r.value for r in rows}
    for kind, field in (("user", "user_id"), ("email", "email"), ("anon", "anonymous_id")):
        if kind in by_kind:
            return SubjectRef(**{field: by_kind[kind]})
    raise Gone("the person this link was for has been erased", code="link_gone")


def _act(db: Session, link: Link, spec: ConsentIn, key: str, *, signer: crypto.Signer, issuer: str,
         ip: str | None, user_agent: str | None, confirmed: bool | None = None) -> tuple[Any, bool]:
    existing = recorder.find_by_idempotency_key(db, link.tenant.id, key)
    if existing is not None:
        return existing, False
    try:
        result = recorder.record_decision(db, link.tenant, spec, signer=signer, issuer=issuer, idempotency_key=key,
                                        ip=ip, user_agent=user_agent, confirmed=confirmed)
    except IdempotencyConflict:  # the same link used twice at the same moment: the first one won
        existing = recorder.find_by_idempotency_key(db, link.tenant.id, key)
        assert existing is not None
        return existing, False
    return result.record, result.created


def unsubscribe(db: Session, link: Link, *, one_click: bool, signer: crypto.Signer, issuer: str,
                ip: str | None, user_agent: str | None) -> tuple[Any, bool]:
    """Withdraw consent for the link's purpose; (record, created).

    Idempotent: while the purpose is already withdrawn or denied nothing is recorded (a mail
    provider's retry, a second click). An old link still works after the person subscribes
    again: the key includes the state it acted on, so a concurrent double POST records once.
    """
    state = pending_state(db, link)
    if state is not None and state.decision in ("withdrawn", "denied"):
        rec = RECORD
        latest = db.execute(sa.select(recorder.ConsentRecord).where(rec.c.seq == state.record_seq)).scalar_one()
        return latest, False
    spec = ConsentIn(subject=_subject_ref(db, link), purpose=link.purpose.key, decision="withdrawn",
                     source="email_link",
                     evidence=Evidence.model_validate({"method": "rfc8058_one_click" if one_click else "unsubscribe_page",
                                                       "link_id": link.link_id}))
    key = f"email_link:unsubscribe:{link.link_id}:{state.record_seq if state else 0}"
    return _act(db, link, spec, key, signer=signer, issuer=issuer, ip=ip, user_agent=user_agent)


def pending_state(db: Session, link: Link) -> ConsentState | None:
    return db.get(ConsentState, (link.tenant.id, link.subject_id, link.purpose.key))


def confirm(db: Session, link: Link, *, signer: crypto.Signer, issuer: str, ip: str | None,
            user_agent: str | None) -> tuple[Any, bool]:
    """Confirm a pending double-opt-in grant: records a confirmed grant; idempotent per link."""
    key = f"email_link:confirm:{link.link_id}"
    existing = recorder.find_by_idempotency_key(db, link.tenant.id, key)
    if existing is not None:
        return existing, False
    state = pending_state(db, link)
    if state is None or state.decision != "granted":
        raise Conflict("there is no pending subscription to confirm (it was withdrawn or never made)",
                       code="nothing_to_confirm")
    if state.confirmed:
        raise Conflict("this subscription is already confirmed", code="already_confirmed")
    rec = RECORD
    pending = db.execute(sa.select(rec.c.id).where(rec.c.seq == state.record_seq)).scalar()
    spec = ConsentIn(subject=_subject_ref(db, link), purpose=link.purpose.key, decision="granted",
                     source="email_link", policy=state.policy_key or "privacy",
                     policy_version=state.policy_version,
                     evidence=Evidence.model_validate({"method": "double_opt_in_confirmation", "link_id": link.link_id,
                                                         "pending_record_id": pending}))
    return _act(db, link, spec, key, signer=signer, issuer=issuer, ip=ip, user_agent=user_agent, confirmed=True)
