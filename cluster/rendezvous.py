"""Rendezvous (highest-random-weight) hashing: which member owns a key.

Workers pick the responder for an IKE datagram with `choose(spi_i, live_responders)`.
Every member's weight for a key is a keyed BLAKE2b of the key; the member with the
highest weight wins. When a member leaves, only the keys it won move (each to the
runner-up), and a new member takes about 1/(n+1) of the keys from the others, so a
responder failure disturbs no SA held by a survivor.

The weight is a stable hash, never Python's `hash()` (salted per process), so every
worker computes the same owner as every other without talking to them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

# BLAKE2b takes a key of up to 64 bytes; member ids are keys, so that bounds them.
MAX_MEMBER_ID = 64


def weight(key: bytes, member: str) -> int:
    """The 64-bit weight of `member` for `key`: BLAKE2b-64 of the key, keyed by the member id."""
    return int.from_bytes(
        hashlib.blake2b(key, digest_size=8, key=_member_key(member)).digest(), "big"
    )


def choose(key: bytes, members: Sequence[str]) -> str:
    """The member with the highest weight for `key`; ValueError when there is none."""
    if not members:
        raise ValueError("no members to choose from")
    best = members[0]
    best_weight = weight(key, best)
    for member in members[1:]:
        w = weight(key, member)
        # Ties (one in 2**64) go to the greater id, so the answer never depends on order.
        if w > best_weight or (w == best_weight and member > best):
            best, best_weight = member, w
    return best


def choose_n(key: bytes, members: Iterable[str], n: int) -> list[str]:
    """Up to `n` distinct members, best first: the owner, then who takes over from it."""
    ranked = sorted(set(members), key=lambda m: (weight(key, m), m), reverse=True)
    return ranked[:n]


def _member_key(member: str) -> bytes:
    raw = member.encode()
    if not raw or len(raw) > MAX_MEMBER_ID:
        raise ValueError(f"member id must be 1..{MAX_MEMBER_ID} bytes of UTF-8: {member!r}")
    return raw
