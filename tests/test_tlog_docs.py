"""docs/transparency.md's consumer code runs as written: a receipt's inclusion, checked against
a pinned verifier key; and it fails for a receipt whose record hash was changed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from consent.audit import tlog

from .helpers import Tenant

DOC = (Path(__file__).resolve().parent.parent / "docs" / "transparency.md").read_text()
BASE = "https://consent.example"


def consumer_code() -> str:
    block = re.search(r"## Checking a receipt, as a consumer.*?```python\n(.*?)```", DOC, re.DOTALL)
    assert block, "the consumer example is missing from docs/transparency.md"
    return block.group(1)


def run(t: Tenant, receipt: str, vkey: str) -> None:
    exec(consumer_code(), {"receipt": receipt, "VKEY": vkey, "__name__": "doc"})  # noqa: S102


def test_the_consumer_example_verifies_a_receipt(tenant: Tenant, monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx

    recs = [tenant.record(email=f"c{i}@example.com") for i in range(7)]
    s = tenant.client.app.state.services  # type: ignore[attr-defined]
    tlog.run_once(s.engine, s.settings, s.signer, wait=True)
    vkey = tenant.client.get("/v1/tlog/key").text.split()[0]
    monkeypatch.setattr(httpx, "get", lambda url, **kw: tenant.client.get(url.removeprefix(BASE), **kw))
    for rec in recs:
        run(tenant, rec["receipt"], vkey)
    # the same receipt claiming another record hash (its signature is not what this block checks)
    import jwt

    claims = jwt.decode(recs[3]["receipt"], options={"verify_signature": False})
    forged = jwt.encode({**claims, "record_hash": "0" * 64}, "k" * 32, algorithm="HS256")
    with pytest.raises(AssertionError):
        run(tenant, forged, vkey)
    with pytest.raises(Exception):  # noqa: B017 (a wrong key fails its assert or signature check)
        run(tenant, recs[0]["receipt"], vkey.split("+")[0] + "+00000000+" + vkey.split("+", 2)[2])
