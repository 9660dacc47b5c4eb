"""A command line that helps: every option has help text; common mistakes are one line on
stderr and a non-zero exit, never a traceback and never a new empty database; the data
directory does not depend on the current directory; shell completion; export asks which
tenant on a terminal; export and verify show progress on a terminal; the receipts' issuer
follows the address served."""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from consent.cli import main
from consent.settings import Settings
from consent.store import db

from .conftest import BACKENDS, PG_SERVER, settings_for
from .helpers import make_tenant


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> Any:
    """``consent ARGS...`` with exactly the environment given, plus the run's key-encryption key
    (``CONSENT_SECRET_KEYS=""``: none): (status, stdout, stderr)."""
    def call(*args: str, **env: str) -> tuple[int, str, str]:
        for name in list(os.environ):
            if (name.startswith("CONSENT_") and name != "CONSENT_SECRET_KEYS") or name == "XDG_DATA_HOME":
                monkeypatch.delenv(name)
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        for name, value in env.items():
            if value == "" and name == "CONSENT_SECRET_KEYS":
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
        code = main.main(list(args))
        out, err = capsys.readouterr()
        return code, out, err
    return call


def test_every_option_has_help() -> None:
    parser = main.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {a.option_strings or a.dest}" for name, cmd in sub.choices.items() for a in cmd._actions
               if not isinstance(a, argparse._HelpAction) and not a.help]
    assert missing == []
    assert all(choice.help for choice in sub._choices_actions)


def one_line_error(code: int, err: str) -> None:
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (code, err)


def test_common_mistakes_are_one_line(run: Any, tmp_path: Path) -> None:
    one_line_error(*run("tenants", "list", CONSENT_DATABASE_URL="postgres://u:secret@127.0.0.1/db")[::2])
    code, _, err = run("tenants", "list", CONSENT_DATABASE_URL="postgresql://u@127.0.0.1/db")
    one_line_error(code, err)
    assert "postgresql+psycopg://" in err
    code, _, err = run("tenants", "list", CONSENT_DATABASE_URL="postgresql+psycopg://u:secret@127.0.0.1:1/x")
    one_line_error(code, err)
    assert "cannot connect" in err and "secret" not in err
    if "postgresql" in BACKENDS:
        code, _, err = run("keys", "rotate", "--tenant", "t",
                           CONSENT_DATABASE_URL=f"{PG_SERVER.replace('postgres@', 'no_such_role@')}/postgres")
        one_line_error(code, err)
    code, _, err = run("migrate", CONSENT_DATA_DIR=str(tmp_path / "missing" / "dir"))
    one_line_error(code, err)
    assert "does not exist" in err and not (tmp_path / "missing").exists()
    code, _, err = run("tenants", "list", CONSENT_DATABASE_URL="not a url")
    one_line_error(code, err)
    # serve too, before it migrates or starts anything
    one_line_error(*run("serve", CONSENT_DATABASE_URL="postgres://u:secret@127.0.0.1/db")[::2])
    one_line_error(*run("serve", CONSENT_DATABASE_URL="postgresql+psycopg://u:secret@127.0.0.1:1/x")[::2])


def test_no_command_but_serve_and_migrate_makes_a_database(run: Any, tmp_path: Path) -> None:
    data = tmp_path / "data"
    for args in (("tenants", "list"), ("keys", "rotate", "--tenant", "x"), ("admin-token",),
                 ("export", "--out", str(tmp_path / "x.jsonl")), ("retention", "run")):
        code, _, err = run(*args, CONSENT_DATA_DIR=str(data))
        one_line_error(code, err)
        assert str(data / "consent.db") in err  # says where it looked
    assert not data.exists()
    # the default does not depend on the current directory
    code, _, err = run("tenants", "list")
    one_line_error(code, err)
    assert str(tmp_path / "home" / ".local" / "share" / "consent-data" / "consent.db") in err
    data.mkdir()
    assert run("migrate", CONSENT_DATA_DIR=str(data))[0] == 0
    code, _, err = run("keys", "rotate", "--tenant", "ten_nope", CONSENT_DATA_DIR=str(data))
    one_line_error(code, err)
    assert "ten_nope" in err


def test_data_dir_default() -> None:
    assert Settings.from_env({"HOME": "/h"}).data_dir == Path("/h/.local/share/consent-data")
    assert Settings.from_env({"HOME": "/h", "XDG_DATA_HOME": "/x"}).database_url == "sqlite:////x/consent-data/consent.db"
    assert Settings.from_env({"CONSENT_DATA_DIR": "rel"}).data_dir.is_absolute()


def test_bash_completion(run: Any) -> None:
    code, script, _ = run("completion", "bash")
    assert code == 0
    def complete(*words: str) -> list[str]:
        line = " ".join(words)
        shell = (f'{script}\nCOMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; _consent; '
                 'printf "%s\\n" "${COMPREPLY[@]}"')
        done = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()
    assert complete("consent", "mig") == ["migrate"]
    assert "--leaked" in complete("consent", "keys", "--le")
    assert complete("consent", "tenants", "upd") == ["update"]


def test_export_asks_which_tenant(client: Any, settings: Settings, run: Any, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    if backend != "sqlite":
        pytest.skip("one backend is enough for the prompt")
    url = f"sqlite:///{tmp_path / 'two.db'}"
    db.migrate(url)
    from starlette.testclient import TestClient

    from consent.web.app import create_app
    with TestClient(create_app(settings_for(url))) as c:
        first, second = make_tenant(c), make_tenant(c)
        second.record(email="ada@example.com")
    out = tmp_path / "ledger.jsonl"
    code, _, err = run("export", "--out", str(out), CONSENT_DATABASE_URL=url)
    one_line_error(code, err)
    assert first.id in err and second.id in err
    monkeypatch.setattr("sys.stdin", Terminal("2\n"))
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    code, _, _ = run("export", "--out", str(out), CONSENT_DATABASE_URL=url)
    shown = terminal.getvalue()
    assert code == 0 and "Export which tenant?" in shown and "1/1 records" in shown, shown
    assert json.loads(out.read_text().splitlines()[0])["tenant"] == second.id
    jwks = tmp_path / "jwks.json"
    jwks.write_text(_jwks(url))
    terminal.seek(0)
    terminal.truncate()
    code, report, _ = run("verify", str(out), "--jwks", str(jwks))
    assert code == 0 and json.loads(report)["records"] == 1
    assert "bytes" in terminal.getvalue()


def _jwks(url: str) -> str:
    from consent.ledger import receipts
    engine = db.create_db_engine(url)
    try:
        with db.transaction(engine) as session:
            return json.dumps(receipts.jwks(session))
    finally:
        engine.dispose()


def test_issuer_follows_the_served_address(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("CONSENT_ISSUER", raising=False)
    main.announce_issuer("127.0.0.1", 8123)
    assert os.environ["CONSENT_ISSUER"] == "http://127.0.0.1:8123" and capsys.readouterr().err == ""
    assert Settings.from_env().issuer == "http://127.0.0.1:8123"
    monkeypatch.delenv("CONSENT_ISSUER")
    main.announce_issuer("0.0.0.0", 9000)
    assert "warning: CONSENT_ISSUER is not set" in capsys.readouterr().err
    monkeypatch.setenv("CONSENT_ISSUER", "https://consent.example.com")
    main.announce_issuer("0.0.0.0", 9000)
    assert capsys.readouterr().err == "" and os.environ["CONSENT_ISSUER"] == "https://consent.example.com"
    assert Settings.from_env({"CONSENT_PORT": "9001"}).issuer == "http://127.0.0.1:9001"
