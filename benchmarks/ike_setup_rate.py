"""IKEv2 setup rate: our initiator against `ike-cluster run` and against strongSwan's charon.

Each SA is PSK + x25519 with one Child SA (IKE_SA_INIT + IKE_AUTH). Both responders run
in the same lab (two network namespaces), one after the other, in one invocation; the
load comes from our own sans-IO initiator in the other namespace. Both install every
Child SA into their data plane: charon into kernel-libipsec, ours into its worker.
Prints SAs/s and the responder's CPU milliseconds per SA (from /proc/PID/stat), and the
ratio ours/strongSwan; with --repeat N, N rounds (fresh responders each) and the median ratio.

    sudo .venv/bin/python benchmarks/ike_setup_rate.py --sas 3000 --concurrency 64

Needs root, iproute2 and strongSwan (as the tests do). Run by hand, not by pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROPOSAL = "aes256gcm16-prfsha256-x25519"
CLIENT_TOML = f"""
[node]
id = "bench-client"
[ike]
addresses = ["{{local}}"]
[connections.gw]
proposals = ["{PROPOSAL}"]
remote_addrs = ["{{remote}}"]
local = {{{{ auth = "psk", id = "client.example.test" }}}}
remote = {{{{ auth = "psk", id = "gw.example.test" }}}}
[connections.gw.children.net]
local_ts = ["10.99.1.0/24"]
remote_ts = ["10.99.2.0/24"]
esp_proposals = ["aes256gcm16"]
[secrets.gw]
ids = ["client.example.test", "gw.example.test"]
secret = "change-me"
"""


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- the load generator (runs inside the initiator namespace) ---------------------------


def run_client(local: str, remote: str, total: int, concurrency: int,
               workdir: Path) -> dict[str, float]:
    from cluster.config import load_config
    from cluster.ike.message import peek_header_untrusted
    from cluster.ike.session import IkeSession
    from cluster.ike.state import State

    config_path = workdir / "client.toml"
    config_path.write_text(CLIENT_TOML.format(local=local, remote=remote))
    config = load_config(config_path)
    conn = config.policy.connections[0]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.bind((local, 500))
    sock.setblocking(False)
    me, peer = (local, 500), (remote, 500)
    sessions: dict[bytes, IkeSession] = {}
    started = established = failed = 0
    begin = time.monotonic()

    def flush(s: IkeSession) -> None:
        for d in s.datagrams_to_send():
            sock.sendto(d.data, d.remote)

    while established + failed < total:
        while len(sessions) < concurrency and started < total:
            s = IkeSession.initiator(conn, config.policy, os.urandom(8), me, peer,
                                     time.monotonic())
            sessions[s.spi_i] = s
            started += 1
            flush(s)
        select.select([sock], [], [], 0.05)
        now = time.monotonic()
        while True:
            try:
                data, addr = sock.recvfrom(65535)
            except BlockingIOError:
                break
            try:
                spi_i = peek_header_untrusted(data).spi_i
            except Exception:
                continue
            s = sessions.get(spi_i)
            if s is None:
                continue
            s.receive_datagram_untrusted(data, me, addr, now)
            flush(s)
            if s.state is State.ESTABLISHED:
                established += 1
                del sessions[spi_i]
            elif s.closed:
                failed += 1
                del sessions[spi_i]
        for s in list(sessions.values()):
            timer = s.get_timer()
            if timer is not None and timer <= now:
                s.handle_timer(now)
                flush(s)
                if s.closed:
                    failed += 1
                    del sessions[s.spi_i]
    elapsed = time.monotonic() - begin
    return {"established": established, "failed": failed, "seconds": elapsed}


# --- the driver -------------------------------------------------------------------------


def measure(lab: object, pid: int, args: argparse.Namespace, label: str) -> dict[str, float]:
    from tests.interop.lab import INITIATOR_V4, RESPONDER_V4

    ns = lab.initiator  # type: ignore[attr-defined]
    workdir = lab.dir / f"client-{label}"  # type: ignore[attr-defined]
    workdir.mkdir()
    before = cpu_seconds(pid)
    out = subprocess.run(
        ns.exec_argv([sys.executable, __file__, "--client", "--local", INITIATOR_V4,
                      "--remote", RESPONDER_V4, "--sas", str(args.sas),
                      "--concurrency", str(args.concurrency), "--workdir", str(workdir)]),
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    cpu = cpu_seconds(pid) - before
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    result["cpu_ms_per_sa"] = 1000 * cpu / max(result["established"], 1)
    result["sas_per_s"] = result["established"] / result["seconds"]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sas", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--no-data-plane", action="store_true",
                        help="run our node without its [worker] (IKE only)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds, each a fresh ike-cluster then a fresh charon; the median "
                             "ratio is the result")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--local", help=argparse.SUPPRESS)
    parser.add_argument("--remote", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        print(json.dumps(run_client(args.local, args.remote, args.sas, args.concurrency,
                                    args.workdir)))
        return 0

    from tests.interop.lab import Lab, conn_pair

    _, responder_conn = conn_pair(proposals=(PROPOSAL,))
    rounds: list[tuple[dict[str, float], dict[str, float]]] = []
    print(f"{'responder':<12} {'SAs':>6} {'failed':>6} {'SAs/s':>8} {'CPU ms/SA':>10}")
    with Lab() as lab:
        for n in range(args.repeat):
            # fresh responders each round, ours then strongSwan's: a machine that slows
            # down during a round tilts that round only
            ours = measure_ours(lab, responder_conn, args, n)
            theirs = measure_charon(lab, responder_conn, args, n)
            rounds.append((ours, theirs))
            for name, r in (("ike-cluster", ours), ("strongswan", theirs)):
                print(f"{name:<12} {r['established']:>6.0f} {r['failed']:>6.0f} "
                      f"{r['sas_per_s']:>8.0f} {r['cpu_ms_per_sa']:>10.3f}")
            print(f"CPU per SA, ike-cluster / strongSwan = {ratio_of(ours, theirs):.2f}",
                  flush=True)
    ratios = sorted(ratio_of(ours, theirs) for ours, theirs in rounds)
    median = statistics.median(ratios)
    spread = f" (rounds: {', '.join(f'{r:.2f}' for r in ratios)})" if len(ratios) > 1 else ""
    print(f"median CPU per SA, ike-cluster / strongSwan = {median:.2f}{spread} "
          f"(target <= 0.50: {'met' if median <= 0.5 else 'NOT met'})")
    return 0


def ratio_of(ours: dict[str, float], theirs: dict[str, float]) -> float:
    return ours["cpu_ms_per_sa"] / theirs["cpu_ms_per_sa"]


def measure_ours(lab: Any, conn: Any, args: argparse.Namespace, n: int) -> dict[str, float]:
    # with its data plane, as charon installs each Child SA into kernel-libipsec
    node = lab.node([conn], start=False,
                    extra_toml="" if args.no_data_plane else '[worker]\ntun = "ikecb0"\n')
    write_config = node.write_config

    def without_dos_limits() -> Path:
        # one source address sends everything: like strongSwan below, no cookies or
        # per-address limits, so both responders only do the handshakes
        path: Path = write_config()
        path.write_text(path.read_text().replace(
            "[ike]\n", "[ike]\ncookie_threshold = 0\nblock_threshold = 0\n", 1))
        return path

    node.write_config = without_dos_limits
    node.start()
    assert node.proc is not None
    try:
        return measure(lab, node.proc.pid, args, f"node{n}")
    finally:
        node.stop()


def measure_charon(lab: Any, conn: Any, args: argparse.Namespace, n: int) -> dict[str, float]:
    from dataclasses import replace

    # strongSwan with its DoS protection off (one source address) and no duplicate-ID
    # checks, so it only does the handshakes; its IKE SA table sized for thousands of
    # SAs as an operator would (the default, 1 bucket, makes every lookup walk all SAs:
    # about 1.7 instead of 1.3 ms per SA at 6000 SAs here)
    charon = lab.charon("responder", settings={
        "dos_protection": "no", "cookie_threshold": "1000000",
        "block_threshold": "1000000", "init_limit_half_open": "0",
        "ikesa_table_size": "4096", "ikesa_table_segments": "16",
    })
    try:
        charon.load(replace(conn, extra={**conn.extra, "unique": "never"}))
        assert charon.proc is not None
        return measure(lab, charon.proc.pid, args, f"charon{n}")
    finally:
        charon.stop()


if __name__ == "__main__":
    raise SystemExit(main())
