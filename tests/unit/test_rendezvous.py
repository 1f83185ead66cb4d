"""Rendezvous hashing: deterministic everywhere, even, and moves only what it must."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from cluster.rendezvous import MAX_MEMBER_ID, choose, choose_n, weight

MEMBERS = ["responder-1", "responder-2", "responder-3"]
ROOT = Path(__file__).resolve().parents[2]


def _spis(count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(8) for _ in range(count)]


def test_weight_is_blake2b_64_keyed_by_member_id() -> None:
    # Pinned: changing the weight would move SAs between responders in a rolling upgrade.
    key = bytes.fromhex("0001020304050607")
    assert weight(key, "responder-1") == 0xEBA2FE8742813205
    expected = hashlib.blake2b(key, digest_size=8, key=b"responder-2").digest()
    assert weight(key, "responder-2") == int.from_bytes(expected, "big")


def test_choice_does_not_depend_on_member_order() -> None:
    for spi in _spis(500, seed=1):
        orders = (MEMBERS, MEMBERS[::-1], MEMBERS[1:] + MEMBERS[:1])
        owners = {choose(spi, order) for order in orders}
        assert len(owners) == 1


def test_choice_is_the_same_in_another_process_with_another_hash_seed() -> None:
    spis = _spis(50, seed=2)
    here = [choose(spi, MEMBERS) for spi in spis]
    script = (
        "import sys\n"
        "from cluster.rendezvous import choose\n"
        f"members = {MEMBERS!r}\n"
        "for line in sys.stdin.read().split():\n"
        "    print(choose(bytes.fromhex(line), members))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", script], input="\n".join(s.hex() for s in spis),
        capture_output=True, text=True, check=True, cwd=ROOT, env=env,
    ).stdout.split()
    assert out == here


def test_three_members_each_get_a_third_of_30k_spis_within_5_percent() -> None:
    counts = Counter(choose(spi, MEMBERS) for spi in _spis(30_000, seed=3))
    assert set(counts) == set(MEMBERS)
    for member, count in counts.items():
        assert abs(count - 10_000) <= 500, (member, count)


def test_removing_a_member_moves_exactly_the_keys_it_owned() -> None:
    spis = _spis(30_000, seed=4)
    before = {spi: choose(spi, MEMBERS) for spi in spis}
    survivors = [m for m in MEMBERS if m != "responder-2"]
    after = {spi: choose(spi, survivors) for spi in spis}
    moved = {spi for spi in spis if before[spi] != after[spi]}
    assert moved == {spi for spi in spis if before[spi] == "responder-2"}
    # ...and each one goes to its runner-up, which choose_n names in advance.
    for spi in moved:
        assert after[spi] == choose_n(spi, MEMBERS, 2)[1]


def test_adding_a_member_moves_about_one_in_n_plus_one_and_only_to_it() -> None:
    spis = _spis(30_000, seed=5)
    grown = [*MEMBERS, "responder-4"]
    before = {spi: choose(spi, MEMBERS) for spi in spis}
    after = {spi: choose(spi, grown) for spi in spis}
    moved = [spi for spi in spis if before[spi] != after[spi]]
    assert all(after[spi] == "responder-4" for spi in moved)
    assert abs(len(moved) / len(spis) - 1 / 4) <= 0.05 / 4


def test_choose_n_ranks_distinct_members_best_first() -> None:
    spi = bytes.fromhex("0001020304050607")
    ranked = choose_n(spi, [*MEMBERS, "responder-1"], 5)
    assert sorted(ranked) == sorted(MEMBERS)
    assert ranked[0] == choose(spi, MEMBERS)
    weights = [weight(spi, m) for m in ranked]
    assert weights == sorted(weights, reverse=True)
    assert choose_n(spi, MEMBERS, 1) == [ranked[0]]


def test_no_members_and_bad_member_ids_are_value_errors() -> None:
    with pytest.raises(ValueError):
        choose(b"\x00" * 8, [])
    with pytest.raises(ValueError):
        choose(b"\x00" * 8, [""])
    with pytest.raises(ValueError):
        weight(b"\x00" * 8, "x" * (MAX_MEMBER_ID + 1))
    assert weight(b"\x00" * 8, "x" * MAX_MEMBER_ID) >= 0
