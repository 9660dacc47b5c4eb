"""How the current state of a purpose is derived from the ledger: one small pure rule,
shared by the check queries, exports and the property tests' reference model."""

from __future__ import annotations

STALE_DECISIONS = frozenset(("granted", "acknowledged"))  # what a newer material version re-asks
STATUSES = ("granted", "denied", "withdrawn", "acknowledged", "stale", "pending_confirmation", "none")


def derive_status(decision: str | None, *, confirmed: bool, stale: bool) -> str:
    """Status of a purpose given its latest decision.

    ``stale``: a material version covering the purpose, newer than the one the decision was
    made under, is in effect. Only a yes goes stale (a grant or an acknowledgement no longer
    counts until given again); a denial or withdrawal stays what it is whatever version it
    named, because a new policy text cannot turn a person's no into a question.
    """
    if decision is None:
        return "none"
    if stale and decision in STALE_DECISIONS:
        return "stale"
    if decision == "granted" and not confirmed:
        return "pending_confirmation"
    return decision


def is_allowed(status: str) -> bool:
    """Only a valid, current grant allows."""
    return status == "granted"
