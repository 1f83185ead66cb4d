"""A worker restarts under traffic (issue 5): its SAD comes back from Redis, traffic
resumes within 2 seconds, and no outbound (SPI, sequence number) pair is sent twice.

strongSwan (kernel-libipsec, so ESP in UDP on port 4500) pings through the worker while
tcpdump in strongSwan's namespace records every ESP packet the worker sends. The worker
is killed with SIGKILL and a new process with the same node id (same store table, same
TUN name) starts in its place. The wire, not the worker's log, says whether sequence
numbers were reused: RFC 4303 3.3.3 forbids sending a sequence number twice on one SA.
"""

from __future__ import annotations

import re
import signal
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from subprocess import Popen

import pytest

from tests.interop.cluster_lab import ClusterLab, ClusterNode
from tests.interop.lab import (
    INITIATOR_INNER_V4,
    RESPONDER_INNER_V4,
    RESPONDER_V4,
    Lab,
    conn_pair,
)
from tests.interop.netns import stop_process
from tests.interop.sa_checks import assert_initiated, child_sa
from tests.interop.spec import Conn
from tests.interop.test_lifecycle import ping, report
from tests.vectors.pcap import udp_datagrams

pytestmark = pytest.mark.interop

NATT_PORT = 4500
RESUME_LIMIT = 2.0  # seconds from the new worker's "ready" line to the first ping reply
TRAFFIC_BEFORE = 3.5  # seconds of ping before the kill: several sequence checkpoints (1 s)
TRAFFIC_AFTER = 3.0  # seconds of ping once replies are back
PING_INTERVAL = "0.05"
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


@dataclass(frozen=True)
class EspPacket:
    timestamp: float  # when tcpdump saw it (wall clock)
    spi: int
    seq: int


def esp_segments(payload: bytes) -> Iterator[bytes]:
    """The ESP packets in one captured UDP payload.

    The worker sends runs of one SA's packets as a UDP GSO send; on the veth such a run
    is one skb, and tcpdump on the receiving side records it unsplit: equal-sized ESP
    packets back to back, the next one starting with the same SPI and the next sequence
    number. A single packet has no such continuation.
    """
    spi, seq = payload[:4], struct.unpack_from("!I", payload, 4)[0]
    size = payload.find(spi + struct.pack("!I", (seq + 1) & 0xFFFFFFFF), 8)
    if size < 0:
        yield payload
        return
    for start in range(0, len(payload), size):
        yield payload[start:start + size]


def outbound_esp(pcap: Path, source: str) -> tuple[list[EspPacket], int]:
    """(every ESP-in-UDP packet ``source`` sent, how many captured datagrams held them)."""
    packets: list[EspPacket] = []
    datagrams = 0
    for ts, src, sport, _dst, _dport, payload in udp_datagrams(pcap):
        if src != source or sport != NATT_PORT or len(payload) < 8:
            continue
        if payload[:4] == b"\0\0\0\0":
            continue  # the non-ESP marker: IKE (RFC 3948 2.2)
        datagrams += 1
        for esp in esp_segments(payload):
            spi, seq = struct.unpack_from("!II", esp)
            assert spi == int.from_bytes(payload[:4], "big"), "split a run at a wrong offset"
            packets.append(EspPacket(ts, spi, seq))
    return packets, datagrams


@dataclass(frozen=True)
class Reply:
    timestamp: float  # ping -D: when the reply arrived (wall clock)
    icmp_seq: int


def ping_replies(text: str) -> list[Reply]:
    return [Reply(float(ts), int(seq)) for ts, seq in
            re.findall(r"^\[(\d+\.\d+)\] \d+ bytes from .*icmp_seq=(\d+)", text, re.M)]


def log_time(node: ClusterNode, needle: str) -> float:
    """Wall-clock time of the first line of the node's log containing ``needle``."""
    for line in node.log_text().splitlines():
        match = LOG_TIME.match(line)
        if match and needle in line:
            return datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    raise AssertionError(f"no {needle!r} in the log of {node.node_id}:\n{node.log_text()}")


def data_plane_counter(node: ClusterNode, name: str) -> int:
    """A counter from the "worker ... stopped: ...; data plane: ..." line of a stopped node."""
    match = re.search(rf"stopped: .*; data plane: .*\b{name}=(\d+)", node.log_text())
    assert match, f"no {name} in the stop line of {node.node_id}:\n{node.log_text()}"
    return int(match[1])


def start_capture(lab: Lab) -> tuple[Popen[bytes], Path]:
    """tcpdump on strongSwan's side of the wire: UDP 4500 both ways, to a pcap file."""
    pcap = lab.dir / "worker-restart.pcap"
    out = lab.dir / "tcpdump.out"
    proc = lab.initiator.spawn(
        ["tcpdump", "-i", "veth0", "-n", "-U", "--immediate-mode", "-Z", "root", "-B", "8192",
         "-w", str(pcap), "udp", "port", str(NATT_PORT)], output=out)
    deadline = time.monotonic() + 10
    while "listening on" not in out.read_text(errors="replace"):
        assert proc.poll() is None, out.read_text(errors="replace")
        assert time.monotonic() < deadline, "tcpdump did not start"
        time.sleep(0.05)
    return proc, pcap


def restart_worker(cluster: ClusterLab, old: ClusterNode, conns: list[Conn]) -> ClusterNode:
    """A new worker process with the old one's node id, config and TUN name.

    The old log moves aside first: the new process writes to the same path, and the lab
    waits for the "ready" line, which the old log already holds.
    """
    assert not old.running()
    old.log_path.rename(old.log_path.with_suffix(".before-restart.log"))
    new = cluster.worker(conns, node_id=old.node_id)
    assert new.extra["worker"]["tun"] == old.extra["worker"]["tun"]
    return new


def test_worker_restart_restores_the_sad_and_never_reuses_a_sequence_number() -> None:
    with Lab() as lab, ClusterLab(lab, responders=2) as cluster:
        initiator, responder = conn_pair()
        cluster.start([responder])
        charon = lab.charon("initiator")
        charon.load(initiator)
        sa = assert_initiated(charon.initiate("net"), charon)
        child = child_sa(sa)
        assert child["state"] == "INSTALLED"
        sent, received, out = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4)
        assert received == sent, f"no traffic through the cluster:\n{out}\n{cluster.logs()}"

        tcpdump, pcap = start_capture(lab)
        ping_out = lab.dir / "ping-restart.out"
        pinging = lab.initiator.spawn(
            ["ping", "-n", "-D", "-i", PING_INTERVAL, "-W", "1", "-I", INITIATOR_INNER_V4,
             RESPONDER_INNER_V4], output=ping_out)
        time.sleep(TRAFFIC_BEFORE)

        old = cluster.workers[0]
        old.kill()
        t_kill = time.time()
        t_spawn = time.time()
        new = restart_worker(cluster, old, [responder])
        t_ready = log_time(new, f"worker {new.node_id}: IKE on")

        deadline = time.monotonic() + 15
        while not any(r.timestamp > t_spawn for r in ping_replies(ping_out.read_text())):
            assert time.monotonic() < deadline, (
                f"no ping reply after the restart:\n{cluster.logs()}\n{charon.log_text()[-3000:]}")
            time.sleep(0.05)
        time.sleep(TRAFFIC_AFTER)
        pinging.send_signal(signal.SIGINT)
        pinging.wait(5)
        time.sleep(0.5)  # the last replies reach the pcap
        stop_process(tcpdump)
        assert new.stop() == 0, new.log_text()
        sent_by_new = data_plane_counter(new, "sa_packets_out")

        # the new worker rebuilt its SAD from the store, with jumped sequence numbers
        restored = re.search(r"restored (\d+) Child SAs from the store", new.log_text())
        assert restored and int(restored[1]) >= 1, new.log_text()

        # traffic came back within RESUME_LIMIT of the new worker being ready
        replies = ping_replies(ping_out.read_text())
        before = [r for r in replies if r.timestamp < t_kill]
        after = [r for r in replies if r.timestamp > t_spawn]
        assert before and after, ping_out.read_text()
        first = after[0].timestamp
        resume = first - t_ready
        assert resume <= RESUME_LIMIT, (
            f"first reply {resume:.2f} s after the worker was ready\n{cluster.logs()}")

        # on the wire: per SPI, every sequence number after the restart is above all before
        packets, datagrams = outbound_esp(pcap, RESPONDER_V4)
        seen: set[tuple[int, int]] = set()
        for packet in packets:
            pair = (packet.spi, packet.seq)
            assert pair not in seen, f"(SPI {packet.spi:08x}, seq {packet.seq}) sent twice"
            seen.add(pair)
        old_sent = [p for p in packets if p.timestamp < t_spawn]
        new_sent = [p for p in packets if p.timestamp >= t_spawn]
        spi_out = int(child["spi-in"], 16)  # strongSwan's inbound SPI is the worker's outbound
        assert {p.spi for p in new_sent} == {spi_out}, (
            f"the restarted worker sent on {sorted({p.spi for p in new_sent})}, "
            f"not on the restored {spi_out:08x}")
        old_seqs = [p.seq for p in old_sent if p.spi == spi_out]
        new_seqs = [p.seq for p in new_sent]
        assert old_seqs and new_seqs
        # the capture is complete: it holds every packet the new worker says it sent
        assert len(new_sent) == sent_by_new, (len(new_sent), sent_by_new)
        assert min(new_seqs) > max(old_seqs), (
            f"SPI {spi_out:08x}: sequence numbers {max(old_seqs)} before the restart, "
            f"{min(new_seqs)} after")
        # strongSwan still holds the Child SA the worker restored: nothing was renegotiated
        sas = charon.list_sas()
        assert len(sas) == 1 and child_sa(sas[0])["spi-in"] == child["spi-in"], sas

        report("worker restart",
               f"outage {first - t_kill:.2f} s from the kill, the new worker ready "
               f"{t_ready - t_spawn:.2f} s after its start, first reply {resume:.2f} s "
               f"after ready; ping: {len(before)} replies before, {len(after)} after")
        report("worker restart",
               f"SPI {spi_out:08x}: {len(old_seqs)} ESP packets before (last seq "
               f"{max(old_seqs)}), {len(new_seqs)} after (first seq {min(new_seqs)}), "
               f"jump {min(new_seqs) - max(old_seqs)}; {datagrams} captured datagrams, "
               f"{len(packets)} ESP packets (the new worker counted {sent_by_new} sent), "
               f"{int(restored[1])} Child SA(s) restored")
