"""Docs that are tested: every setting the code reads and every route is in the README."""

from __future__ import annotations

import re
from pathlib import Path

from starlette.routing import Route

from consent.app import routes

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_every_setting_is_documented() -> None:
    code = "".join(p.read_text() for p in (ROOT / "consent").glob("*.py"))
    names = set(re.findall(r"CONSENT_[A-Z0-9_]+", code))
    assert names, "the settings scan found nothing"
    missing = sorted(n for n in names if n not in README)
    assert not missing, f"settings missing from README.md: {missing}"


def test_every_route_is_documented() -> None:
    docs = README + "".join(p.read_text() for p in (ROOT / "docs").glob("*.md"))
    missing = []
    for route in routes:
        if not isinstance(route, Route) or route.methods == {"OPTIONS"}:
            continue
        # the last literal segment of the path must be named somewhere in the docs
        literal = [seg for seg in route.path.split("/") if seg and not seg.startswith("{")]
        if literal and f"/{literal[-1]}" not in docs:
            missing.append(route.path)
    assert not missing, f"routes missing from the docs: {missing}"


def test_readme_has_the_two_commands_ci_runs() -> None:
    assert "bash tests/run.sh" in README
    assert "bash tests/run.sh" in (ROOT / ".ci" / "run").read_text()
    assert ".venv/bin/consent serve" in README


def stable_error_codes() -> set[str]:
    """Every `code` the service can answer with: the error classes' own and the specific
    ones raised with ``code="…"``."""
    code = "".join(p.read_text() for p in (ROOT / "consent").rglob("*.py"))
    classes = re.findall(r"^\s+(?:status, )?code, title = (?:\d+, )?\"([a-z_]+)\"", code, re.M)
    raised = re.findall(r"\bcode\s*=\s*\"([a-z_]+)\"", code)
    return set(classes) | set(raised)


def test_every_error_code_is_documented() -> None:
    codes = stable_error_codes()
    assert {"validation_failed", "malformed_json", "link_gone"} <= codes, codes
    doc = (ROOT / "docs" / "errors.md").read_text()
    missing = sorted(c for c in codes if f"`{c}`" not in doc)
    assert not missing, f"error codes missing from docs/errors.md: {missing}"
