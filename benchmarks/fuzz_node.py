"""A long mutation-fuzzing run against a whole responder node, by hand.

The same driver as tests/fuzz (loopback only, no root needed), for as long as you like:

    .venv/bin/python benchmarks/fuzz_node.py --seconds 600 --seed 7
    .venv/bin/python benchmarks/fuzz_node.py --datagrams 200000 --cookie-threshold 8

Prints a progress line every `--every` seconds (datagrams, the supervisor's tables,
RSS), then the datagram count, the count per strategy, the node's counters, the
tables a half-open timeout later, and the result of the final liveness check and
handshakes. Exits 1 if the run found a problem (an exception escaping an actor or the
router, a table or RSS beyond its bound, a legitimate exchange that fails).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fuzz.driver import FuzzOptions, run_fuzz


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="run this long (default 60)")
    parser.add_argument("--datagrams", type=int, default=None,
                        help="stop after this many datagrams instead")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cookie-threshold", type=int, default=1_000_000,
                        help="half-open SAs from which cookies are asked (default: never)")
    parser.add_argument("--half-open-timeout", type=float, default=2.0)
    parser.add_argument("--rss-limit-mib", type=int, default=256,
                        help="allowed RSS growth over the run")
    parser.add_argument("--every", type=float, default=30.0,
                        help="seconds between progress lines")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    def progress(snapshot: dict[str, int]) -> None:
        print(" ".join(f"{k}={v}" for k, v in snapshot.items()), flush=True)

    options = FuzzOptions(
        seed=args.seed,
        datagrams=args.datagrams,
        seconds=None if args.datagrams is not None else args.seconds,
        cookie_threshold=args.cookie_threshold,
        half_open_timeout=args.half_open_timeout,
        rss_limit=args.rss_limit_mib << 20,
        progress_every=args.every,
        progress=progress,
    )
    report = trio.run(run_fuzz, options)
    print(report.summary())
    for suspect in report.suspects:
        print("suspect:", suspect)
    problems = report.problems()
    for problem in problems:
        print("PROBLEM:", problem)
    if args.json is not None:
        record = {k: v for k, v in vars(report).items() if k != "options"}
        record["options"] = {"seed": args.seed, "cookie_threshold": args.cookie_threshold,
                             "seconds": options.seconds, "datagrams": options.datagrams}
        args.json.write_text(json.dumps(record, indent=1, default=str))
    print("OK" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
