"""An SA's whole life with strongSwan (issue 4): rekeys, DPD, deletes, fragmented IKE_AUTH.

strongSwan (kernel-libipsec, tunnel mode) initiates to our node, which runs its data
plane (``[worker]``), so a ping really crosses the tunnel. Verdicts come from
strongSwan (``swanctl --list-sas``, its log), from nftables counters on the veths,
from the routing table our worker fills, and from our node's log.

- Child SA and IKE SA rekeys every few seconds, initiated by strongSwan and by our
  node, with and without PFS, while a ping loses nothing;
- DPD both ways, then strongSwan is killed: our node gives up after its
  retransmissions and removes the SAs from itself and its data plane;
- ``swanctl --terminate`` of the Child SA, then of the IKE SA;
- an RSA-4096 certificate chain that needs IKE fragmentation (RFC 7383).

Each test runs in its own lab; with ``-s`` they print their timings and counts.
"""

from __future__ import annotations

import os
import re
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from subprocess import Popen
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tests.interop.certs import TestCa
from tests.interop.charon import Charon
from tests.interop.lab import (
    INITIATOR_INNER_V4,
    INITIATOR_V4,
    RESPONDER_INNER_V4,
    Lab,
    Netns,
    Node,
    conn_pair,
)
from tests.interop.sa_checks import assert_initiated, child_sa, established
from tests.interop.spec import INITIATOR_NETS

pytestmark = pytest.mark.interop

TUN = "ikec0"
WORKER_TOML = f'[worker]\ntun = "{TUN}"\n'
ROUTE_TABLE = "1450"  # WorkerConfig.table's default
SETTLE = 20.0  # seconds a daemon gets to log what it negotiated

# Non-zero first payload word: ESP in UDP (RFC 3948); zero: IKE behind its marker.
ESP_IN_UDP_OUT = "udp dport 4500 @th,64,32 != 0"
ESP_IN_UDP_IN = "udp sport 4500 @th,64,32 != 0"
IKE_ON_4500_OUT = "udp dport 4500 @th,64,32 == 0"
IKE_ON_4500_IN = "udp sport 4500 @th,64,32 == 0"

# strongSwan's ENC lines (level 1): "generating CREATE_CHILD_SA request 4 [ N(REKEY_SA) SA No
# KE TSi TSr ]". A Child SA rekey carries N(REKEY_SA); an IKE SA rekey is SA No KE alone.
CHILD_REKEY = r"CREATE_CHILD_SA {kind} \d+ \[ N\(REKEY_SA\) SA No {ke}TSi TSr \]"
CHILD_REKEY_REPLY = r"CREATE_CHILD_SA {kind} \d+ \[ SA No {ke}TSi TSr \]"
IKE_REKEY = r"CREATE_CHILD_SA {kind} \d+ \[ SA No KE \]"


def report(label: str, text: str) -> None:
    print(f"\n[{label}] {text}")  # shown with -s: the figures are the point of the run


def count(pattern: str, text: str) -> int:
    return len(re.findall(pattern, text))


def wait_for_log(node: Node, pattern: str, *, timeout: float = SETTLE) -> str:
    """The first line of the node's log matching ``pattern``, once there is one."""
    deadline = time.monotonic() + timeout
    while True:
        for line in node.log_text().splitlines():
            if re.search(pattern, line):
                return line
        assert node.running(), f"node exited:\n{node.log_text()}"
        assert time.monotonic() < deadline, (
            f"no log line matching {pattern!r} within {timeout}s:\n{node.log_text()[-5000:]}"
        )
        time.sleep(0.05)


def routes(ns: Netns) -> str:
    """What our worker routes into its TUN (table 1450); "" while the table has no route
    (the kernel then says the table does not exist)."""
    proc = ns.run(["ip", "route", "show", "table", ROUTE_TABLE], check=False)
    if proc.returncode != 0:
        assert "table does not exist" in proc.stderr, proc.stderr
        return ""
    return proc.stdout.strip()


def wait_for_routes(ns: Netns, *, present: bool, timeout: float = 5.0) -> str:
    """Table 1450 once it has routes (or none, ``present=False``): the worker installs
    and removes them just after the node logs the event."""
    deadline = time.monotonic() + timeout
    while bool(found := routes(ns)) != present and time.monotonic() < deadline:
        time.sleep(0.05)
    if present:
        assert found, f"no route into the TUN within {timeout}s"
    else:
        assert not found, f"routes into the TUN left behind: {found}"
    return found


def wait_for_no_routes(ns: Netns, timeout: float = 5.0) -> None:
    wait_for_routes(ns, present=False, timeout=timeout)


def ping(ns: Netns, source: str, target: str, n: int = 5) -> tuple[int, int, str]:
    """(transmitted, received, output) of a short ping; a refused send counts as sent."""
    proc = ns.run(["ping", "-n", "-c", str(n), "-i", "0.1", "-W", "1", "-I", source, target],
                  check=False)
    match = re.search(r"(\d+) packets transmitted, (\d+) received", proc.stdout)
    if match is None:  # e.g. "connect: Network is unreachable": nothing was sent
        return n, 0, proc.stdout + proc.stderr
    return int(match[1]), int(match[2]), proc.stdout


@dataclass
class BackgroundPing:
    """``ping -i 0.2`` through the tunnel for a fixed time, in the initiator's namespace."""

    proc: Popen[bytes]
    output: Path

    @classmethod
    def start(cls, lab: Lab, seconds: float) -> BackgroundPing:
        output = lab.dir / f"ping-{time.monotonic_ns()}.out"
        # -D -O: a timestamp on every line and one for each request left unanswered,
        # so a loss can be matched against the daemons' logs
        argv = ["ping", "-n", "-D", "-O", "-i", "0.2", "-c", str(int(seconds / 0.2)),
                "-W", "2", "-I", INITIATOR_INNER_V4, RESPONDER_INNER_V4]
        return cls(lab.initiator.spawn(argv, output=output), output)

    def running(self) -> bool:
        return self.proc.poll() is None

    def result(self) -> tuple[int, int, str]:
        """(transmitted, received, summary) once ping has finished."""
        self.proc.wait(timeout=30)
        text = self.output.read_text(errors="replace")
        match = re.search(r"(\d+) packets transmitted, (\d+) received.*", text)
        assert match, f"no ping summary:\n{text}"
        summary = match[0]
        if match[1] != match[2]:  # which requests went unanswered, and when
            summary += "".join(f"\n{line}" for line in text.splitlines()
                               if "no answer yet" in line)
        return int(match[1]), int(match[2]), summary


def longest_gap(summary: str) -> int:
    """The most consecutive requests a BackgroundPing summary lists as unanswered."""
    lost = [int(n) for n in re.findall(r"no answer yet for icmp_seq=(\d+)", summary)]
    longest = run = 0
    for at, seq in enumerate(lost):
        run = run + 1 if at and seq == lost[at - 1] + 1 else 1
        longest = max(longest, run)
    return longest


@dataclass
class SaWatch:
    """Every IKE SA and Child SA strongSwan lists while it is polled, by SPIs."""

    charon: Charon
    ike: dict[tuple[str, str], str] = field(default_factory=dict)  # SPIs -> state
    children: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    polls: int = 0

    def poll(self) -> None:
        self.polls += 1
        for sa in self.charon.list_sas():
            self.ike[(sa["initiator-spi"], sa["responder-spi"])] = sa["state"]
            for child in sa.get("child-sas", {}).values():
                self.children.setdefault((child["spi-in"], child["spi-out"]), child)

    def installed(self) -> list[dict[str, Any]]:
        return [c for c in self.children.values() if c.get("state") == "INSTALLED"]


def watch_during(watch: SaWatch, ping_: BackgroundPing) -> None:
    while ping_.running():
        watch.poll()
        time.sleep(0.25)


def our_child_events(node: Node) -> list[tuple[str, str]]:
    """("established" | "deleted", spi_in) from the node's CHILD SA lines, in order."""
    return re.findall(r"CHILD SA (established|deleted): net .* spi_in=([0-9a-f]{8})",
                      node.log_text())


def wait_for_one_child_sa_on_both(node: Node, charon: Charon, timeout: float) -> None:
    """Until our node (by its log) and strongSwan (INSTALLED) hold the same one Child SA."""

    def ours() -> set[str]:
        live: set[str] = set()
        for what, spi in our_child_events(node):
            (live.add if what == "established" else live.discard)(spi)
        return live

    def theirs() -> set[str]:
        return {c["spi-out"] for sa in established(charon)
                for c in sa.get("child-sas", {}).values() if c["state"] == "INSTALLED"}

    deadline = time.monotonic() + timeout
    while not (len(ours()) == 1 and ours() == theirs()):
        assert time.monotonic() < deadline, f"ours {ours()}, strongSwan's {theirs()}"
        time.sleep(0.1)


def assert_make_before_break(events: list[tuple[str, str]]) -> None:
    """After the first Child SA, one was always installed: each rekey's successor came up
    before its predecessor was deleted."""
    live: set[str] = set()
    for index, (what, spi) in enumerate(events):
        if what == "established":
            live.add(spi)
        else:
            live.discard(spi)
            assert live, f"no Child SA left after event {index}: {events}"


# --- 1. rekeying ----------------------------------------------------------------------------

REKEY_WATCH = 21.0  # seconds of ping: 5 Child SA rekeys every 3-4 s, 2 IKE SA rekeys at 8-9 s
CHILD_REKEYS = 3
IKE_REKEYS = 2
PFS_ESP = ("aes256gcm16-x25519",)
# strongSwan: rand_time defaults to life_time - rekey_time; rekey_time - rand_time may come
# out as 0, which libipsec reads as "no soft lifetime" and the SA then only expires hard.
FAST_CHILD = {"rekey_time": "4s", "life_time": "8s", "rand_time": "1s"}
FAST_IKE = "9s"
FAST_IKE_EXTRA = {"over_time": "5s", "rand_time": "1s"}
SLOW = "60s"


def rekey_conns(*, pfs: bool, fast_side: str) -> tuple[Any, Any]:
    """(strongSwan's, ours): the ``fast_side`` rekeys in seconds, the other in a minute."""
    esp = PFS_ESP if pfs else ("aes256gcm16",)
    initiator, responder = conn_pair(esp_proposals=esp,
                                     responder_esp_proposals=esp)
    fast_i = fast_side == "initiator"
    initiator = replace(
        initiator, rekey_time=FAST_IKE if fast_i else SLOW,
        extra=dict(FAST_IKE_EXTRA) if fast_i else {},
    ).with_child(**(FAST_CHILD if fast_i else {"rekey_time": SLOW}))
    responder = replace(
        responder, rekey_time=SLOW if fast_i else FAST_IKE,
        node_extra={} if fast_i else dict(FAST_IKE_EXTRA),
    ).with_child(**({"rekey_time": SLOW} if fast_i else FAST_CHILD))
    return initiator, responder


def run_rekeys(lab: Lab, *, pfs: bool, fast_side: str) -> tuple[Charon, Node, SaWatch]:
    initiator_conn, responder_conn = rekey_conns(pfs=pfs, fast_side=fast_side)
    node = lab.node([responder_conn], extra_toml=WORKER_TOML)
    charon = lab.charon("initiator", log_levels={"ike": 2, "chd": 2})
    charon.load(initiator_conn)
    assert_initiated(charon.initiate("net"), charon)
    wait_for_log(node, r"CHILD SA established: net")
    wait_for_routes(lab.responder, present=True)  # else the first replies have no way back

    watch = SaWatch(charon)
    watch.poll()
    started = time.monotonic()
    pinging = BackgroundPing.start(lab, REKEY_WATCH)
    watch_during(watch, pinging)
    sent, received, summary = pinging.result()
    watch.poll()
    took = time.monotonic() - started
    report(f"rekeys by {fast_side}, pfs={pfs}",
           f"{took:.1f} s: {len(watch.children)} Child SAs and {len(watch.ike)} IKE SAs "
           f"seen in {watch.polls} list-sas polls; ping: {summary}")

    # every reply came back while the SAs changed under the ping
    assert sent >= REKEY_WATCH / 0.2 - 1, summary
    assert received == sent, summary
    # new SPIs each time, as strongSwan lists them
    assert len(watch.children) >= CHILD_REKEYS + 1, watch.children.keys()
    assert len(watch.ike) >= IKE_REKEYS + 1, watch.ike
    assert established(charon), charon.list_sas()
    assert len(established(charon)) == 1, charon.list_sas()
    # one Child SA in use; rekeyed ones linger as DELETED for charon.delete_rekeyed_delay
    # (a listing in the middle of a rekey shows the old one REKEYING, the new one not yet)
    deadline = time.monotonic() + 5
    while True:
        sas = established(charon)
        children = sas[0].get("child-sas", {}).values() if len(sas) == 1 else sas
        if len(sas) == 1 and [c["state"] for c in children].count("INSTALLED") == 1:
            break
        assert time.monotonic() < deadline, children
        time.sleep(0.2)
    if pfs:
        # the first Child SA came with IKE_AUTH (no KE, RFC 7296 1.2); every rekey ran a DH
        rekeyed = [c for c in watch.children.values() if c.get("dh-group")]
        assert len(rekeyed) >= CHILD_REKEYS, watch.children
        assert {c["dh-group"] for c in rekeyed} == {"CURVE_25519"}, watch.children
    else:
        assert not any(c.get("dh-group") for c in watch.children.values()), watch.children

    log = charon.log_text()
    # Real rekeys: a Child SA that reached its life_time unrekeyed would be deleted and
    # created anew, without N(REKEY_SA). (libipsec's hard expiry of an SA that was rekeyed
    # and lingers for delete_rekeyed_delay is harmless, so "delete job" lines are no sign.)
    assert not re.search(r"CREATE_CHILD_SA request \d+ \[ SA No (KE )?TSi TSr \]", log), log
    assert not re.search(r"CREATE_CHILD_SA (request|response) \d+ \[ N\((NO_PROP|TS_UNACCEPT|"
                         r"INVAL_KE|TEMP_FAIL|NO_CHILD_SA|INVAL_SYN)", log), log
    assert "IKE SA deleted" not in node.log_text(), node.log_text()
    assert "IKE SA failed" not in node.log_text(), node.log_text()
    events = our_child_events(node)
    assert_make_before_break(events)
    reasons = set(re.findall(r"CHILD SA deleted: .* reason=(.*)", node.log_text()))
    assert reasons == {"deleted by peer" if fast_side == "initiator" else "deleted by us"}, (
        reasons)
    assert sum(1 for what, _ in events if what == "established") >= CHILD_REKEYS + 1, events
    assert node.running()
    return charon, node, watch


@pytest.mark.parametrize("pfs", [False, True], ids=["no-pfs", "pfs"])
def test_strongswan_rekeys_child_and_ike_sas_while_ping_keeps_every_reply(
    lab: Lab, pfs: bool
) -> None:
    charon, node, _ = run_rekeys(lab, pfs=pfs, fast_side="initiator")
    log = charon.log_text()
    ke = "KE " if pfs else ""
    requests = count(r"generating " + CHILD_REKEY.format(kind="request", ke=ke), log)
    answers = count(r"parsed " + CHILD_REKEY_REPLY.format(kind="response", ke=ke), log)
    ike_requests = count(r"generating " + IKE_REKEY.format(kind="request"), log)
    ike_answers = count(r"parsed " + IKE_REKEY.format(kind="response"), log)
    report("strongSwan initiated", f"{requests} Child SA rekeys ({answers} answered), "
           f"{ike_requests} IKE SA rekeys ({ike_answers} answered)")
    assert requests >= CHILD_REKEYS and answers == requests, log
    assert ike_requests >= IKE_REKEYS and ike_answers == ike_requests, log
    assert count(r"IKE_SA rw\[\d+\] rekeyed between", log) == ike_requests, log
    ours = re.findall(r"IKE SA rekeyed: .* \(initiated by (us|the peer)\)", node.log_text())
    assert ours.count("the peer") >= IKE_REKEYS and "us" not in ours, node.log_text()


@pytest.mark.parametrize("pfs", [False, True], ids=["no-pfs", "pfs"])
def test_rekeys_initiated_by_our_node_are_accepted_by_strongswan(lab: Lab, pfs: bool) -> None:
    charon, node, _ = run_rekeys(lab, pfs=pfs, fast_side="responder")
    log = charon.log_text()
    ke = "KE " if pfs else ""
    requests = count(r"parsed " + CHILD_REKEY.format(kind="request", ke=ke), log)
    answers = count(r"generating " + CHILD_REKEY_REPLY.format(kind="response", ke=ke), log)
    ike_requests = count(r"parsed " + IKE_REKEY.format(kind="request"), log)
    ike_answers = count(r"generating " + IKE_REKEY.format(kind="response"), log)
    report("our node initiated", f"{requests} Child SA rekeys ({answers} answered), "
           f"{ike_requests} IKE SA rekeys ({ike_answers} answered)")
    assert requests >= CHILD_REKEYS and answers == requests, log
    assert ike_requests >= IKE_REKEYS and ike_answers == ike_requests, log
    # strongSwan never rekeyed on its own (its lifetimes are a minute)
    assert count(r"generating CREATE_CHILD_SA request", log) == 0, log
    ours = re.findall(r"IKE SA rekeyed: .* \(initiated by (us|the peer)\)", node.log_text())
    assert ours.count("us") >= IKE_REKEYS and "the peer" not in ours, node.log_text()


# --- 1a. both ends rekeying on the same schedule -----------------------------------------

SAME_CHILD = {"rekey_time": "4s", "life_time": "8s", "rand_time": "0s"}
SAME_IKE = {"over_time": "5s", "rand_time": "0s"}
SAME_WATCH = 30.0
CHILD_LIFE = 8.0


def child_ages(node: Node, now: float) -> dict[str, float]:
    """spi_in -> seconds each of our Child SAs lived, by the node's log (until `now`, a
    time.time(), for one still there)."""
    born: dict[str, float] = {}
    ages: dict[str, float] = {}
    for stamp, what, spi in re.findall(
            r"^(\S+ \S+) INFO \S+ CHILD SA (established|deleted): .* spi_in=([0-9a-f]{8})",
            node.log_text(), re.M):
        at = time.mktime(time.strptime(stamp.split(",")[0], "%Y-%m-%d %H:%M:%S"))
        at += int(stamp.split(",")[1]) / 1000
        if what == "established":
            born[spi] = at
        elif spi in born:
            ages[spi] = at - born.pop(spi)
    ages.update({spi: now - at for spi, at in born.items()})
    return ages


def test_both_ends_rekeying_at_once_keep_one_child_sa_and_every_ping(lab: Lab) -> None:
    """Both ends rekey the Child SA every 4 s and the IKE SA every 9 s, with no random
    part, so their requests often cross (RFC 7296 2.8.1: both complete, the exchange with
    the lowest nonce made the redundant SA; 2.8.2, 2.25: an IKE rekey meeting ours or an
    exchange of ours under way gets TEMPORARY_FAILURE). A ping loses nothing, none of our
    Child SAs outlives its life_time (one whose Delete got lost in such a crossing once
    stayed for good), and both ends end with the same one Child SA."""
    esp = PFS_ESP
    initiator_conn, responder_conn = conn_pair(esp_proposals=esp, responder_esp_proposals=esp)
    initiator_conn = replace(initiator_conn, rekey_time="9s",
                             extra=dict(SAME_IKE)).with_child(**SAME_CHILD)
    responder_conn = replace(responder_conn, rekey_time="9s",
                             node_extra=dict(SAME_IKE)).with_child(**SAME_CHILD)
    node = lab.node([responder_conn], extra_toml=WORKER_TOML)
    charon = lab.charon("initiator", log_levels={"ike": 2, "chd": 2})
    charon.load(initiator_conn)
    assert_initiated(charon.initiate("net"), charon)
    wait_for_log(node, r"CHILD SA established: net")
    wait_for_routes(lab.responder, present=True)

    watch = SaWatch(charon)
    pinging = BackgroundPing.start(lab, SAME_WATCH)
    watch_during(watch, pinging)
    sent, received, summary = pinging.result()
    log, text = charon.log_text(), node.log_text()
    report("both ends rekeying at once", f"{len(watch.children)} Child SAs and "
           f"{len(watch.ike)} IKE SAs seen; strongSwan saw "
           f"{count(r'detected CHILD_REKEY collision with CHILD_REKEY', log)} Child SA and "
           f"{count(r'detected IKE_REKEY collision with IKE_REKEY', log)} IKE SA rekey "
           f"collisions; ping: {summary}")
    assert received == sent and sent >= SAME_WATCH / 0.2 - 1, summary
    assert len(watch.children) >= SAME_WATCH / 4 - 1, watch.children.keys()
    overdue = {spi: age for spi, age in child_ages(node, time.time()).items()
               if age > CHILD_LIFE + SLACK}
    assert not overdue, f"{overdue}\n{text}"
    assert "IKE SA deleted" not in text and "IKE SA failed" not in text, text
    wait_for_one_child_sa_on_both(node, charon, 5)  # (a listing may catch a rekey half done)
    assert node.running(), text


LOSS_TABLE = "ikc_loss"
LOSS_PERCENT = 15
LOSS_WATCH = 40.0
# strongSwan's and our retransmissions: 0.5 s, then 1.4 times longer each, 6 times
FAST_RETRANSMITS = {"retransmit_timeout": 0.5, "retransmit_base": 1.4, "retransmit_tries": 6}


def _lose_ike(ns: Netns, percent: int) -> None:
    """Drop `percent` % of the IKE datagrams (UDP 4500, zero non-ESP marker) either way,
    at random (100: all); ESP passes."""
    ns.run(["nft", "add", "table", "inet", LOSS_TABLE])
    for chain, hook, match in (("out", "output", IKE_ON_4500_OUT),
                               ("in", "input", IKE_ON_4500_IN)):
        ns.run(["nft", "add", "chain", "inet", LOSS_TABLE, chain,
                f"{{ type filter hook {hook} priority 0; }}"])
        chance = ["numgen", "random", "mod", "100", "<", str(percent)] if percent < 100 else []
        ns.run(["nft", "add", "rule", "inet", LOSS_TABLE, chain, *match.split(), *chance,
                "drop"])


def test_ike_packet_loss_with_both_ends_rekeying_ends_with_one_child_sa_on_both(
    lab: Lab
) -> None:
    """15 % of the IKE datagrams lost either way while both ends rekey the Child SA
    every 4 s and the IKE SA every 9 s: retransmissions, rekey collisions and answers
    lost mid-collision. Found this way with strongSwan: a Child SA strongSwan lost
    (CHILD_SA_NOT_FOUND to our rekey) left both ends without one for good, and after a
    collision our data plane sent on the peer's redundant SA. Here the IKE SA lives on,
    most pings are answered and no outage outlasts a Child SA (strongSwan itself can
    lose its outbound SA for a few seconds when its rekey collided with ours and got
    TEMPORARY_FAILURE), and both ends end with the same one Child SA."""
    esp = PFS_ESP
    initiator_conn, responder_conn = conn_pair(esp_proposals=esp, responder_esp_proposals=esp)
    ike = {"over_time": "20s", "rand_time": "0s"}
    initiator_conn = replace(initiator_conn, rekey_time="9s", extra=ike).with_child(**SAME_CHILD)
    responder_conn = replace(responder_conn, rekey_time="9s",
                             node_extra=ike).with_child(**SAME_CHILD)
    node = lab.node([responder_conn], extra_toml=WORKER_TOML, settings={"ike": FAST_RETRANSMITS})
    charon = lab.charon("initiator", log_levels={"ike": 2, "chd": 2},
                        settings={k: str(v) for k, v in FAST_RETRANSMITS.items()})
    charon.load(initiator_conn)
    assert_initiated(charon.initiate("net"), charon)
    wait_for_log(node, r"CHILD SA established: net")
    wait_for_routes(lab.responder, present=True)
    _lose_ike(lab.initiator, LOSS_PERCENT)

    watch = SaWatch(charon)
    pinging = BackgroundPing.start(lab, LOSS_WATCH)
    watch_during(watch, pinging)
    sent, received, summary = pinging.result()
    lab.initiator.run(["nft", "delete", "table", "inet", LOSS_TABLE])
    log, text = charon.log_text(), node.log_text()
    retransmits = count(r"retransmit \d+ of request", log)
    report("IKE packet loss", f"{len(watch.children)} Child SAs and {len(watch.ike)} IKE SAs "
           f"seen; strongSwan: {retransmits} retransmits, "
           f"{count(r'detected CHILD_REKEY collision', log)} Child SA rekey collisions; "
           f"ours: {count(r'reason=unknown to the peer', text)} Child SAs created again; "
           f"ping: {summary}")
    assert "IKE SA deleted" not in text and "IKE SA failed" not in text, text
    assert len(watch.children) >= LOSS_WATCH / 4 - 1, watch.children.keys()
    # strongSwan 5.9.8, when its rekey of an SA we rekeyed got TEMPORARY_FAILURE (RFC 7296
    # 2.25.1), is left without an outbound SA from our Delete of the old SA to the next
    # rekey (one CI run had two gaps of 3 s in that pattern): no gap outlasts a Child SA
    assert longest_gap(summary) * 0.2 <= CHILD_LIFE, summary
    assert received >= 0.7 * sent, summary
    wait_for_one_child_sa_on_both(node, charon, 10)  # (a Delete may still be under way)
    assert node.running(), text


HARD_LIFE = 8.0  # our node's Child SA: no rekey, gone at 8 s


def test_a_child_sa_at_its_hard_lifetime_loses_its_keys_at_once_then_comes_again(
    lab: Lab
) -> None:
    """RFC 4301 4.4.2.1: our node's Child SA, never rekeyed, ends at its life_time, keys
    and all, while the Delete that tells strongSwan is still unanswered (IKE blocked
    here): strongSwan's pings then get no answer although it still holds the SA. Once
    IKE passes again, strongSwan takes the Delete and our node creates the child again
    (as strongSwan does after a hard expiry), with new SPIs that carry every ping."""
    initiator_conn, responder_conn = conn_pair()
    # (without MOBIKE: strongSwan's address update while IKE is blocked would end the SA)
    responder_conn = replace(responder_conn, node_extra={"mobike": False}).with_child(
        rekey_time="0s", life_time=f"{HARD_LIFE:g}s")
    node = lab.node([responder_conn], extra_toml=WORKER_TOML)
    charon = lab.charon("initiator", log_levels={"ike": 2, "chd": 2})
    charon.load(initiator_conn)
    first = child_sa(assert_initiated(charon.initiate("net"), charon))
    wait_for_log(node, r"CHILD SA established: net")
    wait_for_routes(lab.responder, present=True)
    sent, received, output = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4)
    assert (sent, received) == (5, 5), output

    _lose_ike(lab.initiator, 100)
    expired = wait_for_log(node, r"CHILD SA deleted: net .* reason=expired", timeout=HARD_LIFE + 5)
    assert f"spi_in={first['spi-out']}" in expired, expired
    sent, received, output = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4)
    still = [c for sa in established(charon) for c in sa.get("child-sas", {}).values()]
    report("hard lifetime", f"after it, IKE blocked: ping {received}/{sent}; strongSwan "
           f"lists {[(c['spi-in'], c['state']) for c in still]}")
    assert received == 0, output
    assert [c["spi-in"] for c in still] == [first["spi-in"]], still  # it never heard

    lab.initiator.run(["nft", "delete", "table", "inet", LOSS_TABLE])
    wait_for_log(node, r"CHILD SA established: net .* spi_in=(?!" + first["spi-out"] + ")",
                 timeout=SETTLE)
    wait_for_one_child_sa_on_both(node, charon, 10)
    [again] = [c for sa in established(charon) for c in sa.get("child-sas", {}).values()]
    assert again["spi-in"] != first["spi-in"], again
    wait_for_routes(lab.responder, present=True)
    sent, received, output = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4)
    log = charon.log_text()
    report("hard lifetime", f"created again: {again['spi-in']}/{again['spi-out']}; ping "
           f"{received}/{sent}")
    assert (sent, received) == (5, 5), output
    # (a Delete names its sender's inbound SPI: strongSwan's outbound one)
    assert re.search(r"received DELETE for ESP CHILD_SA with SPI " + first["spi-out"], log), log
    # a new Child SA, not a rekey: a CREATE_CHILD_SA from our node without N(REKEY_SA)
    created = re.findall(r"parsed CREATE_CHILD_SA request \d+ \[ (.*) \]", log)
    assert created and not any("REKEY_SA" in c for c in created), created
    assert "IKE SA deleted" not in node.log_text() and node.running()


SLOW_RETRANSMITS = {"retransmit_timeout": 1.0, "retransmit_base": 1.4, "retransmit_tries": 6}


def test_a_child_sa_that_expires_during_our_rekey_is_followed_by_the_rekeys_sa(
    lab: Lab
) -> None:
    """Our node's rekey of its Child SA (at 4 s) is not answered before the SA's
    life_time (8 s): IKE is blocked from 2 s to 9.5 s. The SA goes at 8 s; when a
    retransmission of the rekey gets through, strongSwan rekeys its SA, the answer's
    SA stands alone on our side (nothing created besides), our Delete of the expired
    one follows, and both ends hold that one Child SA, which carries every ping."""
    initiator_conn, responder_conn = conn_pair()
    responder_conn = replace(responder_conn, node_extra={"mobike": False}).with_child(
        rekey_time="4s", life_time="8s", rand_time="0s")
    node = lab.node([responder_conn], extra_toml=WORKER_TOML,
                    settings={"ike": SLOW_RETRANSMITS})
    charon = lab.charon("initiator", log_levels={"ike": 2, "chd": 2})
    charon.load(initiator_conn)
    first = child_sa(assert_initiated(charon.initiate("net"), charon))
    up = time.monotonic()
    wait_for_log(node, r"CHILD SA established: net")
    wait_for_routes(lab.responder, present=True)
    time.sleep(max(0.0, up + 2.0 - time.monotonic()))
    _lose_ike(lab.initiator, 100)
    wait_for_log(node, r"CHILD SA deleted: net .* reason=expired", timeout=10)
    time.sleep(max(0.0, up + 9.5 - time.monotonic()))
    lab.initiator.run(["nft", "delete", "table", "inet", LOSS_TABLE])
    wait_for_one_child_sa_on_both(node, charon, 20)
    [now] = [c for sa in established(charon) for c in sa.get("child-sas", {}).values()
             if c["state"] == "INSTALLED"]
    sent, received, output = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4)
    log, text = charon.log_text(), node.log_text()
    report("expired during rekey", f"{first['spi-in']} -> {now['spi-in']}; ping "
           f"{received}/{sent}; ours: {our_child_events(node)}")
    assert (sent, received) == (5, 5), output
    assert now["spi-in"] != first["spi-in"]
    created = re.findall(r"parsed CREATE_CHILD_SA request \d+ \[ (.*) \]", log)
    assert created and all("REKEY_SA" in c for c in created), created  # a rekey, no more
    assert re.search(r"received DELETE for ESP CHILD_SA with SPI " + first["spi-out"], log), log
    assert [what for what, _ in our_child_events(node)] == \
        ["established", "deleted", "established"], text
    assert "IKE SA deleted" not in text and node.running()


# --- 1b. reauthentication of an SA our node initiated -----------------------------------

REAUTH_TIME = 8  # our node's reauth_time: a new IKE SA at 7.2-8 s, the old one gone at 8.8 s
REAUTH_WATCH = 14.0  # seconds of ping across it


def test_our_initiator_reauthenticates_make_before_break_and_ping_keeps_every_reply(
    lab: Lab
) -> None:
    """Our node initiates to strongSwan with reauth_time = 8 s (RFC 7296 2.8.3): before
    the IKE SA's time is up it brings up a second IKE SA with its Child SA, without
    INITIAL_CONTACT (strongSwan keeps the first), then deletes the first. strongSwan
    ends with the new IKE SA alone, installed, and a ping across it all loses nothing."""
    ours, theirs = conn_pair(encap=True)
    charon = lab.charon("responder")
    charon.load(theirs)
    node = lab.node([replace(ours, node_extra={"reauth_time": REAUTH_TIME})
                     .with_child(start_action="start")],
                    side="initiator", node_id="a", addresses=(INITIATOR_V4,),
                    extra_toml='[worker]\ntun = "ikecA"\n')
    wait_for_log(node, r"CHILD SA established: net .* mode=tunnel")
    first = re.search(r"IKE SA established: rw spi_i=(\w+)", node.log_text())
    assert first, node.log_text()
    wait_for_routes(lab.initiator, present=True)

    watch = SaWatch(charon)
    pinging = BackgroundPing.start(lab, REAUTH_WATCH)
    watch_during(watch, pinging)
    sent, received, summary = pinging.result()
    watch.poll()
    text = node.log_text()
    report("reauthentication by our initiator", f"{len(watch.ike)} IKE SAs and "
           f"{len(watch.children)} Child SAs seen by strongSwan; ping: {summary}")

    old = first[1]
    replaced = re.search(rf"IKE SA {old}_i replaced by (\w+)_i; deleting it", text)
    assert replaced, text
    new = replaced[1]
    assert f"reauthenticating IKE SA {old}_i with a new IKE SA" in text, text
    assert re.search(rf"IKE SA deleted: spi_i={old} .* reason=reauthenticated", text), text
    assert_make_before_break(our_child_events(node))
    assert received == sent and sent >= REAUTH_WATCH / 0.2 - 1, summary
    # strongSwan: the first IKE_AUTH alone said INITIAL_CONTACT, the old SA went by our
    # Delete, and the new one, with its Child SA, is what is left
    log = charon.log_text()
    assert count(r"parsed IKE_AUTH request 1 \[ [^]]*N\(INIT_CONTACT\)", log) == 1, log
    assert count(r"parsed IKE_AUTH request 1 ", log) == 2, log
    assert count(r"received DELETE for IKE_SA rw", log) == 1, log
    (sa,) = established(charon)
    assert sa["initiator-spi"] == new, sa
    assert child_sa(sa)["state"] == "INSTALLED", sa
    assert "initiating again" not in text, text
    assert node.running(), text


@pytest.mark.parametrize("mbb", ["no", "yes"], ids=["break-before-make", "make-before-break"])
def test_strongswan_as_responder_reauthenticating_itself_is_not_initiated_over(
    lab: Lab, mbb: str
) -> None:
    """A strongSwan responder with reauth_time (6 s) reauthenticates by itself when it
    can (no virtual IP, no EAP): it initiates a new IKE SA to us and deletes the one our
    node initiated (after it, or with make_before_break before it). Our node, whose
    connection is to start, sees the connection up and does not initiate another over
    it: before, its INITIAL_CONTACT made strongSwan drop its new SA ("destroying
    duplicate IKE_SA") while our node kept its copy. One IKE SA on each side at the end,
    through three such rounds."""
    ours, theirs = conn_pair(encap=True)
    theirs = replace(theirs, extra={"reauth_time": "6s", "over_time": "10s",
                                    "rand_time": "1s"})
    charon = lab.charon("responder", settings={"make_before_break": mbb})
    charon.load(theirs)
    node = lab.node([ours.with_child(start_action="start")], side="initiator",
                    node_id="a", addresses=(INITIATOR_V4,),
                    extra_toml='[worker]\ntun = "ikecA"\n')
    wait_for_log(node, r"CHILD SA established: net .* mode=tunnel")
    wait_for_routes(lab.initiator, present=True)
    sent, received, output = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4, 200)
    text, log = node.log_text(), charon.log_text()
    rounds = count(r"reauthenticating IKE_SA rw", log)
    report(f"strongSwan responder reauthenticating, mbb={mbb}", f"{rounds} rounds; ping: "
           f"{output.splitlines()[-2] if output else ''}")
    assert rounds >= 2, log
    assert text.count("initiating IKE SA from") == 1, text
    assert text.count("the peer brought it up") >= rounds - 1, text
    assert "destroying duplicate IKE_SA" not in log, log

    def one_each() -> bool:  # (a round may be under way: a moment with 0 or 2)
        text = node.log_text()
        ours = count(r"IKE SA established: ", text) - count(r"IKE SA deleted: ", text)
        return ours == 1 and len(established(charon)) == 1
    deadline = time.monotonic() + 3
    while not one_each():
        assert time.monotonic() < deadline, f"{charon.list_sas()}\n{node.log_text()}"
        time.sleep(0.1)
    # strongSwan 5.9.8 deletes before it initiates (break-before-make): a ping may fall
    # into each gap
    assert received >= sent - rounds, output
    assert node.running(), text


@pytest.mark.parametrize("unique", ["keep", "replace"])
def test_strongswan_reauthenticates_make_before_break_under_unique(
    lab: Lab, unique: str
) -> None:
    """strongSwan (make_before_break = yes, the default from 6.0; reauth_time = 6 s)
    reauthenticates to our node while a ping runs: the new IKE SA comes from the same
    address and port without INITIAL_CONTACT, so under unique = keep our node keeps it
    (it deleted it before, and strongSwan then deleted the old one: nothing was left),
    and under unique = replace deletes the old one only after a grace period. Either
    way strongSwan deletes the old SA itself and the ping loses nothing."""
    initiator_conn, responder_conn = conn_pair()
    # (over_time: strongSwan's default, a tenth of its rekey_time, would end the old SA
    # before the new one is up)
    initiator_conn = replace(initiator_conn, extra={"reauth_time": "6s", "over_time": "10s"})
    responder_conn = replace(responder_conn, node_extra={"unique": unique})
    node = lab.node([responder_conn], extra_toml=WORKER_TOML)
    charon = lab.charon("initiator", settings={"make_before_break": "yes"})
    charon.load(initiator_conn)
    first = assert_initiated(charon.initiate("net"), charon)
    wait_for_log(node, r"CHILD SA established: net")
    wait_for_routes(lab.responder, present=True)

    pinging = BackgroundPing.start(lab, 10.0)
    watch = SaWatch(charon)
    watch_during(watch, pinging)
    sent, received, summary = pinging.result()
    text = node.log_text()
    report(f"strongSwan reauthenticating, unique = {unique}", summary)
    assert "suspected reauthentication (same peer address)" in text, text
    assert "reason=refused (unique = keep)" not in text, text
    assert re.search(rf"IKE SA deleted: spi_i={first['initiator-spi']} .* "
                     r"reason=deleted by peer", text), text
    assert received == sent, summary
    (sa,) = established(charon)
    assert sa["initiator-spi"] != first["initiator-spi"], sa
    assert child_sa(sa)["state"] == "INSTALLED", sa
    assert node.running(), text


# --- 2. dead peer detection ---------------------------------------------------------------

DPD_DELAY = 2.0
DPD_WATCH = 20.0
RETRANSMIT_TIMEOUT = 1.0  # our node's [ike] retransmit_timeout, retransmit_base (default)
RETRANSMIT_BASE = 1.8
RETRANSMIT_TRIES = 2
# The node's last request goes out at most dpd_delay after it last heard from the peer,
# then waits timeout * base^n after send n = 0..tries before it gives up.
GIVE_UP = sum(RETRANSMIT_TIMEOUT * RETRANSMIT_BASE**n for n in range(RETRANSMIT_TRIES + 1))
SLACK = 1.5  # scheduling, polling the log


def data_plane_counters(node: Node) -> dict[str, int]:
    """The counters of the node's "data plane stopped:" line (after it stopped)."""
    lines = [line for line in node.log_text().splitlines() if "data plane stopped:" in line]
    assert lines, f"no data plane counters in the node's log:\n{node.log_text()[-3000:]}"
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", lines[-1].split("stopped:")[1])}


def assert_worker_holds_no_sa(lab: Lab, node: Node, pings: int = 5) -> None:
    """With a route put back into the TUN, pings from the responder leave nothing on the
    wire: the data plane has no SA (and so no keys) left for the peer's network."""
    network = INITIATOR_NETS[4]
    lab.responder.ip("route", "add", network, "dev", TUN, "table", ROUTE_TABLE)
    wire = lab.wire_counters("responder", {
        "to_peer_out": ("out", f"ip daddr {network}"),
        "esp_raw_out": ("out", "ip protocol esp"),
        "udp4500_out": ("out", "udp dport 4500"),
    })  # fmt: skip
    before = wire.read()
    sent, received, output = ping(lab.responder, RESPONDER_INNER_V4, INITIATOR_INNER_V4, pings)
    assert (sent, received) == (pings, 0), output
    time.sleep(0.3)  # anything that did leave has crossed the veth by now
    seen = wire.since(before)
    assert seen == dict.fromkeys(seen, 0), f"packets left without an SA: {seen}"
    lab.responder.ip("route", "del", network, "dev", TUN, "table", ROUTE_TABLE)
    assert node.running(), node.log_text()


QUIET_DPD_DELAY = 6.0  # above the data plane's ACTIVITY_CHECK (5 s)
QUIET_WATCH = 20.0  # of ping, then as long again and ACTIVITY_CHECK more without
OUR_DPD = r"parsed INFORMATIONAL request \d+ \[ \]"  # as strongSwan logs our checks


def test_our_node_checks_liveness_only_while_no_esp_comes_from_the_peer(lab: Lab) -> None:
    """RFC 7296 2.4: a liveness check only when nothing protected came back recently.
    With dpd_delay = 6 s on our side alone, our node sends strongSwan no check during
    20 s of ping (the ESP it receives puts them off, as the kernel's SA use time does
    for strongSwan), and checks again every 6 s once the ping stops."""
    initiator_conn, responder_conn = conn_pair()
    responder_conn = replace(responder_conn, dpd_delay=f"{QUIET_DPD_DELAY:g}s",
                             node_extra={"mobike": False})
    node = lab.node([responder_conn], extra_toml=WORKER_TOML)
    charon = lab.charon("initiator")
    charon.load(initiator_conn)
    assert_initiated(charon.initiate("net"), charon)
    wait_for_log(node, r"CHILD SA established: net")
    wait_for_routes(lab.responder, present=True)

    pinging = BackgroundPing.start(lab, QUIET_WATCH)
    before = count(OUR_DPD, charon.log_text())
    while pinging.running():
        time.sleep(0.25)
    sent, received, summary = pinging.result()
    during = count(OUR_DPD, charon.log_text()) - before
    time.sleep(QUIET_WATCH + 5)
    after = count(OUR_DPD, charon.log_text()) - before - during
    report("liveness checks", f"ours during {QUIET_WATCH:g} s of ping: {during}; in "
           f"{QUIET_WATCH + 5:g} s without traffic: {after}; ping: {summary}")
    assert received == sent, summary
    assert during <= 1, charon.log_text()  # (one may be due as the ping starts)
    # the last sweep with traffic comes up to 5 s after the ping: then one every 6 s
    assert after >= QUIET_WATCH // QUIET_DPD_DELAY, charon.log_text()
    assert len(established(charon)) == 1


def test_dpd_both_ways_then_a_killed_initiator_is_cleared(lab: Lab) -> None:
    initiator_conn, responder_conn = conn_pair()
    initiator_conn = replace(initiator_conn, dpd_delay=f"{DPD_DELAY:g}s")
    # without MOBIKE: its address list exchange right after IKE_AUTH sets the two sides'
    # DPD timers in step, and then one side's checks alone keep the SA known alive
    responder_conn = replace(responder_conn, dpd_delay=f"{DPD_DELAY:g}s",
                             node_extra={"mobike": False})
    node = lab.node(
        [responder_conn], extra_toml=WORKER_TOML,
        settings={
            "node": {"log_level": "debug"},  # ExchangeCompleted events are logged at debug
            "ike": {"retransmit_timeout": RETRANSMIT_TIMEOUT,
                    "retransmit_base": RETRANSMIT_BASE, "retransmit_tries": RETRANSMIT_TRIES},
        },
    )  # fmt: skip
    charon = lab.charon("initiator", log_levels={"ike": 2})
    charon.load(initiator_conn)
    assert_initiated(charon.initiate("net"), charon)
    established_line = wait_for_log(node, r"IKE SA established: rw")
    spi_i, spi_r = re.findall(r"spi_[ir]=([0-9a-f]{16})", established_line)
    wait_for_log(node, r"CHILD SA established: net")
    wait_for_routes(lab.responder, present=True)  # the Child SA is routed into the TUN
    sent, received, output = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4)
    assert (sent, received) == (5, 5), output

    time.sleep(DPD_WATCH)  # no traffic: only liveness checks keep the SA known alive
    log = charon.log_text()
    node_log = node.log_text()
    theirs = (count(r"generating INFORMATIONAL request \d+ \[ \]", log),
              count(r"parsed INFORMATIONAL response \d+ \[ \]", log))
    ours_seen = (count(r"parsed INFORMATIONAL request \d+ \[ \]", log),
                 count(r"generating INFORMATIONAL response \d+ \[ \]", log))
    # ExchangeCompleted(exchange=<ExchangeType.INFORMATIONAL: 37>, as_responder=..., ...)
    exchange = r"ExchangeCompleted\(exchange=(?:<ExchangeType\.INFORMATIONAL: )?37>?"
    ours_done = count(exchange + r", as_responder=False, result='ok'\)", node_log)
    answered = count(exchange + r", as_responder=True, result='ok'\)", node_log)
    report("dpd", f"in {DPD_WATCH:g} s: strongSwan sent {theirs[0]} DPD requests "
           f"({count('sending DPD request', log)} logged as such), got {theirs[1]} answers, "
           f"our node answered {answered}; our node sent {ours_done} and strongSwan "
           f"parsed {ours_seen[0]}, answered {ours_seen[1]}")
    expected = int(DPD_WATCH / DPD_DELAY / 2)  # at least half the chances, each direction
    assert theirs[0] >= expected and theirs[1] == theirs[0], log
    assert count("sending DPD request", log) == theirs[0], log
    assert answered >= theirs[1], node_log
    # each side defers its check while it hears from the other, so ours run less often
    assert ours_done >= 3 and ours_seen[0] >= ours_done, node_log
    assert ours_seen[1] == ours_seen[0], log
    assert "IKE SA deleted" not in node_log and established(charon), node_log

    wire = lab.wire_counters("responder", {"ike_out": ("out", IKE_ON_4500_OUT)})
    assert charon.proc is not None
    pid = charon.proc.pid
    assert Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"/usr/lib/ipsec/charon")
    before = wire.read()
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)  # `ip netns exec` and sh exec'd: this is charon itself
    charon.proc.wait(timeout=5)
    deleted = wait_for_log(node, rf"IKE SA deleted: spi_i={spi_i} spi_r={spi_r}",
                           timeout=DPD_DELAY + GIVE_UP + SLACK + 5)
    took = time.monotonic() - killed
    wait_for_no_routes(lab.responder)
    retransmissions = wire.since(before)["ike_out"]
    report("dead peer", f"IKE SA deleted {took:.2f} s after kill -9 (bound "
           f"{DPD_DELAY + GIVE_UP:.2f} s = dpd_delay + {GIVE_UP:.2f} s of retransmissions); "
           f"{retransmissions} unanswered requests on the wire; {deleted.split(': ', 1)[1]}")
    assert deleted.endswith("reason=peer not responding"), deleted
    assert took <= DPD_DELAY + GIVE_UP + SLACK, took
    # it waited for its retransmissions: a request sent just before the kill at the earliest
    assert took >= GIVE_UP - DPD_DELAY, took
    assert RETRANSMIT_TRIES <= retransmissions <= RETRANSMIT_TRIES + 1, retransmissions
    child_line = wait_for_log(node, r"CHILD SA deleted: net")
    assert child_line.endswith("reason=peer not responding"), child_line
    lines = node.log_text().splitlines()
    assert lines.index(child_line) < lines.index(deleted), "Child SA deleted after the IKE SA"
    assert_worker_holds_no_sa(lab, node)
    assert node.stop() == 0
    counters = data_plane_counters(node)
    assert counters.get("no_sa_out", 0) >= 5, counters
    assert counters.get("sa_packets_out", 0) == 5, counters  # the first pings' replies only


# --- 3. deletes -----------------------------------------------------------------------------


def test_terminate_child_then_ike_sa_both_sides_agree_and_keys_are_gone(lab: Lab) -> None:
    initiator_conn, responder_conn = conn_pair()
    node = lab.node([responder_conn], extra_toml=WORKER_TOML)
    charon = lab.charon("initiator")
    charon.load(initiator_conn)
    sa = assert_initiated(charon.initiate("net"), charon)
    child = child_sa(sa)
    wait_for_log(node, r"CHILD SA established: net")
    wait_for_routes(lab.responder, present=True)
    wire = lab.wire_counters("initiator", {
        "esp_out": ("out", ESP_IN_UDP_OUT),
        "esp_in": ("in", ESP_IN_UDP_IN),
        "ike_out": ("out", IKE_ON_4500_OUT),
        "ike_in": ("in", IKE_ON_4500_IN),
    })  # fmt: skip
    sent, received, output = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4)
    assert (sent, received) == (5, 5), output

    # the Child SA alone
    result = charon.swanctl("--terminate", "--child", "net", "--timeout", "10", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    child_line = wait_for_log(node, r"CHILD SA deleted: net")
    assert f"spi_in={child['spi-out']} spi_out={child['spi-in']}" in child_line, child_line
    assert child_line.endswith("reason=deleted by peer"), child_line
    wait_for_no_routes(lab.responder)
    sas = charon.list_sas()
    assert len(sas) == 1 and sas[0]["state"] == "ESTABLISHED", sas
    assert not sas[0].get("child-sas"), sas  # strongSwan lists the IKE SA without a child
    assert "IKE SA deleted" not in node.log_text()
    before = wire.read()
    sent, received, output = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4)
    assert received == 0, output
    assert_worker_holds_no_sa(lab, node)
    seen = wire.since(before)
    assert seen["esp_out"] == seen["esp_in"] == 0, seen

    # then the IKE SA
    assert charon.terminate_ike().returncode == 0
    ike_line = wait_for_log(node, r"IKE SA deleted: ")
    assert f"spi_i={sa['initiator-spi']} spi_r={sa['responder-spi']}" in ike_line, ike_line
    assert ike_line.endswith("reason=deleted by peer"), ike_line
    assert charon.list_sas() == []
    lines = node.log_text().splitlines()
    assert lines.index(child_line) < lines.index(ike_line)
    assert len(re.findall(r"CHILD SA deleted", node.log_text())) == 1, node.log_text()
    wait_for_no_routes(lab.responder)
    before = wire.read()
    sent, received, output = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4)
    assert received == 0, output
    assert_worker_holds_no_sa(lab, node)
    seen = wire.since(before)
    report("terminate", f"wire after the IKE SA went: {seen}")
    assert seen == dict.fromkeys(seen, 0), seen  # no ESP, and no IKE either: nothing left
    assert node.stop() == 0
    counters = data_plane_counters(node)
    report("terminate", f"data plane: {counters}")
    assert counters.get("no_sa_out", 0) >= 10, counters  # both probes, refused in the SAD
    assert counters.get("sa_packets_out", 0) == 5, counters  # only while the SA existed
    assert counters.get("sa_packets_in", 0) == 5, counters


# --- 4. fragmented IKE_AUTH ---------------------------------------------------------------


def der_size(pem: bytes) -> int:
    """Bytes of DER in a PEM file's certificates, as CERT payloads carry them."""
    return sum(len(c.public_bytes(Encoding.DER)) for c in x509.load_pem_x509_certificates(pem))


def test_rsa4096_chain_establishes_through_fragmented_ike_auth(lab: Lab) -> None:
    pki = lab.dir / "pki"
    root = TestCa(pki, stem="root", common_name="lifecycle root", key_type="rsa",
                  key_size=4096)
    intermediate = root.intermediate("inter", "lifecycle intermediate", key_type="rsa",
                                     key_size=4096)
    gw = intermediate.issue("gw.example.test", key_type="rsa", key_size=4096, name="gw",
                            with_chain=True)
    client = intermediate.issue("client.example.test", key_type="rsa", key_size=4096,
                                name="client")
    chain_bytes = der_size(gw.cert.read_bytes())
    assert chain_bytes > 1500, chain_bytes  # leaf + intermediate: no single datagram
    initiator_conn, responder_conn = conn_pair(ca=root.cert_path, initiator_cred=client,
                                               responder_cred=gw)
    # strongSwan loads the intermediate (x509ca) to verify our leaf and to send its own
    initiator_conn = replace(initiator_conn, remote=replace(
        initiator_conn.remote, cacerts=(root.cert_path, intermediate.cert_path)))
    node = lab.node([responder_conn], extra_toml=WORKER_TOML)
    wire = lab.wire_counters("initiator", {
        "ike_out": ("out", IKE_ON_4500_OUT),
        "ike_in": ("in", IKE_ON_4500_IN),
        "ike_big_out": ("out", f"{IKE_ON_4500_OUT} ip length > 1280"),
        "ike_big_in": ("in", f"{IKE_ON_4500_IN} ip length > 1280"),
    })  # fmt: skip
    charon = lab.charon("initiator", log_levels={"enc": 2, "net": 2, "ike": 2, "cfg": 2})
    charon.load(initiator_conn)
    sa = assert_initiated(charon.initiate("net"), charon)
    assert sa["state"] == "ESTABLISHED"
    assert child_sa(sa)["state"] == "INSTALLED"
    wait_for_log(node, r"CHILD SA established: net")
    wait_for_routes(lab.responder, present=True)
    sent, received, output = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4)
    assert (sent, received) == (5, 5), output

    log = charon.log_text()
    assert "received FRAGMENTATION_SUPPORTED notify" in log, log
    split = re.search(r"splitting IKE message \((\d+) bytes\) into (\d+) fragments", log)
    assert split, log  # strongSwan's own IKE_AUTH request, its chain inside
    # strongSwan's worker threads may handle the fragments in any order: whichever comes
    # last completes the message, the others each wait
    reassembled = re.search(r"received fragment #(\d+) of (\d+), reassembled fragmented IKE "
                            r"message \((\d+) bytes\)", log)
    assert reassembled, log  # our IKE_AUTH response came in fragments
    fragments_in = int(reassembled[2])
    for n in set(range(1, fragments_in + 1)) - {int(reassembled[1])}:
        assert f"received fragment #{n} of {fragments_in}, waiting for complete" in log, log
    # our chain and the Child SA (RFC 6311 and MOBIKE support announced back)
    assert re.search(r"parsed IKE_AUTH response 1 \[ IDr CERT CERT AUTH N\(MSG_ID_SYN_SUP\) "
                     r"N\(MOBIKE_SUP\) "
                     r"SA TSi TSr \]", log), log
    assert 'received issuer cert "O=ike-cluster tests, CN=lifecycle intermediate"' in log
    assert "authentication of 'gw.example.test' with RSA" in log, log
    seen = wire.read()
    report("fragmentation", f"chain {chain_bytes} bytes DER; strongSwan split its "
           f"{split[1]}-byte IKE_AUTH into {split[2]} fragments; our {reassembled[3]}-byte "
           f"response came in {fragments_in}; IKE datagrams on 4500: {seen}")
    assert fragments_in >= 2 and int(split[2]) >= 2
    assert seen["ike_big_out"] == seen["ike_big_in"] == 0, seen  # nothing above 1280 bytes
    assert seen["ike_in"] >= fragments_in and seen["ike_out"] >= int(split[2]), seen
    assert re.search(r"IKE SA established: rw .* remote_id=client\.example\.test",
                     node.log_text()), node.log_text()
