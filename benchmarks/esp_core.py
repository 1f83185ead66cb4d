"""Micro-benchmark of the sans-IO ESP core: microseconds per packet, one core, no I/O.

Measures, for 1400-byte inner packets, the raw AEAD call (the floor), then our
encapsulation and decapsulation alone and with the SAD lookups a worker does
(`outbound_for` + `encapsulate`, `decapsulate_untrusted` by SPI). Compare with the
building blocks in ../shared/notes/building-blocks.md: AES-256-GCM 1400 B = 0.75 us,
a whole blocking TUN -> ESP-in-UDP loop = 4.8-5.5 us/packet.

    .venv/bin/python benchmarks/esp_core.py [--packets 20000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests.esp.pairs import packet, pair, params

SIZE = 1400


def per_packet(run: Callable[[], None], count: int, rounds: int,
               reset: Callable[[], None] | None = None) -> tuple[float, float]:
    """(best, median) microseconds per packet over `rounds` runs of `count` packets."""
    samples = []
    for _ in range(rounds):
        if reset is not None:
            reset()
        start = time.perf_counter()
        run()
        samples.append((time.perf_counter() - start) / count * 1e6)
    return min(samples), statistics.median(samples)


def bench_algorithm(encr: str, integ: str | None, count: int, rounds: int,
                    mode: str = "tunnel") -> dict[str, tuple[float, float]]:
    p = params(encr, integ, mode=mode)
    a, b = pair(p)
    if mode == "tunnel":
        src, dst = "10.99.1.5", "10.99.2.7"
    else:
        src, dst = p.local[0], p.remote[0]
    inner = packet(src, dst, 17, b"\xa5" * (SIZE - 28))
    assert len(inner) == SIZE
    sa = a.outbound_for(inner)
    assert sa is not None
    results: dict[str, tuple[float, float]] = {}

    def encap_only() -> None:
        encapsulate = sa.encapsulate
        for _ in range(count):
            encapsulate(inner)

    def lookup_and_encap() -> None:
        outbound_for = a.outbound_for
        for _ in range(count):
            s = outbound_for(inner)
            assert s is not None
            s.encapsulate(inner)

    results["encapsulate"] = per_packet(encap_only, count, rounds)
    results["outbound_for + encapsulate"] = per_packet(lookup_and_encap, count, rounds)

    # distinct sequence numbers for decapsulation; the window is reset between rounds
    esps = [sa.encapsulate(inner) for _ in range(count)]
    receiver = b.get(p.spi_out)
    assert receiver is not None
    inbound = receiver.inbound
    assert b.decapsulate_untrusted(esps[0]) == inner

    def reset() -> None:
        inbound.replay.top = 0
        inbound.replay.bitmap = 0

    def decap_only() -> None:
        decapsulate = inbound.decapsulate_untrusted
        for esp in esps:
            decapsulate(esp)

    def sad_decap() -> None:
        decapsulate = b.decapsulate_untrusted
        for esp in esps:
            decapsulate(esp)

    results["decapsulate"] = per_packet(decap_only, count, rounds, reset)
    results["decapsulate_untrusted via SAD"] = per_packet(sad_decap, count, rounds, reset)
    return results


def bench_raw_gcm(count: int, rounds: int) -> tuple[float, float]:
    aead = AESGCM(os.urandom(32))
    data = os.urandom(SIZE + 4)
    nonce = struct.Struct("!4sQ")
    salt = os.urandom(4)

    def run() -> None:
        encrypt = aead.encrypt
        for i in range(count):
            encrypt(nonce.pack(salt, i), data, b"12345678")

    return per_packet(run, count, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    count, rounds = args.packets, args.rounds

    floor, floor_med = bench_raw_gcm(count, rounds)
    print(f"{SIZE}-byte packets, {count} per round, best / median of {rounds} rounds (us/packet)")
    print(f"  {'AESGCM.encrypt alone (floor)':44} {floor:6.2f} / {floor_med:6.2f}")
    cases = [("aes256gcm16", None, "tunnel"), ("aes256gcm16", None, "transport"),
             ("aes128gcm16", None, "tunnel"), ("chacha20poly1305", None, "tunnel"),
             ("aes128", "sha256", "tunnel"), ("aes256", "sha512", "tunnel")]
    for encr, integ, mode in cases:
        name = encr + (f"-{integ}" if integ else "") + f" {mode}"
        print(name)
        for what, (best, median) in bench_algorithm(encr, integ, count, rounds, mode).items():
            line = f"  {what:44} {best:6.2f} / {median:6.2f}"
            if encr == "aes256gcm16":
                line += f"   ({best / floor:.1f}x the raw AEAD call)"
            print(line)


if __name__ == "__main__":
    main()
