"""A TEST-ONLY verifier written from the text of RFC 9162 §2.1 and the C2SP signed-note and
tlog-checkpoint specifications, sharing no code with ``consent`` (an independent check of the
service's tree heads, proofs and checkpoints)."""

from __future__ import annotations

import base64
import hashlib

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def mth(entries: list[bytes]) -> bytes:
    """§2.1.1 MTH(D[n]) by its recursive definition, from the leaf *data*."""
    n = len(entries)
    if n == 0:
        return _h(b"")
    if n == 1:
        return _h(b"\x00" + entries[0])
    k = 1
    while k * 2 < n:
        k *= 2
    return _h(b"\x01" + mth(entries[:k]) + mth(entries[k:]))


def path(m: int, entries: list[bytes]) -> list[bytes]:
    """§2.1.3.1 PATH(m, D[n]) by its recursive definition."""
    n = len(entries)
    if n == 1:
        return []
    k = 1
    while k * 2 < n:
        k *= 2
    if m < k:
        return path(m, entries[:k]) + [mth(entries[k:])]
    return path(m - k, entries[k:]) + [mth(entries[:k])]


def subproof(m: int, entries: list[bytes], b: bool) -> list[bytes]:
    """§2.1.4.1 SUBPROOF(m, D[n], b) by its recursive definition."""
    n = len(entries)
    if m == n:
        return [] if b else [mth(entries)]
    k = 1
    while k * 2 < n:
        k *= 2
    if m <= k:
        return subproof(m, entries[:k], b) + [mth(entries[k:])]
    return subproof(m - k, entries[k:], False) + [mth(entries[:k])]


def verify_inclusion(leaf_data: bytes, leaf_index: int, tree_size: int, inclusion_path: list[bytes],
                     root_hash: bytes) -> bool:
    """§2.1.3.2, step by step."""
    if leaf_index >= tree_size:
        return False
    fn, sn = leaf_index, tree_size - 1
    r = _h(b"\x00" + leaf_data)
    for p in inclusion_path:
        if sn == 0:
            return False
        if fn % 2 == 1 or fn == sn:
            r = _h(b"\x01" + p + r)
            if fn % 2 == 0:
                while not (fn % 2 == 1 or fn == 0):
                    fn //= 2
                    sn //= 2
        else:
            r = _h(b"\x01" + r + p)
        fn //= 2
        sn //= 2
    return sn == 0 and r == root_hash


def verify_consistency(first: int, second: int, first_hash: bytes, second_hash: bytes,
                       consistency_path: list[bytes]) -> bool:
    """§2.1.4.2, step by step (first < second)."""
    if not consistency_path:
        return False
    if first & (first - 1) == 0:
        consistency_path = [first_hash] + consistency_path
    fn, sn = first - 1, second - 1
    while fn % 2 == 1:
        fn //= 2
        sn //= 2
    fr = sr = consistency_path[0]
    for c in consistency_path[1:]:
        if sn == 0:
            return False
        if fn % 2 == 1 or fn == sn:
            fr = _h(b"\x01" + c + fr)
            sr = _h(b"\x01" + c + sr)
            if fn % 2 == 0:
                while not (fn % 2 == 1 or fn == 0):
                    fn //= 2
                    sn //= 2
        else:
            sr = _h(b"\x01" + sr + c)
        fn //= 2
        sn //= 2
    return fr == first_hash and sr == second_hash and sn == 0


def parse_vkey(vkey: str) -> tuple[str, bytes, bytes]:
    """A signed-note verifier key ``<name>+<hex key id>+<base64(0x01 || public key)>``."""
    name, key_id, key = vkey.strip().split("+", 2)
    raw = base64.b64decode(key)
    if raw[:1] != b"\x01" or len(raw) != 33:
        raise ValueError("not an Ed25519 verifier key")
    if _h(name.encode() + b"\n" + raw)[:4] != bytes.fromhex(key_id):
        raise ValueError("key id does not match")
    return name, bytes.fromhex(key_id), raw[1:]


def open_checkpoint(note: str, vkey: str) -> tuple[str, int, bytes]:
    """Check a C2SP tlog-checkpoint signed note; (origin, tree size, root hash)."""
    name, key_id, public = parse_vkey(vkey)
    text, sep, sigs = note.partition("\n\n")
    if not sep:
        raise ValueError("no signature block")
    text += "\n"
    ok = False
    for line in sigs.splitlines():
        dash, signer, b64 = line.split(" ")
        if dash != "\u2014":
            raise ValueError("signature line must start with an em dash")
        blob = base64.b64decode(b64)
        if signer == name and blob[:4] == key_id:
            Ed25519PublicKey.from_public_bytes(public).verify(blob[4:], text.encode())
            ok = True
    if not ok:
        raise ValueError("no signature by this key")
    origin, size, root_b64 = text.splitlines()[:3]
    return origin, int(size), base64.b64decode(root_b64)
