"""Merkle tree math of RFC 9162 §2.1: hashes, tree heads, inclusion and consistency proofs and
their verification. Pure functions, no storage.

A tree is read through ``Get(level, index)``: the hash of the complete subtree of ``2**level``
leaves starting at leaf ``index * 2**level`` (level 0 is a leaf hash). Every subtree the RFC's
recursion visits is aligned that way, so a store that keeps complete subtrees answers any tree
head or proof with O(log n) reads (``tlog.py``); ``needed`` lists them first so they can be
read in one round trip.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

Get = Callable[[int, int], bytes]


def leaf_hash(data: bytes) -> bytes:
    """RFC 9162 §2.1.1: SHA-256(0x00 || data)."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 9162 §2.1.1: SHA-256(0x01 || left || right)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


EMPTY_ROOT = hashlib.sha256(b"").digest()


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


def subtree(get: Get, start: int, end: int) -> bytes:
    """MTH(D[start:end]) for a range the RFC recursion visits."""
    n = end - start
    if n & (n - 1) == 0:
        return get(n.bit_length() - 1, start // n)
    k = _split(n)
    return node_hash(subtree(get, start, start + k), subtree(get, start + k, end))


def root(get: Get, size: int) -> bytes:
    """The tree head MTH(D[0:size]); the hash of the empty string for an empty tree."""
    return EMPTY_ROOT if size == 0 else subtree(get, 0, size)


def inclusion_path(get: Get, index: int, size: int) -> list[bytes]:
    """RFC 9162 §2.1.3.1 PATH(m, D[n]), leaf side first."""
    if not 0 <= index < size:
        raise ValueError("leaf index outside the tree")
    path: list[bytes] = []
    start, end = 0, size
    while end - start > 1:
        k = _split(end - start)
        if index < start + k:
            path.append(subtree(get, start + k, end))
            end = start + k
        else:
            path.append(subtree(get, start, start + k))
            start += k
    path.reverse()
    return path


def consistency_path(get: Get, old: int, new: int) -> list[bytes]:
    """RFC 9162 §2.1.4.1 PROOF(m, D[n]) for 0 < m <= n (empty when m == n)."""
    if not 0 < old <= new:
        raise ValueError("sizes must satisfy 0 < old <= new")
    path: list[bytes] = []
    start, end, m, whole = 0, new, old, True
    while m != end - start:
        k = _split(end - start)
        if m <= k:
            path.append(subtree(get, start + k, end))
            end = start + k
        else:
            path.append(subtree(get, start, start + k))
            start, m, whole = start + k, m - k, False
    if not whole:
        path.append(subtree(get, start, end))
    path.reverse()
    return path


def needed(fn: Callable[[Get], object]) -> set[tuple[int, int]]:
    """The complete subtrees ``fn`` reads, found by running it on dummy hashes."""
    seen: set[tuple[int, int]] = set()

    def record(level: int, index: int) -> bytes:
        seen.add((level, index))
        return b"\x00" * 32

    fn(record)
    return seen


def from_leaves(leaves: list[bytes]) -> Get:
    """A getter over leaf hashes held in memory (complete subtrees cached as they are built)."""
    levels: list[list[bytes]] = [list(leaves)]

    def get(level: int, index: int) -> bytes:
        while len(levels) <= level:
            below = levels[-1]
            levels.append([node_hash(below[i], below[i + 1]) for i in range(0, len(below) - 1, 2)])
        return levels[level][index]

    return get


def root_of(leaf_hashes: Iterable[bytes]) -> bytes:
    """The tree head over leaf hashes, in O(log n) memory."""
    acc = RootAccumulator()
    for h in leaf_hashes:
        acc.add(h)
    return acc.root()


class RootAccumulator:
    """Leaf hashes in order; ``root`` at any size seen so far, while more arrive."""

    def __init__(self) -> None:
        self.size = 0
        self._stack: list[tuple[int, bytes]] = []

    def add(self, h: bytes) -> None:
        level = 0
        self.size += 1
        while self._stack and self._stack[-1][0] == level:
            h = node_hash(self._stack.pop()[1], h)
            level += 1
        self._stack.append((level, h))

    def root(self) -> bytes:
        if not self._stack:
            return EMPTY_ROOT
        acc = self._stack[-1][1]
        for _, h in reversed(self._stack[:-1]):
            acc = node_hash(h, acc)
        return acc


def verify_inclusion(leaf: bytes, index: int, size: int, path: list[bytes], head: bytes) -> bool:
    """RFC 9162 §2.1.3.2: does ``path`` prove leaf hash ``leaf`` at ``index`` under ``head``?"""
    if not 0 <= index < size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and r == head


def verify_consistency(old: int, new: int, old_head: bytes, new_head: bytes, path: list[bytes]) -> bool:
    """RFC 9162 §2.1.4.2: does ``path`` prove the tree of ``old`` leaves is a prefix of ``new``?"""
    if not 0 < old <= new:
        return False
    if old == new:
        return not path and old_head == new_head
    if old & (old - 1) == 0:
        path = [old_head, *path]
    if not path:
        return False
    fn, sn = old - 1, new - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and fr == old_head and sr == new_head
