"""The README's walk-through works as written: its shell blocks (the curl walk-through, the
tenant-settings example, the audit export) run in bash from the repository root against a
live `consent serve`, with only the admin token and the port put in for the placeholders.
The receipt's issuer is the address served (CONSENT_ISSUER left unset)."""

from __future__ import annotations

import ast
import os
import re
import subprocess
from pathlib import Path

import pytest

from .helpers import ADMIN_TOKEN
from .live import LiveServer

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def block_after(heading: str) -> str:
    """The first ```sh block after ``heading``."""
    start = README.index(heading)
    match = re.compile(r"```sh\n(.*?)```", re.DOTALL).search(README, start)
    assert match is not None, heading
    return match.group(1)


@pytest.mark.slow
def test_readme_walk_through_runs_verbatim(tmp_path: Path, backend: str) -> None:
    if backend != "sqlite":
        pytest.skip("the walk-through is the embedded default (SQLite)")
    assert (ROOT / ".venv" / "bin" / "python").exists(), "the README's first command makes .venv"
    url = f"sqlite:///{tmp_path / 'data' / 'consent.db'}"
    # as a user runs it: no key-encryption key set, so the server and the commands share the
    # key file the embedded default generates beside the database
    with LiveServer(url, tmp_path, CONSENT_ISSUER="", CONSENT_SECRET_KEYS="") as server:
        port = str(server.port)
        script = "\n".join([block_after("## Walk-through (curl)"), block_after("## Tenant settings and key rotation"),
                            block_after("## Audit exports")])
        assert "python3 " not in script  # the system python may lack PyJWT
        script = script.replace("ADMIN=adm_...", f"ADMIN={ADMIN_TOKEN}")
        script = script.replace("localhost:8000", f"localhost:{port}").replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONSENT_")}
        env.update(CONSENT_DATABASE_URL=url, PATH=f"/usr/bin:/bin:{env.get('PATH', '')}")
        # `consent export --out ledger.jsonl` writes next to where it runs: the clone
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", f"cd {ROOT} && {script}"], env=env,
                              capture_output=True, text=True, timeout=300, check=False)
        ledger = ROOT / "ledger.jsonl"
        try:
            assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}\n{server.log()[-2000:]}"
            lines = done.stdout.strip().splitlines()
            assert any('"allowed":true' in line and '"status":"granted"' in line for line in lines), done.stdout
            # curl prints no newline: the decoded claims follow the check's JSON on its line
            found = re.search(r"(\{'iss'[^\n]*\})", done.stdout)
            assert found is not None, done.stdout
            claims = ast.literal_eval(found.group(1))
            assert claims["iss"] == f"http://127.0.0.1:{port}"
            assert any('"allowed_origins":["https://acme.example","https://www.acme.example"]' in line
                       for line in lines), done.stdout
            assert '"ok": true' in done.stdout and ledger.exists()
        finally:
            ledger.unlink(missing_ok=True)
