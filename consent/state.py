"""How the current state of a purpose is derived from the ledger: one small pure rule,
shared by the check queries, exports and the property tests' reference model."""

from __future__ import annotations

STATUSES = ("granted", "denied", "withdrawn", "acknowledged", "stale", "pending_confirmation", "none")


def derive_status(decision: str | None, *, confirmed: bool, stale: bool) -> str:
    """Status of a purpose given its latest decision.

    ``stale``: a material version covering the purpose, newer than the one the decision was
    made under, is in effect; the decision no longer counts until given again. A withdrawal
    made without a policy version is never stale (nothing to re-ask against).
    """
    if decision is None:
        return "none"
    if stale:
        return "stale"
    if decision == "granted" and not confirmed:
        return "pending_confirmation"
    return decision


def is_allowed(status: str) -> bool:
    """Only a valid, current grant allows."""
    return status == "granted"
