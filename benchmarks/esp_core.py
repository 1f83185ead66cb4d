"""Micro-benchmark of the sans-IO ESP core: microseconds per packet, one core, no I/O.

For 1400-byte inner packets it measures the raw AEAD call (the floor), then our
encapsulation and decapsulation alone and with the SAD lookups a worker does
(`outbound_for` + `encapsulate`; `decapsulate_untrusted` by SPI). Every round measures
the floor and each operation back to back, so the ratios hold on a noisy shared machine
even when the absolute numbers drift. Compare with ../shared/notes/building-blocks.md:
AES-256-GCM 1400 B = 0.75 us; a whole blocking TUN -> ESP-in-UDP loop = 4.8-5.5 us.

    .venv/bin/python benchmarks/esp_core.py [--packets 20000] [--rounds 9]
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
Case = tuple[str, Callable[[], None], Callable[[], None] | None]  # name, run, reset


def timed(run: Callable[[], None], count: int) -> float:
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) / count * 1e6


def raw_gcm(count: int) -> Callable[[], None]:
    aead = AESGCM(os.urandom(32))
    data = os.urandom(SIZE + 4)
    nonce = struct.Struct("!4sQ")
    salt = os.urandom(4)

    def run() -> None:
        encrypt = aead.encrypt
        for i in range(count):
            encrypt(nonce.pack(salt, i), data, b"12345678")

    return run


def esp_cases(encr: str, integ: str | None, mode: str, count: int) -> list[Case]:
    p = params(encr, integ, mode=mode)
    a, b = pair(p)
    src, dst = ("10.99.1.5", "10.99.2.7") if mode == "tunnel" else (p.local[0], p.remote[0])
    inner = packet(src, dst, 17, b"\xa5" * (SIZE - 28))
    assert len(inner) == SIZE
    sa = a.outbound_for(inner)
    assert sa is not None
    # distinct sequence numbers to decapsulate; the window is reset between rounds
    esps = [sa.encapsulate(inner) for _ in range(count)]
    receiver = b.get(p.spi_out)
    assert receiver is not None
    inbound = receiver.inbound
    assert b.decapsulate_untrusted(esps[0]) == inner

    def reset() -> None:
        inbound.replay.top = 0
        inbound.replay.bitmap = 0

    def encapsulate() -> None:
        run = sa.encapsulate
        for _ in range(count):
            run(inner)

    def lookup_and_encapsulate() -> None:
        outbound_for = a.outbound_for
        for _ in range(count):
            found = outbound_for(inner)
            assert found is not None
            found.encapsulate(inner)

    def decapsulate() -> None:
        run = inbound.decapsulate_untrusted
        for esp in esps:
            run(esp)

    def sad_decapsulate() -> None:
        run = b.decapsulate_untrusted
        for esp in esps:
            run(esp)

    return [("encapsulate", encapsulate, None),
            ("outbound_for + encapsulate", lookup_and_encapsulate, None),
            ("decapsulate", decapsulate, reset),
            ("Sad.decapsulate_untrusted", sad_decapsulate, reset)]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--packets", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    count, rounds = args.packets, args.rounds
    floor_run = raw_gcm(count)
    print(f"{SIZE}-byte inner packets, {count} per round, {rounds} rounds; us/packet as "
          "best / median, and the median ratio to AESGCM.encrypt in the same round")
    for encr, integ, mode in [("aes256gcm16", None, "tunnel"), ("aes256gcm16", None, "transport"),
                              ("aes128gcm16", None, "tunnel"),
                              ("chacha20poly1305", None, "tunnel"),
                              ("aes128", "sha256", "tunnel"), ("aes256", "sha512", "tunnel")]:
        cases = esp_cases(encr, integ, mode, count)
        floors: list[float] = []
        samples: dict[str, list[float]] = {name: [] for name, _, _ in cases}
        for _ in range(rounds):
            floors.append(timed(floor_run, count))
            for name, run, reset in cases:
                if reset is not None:
                    reset()
                samples[name].append(timed(run, count))
        print(f"{encr}{'-' + integ if integ else ''} {mode}")
        print(f"  {'AESGCM.encrypt alone (floor)':30} {min(floors):5.2f} / "
              f"{statistics.median(floors):5.2f}")
        for name, values in samples.items():
            ratio = statistics.median(v / f for v, f in zip(values, floors, strict=True))
            print(f"  {name:30} {min(values):5.2f} / {statistics.median(values):5.2f}"
                  f"   {ratio:4.1f}x")


if __name__ == "__main__":
    main()
