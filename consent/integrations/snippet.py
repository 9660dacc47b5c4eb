"""What the browser snippet needs: its config (policy version, purposes with the version label
whose answer counts, cookie disclosures, the tenant's texts and theme over the built-in ones in
snippet_texts.py), the tenant's versioned snippet settings, recording a visitor's choices (GPC
opt-outs once per subject, purpose and version) and linking an anonymous id to a user id. No
Starlette here; the HTTP side (CORS, ETag) is in api_snippet.py."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.orm import Session

from consent import crypto
from consent.errors import BadToken, Conflict, Forbidden, NotFound, Unauthorized, ValidationFailed
from consent.integrations.schemas_snippet import SnippetConsentsIn, SnippetSettingsIn
from consent.integrations.snippet_texts import LIST_SEPARATOR, RTL, TEXTS, human_lifetime
from consent.ledger import subject_tokens
from consent.ledger.catalog import current_version, get_purpose, get_version, list_purposes
from consent.ledger.checks import subject_states
from consent.ledger.recorder import (
    NewRecord,
    find_subject_id,
    lock_subject,
    record_decision,
    resolve_subject,
)
from consent.ledger.schemas import ConsentIn, Evidence, Source, SubjectRef
from consent.store.models import (
    ConsentRecord,
    PolicyVersion,
    Purpose,
    SnippetSettings,
    Tenant,
    utcnow,
)
from consent.store.tables import (
    POLICY_PURPOSE,
    POLICY_VERSION,
    PURPOSE,
    SNIPPET_SETTINGS,
    STATE,
    TENANT,
)
from consent.store.tables import SUBJECT_IDENTIFIER as SI

LANG_RE = re.compile(r"^[a-z]{2,3}$")


def lang_key(requested: str | None, default: str) -> str:
    """What a built config is cached under: the primary language subtag asked for (``de-AT``
    -> ``de``) and the tenant's default (``build_config`` falls back to it when it has no
    texts for the one asked for, so a new default must not find the old one's config)."""
    asked, fallback = ((tag or "").strip().lower().split("-")[0] for tag in (requested, default))
    fallback = fallback if LANG_RE.match(fallback) else "en"
    return f"{asked}/{fallback}" if LANG_RE.match(asked) and asked != fallback else fallback


def pick_lang(requested: str | None, default: str, extra: Any = ()) -> str:
    """The first language with texts (built-in, or the tenant's own in ``extra``) among
    ``requested`` (e.g. ``de-AT`` -> ``de``), the tenant's default and English."""
    for tag in (requested, default):
        if tag:
            primary = tag.strip().lower().split("-")[0]
            if primary in TEXTS or primary in extra:
                return primary
    return "en"


def current_settings(db: Session, tenant_id: str) -> SnippetSettings | None:
    """The tenant's newest snippet settings row, or None while the built-in defaults apply."""
    return db.execute(sa.select(SnippetSettings).where(SnippetSettings.tenant_id == tenant_id)  # type: ignore[arg-type]
                      .order_by(SnippetSettings.version.desc()).limit(1)).scalars().first()  # type: ignore[attr-defined]


def settings_out(row: SnippetSettings | None) -> dict[str, Any]:
    """The API shape of a settings row (the defaults when there is none)."""
    defaults = SnippetSettingsIn()
    return {"version": row.version if row else 0, "texts": row.texts if row else {},
            "theme": row.theme if row else defaults.theme.model_dump(),
            "refusal_cooldown_days": row.refusal_cooldown_days if row else defaults.refusal_cooldown_days,
            "created_at": row.created_at if row else None, "languages": sorted(TEXTS)}


def get_settings(db: Session, tenant_id: str, version: int | None = None) -> dict[str, Any]:
    """The current settings, or one earlier ``version`` (404 if there is none)."""
    if version is None:
        return settings_out(current_settings(db, tenant_id))
    if version == 0:
        return settings_out(None)
    row = db.get(SnippetSettings, (tenant_id, version))
    if row is None:
        raise NotFound(f"no snippet settings version {version}")
    return settings_out(row)


def put_settings(db: Session, tenant_id: str, spec: SnippetSettingsIn) -> dict[str, Any]:
    """Store ``spec`` as the tenant's next settings version (earlier ones are kept)."""
    lock_tenant(db, tenant_id)  # two concurrent PUTs must not both take the same version number
    latest = current_settings(db, tenant_id)
    row = SnippetSettings(
        tenant_id=tenant_id, version=(latest.version if latest else 0) + 1,
        # one language per primary subtag (de-AT -> de), as the config picks languages
        texts={lang.lower().split("-")[0]: dict(t) for lang, t in spec.texts.items()},
        theme=spec.theme.model_dump(), refusal_cooldown_days=spec.refusal_cooldown_days, created_at=utcnow())
    db.add(row)
    db.flush()
    return settings_out(row)


def lock_tenant(db: Session, tenant_id: str) -> None:
    """Serialise writers of one tenant's settings (PostgreSQL row lock; SQLite has one writer)."""
    t = TENANT
    db.execute(sa.select(t.c.id).where(t.c.id == tenant_id).with_for_update())


def translated(translations: dict[str, Any] | None, lang: str) -> dict[str, Any]:
    """The translation for ``lang`` (keys compared case-insensitively, region tags accepted)."""
    for key, value in (translations or {}).items():
        if key.lower().split("-")[0] == lang and isinstance(value, dict):
            return value
    return {}


def ask_labels(db: Session, version: PolicyVersion, now: Any) -> dict[str, str]:
    """Per purpose of ``version``: the label of the newest material version in effect covering
    it, else of the first version covering it. An answer given for that label still counts."""
    pp = POLICY_PURPOSE
    pv = POLICY_VERSION
    rows = db.execute(
        sa.select(pp.c.purpose, pv.c.version, pv.c.material)
        .select_from(pp.join(pv, pv.c.id == pp.c.policy_version_id))
        .where(pp.c.tenant_id == version.tenant_id, pp.c.policy_key == version.policy_key,
               pp.c.purpose.in_(version.purposes), pp.c.effective_at <= now)
        .order_by(pv.c.id)
    ).all()
    first: dict[str, str] = {}
    material: dict[str, str] = {}
    for r in rows:
        first.setdefault(r.purpose, r.version)
        if r.material:
            material[r.purpose] = r.version
    return {p: material.get(p) or first.get(p) or version.version for p in version.purposes}


def build_config(db: Session, tenant: Tenant, policy_key: str, lang: str | None) -> dict[str, Any]:
    """The snippet's config for the policy version in effect now, in one language."""
    now = utcnow()
    version = current_version(db, tenant.id, policy_key, at=now)
    if version is None:
        raise NotFound(f"policy {policy_key!r} has no version in effect", code="no_policy_version")
    settings = current_settings(db, tenant.id)
    own: dict[str, dict[str, str]] = settings.texts if settings else {}
    chosen = pick_lang(lang, tenant.default_lang, own)
    pt = PURPOSE
    purposes = {p.key: p for p in db.execute(
        sa.select(Purpose).where(pt.c.tenant_id == tenant.id, pt.c.key.in_(version.purposes))
    ).scalars()}
    asks = ask_labels(db, version, now)
    out_purposes = []
    for key in version.purposes:
        p = purposes.get(key)
        if p is None:  # purposes are never deleted; be robust anyway
            continue
        tr = translated(p.translations, chosen)
        out_purposes.append({
            "key": p.key, "kind": p.kind, "legal_basis": p.legal_basis, "double_opt_in": p.double_opt_in,
            "gpc": p.gpc, "ask": asks[key], "title": tr.get("title") or p.title or p.key,
            "description": tr.get("description") or p.description,
        })
    # built-in texts of the language (English for a language only the tenant wrote), then the
    # tenant's own words for it
    texts = {**TEXTS.get(chosen, TEXTS["en"]), **own.get(chosen, {})}
    titles = LIST_SEPARATOR.get(chosen, ", ").join(str(p["title"]) for p in out_purposes)
    texts = {k: v.replace("{purposes}", titles) for k, v in texts.items()}
    cookies = []
    for c in version.cookies:
        tr = translated(c.get("translations"), chosen)
        cookies.append({k: v for k, v in c.items() if k != "translations"}
                       | {"description": tr.get("description") or c.get("description", ""),
                          "lifetime_text": human_lifetime(c.get("lifetime", "session"), chosen,
                                                          texts["session_lifetime"])})
    defaults = SnippetSettingsIn()
    return {
        "tenant": tenant.id,
        "lang": chosen,
        "dir": "rtl" if chosen in RTL else "ltr",
        "policy": {"key": version.policy_key, "version": version.version, "url": version.document_url,
                   "sha256": version.document_sha256, "effective_at": version.effective_at},
        "purposes": out_purposes,
        "cookies": cookies,
        "texts": texts,
        "theme": settings.theme if settings else defaults.theme.model_dump(),
        "cooldown_days": settings.refusal_cooldown_days if settings else defaults.refusal_cooldown_days,
        "settings_version": settings.version if settings else 0,
    }


def stamp_columns(tenant_id: Any) -> list[Any]:
    """``config_stamp``'s values as scalar subqueries with parameters ``k`` (policy key) and
    ``now``; ``tenant_id`` is a bound parameter or a column of an enclosing query
    (an enclosing query may read the stamp with its own rows)."""
    pv = POLICY_VERSION
    pp = POLICY_PURPOSE
    pt = PURPOSE
    ss = SNIPPET_SETTINGS
    policy_key: Any = sa.bindparam("k")
    now = sa.bindparam("now", type_=pv.c.effective_at.type)
    of_policy = (pv.c.tenant_id == tenant_id, pv.c.policy_key == policy_key)
    return [
        sa.select(sa.func.max(pv.c.id)).where(*of_policy).scalar_subquery(),
        sa.select(sa.func.max(pv.c.effective_at)).where(*of_policy, pv.c.effective_at <= now).scalar_subquery(),
        sa.select(sa.func.max(pp.c.effective_at)).where(
            pp.c.tenant_id == tenant_id, pp.c.policy_key == policy_key, pp.c.effective_at <= now).scalar_subquery(),
        sa.select(sa.func.count()).select_from(pt).where(pt.c.tenant_id == tenant_id).scalar_subquery(),
        sa.select(sa.func.max(pt.c.updated_at)).where(pt.c.tenant_id == tenant_id).scalar_subquery(),
        sa.select(sa.func.max(ss.c.version)).where(ss.c.tenant_id == tenant_id).scalar_subquery(),
    ]


# Perf: built once; SQLAlchemy then compiles it once (building it per request was ~20 % of a
# snippet config request's CPU).
_STAMP = sa.select(*stamp_columns(sa.bindparam("t")))


def config_stamp(db: Session, tenant_id: str, policy_key: str, now: Any) -> tuple[Any, ...]:
    """One cheap query whose answer changes whenever ``build_config``'s answer can: the newest
    version of the policy (versions and their policy_purpose rows are immutable), the newest
    ``effective_at`` reached by ``now`` (a scheduled version taking effect, a purpose's ask
    label moving), the tenant's purposes (count and newest ``updated_at``: every edit
    stamps it) and the newest version of its snippet settings (texts, theme). The tenant's language is part of the cache key, not of the stamp."""
    return tuple(db.connection().execute(_STAMP, {"t": tenant_id, "k": policy_key, "now": now}).one())


@dataclass(frozen=True)
class Visit:
    """What the HTTP request tells us about the visitor (evidence and signals)."""

    origin: str | None
    ip: str | None
    user_agent: str | None
    sec_gpc: bool


def subject_for(db: Session, tenant: Tenant, body: SnippetConsentsIn) -> tuple[SubjectRef, str]:
    """The subject to record for, and the subject token's state (none or valid).

    The publishable key and the anonymous id are both readable by any script on the page, so
    together they prove nothing about who is choosing: they may write only for a subject that
    is anonymous. A subject known by a user id (linked, or attached by a valid token) changes
    only with a valid subject token; an expired token is refused, never downgraded to the
    anonymous id. A valid token records for its user id (a new anonymous id joins that person)."""
    if not body.subject_token:
        assert body.anonymous_id is not None  # the schema requires one of the two
        _anonymous_only(db, tenant, body.anonymous_id)
        return SubjectRef(anonymous_id=body.anonymous_id), "none"
    try:
        user_id = subject_tokens.verify(db, tenant, body.subject_token)
    except BadToken as exc:
        if exc.code == "bad_token":
            raise
        raise Unauthorized(exc.detail, code=exc.code) from None
    return SubjectRef(user_id=user_id, anonymous_id=body.anonymous_id), "valid"


def _anonymous_only(db: Session, tenant: Tenant, anonymous_id: str) -> None:
    """403 ``subject_token_required`` when the anonymous id belongs to an identified subject."""
    sid = find_subject_id(db, tenant, "anon", anonymous_id)
    if sid is None:
        return
    identified = db.execute(sa.select(SI.c.subject_id).where(
        SI.c.tenant_id == tenant.id, SI.c.subject_id == sid, SI.c.kind != "anon").limit(1)).first()
    if identified is not None:
        raise Forbidden("this anonymous id belongs to a signed-in person: send a valid subject_token "
                        "to change their choices", code="subject_token_required")


def _gpc_opt_out_on_record(db: Session, tenant: Tenant, ref: SubjectRef, purpose: str,
                           version: str | None) -> ConsentRecord | None:
    """The subject's current record for ``purpose`` if it already is a GPC denial under
    ``version`` (so a repeated signal on every page view is not recorded again)."""
    sid = None
    if ref.user_id:
        sid = find_subject_id(db, tenant, "user", ref.user_id)
    if sid is None and ref.anonymous_id:
        sid = find_subject_id(db, tenant, "anon", ref.anonymous_id)
    if sid is None:
        return None
    rec = db.execute(
        sa.select(ConsentRecord)
        .join(STATE, STATE.c.record_seq == ConsentRecord.seq)
        .where(STATE.c.tenant_id == tenant.id, STATE.c.subject_id == sid, STATE.c.purpose == purpose)
    ).scalars().first()
    if rec is not None and rec.source == "gpc" and rec.decision == "denied" and rec.policy_version == version:
        return rec
    return None


def _prefixed(exc: ValidationFailed, prefix: str) -> ValidationFailed:
    return ValidationFailed([{**e, "field": prefix + e["field"]} for e in exc.errors])


def record_choices(db: Session, tenant: Tenant, body: SnippetConsentsIn, visit: Visit, *,
                   signer: crypto.Signer, issuer: str) -> dict[str, Any]:
    """Record every choice of one snippet submission (all or nothing)."""
    ref, token_state = subject_for(db, tenant, body)
    now = utcnow()
    if body.policy_version:
        version = get_version(db, tenant.id, body.policy, body.policy_version)
        if version is None or version.effective_at > now:
            raise ValidationFailed.field("policy_version", f"policy {body.policy!r} has no version "
                                         f"{body.policy_version!r} in effect")
    gpc = body.gpc or visit.sec_gpc
    evidence: dict[str, Any] = {"origin": visit.origin} if visit.origin else {}
    if gpc:
        evidence["gpc"] = True
    records: list[dict[str, Any]] = []
    subject_id = None
    for i, choice in enumerate(body.choices):
        purpose = get_purpose(db, tenant.id, choice.purpose)
        if purpose is None:
            raise ValidationFailed.field(f"choices[{i}].purpose", f"unknown purpose {choice.purpose!r}")
        source: Source = "gpc" if gpc and purpose.gpc and choice.decision == "denied" else "snippet"
        if source == "gpc":
            label = body.policy_version
            if label is None:
                v = current_version(db, tenant.id, body.policy, at=now, purpose=purpose.key)
                label = v.version if v else None
            existing = _gpc_opt_out_on_record(db, tenant, ref, purpose.key, label)
            if existing is not None:
                subject_id = existing.subject_id
                records.append(_out(existing, "denied", created=False))
                continue
        spec = ConsentIn(subject=ref, purpose=purpose.key, decision=choice.decision, policy=body.policy,
                         policy_version=body.policy_version, source=source,
                         evidence=Evidence.model_validate(evidence) if evidence else None)
        try:
            result = record_decision(
                db, tenant, spec, signer=signer, issuer=issuer,
                idempotency_key=f"snippet:{choice.idempotency_key}" if choice.idempotency_key else None,
                ip=visit.ip, user_agent=visit.user_agent, gpc=gpc)
        except ValidationFailed as exc:
            raise _prefixed(exc, f"choices[{i}].") from None
        subject_id = result.record.subject_id
        records.append(_out(result.record, result.status, created=result.created))
    return {"subject": subject_id, "subject_token": token_state, "records": records}


def _out(record: ConsentRecord | NewRecord, status: str, *, created: bool) -> dict[str, Any]:
    return {"purpose": record.purpose, "decision": record.decision, "status": status,
            "source": record.source, "record_id": record.id, "created": created, "receipt": record.receipt}


def link(db: Session, tenant: Tenant, anonymous_id: str, user_id: str, *, signer: crypto.Signer,
         issuer: str) -> dict[str, Any]:
    """Link an anonymous id to a user id (see docs/snippet.md, "Linking").

    - anonymous id unknown: it is attached to the user's subject (created if needed);
    - user id unknown: it is attached to the anonymous subject, which becomes the user's;
    - both known on different subjects: the anonymous identifier moves to the user's subject,
      and for each purpose where the anonymous subject's decision is newer than the user's (or
      the user has none), that decision is appended to the user's chain, pointing at the
      original record. The anonymous subject keeps its own records (append-only) for audit.
    An anonymous id already linked to a different user id is a 409.
    """
    anon_sid = find_subject_id(db, tenant, "anon", anonymous_id)
    user_sid = find_subject_id(db, tenant, "user", user_id)
    if anon_sid is not None and anon_sid == user_sid:
        return {"subject": user_sid, "outcome": "already_linked", "carried_over": []}
    if anon_sid is not None:
        other = db.execute(sa.select(SI.c.value_hash).where(
            SI.c.tenant_id == tenant.id, SI.c.subject_id == anon_sid, SI.c.kind == "user")).first()
        if other is not None:
            raise Conflict("this anonymous id is already linked to another user id", code="already_linked")
    ref = SubjectRef(user_id=user_id, anonymous_id=anonymous_id)
    if anon_sid is None or user_sid is None:
        subject = resolve_subject(db, tenant, ref)
        return {"subject": subject.id, "outcome": "created" if anon_sid is None and user_sid is None
                else "attached", "carried_over": []}
    for sid in sorted((anon_sid, user_sid)):  # one lock order, no deadlock between two links
        lock_subject(db, sid)
    h = crypto.keyed_hash(tenant.hash_key, "anon", anonymous_id)
    db.execute(sa.update(SI).where(SI.c.tenant_id == tenant.id, SI.c.kind == "anon", SI.c.value_hash == h)
               .values(subject_id=user_sid))
    states = {sid: {r.purpose: r for r in db.execute(
        sa.select(STATE).where(STATE.c.tenant_id == tenant.id, STATE.c.subject_id == sid)).all()}
        for sid in (anon_sid, user_sid)}
    carried = []
    for purpose, a in sorted(states[anon_sid].items()):
        u = states[user_sid].get(purpose)
        if u is not None and u.recorded_at >= a.recorded_at:
            continue
        original = db.execute(sa.select(ConsentRecord).where(ConsentRecord.seq == a.record_seq)).scalar_one()
        spec = ConsentIn(subject=SubjectRef(user_id=user_id), purpose=purpose, decision=a.decision,
                         policy=a.policy_key or "privacy", policy_version=a.policy_version,
                         source=cast(Source, original.source),
                         evidence=Evidence.model_validate({"linked_from_record": original.id}))
        result = record_decision(db, tenant, spec, signer=signer, issuer=issuer, confirmed=a.confirmed,
                                 gpc=bool(original.gpc))
        carried.append({"purpose": purpose, "decision": a.decision, "from_record": original.id,
                        "record_id": result.record.id})
    return {"subject": user_sid, "outcome": "merged", "carried_over": carried}


GPC_HONORED = "Opt-Out Preference Signal Honored"  # CCPA regulations § 7025(c)(6)


def gpc_status(db: Session, tenant: Tenant, *, anonymous_id: str | None, signal: bool) -> dict[str, Any]:
    """Whether this visitor's Global Privacy Control signal is honoured: every purpose marked
    ``gpc`` is opted out (denied or withdrawn). An explicit opt-in made while the signal was on
    is the visitor's own choice: kept, shown with ``gpc: true``, and then not "honoured"."""
    sid = find_subject_id(db, tenant, "anon", anonymous_id) if anonymous_id else None
    states = subject_states(db, tenant, sid) if sid else []
    by_purpose = {s["purpose"]: s for s in states}
    purposes = []
    for p in list_purposes(db, tenant.id):
        if not (p.gpc and p.kind == "consent"):
            continue
        s = by_purpose.get(p.key)
        status = s["status"] if s else "none"
        purposes.append({"purpose": p.key, "status": status, "gpc": bool(s and s["gpc"]),
                         "opted_out": status in ("denied", "withdrawn")})
    honored = signal and bool(purposes) and all(p["opted_out"] for p in purposes)
    return {"signal": signal, "honored": honored, "message": GPC_HONORED if honored else None,
            "purposes": purposes}
