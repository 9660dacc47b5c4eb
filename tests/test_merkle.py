"""RFC 9162 tree math (consent/audit/merkle.py) against the RFC's recursive definitions
(tests/rfc9162.py), for every tree size up to 40 and every leaf and older size in it."""

from __future__ import annotations

import hashlib

import pytest

from consent.audit import merkle
from tests import rfc9162

DATA = [hashlib.sha256(b"%d" % i).hexdigest().encode() for i in range(40)]


def test_known_answers() -> None:
    assert merkle.root(merkle.from_leaves([]), 0).hex() == hashlib.sha256(b"").hexdigest()
    one = merkle.leaf_hash(b"")
    assert one.hex() == "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
    assert merkle.node_hash(one, one) == hashlib.sha256(b"\x01" + one + one).digest()


@pytest.mark.parametrize("n", range(1, 41))
def test_roots_and_proofs_match_the_rfc_definitions(n: int) -> None:
    leaves = [merkle.leaf_hash(d) for d in DATA[:n]]
    get = merkle.from_leaves(leaves)
    head = merkle.root(get, n)
    assert head == rfc9162.mth(DATA[:n]) == merkle.root_of(leaves)
    acc = merkle.RootAccumulator()
    for h in leaves:
        acc.add(h)
    assert acc.root() == head
    for m in range(n):
        path = merkle.inclusion_path(get, m, n)
        assert path == rfc9162.path(m, DATA[:n])
        assert merkle.verify_inclusion(leaves[m], m, n, path, head)
        assert rfc9162.verify_inclusion(DATA[m], m, n, path, head)
        assert not merkle.verify_inclusion(leaves[m], (m + 1) % n, n, path, head) or n == 1
        if path:
            bad = [bytes(32)] + path[1:]
            assert not merkle.verify_inclusion(leaves[m], m, n, bad, head)
    for m in range(1, n + 1):
        proof = merkle.consistency_path(get, m, n)
        assert proof == rfc9162.subproof(m, DATA[:n], True)
        old = rfc9162.mth(DATA[:m])
        assert merkle.verify_consistency(m, n, old, head, proof)
        if m < n:
            assert rfc9162.verify_consistency(m, n, old, head, proof)
            assert not merkle.verify_consistency(m, n, bytes(32), head, proof)
            assert not rfc9162.verify_consistency(m, n, old, bytes(32), proof)


def test_needed_lists_every_read() -> None:
    leaves = [merkle.leaf_hash(d) for d in DATA[:37]]
    full = merkle.from_leaves(leaves)
    keys = merkle.needed(lambda g: merkle.inclusion_path(g, 5, 37))
    table = {k: full(*k) for k in keys}
    assert merkle.inclusion_path(lambda lvl, i: table[(lvl, i)], 5, 37) == merkle.inclusion_path(full, 5, 37)
    assert len(keys) <= 2 * 6  # O(log n) reads
