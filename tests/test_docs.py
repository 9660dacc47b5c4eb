"""Docs that are tested: every setting is in the README, every route in the docs and every
stable error code in docs/errors.md."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import re
from pathlib import Path

from starlette.routing import Route

import consent
from consent.errors import ConsentError
from consent.settings import Settings
from consent.web.app import routes

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def setting_names() -> set[str]:
    """``CONSENT_*`` names the code reads, and one per field of the settings declaration
    (dataclass or pydantic model), so a setting that is never spelled out in full counts too."""
    code = "".join(p.read_text() for p in (ROOT / "consent").rglob("*.py"))
    names = set(re.findall(r"\bCONSENT_[A-Z0-9_]+", code))
    fields = getattr(Settings, "model_fields", None) or {f.name: f for f in dataclasses.fields(Settings)}
    names |= {"CONSENT_" + name.upper() for name in fields if name != "extra"}
    return names


def test_every_setting_is_documented() -> None:
    names = setting_names()
    assert {"CONSENT_DATABASE_URL", "CONSENT_ADMIN_TOKEN", "CONSENT_MAX_BULK"} <= names, names
    # whole names: CONSENT_X is not documented by CONSENT_X_Y
    missing = sorted(n for n in names if not re.search(rf"\b{n}\b", README))
    assert not missing, f"settings missing from README.md: {missing}"


def test_readme_settings_table_is_the_declarations() -> None:
    """README's configuration table is generated from ``Settings``' field declarations: a setting
    added, renamed, re-defaulted or re-documented there must be pasted here too."""
    from consent.settings import declared, env_name, readme_table

    table = readme_table()
    assert table in README, (
        "README.md's settings table differs from the declarations in consent/settings.py; paste the "
        "output of: .venv/bin/python -c 'from consent.settings import readme_table; "
        "print(readme_table(), end=\"\")'")
    rows = [line for line in README.splitlines() if re.match(r"\| `CONSENT_[A-Z0-9_]+` \|", line)]
    assert rows == table.splitlines()[2:], "a settings row outside the generated table"
    assert len({env_name(f) for f in declared()}) == len(declared()) == len(rows)


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
    classes = re.findall(r"^\s+(?:status, )?code, title = (?:\d+, )?\"([a-z_]+)\"", code, re.MULTILINE)
    raised = re.findall(r"\bcode\s*=\s*\"([a-z_]+)\"", code)
    return set(classes) | set(raised)


def error_class_codes() -> set[str]:
    """The ``code`` of every error class, wherever in the package it is declared and however
    its code is spelled."""
    for info in pkgutil.walk_packages(consent.__path__, "consent."):
        if ".migrations" not in info.name:
            importlib.import_module(info.name)
    codes: set[str] = set()
    todo: list[type[ConsentError]] = [ConsentError]
    while todo:
        cls = todo.pop()
        codes.add(cls.code)
        todo.extend(cls.__subclasses__())
    return codes


def test_every_error_code_is_documented() -> None:
    codes = stable_error_codes() | error_class_codes()
    assert {"validation_failed", "malformed_json", "link_gone", "rate_limited"} <= codes, codes
    doc = (ROOT / "docs" / "errors.md").read_text()
    missing = sorted(c for c in codes if f"`{c}`" not in doc)
    assert not missing, f"error codes missing from docs/errors.md: {missing}"


def test_openapi_operations_have_tag_description_example_and_path_patterns() -> None:
    from consent.web.openapi import KEY_PATTERN, build_openapi

    doc = build_openapi(routes)
    tags = {t["name"] for t in doc["tags"]}
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            where = f"{method.upper()} {path}"
            assert op["summary"] and op["description"], where
            assert op["tags"] and op["tags"][0] in tags, where
            ok = op["responses"][next(c for c in op["responses"] if c.startswith("2"))]
            assert any("example" in m for m in ok.get("content", {}).values()), where
            if "requestBody" in op:
                assert all("example" in m for m in op["requestBody"]["content"].values()), where
            for p in op.get("parameters", []):
                if p["in"] == "path" and p["name"] in ("key", "policy"):
                    assert p["schema"]["pattern"] == KEY_PATTERN, where


def test_openapi_body_examples_are_valid_requests() -> None:
    from consent.web.openapi import build_openapi

    doc = build_openapi(routes)
    checked = 0
    for route in routes:
        meta = getattr(getattr(route, "endpoint", None), "meta", None)
        if not isinstance(route, Route) or meta is None or meta.body is None:
            continue
        for method in sorted((route.methods or set()) - {"HEAD"}):
            for media in doc["paths"][route.path][method.lower()]["requestBody"]["content"].values():
                meta.body.model_validate(media["example"])
                checked += 1
    assert checked >= 10


def test_openapi_key_pattern_is_what_the_server_enforces(tenant) -> None:  # type: ignore[no-untyped-def]
    from consent.web.openapi import KEY_PATTERN

    assert re.fullmatch(KEY_PATTERN[1:-1], "marketing_email")
    for bad in ("Marketing", "-x", "a" * 65):
        assert not re.fullmatch(KEY_PATTERN[1:-1], bad)
        r = tenant.put(f"/v1/purposes/{bad}", json={"kind": "consent", "title": "x"})
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "key", bad
        r = tenant.get(f"/v1/policies/{bad}/versions")
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "policy", bad
