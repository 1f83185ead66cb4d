"""When to rekey and when to give up an SA, in strongSwan's terms (rekey/life/rand time)."""

from __future__ import annotations

from collections.abc import Callable

from .policy import Lifetime

INFINITY = float("inf")


def fraction(rng: Callable[[int], bytes]) -> float:
    """A uniform number in [0, 1) from the injected randomness."""
    return int.from_bytes(rng(4), "big") / 2**32


def deadlines(lifetime: Lifetime, now: float,
              rng: Callable[[int], bytes]) -> tuple[float, float]:
    """(rekey_at, expire_at): rekey at rekey_time minus a random part of rand_time, so two
    peers with equal settings rarely collide; expire at life_time."""
    if lifetime.rekey_time <= 0:
        return INFINITY, (now + lifetime.life_time) if lifetime.life_time else INFINITY
    rekey_at = now + lifetime.rekey_time - lifetime.jitter * fraction(rng)
    return rekey_at, now + lifetime.hard
