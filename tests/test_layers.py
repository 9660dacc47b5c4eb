"""Imports flow one way: cli → web → integrations | audit → ledger → store → the base modules
(consent/errors.py, crypto.py, settings.py, logs.py). A lower layer that needs something from a
higher one is a design error: move the shared piece down instead."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "consent"
RANK = {"": 0, "store": 1, "ledger": 2, "audit": 3, "integrations": 3, "web": 4, "cli": 5}


def layer_of(dotted: str) -> str:
    parts = dotted.split(".")
    assert parts[0] == "consent", dotted
    return parts[1] if len(parts) > 2 and parts[1] in RANK else ""


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported(path: Path) -> list[tuple[int, str]]:
    """Every consent module a file imports (top level or inside a function), as dotted names."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "consent"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "consent":
                continue
            if node.module is None or target in ("consent", *(f"consent.{k}" for k in RANK if k)):
                found += [(node.lineno, f"{target}.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, target))
    return found


def test_imports_flow_one_way() -> None:
    wrong = []
    files = sorted(PKG.rglob("*.py"))
    assert len(files) > 40
    for path in files:
        if "migrations" in path.parts:
            continue
        mine = layer_of(module_name(path) + (".x" if path.name == "__init__.py" else ""))
        for line, target in imported(path):
            theirs = layer_of(target if target.count(".") > 1 else target + ".x")
            if theirs == mine:
                continue
            if RANK[theirs] >= RANK[mine]:
                wrong.append(f"{path.relative_to(PKG.parent)}:{line} ({mine or 'base'}) imports {target} ({theirs or 'base'})")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_no_flat_modules_left_behind() -> None:
    base = {p.stem for p in PKG.glob("*.py")} - {"__init__"}
    assert base == {"errors", "crypto", "settings", "logs"}, base
