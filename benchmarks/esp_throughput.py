"""ESP data-plane throughput: strongSwan libipsec against our userspace worker (issue 3).

One lab topology (two network namespaces joined by a veth pair, inner addresses
10.99.1.1 and 10.99.2.1 on `lo`), tunnel mode, AES-256-GCM, ESP in UDP on port 4500
in every case (libipsec always encapsulates, so our node is told to as well), and
the same iperf3 TCP run between the inner addresses:

    (a) strongSwan libipsec initiator  <->  strongSwan libipsec responder
    (b) strongSwan libipsec initiator  <->  our node (responder) with its worker
    (c) our node (initiator, start_action = "start")  <->  our node (responder)

For each: Mbit/s as iperf3 reports it (sender and receiver), and CPU seconds per
gigabit of each side's data-plane process (charon, or our `ike-cluster run`): the
utime + stime delta of /proc/PID/stat over the iperf3 run divided by the gigabits
iperf3's receiver counted. "up" sends from the initiator's namespace to the
responder's, "down" the reverse (iperf3 -R). Then the issue's two ratios:
(c)/(a) throughput (target >= 3) and, in (b), our worker's CPU per gigabit over
libipsec's (target <= 0.5).

charon loads openssl before the portable aes/gcm plugins (AES-NI GCM; the harness's
own order, `--harness-plugins`, makes libipsec about 6x slower here). A process's CPU
includes the kernel work that runs in its context, on a veth that is much of the
peer's receive path too (softirqs run where the packet was sent).

Run by hand as root with the dev venv (our node is started with this interpreter):

    /tmp/venv-dev/bin/python benchmarks/esp_throughput.py [--cases abc] [--seconds 10]
        [--directions up,down] [--repeat 1] [--top] [--py-spy DIR] [--json FILE]
        [--congestion NAME]

iperf3's TCP runs with the machine's congestion control (net.ipv4.tcp_congestion_control;
bbr on the machine the README's numbers come from, cubic on a stock Debian) unless
`--congestion` names one; each run prints the one the sender used. It matters: bbr
keeps sending into the receiver's full socket buffer (tens of thousands of
retransmits a run down), cubic backs off, the machine is less busy and charon cheaper.

Each run also prints "udp drops": datagrams a full UDP socket refused in either
namespace (Udp RcvbufErrors). Down in (b) they are charon's socket falling behind our
sends, and they match iperf3's retransmits one for one.

`--top` adds the /proc/stat split and the busiest processes of each run (anything
else running on the machine shows up there); `--py-spy DIR` records every node
process during each run (py-spy raw format). The machines are shared and noisy:
compare numbers from one invocation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.interop.charon import PLUGINS  # noqa: E402
from tests.interop.lab import (  # noqa: E402
    INITIATOR_INNER_V4,
    INITIATOR_V4,
    RESPONDER_INNER_V4,
    Charon,
    Lab,
    LabError,
    Netns,
    Node,
    conn_pair,
)
from tests.interop.spec import Conn  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
PY_SPY = Path(sys.executable).with_name("py-spy")
SETTLE = 20.0  # seconds for an SA to come up and the tunnel to pass a ping
CASES = {
    "a": "strongSwan libipsec <-> strongSwan libipsec",
    "b": "strongSwan libipsec initiator <-> our node",
    "c": "our node (initiator) <-> our node",
}


# strongSwan takes the first plugin that registers an algorithm (no crypto_test.bench):
# openssl first gives libipsec AES-NI/VAES GCM instead of the portable aes + gcm plugins.
FAST_PLUGINS = "openssl " + " ".join(p for p in PLUGINS.split() if p != "openssl")


def worker_toml(tun: str) -> str:
    return f'[worker]\ntun = "{tun}"\n'


# --- measuring ---------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (every thread), in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()  # the name may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


STAT_COLUMNS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def machine_ticks() -> list[int]:
    """Clock ticks of all CPUs since boot per /proc/stat column (STAT_COLUMNS)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return values[:len(STAT_COLUMNS)]


def machine_split(before: list[int], after: list[int]) -> tuple[float, str]:
    """The busy share of all CPUs between two samples, and where it went."""
    delta = dict(zip(STAT_COLUMNS, (b - a for a, b in zip(before, after, strict=True)),
                     strict=True))
    total = max(1, sum(delta.values()))
    busy = total - delta["idle"] - delta["iowait"]
    split = " ".join(f"{k} {100 * v / total:.0f}%" for k, v in delta.items()
                     if k not in ("idle", "iowait", "nice") and v)
    return busy / total, split


def all_processes() -> dict[int, tuple[str, float]]:
    """pid -> (name, CPU seconds) of every process now (for --top)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                text = (entry / "stat").read_text()
            except OSError:
                continue
            name = text[text.index("(") + 1 : text.rindex(")")]
            fields = text[text.rindex(")") + 2 :].split()
            out[int(entry.name)] = (name, (int(fields[11]) + int(fields[12])) / CLK_TCK)
    return out


def top_during(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
               seconds: float, n: int = 8) -> str:
    used = sorted(((cpu - before.get(pid, (name, 0.0))[1], pid, name)
                   for pid, (name, cpu) in after.items()), reverse=True)
    return "  ".join(f"{name}[{pid}] {100 * cpu / seconds:.0f}%" for cpu, pid, name in used[:n]
                     if cpu > 0)


@dataclasses.dataclass
class Side:
    """One data-plane process: who it is and its pid."""

    label: str  # e.g. "charon (initiator)"
    pid: int


@dataclasses.dataclass
class Run:
    direction: str  # "up" (initiator -> responder) or "down"
    sender_mbit: float
    receiver_mbit: float
    received_bytes: int
    retransmits: int
    cpu: dict[str, float]  # side label -> CPU seconds during the run
    machine_busy: float  # share of all CPUs busy during the run (every process, softirqs)
    congestion: str = ""  # the sending TCP's congestion control, as iperf3 reports it
    # UDP datagrams (ESP) dropped at a full socket in either namespace during the run:
    # the data plane that falls behind loses them there, and TCP sends them again
    udp_drops: int = 0
    top: str = ""  # the busiest processes during the run (--top)
    machine_detail: str = ""  # user/system/softirq/steal shares of all CPUs

    @property
    def gigabits(self) -> float:
        return self.received_bytes * 8 / 1e9

    def cpu_per_gbit(self, label: str) -> float:
        return self.cpu[label] / self.gigabits if self.gigabits else float("inf")


def udp_rcvbuf_errors(ns: Netns) -> int:
    """The namespace's Udp RcvbufErrors (/proc/net/snmp): datagrams a full socket refused."""
    lines = [line.split() for line in ns.run(["cat", "/proc/net/snmp"]).stdout.splitlines()
             if line.startswith("Udp:")]
    names, values = lines[0], lines[1]
    return int(values[names.index("RcvbufErrors")])


def iperf3(lab: Lab, sides: Sequence[Side], *, seconds: int, reverse: bool,
           profile_dir: Path | None, tag: str, top: bool = False,
           congestion: str | None = None) -> Run:
    """One iperf3 TCP run between the inner addresses, with the sides' CPU use."""
    port = 5201 + secrets.randbelow(1000)
    out = lab.dir / f"iperf3-server-{tag}.json"
    server = lab.responder.spawn(
        ["iperf3", "--server", "--one-off", "--json", "--bind", RESPONDER_INNER_V4,
         "--port", str(port)],
        output=out,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while f"{RESPONDER_INNER_V4}:{port}" not in lab.responder.run(
            ["ss", "-H", "-t", "-l", "-n"]).stdout:
        if server.poll() is not None or time.monotonic() > deadline:
            raise LabError(f"iperf3 server did not start:\n{out.read_text(errors='replace')}")
        time.sleep(0.05)
    spies = []
    if profile_dir is not None:
        for side in sides:
            if side.label.startswith("node"):
                name = re.sub(r"\W+", "-", side.label).strip("-")
                spies.append(subprocess.Popen(
                    [str(PY_SPY), "record", "-p", str(side.pid), "-d", str(seconds), "-r", "500",
                     "-f", "raw", "--nonblocking", "-o", str(profile_dir / f"{tag}-{name}.txt")],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                ))  # fmt: skip
    argv = ["iperf3", "--client", RESPONDER_INNER_V4, "--bind", INITIATOR_INNER_V4,
            "--port", str(port), "--time", str(seconds), "--json",
            *(["--reverse"] if reverse else []),
            *(["--congestion", congestion] if congestion else [])]  # fmt: skip
    before = {side.label: cpu_seconds(side.pid) for side in sides}
    drops_before = udp_rcvbuf_errors(lab.initiator) + udp_rcvbuf_errors(lab.responder)
    ticks_before = machine_ticks()
    # iperf3 has exited when the run ends: the busiest processes are sampled at 90 %
    procs: list[dict[int, tuple[str, float]]] = [all_processes()] if top else []
    sampler = threading.Timer(0.9 * seconds, lambda: procs.append(all_processes()))
    if top:
        sampler.start()
    try:
        client = lab.initiator.run(argv, check=False, timeout=seconds + 30)
    finally:
        after = {side.label: cpu_seconds(side.pid) for side in sides}
        busy, detail = machine_split(ticks_before, machine_ticks())
        drops = udp_rcvbuf_errors(lab.initiator) + udp_rcvbuf_errors(lab.responder) \
            - drops_before
        sampler.cancel()
        busiest = top_during(procs[0], procs[1], 0.9 * seconds) if len(procs) == 2 else ""
        for spy in spies:
            spy.wait(timeout=seconds + 30)
        server.wait(timeout=10)
    try:
        report: dict[str, Any] = json.loads(client.stdout)
    except json.JSONDecodeError:
        report = {"error": f"no JSON: {client.stdout}{client.stderr}"}
    if client.returncode != 0 or "error" in report:
        raise LabError(f"iperf3 failed ({client.returncode}): {report.get('error')}")
    end = report["end"]
    return Run(
        direction="down" if reverse else "up",
        sender_mbit=end["sum_sent"]["bits_per_second"] / 1e6,
        receiver_mbit=end["sum_received"]["bits_per_second"] / 1e6,
        received_bytes=int(end["sum_received"]["bytes"]),
        retransmits=int(end["sum_sent"].get("retransmits", 0)),
        congestion=str(end.get("sender_tcp_congestion", "?")),
        cpu={label: after[label] - before[label] for label in before},
        udp_drops=drops,
        machine_busy=busy,
        machine_detail=detail,
        top=busiest,
    )


# --- bringing a tunnel up ----------------------------------------------------------------


def wait_for(what: str, check: Callable[[], bool], alive: Callable[[], str | None]) -> None:
    deadline = time.monotonic() + SETTLE
    while not check():
        problem = alive()
        if problem:
            raise LabError(f"{what}: {problem}")
        if time.monotonic() > deadline:
            raise LabError(f"{what}: not within {SETTLE}s")
        time.sleep(0.1)


def node_logged(node: Node, pattern: str) -> Callable[[], bool]:
    return lambda: re.search(pattern, node.log_text()) is not None


def nodes_alive(*nodes: Node) -> Callable[[], str | None]:
    def check() -> str | None:
        for node in nodes:
            if not node.running():
                return f"node {node.node_id} exited:\n{node.log_text()[-3000:]}"
        return None
    return check


def tunnel_passes_ping(ns: Netns) -> bool:
    proc = ns.run(["ping", "-n", "-q", "-c", "3", "-i", "0.2", "-W", "1", "-I",
                   INITIATOR_INNER_V4, RESPONDER_INNER_V4], check=False)
    return proc.returncode == 0 and " 0% packet loss" in proc.stdout


def pid_of_charon(charon: Charon) -> int:
    assert charon.proc is not None
    pid = charon.proc.pid  # `ip netns exec` and `sh -c exec` both exec in place
    comm = Path(f"/proc/{pid}/comm").read_text().strip()
    if comm != "charon":
        raise LabError(f"pid {pid} is {comm!r}, not charon")
    return pid


def pid_of_node(node: Node) -> int:
    assert node.proc is not None
    pid = node.proc.pid
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    if b"cluster" not in cmdline:
        raise LabError(f"pid {pid} is not our node: {cmdline!r}")
    return pid


def charon_initiates(lab: Lab, initiator: Conn, plugins: str) -> Charon:
    charon = lab.charon("initiator", plugins=plugins)
    charon.load(initiator)
    result = charon.initiate("net")
    if result.returncode != 0:
        raise LabError(f"swanctl --initiate failed:\n{result.stdout}{result.stderr}\n"
                       f"{lab.logs(60)}")
    return charon


def setup(case: str, lab: Lab, plugins: str) -> list[Side]:
    """Bring case's tunnel up; returns its data-plane processes."""
    initiator, responder = conn_pair(mode="tunnel", encap=True)
    if case == "a":
        r = lab.charon("responder", plugins=plugins)
        r.load(responder)
        i = charon_initiates(lab, initiator, plugins)
        sides = [Side("charon (initiator)", pid_of_charon(i)),
                 Side("charon (responder)", pid_of_charon(r))]
    elif case == "b":
        node = lab.node([responder], node_id="r", extra_toml=worker_toml("ikecR"))
        i = charon_initiates(lab, initiator, plugins)
        wait_for("our node's CHILD SA", node_logged(node, r"CHILD SA established: net"),
                 nodes_alive(node))
        sides = [Side("charon (initiator)", pid_of_charon(i)),
                 Side("node (responder)", pid_of_node(node))]
    elif case == "c":
        r_node = lab.node([responder], node_id="r", extra_toml=worker_toml("ikecR"))
        i_node = lab.node(
            [initiator.with_child(start_action="start")], side="initiator", node_id="i",
            addresses=(INITIATOR_V4,), extra_toml=worker_toml("ikecI"),
        )  # fmt: skip
        for node in (i_node, r_node):
            wait_for(f"node {node.node_id}'s CHILD SA",
                     node_logged(node, r"CHILD SA established: net"), nodes_alive(i_node, r_node))
        sides = [Side("node (initiator)", pid_of_node(i_node)),
                 Side("node (responder)", pid_of_node(r_node))]
    else:
        raise ValueError(case)
    wait_for("a ping through the tunnel", lambda: tunnel_passes_ping(lab.initiator),
             lambda: None)
    return sides


# --- reporting ---------------------------------------------------------------------------


def median_run(runs: list[Run]) -> Run:
    return sorted(runs, key=lambda r: r.receiver_mbit)[len(runs) // 2]


def print_runs(case: str, sides: list[Side], runs: list[Run]) -> None:
    print(f"\n({case}) {CASES[case]}")
    for run in runs:
        cpu = "  ".join(f"{label}: {run.cpu[label]:.2f} s = {run.cpu_per_gbit(label):.2f} s/Gbit"
                        for label in run.cpu)
        print(f"  {run.direction:<4} sender {run.sender_mbit:7.1f} Mbit/s  receiver "
              f"{run.receiver_mbit:7.1f} Mbit/s  retr {run.retransmits:5d} ({run.congestion})  "
              f"udp drops {run.udp_drops:5d}  machine busy "
              f"{100 * run.machine_busy:3.0f}%  {cpu}")
        if run.top:
            print(f"       cpus: {run.machine_detail}; top: {run.top}")
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="abc", help="which of a, b, c (default abc)")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--directions", default="up,down", help="up, down or up,down")
    parser.add_argument("--repeat", type=int, default=1, help="runs per direction (median)")
    parser.add_argument("--py-spy", type=Path, default=None, metavar="DIR",
                        help="record our node processes with py-spy into DIR")
    parser.add_argument("--harness-plugins", action="store_true",
                        help="charon with the test harness's plugin order (portable AES/GCM)")
    parser.add_argument("--top", action="store_true",
                        help="also print the busiest processes of each run (any process)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--congestion", default=None, metavar="NAME",
                        help="TCP congestion control for iperf3 (default: the system's, "
                             "net.ipv4.tcp_congestion_control)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces, TUN devices)")
    for tool in ("iperf3", "ip", "ss", "ping"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} not found")
    directions = [d for d in args.directions.split(",") if d]
    if not set(directions) <= {"up", "down"} or not set(args.cases) <= set(CASES):
        parser.error("bad --directions or --cases")
    if args.py_spy is not None:
        if not PY_SPY.exists():
            parser.error(f"--py-spy needs {PY_SPY}: {PY_SPY.with_name('pip')} install py-spy")
        args.py_spy.mkdir(parents=True, exist_ok=True)

    results: dict[str, dict[str, Run]] = {}
    labels: dict[str, list[str]] = {}
    for case in args.cases:
        with Lab(prefix="ikb") as lab:
            try:
                sides = setup(case, lab, PLUGINS if args.harness_plugins else FAST_PLUGINS)
                runs = []
                for direction in directions:
                    per = [iperf3(lab, sides, seconds=args.seconds, reverse=direction == "down",
                                  profile_dir=args.py_spy, tag=f"{case}-{direction}-{n}",
                                  top=args.top, congestion=args.congestion)
                           for n in range(args.repeat)]
                    runs += per
                    results.setdefault(case, {})[direction] = median_run(per)
                labels[case] = [s.label for s in sides]
                print_runs(case, sides, runs)
            except LabError:
                print(lab.logs(80), file=sys.stderr)
                raise

    print(f"\nsummary (the median run per direction of {args.repeat}; of an even count, "
          "the faster middle one)")
    for direction in directions:
        a, b, c = (results.get(k, {}).get(direction) for k in "abc")
        if a and c:
            ratio = c.receiver_mbit / a.receiver_mbit
            print(f"  {direction:<4} (c)/(a) throughput: {c.receiver_mbit:.0f} / "
                  f"{a.receiver_mbit:.0f} Mbit/s = {ratio:.2f}  (target >= 3: "
                  f"{'met' if ratio >= 3 else 'NOT met'})")
        if b:
            ours = b.cpu_per_gbit("node (responder)")
            theirs = b.cpu_per_gbit("charon (initiator)")
            ratio = ours / theirs if theirs else float("inf")
            print(f"  {direction:<4} (b) CPU/Gbit ours / libipsec: {ours:.2f} / {theirs:.2f} s = "
                  f"{ratio:.2f}  (target <= 0.5: {'met' if ratio <= 0.5 else 'NOT met'})")
    if args.json is not None:
        args.json.write_text(json.dumps(
            {case: {d: dataclasses.asdict(r) | {"cpu_per_gbit": {
                label: r.cpu_per_gbit(label) for label in r.cpu}} for d, r in runs_.items()}
             for case, runs_ in results.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
