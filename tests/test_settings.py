"""Settings are declared once (consent/settings.py): each field's type and default are what the
environment parser and the README table use."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from starlette.datastructures import Secret

from consent.crypto import new_kek_text
from consent.settings import Settings, declared, env_name, readme_table

COMPUTED = {"data_dir", "database_url", "issuer"}  # defaults that depend on the environment


def test_unset_variables_give_the_declared_defaults() -> None:
    s = Settings.from_env({"HOME": "/h"})
    for f in declared():
        if f.name not in COMPUTED:
            assert getattr(s, f.name) == f.default, f.name
    assert s.data_dir == Path("/h/.local/share/consent-data")
    assert s.database_url == "sqlite:////h/.local/share/consent-data/consent.db"
    assert s.issuer == "http://127.0.0.1:8000"
    assert Settings.from_env({"CONSENT_PORT": "9001"}).issuer == "http://127.0.0.1:9001"


def test_every_declared_variable_is_read_by_its_type() -> None:
    kek = new_kek_text()
    written: dict[type, tuple[str, object]] = {bool: ("false", False), int: ("7", 7), float: ("0.5", 0.5),
                                               str: ("x", "x")}
    env: dict[str, str] = {}
    expected: dict[str, object] = {}
    for f in declared():
        kind = type(f.default)
        if f.name == "secret_keys":
            env[env_name(f)], expected[f.name] = f" {kek} ,", (kek,)
        elif f.name == "trusted_proxies":
            env[env_name(f)], expected[f.name] = "10.0.0.0/8, ::1", ("10.0.0.0/8", "::1")
        elif f.name == "sqlite_reader":
            env[env_name(f)], expected[f.name] = " Loop ", "loop"
        elif f.name == "issuer":
            env[env_name(f)], expected[f.name] = "https://c.example/", "https://c.example"
        elif f.name == "data_dir":
            env[env_name(f)], expected[f.name] = "/d", Path("/d")
        elif f.name == "admin_token":
            env[env_name(f)], expected[f.name] = "adm_1", "adm_1"
        elif kind is tuple:
            env[env_name(f)], expected[f.name] = "a, b,,", ("a", "b")
        else:
            env[env_name(f)], expected[f.name] = written[kind]
    s = Settings.from_env(env)
    for name, value in expected.items():
        got = getattr(s, name)
        shown = tuple(str(v) for v in got) if isinstance(got, tuple) else str(got) if isinstance(got, Secret) else got
        assert shown == value, name
    assert isinstance(s.admin_token, Secret) and all(isinstance(k, Secret) for k in s.secret_keys)
    assert Settings.from_env({"CONSENT_ADMIN_TOKEN": ""}).admin_token is None
    assert Settings.from_env({"CONSENT_DEMO": "TRUE", "CONSENT_WEBHOOK_WORKER": "0"}).demo is True


@pytest.mark.parametrize(("name", "value", "said"), [
    ("CONSENT_PORT", "x", "CONSENT_PORT is 'x', not a valid int"),
    ("CONSENT_DEMO", "yes", "CONSENT_DEMO is 'yes', not true or false"),
    ("CONSENT_TLOG_SECONDS", "soon", "CONSENT_TLOG_SECONDS is 'soon', not a valid float"),
    ("CONSENT_SECRET_KEYS", "short", "CONSENT_SECRET_KEYS: each key must be 32 bytes"),
    ("CONSENT_TRUSTED_PROXIES", "proxy.local", "CONSENT_TRUSTED_PROXIES lists 'proxy.local'"),
])
def test_a_bad_value_names_its_variable(name: str, value: str, said: str) -> None:
    with pytest.raises(ValueError, match=said):
        Settings.from_env({name: value})


def test_overrides_and_replace_keep_working() -> None:
    s = Settings.from_env({}, max_bulk=5)
    assert s.max_bulk == 5
    assert dataclasses.replace(s, max_bulk=6).max_bulk == 6
    assert Settings(database_url="sqlite://").is_sqlite


def test_the_readme_table_follows_the_declarations() -> None:
    table = readme_table()
    lines = table.splitlines()
    assert lines[:2] == ["| variable | default | meaning |", "|---|---|---|"]
    assert [line.split(" | ")[0] for line in lines[2:]] == [f"| `{env_name(f)}`" for f in declared()]
    assert "| `CONSENT_MAX_BULK` | `100000` | addresses per bulk check |" in lines
    assert "| `CONSENT_WEBHOOK_POLL_SECONDS` | `1` |" in table  # 1.0, as it is written in a variable
    assert "| `CONSENT_RATE_LIMIT_ROUTES` | (none) |" in table
