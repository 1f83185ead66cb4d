"""Our userspace ESP data plane carries real traffic, and only as ESP (issue 3).

Every verdict comes from outside our node: ping and iperf3 replies, strongSwan's own
CHILD_SA counters, and nftables counters on the veth (``netdev`` ingress/egress
hooks), which see each packet as it crosses the wire whichever process made it.

- tunnel mode, strongSwan (kernel-libipsec, always ESP in UDP) initiating to our node;
- transport mode between two of our nodes, raw ESP and with encapsulation forced;
- every ESP transform we offer, each with strongSwan: ping and iperf3 both ways;
- IPv6 outside, inside or both, with strongSwan: ping and iperf3 both ways;
- two Child SAs of one IKE SA with strongSwan, each ping on its own SA;
- our node initiating (start_action) to strongSwan as the responder, with traffic;
- traffic selectors narrowed by us, or bound to ICMP, with strongSwan;
- 4000-byte pings, fragmented before the tunnel, both ways with strongSwan;
- a byte lifetime makes our node rekey with strongSwan, no ping lost;
- strongSwan's ESP captured on the wire, replayed and forged: dropped, counted, harmless;
- a packet routed into the TUN that no SA covers never leaves the namespace.

Run with ``-rP`` (or ``-s``) to see the ping, iperf3 and counter figures.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.worker.dataplane import REKEYED_LINGER
from tests.interop.certs import Pki
from tests.interop.charon import PLUGINS, Charon
from tests.interop.freeradius import FreeRadius
from tests.interop.lab import (
    INITIATOR_INNER_V4,
    INITIATOR_INNER_V6,
    INITIATOR_NETS,
    INITIATOR_V4,
    INITIATOR_V6,
    RESPONDER_INNER_V4,
    RESPONDER_INNER_V6,
    RESPONDER_NETS,
    RESPONDER_V4,
    RESPONDER_V6,
    VETH,
    Child,
    Conn,
    End,
    IperfResult,
    Lab,
    Netns,
    Node,
    WireCounters,
    conn_pair,
)
from tests.interop.node import logged
from tests.interop.sa_checks import algorithm, assert_initiated, assert_not_established, child_sa

pytestmark = pytest.mark.interop

PSK = "dataplane-test-secret"
IPERF_PORT = 5201
IPERF_SECONDS = 10
PINGS = 20
# How long daemons get to log an SA they negotiated (they normally take milliseconds).
SETTLE = 20.0

# Non-zero first payload word: ESP in UDP (RFC 3948), not IKE behind its zero marker.
ESP_IN_UDP_OUT = "udp dport 4500 @th,64,32 != 0"
ESP_IN_UDP_IN = "udp sport 4500 @th,64,32 != 0"
IKE_ON_4500_OUT = "udp dport 4500 @th,64,32 == 0"
INNER_PAIR = f"{{ {INITIATOR_INNER_V4}, {RESPONDER_INNER_V4} }}"
OUTER_PAIR = f"{{ {INITIATOR_V4}, {RESPONDER_V4} }}"


def worker_toml(tun: str) -> str:
    return f'[worker]\ntun = "{tun}"\n'


def wait_for_charon_log(charon: Charon, pattern: str) -> str:
    """charon's log, once a line matches ``pattern``."""
    return logged(charon.log_text, pattern, SETTLE)


def wait_for_log(node: Node, pattern: str, *, count: int = 1) -> list[str]:
    """The node's log lines matching ``pattern``, once there are ``count`` of them."""
    deadline = time.monotonic() + SETTLE
    while True:
        lines = [line for line in node.log_text().splitlines() if re.search(pattern, line)]
        if len(lines) >= count:
            return lines
        assert node.running(), f"node exited:\n{node.log_text()}"
        assert time.monotonic() < deadline, (
            f"no {count} log line(s) matching {pattern!r} within {SETTLE}s:\n{node.log_text()}"
        )
        time.sleep(0.05)


def ping(ns: Netns, source: str, target: str, count: int = PINGS, *, size: int = 56,
         tos: int = 0) -> tuple[int, int, str]:
    """(transmitted, received, output) of ``ping -c count -i 0.05 -s size -Q tos -I
    source target``."""
    proc = ns.run(
        ["ping", "-n", "-c", str(count), "-i", "0.05", "-W", "2", "-s", str(size),
         "-Q", hex(tos), "-I", source, target],
        check=False,
    )
    match = re.search(r"(\d+) packets transmitted, (\d+) received", proc.stdout)
    assert match, f"no ping summary:\n{proc.stdout}{proc.stderr}"
    return int(match[1]), int(match[2]), proc.stdout


def established_sas(charon: Charon) -> list[dict[str, Any]]:
    """strongSwan's ESTABLISHED IKE SAs, once there is one (our node initiated)."""
    deadline = time.monotonic() + SETTLE
    while not (sas := [sa for sa in charon.list_sas() if sa.get("state") == "ESTABLISHED"]):
        assert time.monotonic() < deadline, charon.log_text()
        time.sleep(0.1)
    return sas


def data_plane_counters(node: Node) -> dict[str, int]:
    """The counters in the node's last "data plane stopped:" line (after it stopped)."""
    lines = [line for line in node.log_text().splitlines() if "data plane stopped:" in line]
    assert lines, f"the node logged no data plane counters:\n{node.log_text()}"
    fields = lines[-1].split("data plane stopped:", 1)[1].split()
    return {k: int(v) for k, _, v in (f.partition("=") for f in fields if "=" in f)}


def report(label: str, text: str) -> None:
    # shown with -s; the figures are the point of these runs, not thresholds
    print(f"\n[{label}] {text}")


# --- tunnel mode with strongSwan ---------------------------------------------------------


def child_bytes(charon: Charon, name: str = "net") -> tuple[int, int]:
    """(bytes-in, bytes-out) of strongSwan's one CHILD_SA ``name``."""
    sas = [sa for sa in charon.list_sas() if sa.get("state") == "ESTABLISHED"]
    assert len(sas) == 1, f"expected one ESTABLISHED IKE SA: {sas}"
    child: Mapping[str, Any] = child_sa(sas[0], name)
    return int(child.get("bytes-in", 0)), int(child.get("bytes-out", 0))


def test_tunnel_mode_with_strongswan_libipsec_carries_ping_and_iperf3(
    lab: Lab, initiator: Charon
) -> None:
    initiator_conn, responder_conn = conn_pair(mode="tunnel")
    node = lab.node([responder_conn], extra_toml=worker_toml("ikec0"))
    wire = lab.wire_counters(
        "initiator",
        {
            "esp_udp_out": ("out", ESP_IN_UDP_OUT),
            "esp_udp_in": ("in", ESP_IN_UDP_IN),
            "ike_4500_out": ("out", IKE_ON_4500_OUT),
            "icmp_out": ("out", "ip protocol icmp"),
            "icmp_in": ("in", "ip protocol icmp"),
            "inner_out": ("out", f"ip saddr {INNER_PAIR} ip daddr {INNER_PAIR}"),
            "inner_in": ("in", f"ip saddr {INNER_PAIR} ip daddr {INNER_PAIR}"),
        },
    )
    initiator.load(initiator_conn)
    sa = assert_initiated(initiator.initiate("net"), initiator)
    assert child_sa(sa)["mode"] == "TUNNEL"
    assert child_sa(sa)["encap"] == "yes"  # libipsec always encapsulates
    wait_for_log(node, r"CHILD SA established: net .* mode=tunnel")
    bytes_before = child_bytes(initiator)

    before = wire.read()
    before_bytes = wire.read_bytes()
    # The counters tell IKE from ESP on port 4500: IKE_AUTH went there, no ESP yet.
    assert before["ike_4500_out"] > 0 and before["esp_udp_out"] == 0, before
    sent, received, output = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4)
    report("tunnel ping", output.strip().splitlines()[-2])
    assert (sent, received) == (PINGS, PINGS), output
    after_ping = wire.since(before)
    assert after_ping["esp_udp_out"] >= PINGS, after_ping
    assert after_ping["esp_udp_in"] >= PINGS, after_ping

    upload = lab.iperf3(
        server="responder", server_addr=RESPONDER_INNER_V4, client_addr=INITIATOR_INNER_V4,
        seconds=IPERF_SECONDS, port=IPERF_PORT,
    )  # fmt: skip
    download = lab.iperf3(
        server="responder", server_addr=RESPONDER_INNER_V4, client_addr=INITIATOR_INNER_V4,
        seconds=IPERF_SECONDS, port=IPERF_PORT, reverse=True,
    )  # fmt: skip
    report("tunnel iperf3", str(upload))
    report("tunnel iperf3", str(download))
    for result in (upload, download):
        assert result.received_bytes > 0 and result.seconds > IPERF_SECONDS / 2, result

    seen = wire.since(before)
    seen_bytes = wire.bytes_since(before_bytes)
    report("tunnel wire (initiator veth)", f"packets {seen}, bytes {seen_bytes}")
    # Each direction's bulk data crossed the wire as ESP in UDP, nothing in the clear.
    # Counted in bytes: the worker sends ESP in UDP with GSO, one skb per up to 64
    # datagrams, and nftables counts skbs (strongSwan's direction would pass either way).
    assert seen_bytes["esp_udp_out"] >= upload.received_bytes, seen_bytes
    assert seen_bytes["esp_udp_in"] >= download.received_bytes, seen_bytes
    assert seen["icmp_out"] == seen["icmp_in"] == 0, seen
    assert seen["inner_out"] == seen["inner_in"] == 0, seen

    bytes_in, bytes_out = child_bytes(initiator)
    report("tunnel strongSwan CHILD_SA", f"bytes-in {bytes_in}, bytes-out {bytes_out}")
    assert bytes_out - bytes_before[1] >= upload.received_bytes
    assert bytes_in - bytes_before[0] >= download.received_bytes
    assert node.running(), node.log_text()


ESP_MATRIX_SECONDS = 2


def iperf3_both_ways(lab: Lab, initiator_addr: str, responder_addr: str) -> list[IperfResult]:
    """Short iperf3 runs, the server in the responder's namespace: [up, down]."""
    return [lab.iperf3(server="responder", server_addr=responder_addr,
                       client_addr=initiator_addr, seconds=ESP_MATRIX_SECONDS,
                       port=IPERF_PORT, reverse=reverse)
            for reverse in (False, True)]  # fmt: skip


@pytest.mark.parametrize(
    ("proposal", "encr", "integ"),
    [
        ("aes128gcm16", "AES_GCM_16-128", None),
        ("chacha20poly1305", "CHACHA20_POLY1305", None),
        ("aes128-sha256", "AES_CBC-128", "HMAC_SHA2_256_128"),
        ("aes256-sha384", "AES_CBC-256", "HMAC_SHA2_384_192"),
        ("aes256-sha512", "AES_CBC-256", "HMAC_SHA2_512_256"),
        ("aes128-sha1", "AES_CBC-128", "HMAC_SHA1_96"),  # legacy, opted in
        ("3des-sha1", "3DES_CBC", "HMAC_SHA1_96"),  # legacy, opted in
    ],
)  # fmt: skip
def test_every_esp_cipher_carries_traffic_with_strongswan_libipsec(
    lab: Lab, initiator: Charon, proposal: str, encr: str, integ: str | None
) -> None:
    """Each ESP transform we offer (RFC 4106, RFC 7634, RFC 3602 + RFC 4868 / 2404)
    protects a ping and a short iperf3 run each way with strongSwan's own libipsec:
    every reply comes back and strongSwan's CHILD_SA of that cipher counts the bytes."""
    initiator_conn, responder_conn = conn_pair(
        esp_proposals=(proposal,), responder_esp_proposals=(proposal,))
    legacy = {"ike": {"legacy_algorithms": True}} if "sha1" in proposal else None
    node = lab.node([responder_conn], extra_toml=worker_toml("ikec0"), settings=legacy)
    initiator.load(initiator_conn)
    child = child_sa(assert_initiated(initiator.initiate("net"), initiator))
    assert (algorithm(child), child.get("integ-alg")) == (encr, integ), child
    wait_for_log(node, r"CHILD SA established: net .* mode=tunnel")
    bytes_before = child_bytes(initiator)

    sent, received, output = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4,
                                  count=10)
    assert (sent, received) == (10, 10), output
    runs = iperf3_both_ways(lab, INITIATOR_INNER_V4, RESPONDER_INNER_V4)
    report(f"{proposal} iperf3", f"up {runs[0]}; down {runs[1]}")
    for result in runs:
        assert result.received_bytes > 0, result
    bytes_in, bytes_out = child_bytes(initiator)
    assert bytes_out - bytes_before[1] >= runs[0].received_bytes
    assert bytes_in - bytes_before[0] >= runs[1].received_bytes
    assert node.running(), node.log_text()
    node.stop()
    counters = data_plane_counters(node)
    assert counters.get("sa_packets_in", 0) >= 10 and counters.get("sa_packets_out", 0) >= 10
    for bad in ("sa_integrity_failures", "sa_pad_errors", "sa_malformed_drops"):
        assert counters.get(bad, 0) == 0, counters


def test_sha256_96_changes_only_our_icv_and_a_128_bit_peer_drops_it(
        lab: Lab, initiator: Charon) -> None:
    """swanctl's sha256_96 (HMAC-SHA-256 with a 96-bit ICV, for old peers) on our child
    alone: the negotiation is the same (strongSwan lists HMAC_SHA2_256_128), our log
    names sha256_96, and no ESP packet passes either end's check, so the ICV on the
    wire did change. (strongSwan's libipsec has no HMAC_SHA2_256_96 to set on its side:
    "unsupported integrity algorithm"; a kernel's SA would.)"""
    initiator_conn, responder_conn = conn_pair(
        esp_proposals=("aes128-sha256",), responder_esp_proposals=("aes128-sha256",))
    node = lab.node([responder_conn.with_child(sha256_96=True)],
                    extra_toml=worker_toml("ikec0"))
    initiator.load(initiator_conn)
    child = child_sa(assert_initiated(initiator.initiate("net"), initiator))
    assert child.get("integ-alg") == "HMAC_SHA2_256_128", child
    line = wait_for_log(node, r"CHILD SA established: net .* mode=tunnel")[0]
    assert " esp=aes128-sha256_96 " in line, line
    sent, received, output = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4,
                                  count=10)
    assert (sent, received) == (10, 0), output
    node.stop()
    counters = data_plane_counters(node)
    report("sha256_96 (ours only)", str(counters))
    # 16-byte ICVs cut as 12: what is left is no whole number of cipher blocks
    assert counters.get("sa_packets_in", 0) == 0, counters
    assert counters.get("sa_malformed_drops", 0) >= 10, counters


def test_the_windows_client_default_proposals_with_legacy_algorithms(
        lab: Lab, initiator: Charon) -> None:
    """Windows' built-in IKEv2 client proposes AES-CBC-256, SHA-1 and MODP-1024 unless its
    registry says otherwise; with `legacy_algorithms` our node accepts exactly that (and
    without it, the config refuses modp1024 as a legacy algorithm)."""
    windows = ("aes256-sha1-modp1024",)
    initiator_conn, responder_conn = conn_pair(
        proposals=windows, esp_proposals=("aes256-sha1",),
        responder_esp_proposals=("aes256-sha1",))
    responder_conn = replace(responder_conn, proposals=windows)
    node = lab.node([responder_conn], extra_toml=worker_toml("ikec0"),
                    settings={"ike": {"legacy_algorithms": True}})
    initiator.load(initiator_conn)
    sa = assert_initiated(initiator.initiate("net"), initiator)
    assert (algorithm(sa), sa.get("integ-alg"), sa["dh-group"]) == (
        "AES_CBC-256", "HMAC_SHA1_96", "MODP_1024"), sa
    sent, received, output = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4)
    assert (sent, received) == (PINGS, PINGS), output
    assert node.running(), node.log_text()


INNER = {4: (INITIATOR_INNER_V4, RESPONDER_INNER_V4), 6: (INITIATOR_INNER_V6, RESPONDER_INNER_V6)}


@pytest.mark.parametrize(("outer", "inner"), [(6, 6), (6, 4), (4, 6)],
                         ids=["v6-in-v6", "v4-in-v6", "v6-in-v4"])
def test_ipv6_tunnels_with_strongswan_libipsec_carry_ping_and_iperf3(
    lab: Lab, initiator: Charon, outer: int, inner: int
) -> None:
    """IPv6 outside, inside or both: ESP in UDP over IPv6 (RFC 3948) between strongSwan
    and our worker, IPv6 routes into the TUN, IPv6 TCP segments sealed and coalesced."""
    initiator_conn, responder_conn = conn_pair(family=outer)
    initiator_conn = initiator_conn.with_child(local_ts=(INITIATOR_NETS[inner],),
                                               remote_ts=(RESPONDER_NETS[inner],))
    responder_conn = responder_conn.with_child(local_ts=(RESPONDER_NETS[inner],),
                                               remote_ts=(INITIATOR_NETS[inner],))
    responder_outer = RESPONDER_V6 if outer == 6 else RESPONDER_V4
    node = lab.node([responder_conn], addresses=(responder_outer,),
                    extra_toml=worker_toml("ikec0"))
    ip = "ip6" if outer == 6 else "ip"
    inner_ip = "ip6" if inner == 6 else "ip"
    wire = lab.wire_counters(
        "initiator",
        {
            "esp_udp_out": ("out", f"{ip} daddr {responder_outer} {ESP_IN_UDP_OUT}"),
            "esp_udp_in": ("in", f"{ip} saddr {responder_outer} {ESP_IN_UDP_IN}"),
            "inner_out": ("out", f"{inner_ip} daddr {RESPONDER_NETS[inner]}"),
            "inner_in": ("in", f"{inner_ip} saddr {RESPONDER_NETS[inner]}"),
        },
    )
    initiator.load(initiator_conn)
    child = child_sa(assert_initiated(initiator.initiate("net"), initiator))
    assert child["encap"] == "yes" and child["remote-ts"] == [RESPONDER_NETS[inner]], child
    wait_for_log(node, r"CHILD SA established: net .* mode=tunnel")
    bytes_before = child_bytes(initiator)
    before, before_bytes = wire.read(), wire.read_bytes()

    source, target = INNER[inner]
    sent, received, output = ping(lab.initiator, source, target)
    assert (sent, received) == (PINGS, PINGS), output
    runs = iperf3_both_ways(lab, source, target)
    label = f"v{inner}-in-v{outer} tunnel"
    report(f"{label} iperf3", f"up {runs[0]}; down {runs[1]}")
    seen, seen_bytes = wire.since(before), wire.bytes_since(before_bytes)
    report(f"{label} wire (initiator veth)", f"packets {seen}, bytes {seen_bytes}")
    assert seen_bytes["esp_udp_out"] >= runs[0].received_bytes, seen_bytes
    assert seen_bytes["esp_udp_in"] >= runs[1].received_bytes, seen_bytes
    assert seen["inner_out"] == seen["inner_in"] == 0, seen
    bytes_in, bytes_out = child_bytes(initiator)
    assert bytes_out - bytes_before[1] >= runs[0].received_bytes
    assert bytes_in - bytes_before[0] >= runs[1].received_bytes
    assert node.running(), node.log_text()


SECOND = {"initiator": "10.99.3.1", "responder": "10.99.4.1"}  # net2's inner addresses


def with_second_child(lab: Lab, initiator_conn: Conn, responder_conn: Conn
                      ) -> tuple[Conn, Conn]:
    """Both ends' connections with a second child, net2 (10.99.3.0/24 behind the
    initiator, 10.99.4.0/24 behind the responder), and an address of each on lo."""
    lab.initiator.ip("addr", "add", f"{SECOND['initiator']}/32", "dev", "lo")
    lab.responder.ip("addr", "add", f"{SECOND['responder']}/32", "dev", "lo")
    initiator_conn = replace(initiator_conn, children=(initiator_conn.child, replace(
        initiator_conn.child, name="net2", local_ts=("10.99.3.0/24",),
        remote_ts=("10.99.4.0/24",))))
    responder_conn = replace(responder_conn, children=(responder_conn.child, replace(
        responder_conn.child, name="net2", local_ts=("10.99.4.0/24",),
        remote_ts=("10.99.3.0/24",))))
    return initiator_conn, responder_conn


def assert_each_child_carries_its_own_pings(lab: Lab, charon: Charon) -> None:
    """Pings on each child's addresses cross strongSwan's CHILD_SA of that name, and
    only that one (its per-CHILD_SA byte counters)."""
    def counters() -> dict[str, tuple[int, int]]:
        return {name: child_bytes(charon, name) for name in ("net", "net2")}

    for child, source, target in (("net", INITIATOR_INNER_V4, RESPONDER_INNER_V4),
                                  ("net2", SECOND["initiator"], SECOND["responder"])):
        before = counters()
        sent, received, output = ping(lab.initiator, source, target)
        assert (sent, received) == (PINGS, PINGS), output
        after = counters()
        other = "net2" if child == "net" else "net"
        grown = [a - b for a, b in zip(after[child], before[child], strict=True)]
        assert min(grown) >= PINGS * 84, (child, before, after)  # 84-byte IPv4 echoes
        assert after[other] == before[other], (child, before, after)


def test_two_child_sas_of_one_ike_sa_each_carry_their_own_traffic(
    lab: Lab, initiator: Charon
) -> None:
    """A second Child SA (CREATE_CHILD_SA, RFC 7296 1.3.1) with other selectors: our
    worker picks the outbound SA by traffic selector, and strongSwan's per-CHILD_SA
    counters show each ping crossed its own SA and only that one."""
    initiator_conn, responder_conn = with_second_child(lab, *conn_pair())
    node = lab.node([responder_conn], extra_toml=worker_toml("ikec0"))
    initiator.load(initiator_conn)
    assert_initiated(initiator.initiate("net"), initiator)
    assert initiator.initiate("net2").returncode == 0, initiator.log_text()
    wait_for_log(node, r"CHILD SA established: net2? .* mode=tunnel", count=2)
    assert_each_child_carries_its_own_pings(lab, initiator)
    assert node.running(), node.log_text()


FORGE = Path(__file__).with_name("esp_forge.py")
FORGED = 5
METRICS = "127.0.0.1:9464"  # in the responder's namespace


def drop_counts(ns: Netns) -> dict[str, float]:
    """Our node's drop counters from its Prometheus endpoint: "esp:<reason>" for
    esp_dropped_packets_total, "ike:<reason>" for datagrams_dropped_total, and
    "acquires" for esp_acquires_total."""
    text = ns.run([sys.executable, "-c",
                   "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
                   f"'http://{METRICS}/metrics', timeout=5).read().decode())"]).stdout
    kinds = {"ike_cluster_esp_dropped_packets": "esp", "ike_cluster_datagrams_dropped": "ike"}
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            kind = kinds.get(family.name)
            if kind and sample.name.endswith("_total"):
                counts[f"{kind}:{sample.labels['reason']}"] = sample.value
            elif family.name == "ike_cluster_esp_acquires" and sample.name.endswith("_total"):
                counts["acquires"] = sample.value
    return counts


def start_forge(lab: Lab, args: list[str], out: Path) -> subprocess.Popen[bytes]:
    """esp_forge.py in the initiator's namespace, once its capture socket is open."""
    forge = lab.initiator.spawn([sys.executable, str(FORGE), *args], output=out)
    deadline = time.monotonic() + SETTLE
    while "listening" not in out.read_text():
        assert forge.poll() is None and time.monotonic() < deadline, out.read_text()
        time.sleep(0.05)
    return forge


def test_replayed_forged_and_truncated_esp_is_dropped_counted_and_harmless(
    lab: Lab, initiator: Charon
) -> None:
    """ESP captured on the wire and sent again is refused as a replay (RFC 4303 3.4.3);
    a copy with a sequence number far ahead fails the ICV and must not move the window
    (else the real packets after it would be "too old"); a datagram cut after the SPI
    and one with an unknown SPI are dropped. Each shows in the node's metrics, and the
    SA carries on."""
    initiator_conn, responder_conn = conn_pair()
    node = lab.node([responder_conn], extra_toml=worker_toml("ikec0"),
                    settings={"metrics": {"listen": METRICS, "interval": 0.1}})
    initiator.load(initiator_conn)
    assert_initiated(initiator.initiate("net"), initiator)
    wait_for_log(node, r"CHILD SA established: net .* mode=tunnel")
    out = lab.dir / "esp-forge.txt"
    forge = start_forge(lab, [VETH, RESPONDER_V4, str(FORGED)], out)
    sent, received, output = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4)
    assert (sent, received) == (PINGS, PINGS), output
    assert forge.wait(timeout=SETTLE) == 0, out.read_text()
    report("forged ESP", out.read_text().strip().splitlines()[-1])
    # strongSwan's next packets carry sequence numbers far below the forged one
    sent, received, output = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4)
    assert (sent, received) == (PINGS, PINGS), output
    expected = {"esp:replay": FORGED, "esp:integrity": 1, "esp:no_sa_inbound": 1,
                "ike:malformed": 1}  # too short for ESP, no IKE marker: RFC 3948 2.2
    deadline = time.monotonic() + SETTLE
    while {k: drop_counts(lab.responder).get(k) for k in expected} != expected:
        assert time.monotonic() < deadline, (expected, drop_counts(lab.responder))
        time.sleep(0.2)
    counts = drop_counts(lab.responder)
    report("forged ESP node metrics", str(counts))
    assert sum(counts.values()) == sum(expected.values()), counts  # nothing else dropped
    assert node.running(), node.log_text()


def test_esp_on_the_sa_strongswan_rekeyed_away_is_received_for_a_while_after_its_delete(
    lab: Lab, initiator: Charon
) -> None:
    """strongSwan rekeys the Child SA and deletes the old one (RFC 7296 1.3.3, 1.4.1).
    ESP it sent on the old SA before switching may still be on its way: for
    REKEYED_LINGER seconds after the Delete our worker still knows the old SA (a packet
    captured on it and sent again is refused as a replay, so it was looked up and
    checked), and after that the SPI is gone (no_sa_inbound)."""
    initiator_conn, responder_conn = conn_pair()
    node = lab.node([responder_conn], extra_toml=worker_toml("ikec0"),
                    settings={"metrics": {"listen": METRICS, "interval": 0.1}})
    initiator.load(initiator_conn)
    first = child_sa(assert_initiated(initiator.initiate("net"), initiator))
    wait_for_log(node, r"CHILD SA established: net .* mode=tunnel")
    kept, out = lab.dir / "old-sa-esp.hex", lab.dir / "esp-keep.txt"
    keep = start_forge(lab, ["--keep", VETH, RESPONDER_V4, str(kept)], out)
    sent, received, output = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4, 3)
    assert (sent, received) == (3, 3), output
    assert keep.wait(timeout=SETTLE) == 0, out.read_text()
    assert bytes.fromhex(kept.read_text())[:4].hex() == first["spi-out"], first

    def send_kept_and_count(reason: str, before: float) -> None:
        lab.initiator.run([sys.executable, str(FORGE), "--send", RESPONDER_V4, str(kept)])
        deadline = time.monotonic() + SETTLE
        while drop_counts(lab.responder).get(f"esp:{reason}", 0) != before + 1:
            assert time.monotonic() < deadline, (reason, drop_counts(lab.responder))
            time.sleep(0.1)

    initiator.rekey(child="net")
    deleted = wait_for_log(node, r"CHILD SA deleted: net .* reason=deleted by peer")
    send_kept_and_count("replay", 0)  # the old SA still checks it
    counts = drop_counts(lab.responder)
    assert counts.get("esp:no_sa_inbound", 0) == 0, counts
    (sa,) = [sa for sa in initiator.list_sas() if sa.get("state") == "ESTABLISHED"]
    (new,) = [c for c in sa["child-sas"].values() if c["state"] == "INSTALLED"]
    assert new["spi-out"] != first["spi-out"], (first, sa)
    sent, received, output = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4, 3)
    assert (sent, received) == (3, 3), output  # the new SA carries the traffic
    time.sleep(REKEYED_LINGER + 1)
    send_kept_and_count("no_sa_inbound", 0)
    assert drop_counts(lab.responder).get("esp:replay") == 1
    report("rekeyed SA linger", f"{deleted[0]}; replay within, no SA after")
    assert node.running(), node.log_text()


# --- a real NAT in front of strongSwan --------------------------------------------------

NAT_TABLE = "ikc_nat"


def source_nat(lab: Lab, public: str, port_500: int, port_4500: int) -> None:
    """Source NAT in the initiator's namespace, as a home router would do it: UDP 500 and
    4500 from the initiator's address to the responder's leave from `public` and the
    given ports (conntrack undoes it for the replies). Called again, it is a new
    mapping: the old table and every conntrack entry are dropped, so the next packet
    gets the new one."""
    ns = lab.initiator
    ns.ip("addr", "replace", f"{public}/32", "dev", VETH)  # it answers ARP for it
    script = lab.dir / "nat.nft"
    rules = "".join(
        f"        ip saddr {INITIATOR_V4} ip daddr {RESPONDER_V4} udp sport {sport} "
        f"snat to {public}:{port}\n"
        for sport, port in ((500, port_500), (4500, port_4500)))
    script.write_text(
        f"table ip {NAT_TABLE} {{}}\ndelete table ip {NAT_TABLE}\n"
        f"table ip {NAT_TABLE} {{\n    chain post {{\n"
        "        type nat hook postrouting priority srcnat; policy accept;\n"
        f"{rules}    }}\n}}\n")
    ns.run(["nft", "-f", str(script)])
    ns.run([sys.executable, "-c", "from pyroute2 import Conntrack; Conntrack().flush()"])


def test_strongswan_behind_a_nat_and_its_mapping_changing(lab: Lab, initiator: Charon) -> None:
    """strongSwan behind a source NAT (new address and ports, conntrack): both sides
    detect it (RFC 7296 2.23), IKE moves to 4500 and ESP travels in UDP through the NAT
    both ways, with no forced encapsulation. Then the NAT forgets the mapping and makes a
    new one (another address, other ports), as home routers do: our replies to the old
    one are lost until strongSwan's next authenticated message (its DPD) reaches us from
    the new one; we move the IKE SA and its ESP there, and pings get through again."""
    initiator_conn, responder_conn = conn_pair()
    initiator_conn = replace(initiator_conn, dpd_delay="2s")
    source_nat(lab, "10.99.0.9", 40500, 44500)
    wire = lab.wire_counters("initiator", {
        f"esp_{name}_{way}": (way, f"{match} @th,64,32 != 0")
        for name, public, port in (("a", "10.99.0.9", 44500), ("b", "10.99.0.10", 44501))
        for way, match in (("out", f"ip saddr {public} udp sport {port} udp dport 4500"),
                           ("in", f"ip daddr {public} udp dport {port} udp sport 4500"))})
    node = lab.node([responder_conn], extra_toml=worker_toml("ikec0"))
    initiator.load(initiator_conn)
    sa = assert_initiated(initiator.initiate("net"), initiator)
    assert sa.get("nat-local") == "yes" and "nat-fake" not in sa, sa
    line = wait_for_log(node, r"IKE SA established: rw ")[0]
    assert "peer=10.99.0.9:" in line and line.endswith("(NAT)"), line
    line = wait_for_log(node, r"CHILD SA established: net .* mode=tunnel")[0]
    assert line.endswith(" encap"), line
    before = wire.read()
    sent, received, output = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4)
    assert (sent, received) == (PINGS, PINGS), output
    counts = wire.since(before)
    assert counts["esp_a_out"] >= PINGS and counts["esp_a_in"] >= PINGS, counts

    source_nat(lab, "10.99.0.10", 40501, 44501)
    moved = wait_for_log(node, r"IKE SA moved: .* peer=10\.99\.0\.10:44501 ")
    before = wire.read()
    sent, received, output = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4)
    assert (sent, received) == (PINGS, PINGS), output
    counts = wire.since(before)
    assert counts["esp_b_out"] >= PINGS and counts["esp_b_in"] >= PINGS, counts
    assert counts["esp_a_out"] == counts["esp_a_in"] == 0, counts
    (sa,) = [sa for sa in initiator.list_sas() if sa.get("state") == "ESTABLISHED"]
    assert child_sa(sa)["state"] == "INSTALLED", sa
    report("NAT rebinding", moved[0])
    assert node.running(), node.log_text()


def road_warrior(lab: Lab, dns: tuple[str, ...] = (), **child: object
                 ) -> tuple[Charon, Node]:
    """strongSwan asking for a virtual IP (`vips = 0.0.0.0`, installed on its TUN) and our
    node leasing from pool rw (10.99.3.0/28) to the child's dynamic remote selector;
    `child`: more of our child's settings."""
    charon = lab.charon("initiator", settings={"install_virtual_ip": "yes"})
    initiator_conn, responder_conn = conn_pair()
    initiator_conn = replace(initiator_conn, extra={"vips": "0.0.0.0"}).with_child(local_ts=())
    responder_conn = replace(responder_conn, node_extra={"pools": ["rw"]}).with_child(
        remote_ts=(), **child)
    pool = f'[pools.rw]\naddrs = "10.99.3.0/28"\ndns = {json.dumps(list(dns))}\n'
    node = lab.node([responder_conn], extra_toml=worker_toml("ikec0") + pool)
    charon.load(initiator_conn)
    return charon, node


def test_a_road_warrior_gets_a_virtual_ip_from_the_pool_and_traffic_crosses(
        lab: Lab) -> None:
    """strongSwan as a road warrior (`vips = 0.0.0.0`) asks for an address in IKE_AUTH;
    our node leases one from the connection's pool (RFC 7296 2.19) with the pool's DNS
    server, narrows the Child SA to it, and routes it into the TUN: strongSwan installs
    the address and pings from it cross. After strongSwan deletes the SA and comes back,
    the lease returns to the same identity: the same address again."""
    charon, node = road_warrior(lab, dns=("10.99.2.53",))
    wire = lab.wire_counters("initiator", {"esp_out": ("out", ESP_IN_UDP_OUT),
                                           "esp_in": ("in", ESP_IN_UDP_IN)})
    for attempt in range(2):
        sa = assert_initiated(charon.initiate("net"), charon)
        assert sa.get("local-vips") == ["10.99.3.1"], sa
        child = child_sa(sa)
        assert child.get("local-ts") == ["10.99.3.1/32"], child
        assert child.get("remote-ts") == [RESPONDER_NETS[4]], child
        line = wait_for_log(node, r"IKE SA established: rw ", count=attempt + 1)[-1]
        assert " vip=10.99.3.1" in line, line
        assert re.search(r"CHILD SA established: net .*10\.99\.3\.1/32",
                         node.log_text()), node.log_text()
        before = wire.read()
        sent, received, output = ping(lab.initiator, "10.99.3.1", RESPONDER_INNER_V4)
        assert (sent, received) == (PINGS, PINGS), output
        counts = wire.since(before)
        assert counts["esp_out"] >= PINGS and counts["esp_in"] >= PINGS, counts
        # the pool's DNS server arrived (this charon loads no plugin that would use it)
        assert "handling INTERNAL_IP4_DNS attribute" in charon.log_text(), charon.log_text()
        charon.terminate_ike()
        wait_for_log(node, r"IKE SA deleted: ", count=attempt + 1)
    assert node.running(), node.log_text()


def test_a_road_warrior_reauthenticating_make_before_break_keeps_its_virtual_ip(
        lab: Lab) -> None:
    """strongSwan as a road warrior with make_before_break = yes (its default from 6.0),
    told AUTH_LIFETIME by our gateway (reauth_time = 8 s): its new IKE SA asks for the
    address it has, our pool gives the same one to the same identity while the old SA
    still holds it, strongSwan deletes the old SA, and pings from the address across
    every reauthentication lose nothing; the lease stays with the new SA."""
    charon = lab.charon("initiator", settings={"install_virtual_ip": "yes",
                                               "make_before_break": "yes"})
    initiator_conn, responder_conn = conn_pair()
    # strongSwan starts over_time before the AUTH_LIFETIME ends: at 5 s
    initiator_conn = replace(initiator_conn, extra={"vips": "0.0.0.0", "over_time": "3s"}
                             ).with_child(local_ts=())
    responder_conn = replace(responder_conn, node_extra={"pools": ["rw"], "reauth_time": 8}
                             ).with_child(remote_ts=())
    node = lab.node([responder_conn], extra_toml=worker_toml("ikec0") +
                    '[pools.rw]\naddrs = "10.99.3.0/28"\n')
    charon.load(initiator_conn)
    first = assert_initiated(charon.initiate("net"), charon)
    assert first.get("local-vips") == ["10.99.3.1"], first
    sent, received, output = ping(lab.initiator, "10.99.3.1", RESPONDER_INNER_V4, 250)
    text = node.log_text()
    vips = re.findall(r"IKE SA established: rw spi_i=(\w+) .* vip=(\S+)", text)
    # (a reauthentication every 5 s: two or three during the pings)
    assert len(vips) >= 2 and {vip for _, vip in vips} == {"10.99.3.1"}, text
    for spi_i, _ in vips[:-1]:
        assert re.search(rf"IKE SA deleted: spi_i={spi_i} .* reason=deleted by peer", text)
    assert (sent, received) == (250, 250), output
    (sa,) = established_sas(charon)
    assert sa.get("local-vips") == ["10.99.3.1"], sa
    sent, received, output = ping(lab.initiator, "10.99.3.1", RESPONDER_INNER_V4)
    assert (sent, received) == (PINGS, PINGS), output
    assert node.running(), text


def test_our_gateway_brings_back_a_road_warriors_child_with_close_action_start(
        lab: Lab) -> None:
    """swanctl's close_action = "start" on our gateway's child: strongSwan, a road
    warrior with a virtual IP, deletes its Child SA; our gateway (the IKE responder)
    brings it back with a CREATE_CHILD_SA of its own whose TSr is that virtual IP, and
    pings from it cross again."""
    charon, node = road_warrior(lab, close_action="start")
    first = child_sa(assert_initiated(charon.initiate("net"), charon))
    result = charon.swanctl("--terminate", "--child", "net", "--timeout", "10", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    wait_for_log(node, r"CHILD SA established: net .*ts=10\.99\.2\.0/24===10\.99\.3\.1/32",
                 count=2)
    (sa,) = established_sas(charon)
    again = child_sa(sa)
    assert again["spi-in"] != first["spi-in"] and again["local-ts"] == ["10.99.3.1/32"], sa
    sent, received, output = ping(lab.initiator, "10.99.3.1", RESPONDER_INNER_V4)
    assert (sent, received) == (PINGS, PINGS), output
    assert node.running(), node.log_text()


def test_a_virtual_ip_survives_rekeys_and_a_reauthentication(lab: Lab) -> None:
    """strongSwan rekeys the Child SA (its new selectors must be the virtual IP again,
    RFC 7296 2.19), then the IKE SA, then reauthenticates (a second IKE SA of the same
    identity, make-before-break): the address stays 10.99.3.1 throughout and pings from it
    keep crossing."""
    charon, node = road_warrior(lab)
    first = assert_initiated(charon.initiate("net"), charon)
    assert first.get("local-vips") == ["10.99.3.1"], first

    def settled(check: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        deadline = time.monotonic() + SETTLE
        while True:
            sas = [sa for sa in charon.list_sas() if sa.get("state") == "ESTABLISHED"]
            if len(sas) == 1 and check(sas[0]):
                return sas[0]
            assert time.monotonic() < deadline, f"{what}: {sas}\n{node.log_text()}"
            time.sleep(0.1)

    old_child = child_sa(first)["spi-in"]
    charon.rekey(child="net")
    sa = settled(lambda sa: [c["spi-in"] for c in sa["child-sas"].values()
                             if c["state"] == "INSTALLED"] not in ([], [old_child]),
                 "child rekey")
    installed = [c for c in sa["child-sas"].values() if c["state"] == "INSTALLED"]
    assert installed[0]["local-ts"] == ["10.99.3.1/32"], sa
    charon.rekey(ike="rw")
    sa = settled(lambda sa: sa["responder-spi"] != first["responder-spi"], "IKE rekey")
    assert sa.get("local-vips") == ["10.99.3.1"], sa
    sent, received, output = ping(lab.initiator, "10.99.3.1", RESPONDER_INNER_V4)
    assert (sent, received) == (PINGS, PINGS), output
    before = sa["responder-spi"]
    charon.swanctl("--rekey", "--ike", "rw", "--reauth")
    sa = settled(lambda sa: sa["responder-spi"] != before, "reauthentication")
    assert sa.get("local-vips") == ["10.99.3.1"], sa
    assert node.log_text().count(" vip=10.99.3.1") == 2, node.log_text()
    sent, received, output = ping(lab.initiator, "10.99.3.1", RESPONDER_INNER_V4)
    assert (sent, received) == (PINGS, PINGS), output
    assert node.running(), node.log_text()


def test_an_os_style_road_warrior_eap_user_virtual_ip_and_traffic(lab: Lab, pki: Pki) -> None:
    """The set-up of the VPN clients built into Windows, macOS, iOS and Android, played by
    strongSwan: the gateway's certificate, an EAP-MSCHAPv2 user, a virtual IP from the
    pool, all traffic (0.0.0.0/0) through the tunnel, and MOBIKE. Pings from the virtual
    IP cross, as ESP on the wire."""
    charon = lab.charon("initiator", settings={"install_virtual_ip": "yes"})
    initiator_conn, responder_conn = conn_pair(
        ca=pki.ca, initiator_cred=pki.client_ecdsa, responder_cred=pki.gw_ecdsa)
    user = ("alice", "Alice's passw0rd")
    initiator_conn = replace(
        initiator_conn, eap_users=(user,), extra={"vips": "0.0.0.0"},
        local=End("eap-mschapv2", "client.example.test", eap_id="alice"),
    ).with_child(local_ts=(), remote_ts=("0.0.0.0/0",))
    responder_conn = replace(
        responder_conn, eap_users=(user,), node_extra={"pools": ["rw"]},
        remote=End("eap-mschapv2", "%any", eap_id="%any"),
    ).with_child(local_ts=("0.0.0.0/0",), remote_ts=())
    node = lab.node([responder_conn], extra_toml=worker_toml("ikec0") + (
        '[pools.rw]\naddrs = "10.99.3.0/28"\ndns = ["10.99.2.53"]\n'))
    charon.load(initiator_conn)
    # libipsec routes 0.0.0.0/0 into its TUN (table 220) with nothing to exempt its own
    # ESP to the gateway, which an OS client's routing does: this rule plays that part
    lab.initiator.run(["ip", "rule", "add", "to", RESPONDER_V4, "lookup", "main",
                       "priority", "100"])
    wire = lab.wire_counters("initiator", {"esp_out": ("out", ESP_IN_UDP_OUT),
                                           "esp_in": ("in", ESP_IN_UDP_IN)})
    result = charon.initiate("net")
    sa = assert_initiated(result, charon)
    assert "EAP method EAP_MSCHAPV2 succeeded, MSK established" in result.stdout, result.stdout
    assert sa.get("local-vips") == ["10.99.3.1"], sa
    assert child_sa(sa).get("remote-ts") == ["0.0.0.0/0"], sa
    line = wait_for_log(node, r"IKE SA established: rw ")[0]
    assert " vip=10.99.3.1 eap_id=alice" in line, line
    before = wire.read()
    sent, received, output = ping(lab.initiator, "10.99.3.1", RESPONDER_INNER_V4)
    assert (sent, received) == (PINGS, PINGS), output
    counts = wire.since(before)
    assert counts["esp_out"] >= PINGS and counts["esp_in"] >= PINGS, counts
    assert node.running(), node.log_text()


def test_a_dual_stack_road_warrior_gets_one_address_of_each_family(lab: Lab) -> None:
    """strongSwan asks for an IPv4 and an IPv6 address (`vips = 0.0.0.0,::`); the
    connection's two pools each lease one, the Child SA covers both, and pings from
    each cross the tunnel."""
    charon = lab.charon("initiator", settings={"install_virtual_ip": "yes"})
    initiator_conn, responder_conn = conn_pair()
    both = (RESPONDER_NETS[4], RESPONDER_NETS[6])
    initiator_conn = replace(initiator_conn, extra={"vips": "0.0.0.0,::"}).with_child(
        local_ts=(), remote_ts=both)
    responder_conn = replace(responder_conn, node_extra={"pools": ["v4", "v6"]}).with_child(
        remote_ts=(), local_ts=both)
    node = lab.node([responder_conn], extra_toml=worker_toml("ikec0") + (
        '[pools.v4]\naddrs = "10.99.3.0/28"\n[pools.v6]\naddrs = "fd99:3::/120"\n'))
    charon.load(initiator_conn)
    sa = assert_initiated(charon.initiate("net"), charon)
    assert sorted(sa.get("local-vips", [])) == ["10.99.3.1", "fd99:3::1"], sa
    assert sorted(child_sa(sa).get("local-ts", [])) == ["10.99.3.1/32", "fd99:3::1/128"], sa
    line = wait_for_log(node, r"IKE SA established: rw ")[0]
    assert " vip=10.99.3.1 vip=fd99:3::1" in line, line
    for source, target in (("10.99.3.1", RESPONDER_INNER_V4), ("fd99:3::1", RESPONDER_INNER_V6)):
        sent, received, output = ping(lab.initiator, source, target)
        assert (sent, received) == (PINGS, PINGS), output
    assert node.running(), node.log_text()


def test_strongswan_roams_to_a_new_address_with_mobike(lab: Lab, initiator: Charon) -> None:
    """MOBIKE (RFC 4555): strongSwan (mobike = yes, its default) loses its address and
    has another on the same link; it moves the IKE SA there with UPDATE_SA_ADDRESSES,
    our node moves the IKE SA and its ESP, and the pings get through again on the same
    IKE SA, without a new IKE_AUTH."""
    initiator_conn, responder_conn = conn_pair()
    node = lab.node([responder_conn], extra_toml=worker_toml("ikec0"))
    initiator.load(initiator_conn)
    sa = assert_initiated(initiator.initiate("net"), initiator)
    spis = (sa["initiator-spi"], sa["responder-spi"])
    line = wait_for_log(node, r"IKE SA established: rw ")[0]
    assert "peer=10.99.0.1:4500" in line, line
    sent, received, output = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4)
    assert (sent, received) == (PINGS, PINGS), output

    roamed = "10.99.0.11"
    # the new address must outlive the old one (not go with it as a secondary would)
    lab.initiator.run(["sysctl", "-qw", f"net.ipv4.conf.{VETH}.promote_secondaries=1"])
    lab.initiator.run(["ip", "addr", "add", f"{roamed}/24", "dev", VETH])
    lab.initiator.run(["ip", "addr", "del", f"{INITIATOR_V4}/24", "dev", VETH])
    wait_for_log(node, rf"IKE SA moved: .* peer={re.escape(roamed)}:4500 ")
    # strongSwan asked with UPDATE_SA_ADDRESSES and took our answer (a COOKIE2 it did
    # not get back would have made it close the IKE SA)
    # (our answer may still be on its way when our node logs the move)
    log = wait_for_charon_log(initiator, r"parsed INFORMATIONAL response \d+ \[ "
                                         r"N\(NATD_S_IP\) N\(NATD_D_IP\) N\(COOKIE2\) \]")
    assert re.search(r"generating INFORMATIONAL request \d+ \[ N\(UPD_SA_ADDR\) .*"
                     r"N\(COOKIE2\)", log), log
    wire = lab.wire_counters("initiator", {
        "esp_out": ("out", f"ip saddr {roamed} {ESP_IN_UDP_OUT}"),
        "esp_in": ("in", f"ip daddr {roamed} {ESP_IN_UDP_IN}")})
    before = wire.read()
    sent, received, output = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4)
    assert (sent, received) == (PINGS, PINGS), output
    counts = wire.since(before)
    assert counts["esp_out"] >= PINGS and counts["esp_in"] >= PINGS, counts
    (sa,) = [sa for sa in initiator.list_sas() if sa.get("state") == "ESTABLISHED"]
    assert (sa["initiator-spi"], sa["responder-spi"]) == spis, sa
    assert sa.get("local-host") == roamed, sa
    # libipsec cannot move an SA, so strongSwan rekeyed its Child SA after the update
    installed = [c for c in sa["child-sas"].values() if c["state"] == "INSTALLED"]
    assert len(installed) == 1 and int(installed[0]["packets-in"]) >= PINGS, sa
    assert node.log_text().count("IKE SA established:") == 1, node.log_text()
    assert node.running(), node.log_text()


def test_our_node_behind_a_nat_keeps_its_mapping_with_keepalives(lab: Lab) -> None:
    """The other way: our node initiates from behind the source NAT to strongSwan. Both
    detect that the NAT is in front of us, and we send the one-byte NAT keepalives (RFC
    3948 2.3, 4) through it every `[ike] keep_alive` seconds while the Child SA carries
    traffic; strongSwan, not behind a NAT, sends none."""
    ours, theirs = conn_pair()
    charon = lab.charon("responder")
    charon.load(theirs)
    source_nat(lab, "10.99.0.9", 40500, 44500)
    keepalive = "udp length 9 @th,64,8 == 0xff"
    wire = lab.wire_counters("initiator", {
        "keepalive_out": ("out", f"ip saddr 10.99.0.9 udp sport 44500 udp dport 4500 {keepalive}"),
        "keepalive_in": ("in", f"udp sport 4500 {keepalive}"),
        "esp_out": ("out", f"ip saddr 10.99.0.9 udp sport 44500 {ESP_IN_UDP_OUT}")})
    node = lab.node([ours.with_child(start_action="start")], side="initiator", node_id="a",
                    addresses=(INITIATOR_V4,), extra_toml=worker_toml("ikecA"),
                    settings={"ike": {"keep_alive": 1}})
    line = wait_for_log(node, r"IKE SA established: rw ")[0]
    assert line.endswith("(NAT)"), line
    sas = established_sas(charon)
    assert sas[0].get("nat-remote") == "yes" and "nat-fake" not in sas[0], sas[0]
    assert child_sa(sas[0])["encap"] == "yes", sas[0]
    sent, received, output = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4)
    assert (sent, received) == (PINGS, PINGS), output
    before = wire.read()
    time.sleep(3.5)
    counts = wire.since(before)
    assert 2 <= counts["keepalive_out"] <= 5 and counts["keepalive_in"] == 0, counts
    assert wire.read()["esp_out"] >= PINGS
    assert node.running(), node.log_text()


def test_our_responder_behind_a_one_to_one_nat(lab: Lab, initiator: Charon) -> None:
    """A cloud's 1:1 NAT in front of our node: strongSwan connects to a public address
    that no host has (its neighbour entry points at our veth) and the responder's
    namespace translates it to our own (nftables DNAT, conntrack). We detect that the NAT
    is in front of us (RFC 7296 2.23: NAT_DETECTION_DESTINATION_IP does not match), send
    keepalives, and our ESP leaves through the NAT: strongSwan only ever sees the public
    address."""
    public = "10.99.0.20"
    mac = lab.responder.run(["cat", f"/sys/class/net/{VETH}/address"]).stdout.strip()
    lab.initiator.ip("neigh", "replace", public, "lladdr", mac, "dev", VETH, "nud", "permanent")
    script = lab.dir / "dnat.nft"
    script.write_text(
        f"table ip {NAT_TABLE} {{\n    chain pre {{\n"
        "        type nat hook prerouting priority dstnat; policy accept;\n"
        f"        ip daddr {public} dnat to {RESPONDER_V4}\n    }}\n}}\n")
    lab.responder.run(["nft", "-f", str(script)])
    wire = lab.wire_counters("initiator", {
        "keepalive_in": ("in", f"ip saddr {public} udp sport 4500 udp length 9 "
                               "@th,64,8 == 0xff"),
        "esp_in": ("in", f"ip saddr {public} {ESP_IN_UDP_IN}"),
        "private_in": ("in", f"ip saddr {RESPONDER_V4}")})
    initiator_conn, responder_conn = conn_pair()
    initiator_conn = replace(initiator_conn, remote_addrs=(public,))
    node = lab.node([responder_conn], extra_toml=worker_toml("ikec0"),
                    settings={"ike": {"keep_alive": 1}})
    initiator.load(initiator_conn)
    sa = assert_initiated(initiator.initiate("net"), initiator)
    assert sa.get("nat-remote") == "yes" and "nat-local" not in sa, sa
    assert sa["remote-host"] == public, sa
    line = wait_for_log(node, r"IKE SA established: rw ")[0]
    assert line.endswith("(NAT)"), line
    sent, received, output = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4)
    assert (sent, received) == (PINGS, PINGS), output
    time.sleep(2.5)
    counts = wire.read()
    assert counts["esp_in"] >= PINGS and counts["keepalive_in"] >= 2, counts
    assert counts["private_in"] == 0, counts  # nothing left without the NAT
    assert node.running(), node.log_text()


@pytest.mark.parametrize("auth", ["psk", "ecdsa"])
def test_our_node_initiates_to_strongswan_and_carries_traffic(
    lab: Lab, pki: Pki, auth: str
) -> None:
    """The other way round: our node initiates at start-up (start_action = "start",
    encapsulation forced, as libipsec needs) and strongSwan responds, with a PSK or
    certificates (then each side verifies the other's signature). strongSwan installs
    the SA, and ping and iperf3 cross our worker and its libipsec both ways."""
    if auth == "psk":
        ours, theirs = conn_pair(encap=True)
    else:
        ours, theirs = conn_pair(encap=True, ca=pki.ca, initiator_cred=pki.client_ecdsa,
                                 responder_cred=pki.gw_ecdsa)
    charon = lab.charon("responder")
    charon.load(theirs)
    node = lab.node([ours.with_child(start_action="start")], side="initiator",
                    node_id="a", addresses=(INITIATOR_V4,), extra_toml=worker_toml("ikecA"))
    line = wait_for_log(node, r"CHILD SA established: net .* mode=tunnel")[0]
    assert line.endswith("esp=aes256gcm16 mode=tunnel encap"), line
    sas = established_sas(charon)
    child = child_sa(sas[0])
    assert child["state"] == "INSTALLED" and child["encap"] == "yes", child
    assert sas[0]["remote-id"] == ours.local.id, sas[0]
    if auth == "ecdsa":
        assert re.search(rf"authentication of '{ours.local.id}' with ECDSA\S* successful",
                         charon.log_text()), charon.log_text()

    sent, received, output = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4)
    assert (sent, received) == (PINGS, PINGS), output
    runs = iperf3_both_ways(lab, INITIATOR_INNER_V4, RESPONDER_INNER_V4)
    report("our initiator iperf3", f"up {runs[0]}; down {runs[1]}")
    bytes_in, bytes_out = child_bytes(charon)
    assert bytes_in >= runs[0].received_bytes and bytes_out >= runs[1].received_bytes
    assert node.running(), node.log_text()


def test_our_node_initiating_brings_up_every_child_to_start(lab: Lab) -> None:
    """A connection of our node with two children to start (swanctl's start_action =
    "start" on both): IKE_AUTH brings net, a CREATE_CHILD_SA of ours net2 (RFC 7296
    1.3.1). strongSwan, responding, installs both, and each child's pings cross its own
    CHILD_SA. A third child strongSwan does not have is refused (TS_UNACCEPTABLE), our
    log says so, and the other two are not disturbed."""
    ours, theirs = with_second_child(lab, *conn_pair(encap=True))
    ours = replace(ours, children=(*(replace(c, start_action="start") for c in ours.children),
                                   replace(ours.child, name="net3", start_action="start",
                                           local_ts=("10.99.5.0/24",),
                                           remote_ts=("10.99.6.0/24",))))
    charon = lab.charon("responder")
    charon.load(theirs)
    node = lab.node([ours], side="initiator", node_id="a", addresses=(INITIATOR_V4,),
                    extra_toml=worker_toml("ikecA"))
    wait_for_log(node, r"CHILD SA established: net2? .* mode=tunnel encap", count=2)
    (failed,) = wait_for_log(node, r"CHILD SA failed: net3 ")
    assert "TS_UNACCEPTABLE" in failed, failed
    sas = established_sas(charon)
    assert len(sas) == 1, sas
    assert {c["name"]: c["state"] for c in sas[0]["child-sas"].values()} == \
        {"net": "INSTALLED", "net2": "INSTALLED"}, sas[0]
    assert_each_child_carries_its_own_pings(lab, charon)
    report("our initiator, three children", f"net and net2 up, {failed.split(': ', 1)[-1]}")
    assert node.running(), node.log_text()


def test_initiate_from_the_command_line_brings_up_each_child(lab: Lab) -> None:
    """`ike-cluster initiate --child` (swanctl's --initiate) on a connection with no
    start_action: net on a new IKE SA, then net2 on that one (CREATE_CHILD_SA), a third
    time net again, which is up already. strongSwan, responding, installs both, with the
    SPIs the command printed, and each child's pings cross its own CHILD_SA."""
    ours, theirs = with_second_child(lab, *conn_pair(encap=True))
    charon = lab.charon("responder")
    charon.load(theirs)
    node = lab.node([ours], side="initiator", node_id="a", addresses=(INITIATOR_V4,),
                    extra_toml=worker_toml("ikecA"))
    time.sleep(1.5)  # (an Initiator would have started by now)
    assert charon.list_sas() == [], charon.list_sas()
    assert "initiating" not in node.log_text(), node.log_text()

    def initiate(child: str) -> subprocess.CompletedProcess[str]:
        return node.ns.run([sys.executable, "-m", "cluster", "initiate", "--config",
                            str(node.config_path), "--child", child], check=False)

    runs = [initiate("net"), initiate("net2"), initiate("net")]
    for run in runs:
        assert run.returncode == 0 and run.stderr == "", run
    (sa,) = established_sas(charon)
    spis = f"{sa['initiator-spi']}_i/{sa['responder-spi']}_r"
    children = {c["name"]: c for c in sa["child-sas"].values()}
    assert {n: c["state"] for n, c in children.items()} == \
        {"net": "INSTALLED", "net2": "INSTALLED"}, sa
    for run, word, name in zip(runs, ("initiated", "initiated", "already up"),
                               ("net", "net2", "net"), strict=True):
        child = children[name]
        assert run.stdout == (f"{word}: CHILD SA {name} {child['spi-out']} (in) "
                              f"{child['spi-in']} (out) in IKE SA rw {spis} with "
                              f"{RESPONDER_V4}\n"), run.stdout
    assert_each_child_carries_its_own_pings(lab, charon)
    report("initiate from the command line", runs[0].stdout + runs[1].stdout)
    assert node.running(), node.log_text()


def test_initiate_adds_a_child_to_the_ike_sa_strongswan_brought_up(lab: Lab) -> None:
    """strongSwan initiates net; `ike-cluster initiate --child net2` on our node, its
    responder, asks for net2 with a CREATE_CHILD_SA on that IKE SA (RFC 7296 1.3: either
    end may), which strongSwan installs beside net; each child's pings cross."""
    initiator_conn, responder_conn = with_second_child(lab, *conn_pair(encap=True))
    responder_conn = replace(responder_conn, remote_addrs=(INITIATOR_V4,))
    node = lab.node([responder_conn], extra_toml=worker_toml("ikec0"))
    charon = lab.charon("initiator")
    charon.load(initiator_conn)
    sa = assert_initiated(charon.initiate("net"), charon)
    run = node.ns.run([sys.executable, "-m", "cluster", "initiate", "--config",
                       str(node.config_path), "--child", "net2"], check=False)
    assert run.returncode == 0 and run.stderr == "", run
    (now,) = established_sas(charon)
    assert now["initiator-spi"] == sa["initiator-spi"], now
    children = {c["name"]: c for c in now["child-sas"].values()}
    assert {n: c["state"] for n, c in children.items()} == \
        {"net": "INSTALLED", "net2": "INSTALLED"}, now
    assert run.stdout == (f"initiated: CHILD SA net2 {children['net2']['spi-out']} (in) "
                          f"{children['net2']['spi-in']} (out) in IKE SA rw "
                          f"{sa['initiator-spi']}_i/{sa['responder-spi']}_r with "
                          f"{INITIATOR_V4}\n"), run.stdout
    assert_each_child_carries_its_own_pings(lab, charon)
    assert node.running(), node.log_text()


def test_our_node_asks_a_strongswan_gateway_for_a_virtual_ip(lab: Lab) -> None:
    """Our node as the road warrior (`vips = ["0.0.0.0"]`) initiating to strongSwan with an
    address pool: it asks in IKE_AUTH, puts the address strongSwan assigns on its TUN,
    and pings from that address cross; strongSwan sees the Child SA narrowed to it, and
    a Child SA rekey strongSwan starts goes through (its TSr is the virtual IP)."""
    ours, theirs = conn_pair(encap=True)
    theirs = replace(theirs, extra={"pools": "rw"}).with_child(remote_ts=())
    charon = lab.charon("responder")
    charon.load(theirs, pools={"rw": "10.99.3.0/28"})
    ours = replace(ours, node_extra={"vips": ["0.0.0.0"]}).with_child(
        start_action="start", local_ts=())
    node = lab.node([ours], side="initiator", node_id="a", addresses=(INITIATOR_V4,),
                    extra_toml=worker_toml("ikecA"))
    line = wait_for_log(node, r"IKE SA established: rw ")[0]
    assert " own_vip=10.99.3.1" in line, line
    wait_for_log(node, r"CHILD SA established: net .*ts=10\.99\.3\.1/32===")
    sas = established_sas(charon)
    assert sas[0].get("remote-vips") == ["10.99.3.1"], sas[0]
    assert child_sa(sas[0]).get("remote-ts") == ["10.99.3.1/32"], sas[0]
    sent, received, output = ping(lab.initiator, "10.99.3.1", RESPONDER_INNER_V4)
    assert (sent, received) == (PINGS, PINGS), output
    # strongSwan rekeys the Child SA: its TSr names our virtual IP, which our "dynamic"
    # local selector stands for
    charon.rekey(child="net")
    wait_for_log(node, r"CHILD SA established: net .*ts=10\.99\.3\.1/32===", count=2)
    sent, received, output = ping(lab.initiator, "10.99.3.1", RESPONDER_INNER_V4)
    assert (sent, received) == (PINGS, PINGS), output
    assert node.running(), node.log_text()


@pytest.mark.parametrize("childless", ["allow", "force"])
def test_our_road_warrior_brings_up_two_children_from_its_virtual_ip(
        lab: Lab, childless: str) -> None:
    """Our node as a road warrior (vips) with two children to start, with and without
    childless = force: the second Child SA (CREATE_CHILD_SA, both with force) names the
    virtual IP strongSwan assigned in IKE_AUTH as its "dynamic" local selector, and pings
    from it reach both of strongSwan's subnets."""
    ours, theirs = with_second_child(lab, *conn_pair(encap=True))
    theirs = replace(theirs, extra={"pools": "rw"},
                     children=tuple(replace(c, remote_ts=()) for c in theirs.children))
    charon = lab.charon("responder")
    charon.load(theirs, pools={"rw": "10.99.3.0/28"})
    ours = replace(ours, node_extra={"vips": ["0.0.0.0"], "childless": childless},
                   children=tuple(replace(c, start_action="start", local_ts=())
                                  for c in ours.children))
    node = lab.node([ours], side="initiator", node_id="a", addresses=(INITIATOR_V4,),
                    extra_toml=worker_toml("ikecA"))
    wait_for_log(node, r"CHILD SA established: net2? .*ts=10\.99\.3\.1/32===", count=2)
    (sa,) = established_sas(charon)
    assert {c["name"]: c.get("remote-ts") for c in sa["child-sas"].values()} == \
        {"net": ["10.99.3.1/32"], "net2": ["10.99.3.1/32"]}, sa
    for target in (RESPONDER_INNER_V4, SECOND["responder"]):
        sent, received, output = ping(lab.initiator, "10.99.3.1", target)
        assert (sent, received) == (PINGS, PINGS), output
    assert node.running(), node.log_text()


def test_our_road_warrior_reauthenticates_when_strongswan_sends_auth_lifetime(
        lab: Lab) -> None:
    """strongSwan's gateway has reauth_time = 10 s; a road warrior with a virtual IP it
    cannot reauthenticate itself, so it sends AUTH_LIFETIME (RFC 4478). Our node
    reauthenticates at nine tenths of it, make-before-break (RFC 7296 2.8.3), asking for
    the virtual IP it has: strongSwan reassigns the online lease, so the new IKE SA has
    the same address, our Delete ends the old one, and pings from the virtual IP across
    it lose nothing."""
    ours, theirs = conn_pair(encap=True)
    theirs = replace(theirs, extra={"pools": "rw", "reauth_time": "10s"},
                     children=tuple(replace(c, remote_ts=()) for c in theirs.children))
    charon = lab.charon("responder")
    charon.load(theirs, pools={"rw": "10.99.3.0/28"})
    ours = replace(ours, node_extra={"vips": ["0.0.0.0"]},
                   children=tuple(replace(c, start_action="start", local_ts=())
                                  for c in ours.children))
    node = lab.node([ours], side="initiator", node_id="a", addresses=(INITIATOR_V4,),
                    extra_toml=worker_toml("ikecA"))
    wait_for_log(node, r"CHILD SA established: net .*ts=10\.99\.3\.1/32===")
    sent, received, output = ping(lab.initiator, "10.99.3.1", RESPONDER_INNER_V4, 300)
    text = node.log_text()
    log = charon.log_text()
    spis = re.findall(r"IKE SA established: rw spi_i=(\w+) .* own_vip=10\.99\.3\.1 ", text)
    assert len(spis) == 2, text
    assert re.search(r"generating IKE_AUTH response 1 \[ [^]]*N\(AUTH_LFT\)", log), log
    assert "reassigning online lease" in log, log
    # the second IKE_AUTH asked for the address the first SA has (RFC 7296 3.15.1)
    asked = re.findall(r"peer requested virtual IP (\S+)", log)
    assert asked == ["%any", "10.99.3.1"], log
    assert f"reauthenticating IKE SA {spis[0]}_i with a new IKE SA" in text, text
    assert re.search(rf"IKE SA deleted: spi_i={spis[0]} .* reason=reauthenticated", text), text
    assert (sent, received) == (300, 300), output
    (sa,) = established_sas(charon)
    assert sa["initiator-spi"] == spis[1] and sa["remote-vips"] == ["10.99.3.1"], sa
    assert "10.99.3.1" in lab.initiator.ip("-o", "addr", "show", "dev", "ikecA"), text
    assert node.running(), text


@pytest.mark.parametrize("family", [4, 6])
def test_a_trapped_connection_comes_up_when_traffic_needs_it(lab: Lab, family: int) -> None:
    """start_action = "trap" (strongSwan's on-demand policies): our node routes the
    remote subnet into its TUN and initiates nothing until a packet for it arrives; that
    packet (dropped, as the kernel drops the one behind an acquire) brings the SA up with
    strongSwan and the pings after it cross. When strongSwan deletes the SA our node
    stays quiet until traffic asks again. IPv4, and IPv6 inside and out."""
    ours, theirs = conn_pair(encap=True, family=family)
    charon = lab.charon("responder")
    charon.load(theirs)
    node = lab.node([ours.with_child(start_action="trap")], side="initiator", node_id="a",
                    addresses=(INITIATOR_V4 if family == 4 else INITIATOR_V6,),
                    extra_toml=worker_toml("ikecA"),
                    settings={"metrics": {"listen": METRICS, "interval": 0.1}})
    wait_for_log(node, rf"connection rw: trap on {re.escape(RESPONDER_NETS[family])}")
    time.sleep(2.0)
    assert charon.list_sas() == [] and "initiating IKE SA" not in node.log_text()
    inner = ((INITIATOR_INNER_V4, RESPONDER_INNER_V4) if family == 4
             else (INITIATOR_INNER_V6, RESPONDER_INNER_V6))

    def up_after_pings() -> dict[str, Any]:
        ping(lab.initiator, *inner, 3)  # some wait for the SA
        (sa,) = established_sas(charon)
        assert child_sa(sa)["state"] == "INSTALLED", sa
        sent, received, output = ping(lab.initiator, *inner)
        assert (sent, received) == (PINGS, PINGS), output
        return sa

    first = up_after_pings()
    asked = drop_counts(lab.initiator)["acquires"]
    assert asked >= 1, asked  # the pings before the SA; none after it
    time.sleep(0.3)
    assert drop_counts(lab.initiator)["acquires"] == asked
    charon.terminate_ike("rw")
    wait_for_log(node, r"connection rw: IKE SA \w+_i ended \(deleted by peer\); trap armed")
    time.sleep(3.0)
    assert [sa for sa in charon.list_sas() if sa.get("state") == "ESTABLISHED"] == []
    assert node.log_text().count("initiating IKE SA") == 1, node.log_text()
    second = up_after_pings()
    assert second["initiator-spi"] != first["initiator-spi"]
    assert node.log_text().count("initiating IKE SA") == 2, node.log_text()
    report("trap", " | ".join(line.split(": ", 1)[-1] for line in node.log_text().splitlines()
                              if "connection rw:" in line))
    assert node.running(), node.log_text()


@pytest.mark.parametrize("how", ["trap", "close_action start"])
def test_a_child_the_peer_deleted_comes_back_on_the_same_ike_sa(lab: Lab, how: str) -> None:
    """strongSwan deletes only the CHILD_SA; the IKE SA stays. Our node brings the
    child back with a CREATE_CHILD_SA on the IKE SA it has (RFC 7296 1.3.1): for a
    trapped connection when the next packet, still routed into our TUN, finds no SA
    (as strongSwan's trap manager does); with swanctl's close_action = "start" at once,
    without traffic. No second IKE_SA_INIT, and the pings after it cross."""
    ours, theirs = conn_pair(encap=True)
    charon = lab.charon("responder")
    charon.load(theirs)
    ours = ours.with_child(start_action="trap") if how == "trap" else \
        ours.with_child(start_action="start", close_action="start")
    node = lab.node([ours], side="initiator", node_id="a",
                    addresses=(INITIATOR_V4,), extra_toml=worker_toml("ikecA"))
    if how == "trap":
        wait_for_log(node, rf"connection rw: trap on {re.escape(RESPONDER_NETS[4])}")
        ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4, 3)  # brings it up
    (sa,) = established_sas(charon)
    first = child_sa(sa)
    result = charon.swanctl("--terminate", "--child", "net", "--timeout", "10", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    wait_for_log(node, rf"CHILD SA deleted: net .*spi_in={first['spi-out']}")
    if how == "trap":
        ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4, 3)  # asks for it again
    else:
        wait_for_log(node, r"CHILD SA established: net ", count=2)  # no packet needed
    sent, received, output = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4)
    assert (sent, received) == (PINGS, PINGS), output + node.log_text()
    (again,) = established_sas(charon)
    assert again["initiator-spi"] == sa["initiator-spi"], (sa, again)
    second = child_sa(again)
    assert second["state"] == "INSTALLED" and second["spi-in"] != first["spi-in"], again
    assert node.log_text().count("initiating IKE SA") == 1, node.log_text()
    assert node.running(), node.log_text()


def test_a_trapped_connection_with_dpd_action_restart_comes_back_without_traffic(
    lab: Lab
) -> None:
    """strongSwan is killed and started afresh (it forgot the SA): our liveness check
    times out and, with dpd_action = "restart", our node initiates the trapped connection
    again at once; the new strongSwan shows the SA established before any packet asked."""
    ours, theirs = conn_pair(encap=True)
    ours = replace(ours.with_child(start_action="trap"), dpd_delay="1s",
                   node_extra={"dpd_action": "restart"})
    charon = lab.charon("responder")
    charon.load(theirs)
    node = lab.node([ours], side="initiator", node_id="a", addresses=(INITIATOR_V4,),
                    extra_toml=worker_toml("ikecA"),
                    settings={"ike": {"retransmit_timeout": 0.5, "retransmit_tries": 1}})
    wait_for_log(node, r"connection rw: trap on ")
    sent, received, output = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4, 3)
    first = established_sas(charon)[0]
    assert charon.proc is not None
    charon.proc.kill()  # no Delete: gone silent
    charon.proc.wait(5)
    again = lab.charon("responder")
    again.load(theirs)
    line = wait_for_log(node, r"connection rw: IKE SA \w+_i ended \(peer not responding\); "
                              r"initiating again")[0]
    (sa,) = established_sas(again)
    assert sa["initiator-spi"] != first["initiator-spi"]
    assert child_sa(sa)["state"] == "INSTALLED", sa
    sent, received, output = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4)
    assert (sent, received) == (PINGS, PINGS), output
    report("dpd_action restart", line.split(": ", 1)[-1])
    assert node.running(), node.log_text()


@pytest.mark.parametrize("case", ["narrowed", "icmp-only"])
def test_traffic_selectors_narrowed_or_protocol_bound_with_strongswan(
    lab: Lab, initiator: Charon, case: str
) -> None:
    """RFC 7296 2.9. "narrowed": strongSwan asks for everything behind us (0.0.0.0/0) and
    we narrow to our configured subnet, which strongSwan accepts and routes. "icmp-only":
    selectors bound to a protocol on both sides; pings cross, and UDP our side routes
    towards strongSwan matches no SA (our outbound lookup honours the protocol), so it
    is dropped and counted, never sent in the clear."""
    initiator_conn, responder_conn = conn_pair()
    if case == "narrowed":
        initiator_conn = initiator_conn.with_child(remote_ts=("0.0.0.0/0",))
        expected = (["10.99.1.0/24"], ["10.99.2.0/24"])
    else:
        initiator_conn = initiator_conn.with_child(local_ts=("10.99.1.0/24[icmp]",),
                                                   remote_ts=("10.99.2.0/24[icmp]",))
        responder_conn = responder_conn.with_child(local_ts=("10.99.2.0/24[icmp]",),
                                                   remote_ts=("10.99.1.0/24[icmp]",))
        expected = (["10.99.1.0/24[icmp]"], ["10.99.2.0/24[icmp]"])
    node = lab.node([responder_conn], extra_toml=worker_toml("ikec0"))
    initiator.load(initiator_conn)
    child = child_sa(assert_initiated(initiator.initiate("net"), initiator))
    assert (child["local-ts"], child["remote-ts"]) == expected, child
    wait_for_log(node, r"CHILD SA established: net .* mode=tunnel")
    sent, received, output = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4)
    assert (sent, received) == (PINGS, PINGS), output
    if case == "narrowed":
        return
    wire = lab.wire_counters("responder", {"clear": ("out", f"ip daddr {INITIATOR_NETS[4]}")})
    before = wire.read()
    send_udp(lab.responder, INITIATOR_INNER_V4, UDP_PROBES)
    time.sleep(0.5)  # a datagram that did leave has long crossed the veth by now
    assert wire.since(before) == {"clear": 0}, wire.since(before)
    assert node.running(), node.log_text()
    node.stop()
    counters = data_plane_counters(node)
    assert counters.get("no_sa_out", 0) == UDP_PROBES, counters
    assert counters.get("sa_packets_out", 0) >= PINGS, counters


def test_fragmented_inner_packets_cross_both_ways_with_strongswan(
    lab: Lab, initiator: Charon
) -> None:
    """4000-byte pings do not fit either TUN (MTU 1400): each side's host fragments
    them before the tunnel, every fragment travels in its own ESP packet, and the
    far host reassembles. Each direction originates its own pings."""
    initiator_conn, responder_conn = conn_pair()
    node = lab.node([responder_conn], extra_toml=worker_toml("ikec0"))
    initiator.load(initiator_conn)
    assert_initiated(initiator.initiate("net"), initiator)
    wait_for_log(node, r"CHILD SA established: net .* mode=tunnel")
    for ns, source, target in ((lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4),
                               (lab.responder, RESPONDER_INNER_V4, INITIATOR_INNER_V4)):
        sent, received, output = ping(ns, source, target, 10, size=4000)
        assert (sent, received) == (10, 10), output
    assert node.running(), node.log_text()
    node.stop()
    counters = data_plane_counters(node)
    # 4008-byte ICMP messages in fragments of at most 1400 bytes: at least 3 per message,
    # 20 messages each way (10 requests one way and 10 replies, for each side's pings)
    assert counters.get("sa_packets_in", 0) >= 60 and counters.get("sa_packets_out", 0) >= 60
    assert counters.get("no_sa_out", 0) == 0 and counters.get("sa_policy_drops", 0) == 0


LIFETIME_BYTES = 30_000  # soft limit at 90 %: a rekey about every 26 pings of 1028 bytes


@pytest.mark.parametrize("source", ["worker", "child"])
def test_byte_lifetime_makes_our_node_rekey_with_strongswan_and_no_ping_is_lost(
    lab: Lab, initiator: Charon, source: str
) -> None:
    """[worker] lifetime_bytes (soft limit at 90 %), or the child's swanctl-style
    rekey_bytes and life_bytes: the soft limit makes our node rekey the Child SA
    (CREATE_CHILD_SA, RFC 7296 1.3.3) with strongSwan before the hard limit would remove
    it; pings running throughout keep every reply and strongSwan ends on new SPIs."""
    initiator_conn, responder_conn = conn_pair()
    worker = worker_toml("ikec0")
    if source == "worker":
        worker += f"lifetime_bytes = {LIFETIME_BYTES}\n"
    else:
        responder_conn = responder_conn.with_child(volume=(
            ("rekey_bytes", LIFETIME_BYTES * 9 // 10), ("life_bytes", LIFETIME_BYTES)))
    node = lab.node([responder_conn], extra_toml=worker)
    initiator.load(initiator_conn)
    first = child_sa(assert_initiated(initiator.initiate("net"), initiator))
    wait_for_log(node, r"CHILD SA established: net .* mode=tunnel")
    sent, received, output = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4, 80,
                                  size=1000)
    assert (sent, received) == (80, 80), output
    soft = [line for line in node.log_text().splitlines() if "soft lifetime reached" in line]
    assert len(soft) >= 2, node.log_text()  # 80 x 1028 bytes each way: 2 or more rekeys
    assert "hard lifetime reached" not in node.log_text(), node.log_text()
    (sa,) = [sa for sa in initiator.list_sas() if sa.get("state") == "ESTABLISHED"]
    # strongSwan keeps the rekeyed ones a while as DELETED (its delete_rekeyed_delay)
    (last,) = [c for c in sa["child-sas"].values() if c["state"] == "INSTALLED"]
    assert last["spi-in"] != first["spi-in"], (first, sa)
    report("byte lifetime", f"{len(soft)} soft limits, first: {soft[0].split(': ', 1)[-1]}")
    assert node.running(), node.log_text()


def test_a_child_sa_at_its_hard_byte_limit_is_created_again_with_strongswan(
    lab: Lab, initiator: Charon
) -> None:
    """The child's life_bytes alone (no rekey_bytes, so no rekey first): at the hard
    limit the data plane drops the SA, our node tells strongSwan (Delete) and creates
    the child again, as strongSwan does after a hard expire. The pings go on over each
    new SA; only those around a switch may be lost."""
    initiator_conn, responder_conn = conn_pair()
    responder_conn = responder_conn.with_child(volume=(("life_bytes", LIFETIME_BYTES),))
    node = lab.node([responder_conn], extra_toml=worker_toml("ikec0"))
    initiator.load(initiator_conn)
    first = child_sa(assert_initiated(initiator.initiate("net"), initiator))
    wait_for_log(node, r"CHILD SA established: net .* mode=tunnel")
    sent, received, output = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4, 60,
                                  size=1000)
    text = node.log_text()
    hard = [line for line in text.splitlines() if "hard lifetime reached" in line]
    expired = re.findall(r"CHILD SA deleted: net .* reason=expired", text)
    (sa,) = [sa for sa in initiator.list_sas() if sa.get("state") == "ESTABLISHED"]
    (last,) = [c for c in sa["child-sas"].values() if c["state"] == "INSTALLED"]
    created = re.findall(r"parsed CREATE_CHILD_SA request \d+ \[ (.*) \]", initiator.log_text())
    report("hard byte lifetime", f"{len(hard)} hard limits, {len(created)} Child SAs created "
           f"again; ping {received}/{sent}")
    assert len(hard) >= 2 and len(expired) == len(hard), text  # 60 x 1028 bytes each way
    assert len(created) == len(hard) and not any("REKEY_SA" in c for c in created), created
    assert last["spi-in"] != first["spi-in"], (first, sa)
    assert received >= sent - 3 * len(hard), output
    assert "soft lifetime reached" not in text and node.running(), text


# --- transport mode between two of our nodes ---------------------------------------------


def transport_pair(*, encap: bool, esp: str = "aes256gcm16") -> tuple[Conn, Conn]:
    """(A, B): A initiates to B at start-up, host-to-host transport mode."""
    a_id, b_id = "a.example.test", "b.example.test"
    a = Conn(
        local=End("psk", a_id),
        remote=End("psk", b_id),
        name="link",
        children=(Child(name="host", mode="transport", start_action="start",
                        esp_proposals=(esp,)),),
        remote_addrs=(RESPONDER_V4,),
        psk=PSK,
        encap=encap,
    )
    b = Conn(
        local=End("psk", b_id),
        remote=End("psk", a_id),
        name="link",
        children=(Child(name="host", mode="transport", esp_proposals=(esp,)),),
        psk=PSK,
    )
    return a, b


def test_a_trapped_transport_connection_between_two_nodes(lab: Lab) -> None:
    """start_action = "trap" in transport mode: node A routes B's address into its TUN
    (its own IKE and ESP sockets carry the worker's mark and bypass that route), and the
    first ping to B brings the SA up. Nothing crosses in the clear, before or after."""
    a_conn, b_conn = transport_pair(encap=False)
    b = lab.node([b_conn], node_id="b", extra_toml=worker_toml("ikecB"))
    wire = lab.wire_counters("initiator", {
        "esp_raw_out": ("out", "ip protocol esp"),
        "echo_out": ("out", "icmp type { echo-request, echo-reply }"),
        "echo_in": ("in", "icmp type { echo-request, echo-reply }")})
    a = lab.node([a_conn.with_child(start_action="trap")], side="initiator", node_id="a",
                 addresses=(INITIATOR_V4,), extra_toml=worker_toml("ikecA"))
    wait_for_log(a, rf"connection link: trap on {re.escape(RESPONDER_V4)}/32")
    time.sleep(1.0)
    assert "initiating IKE SA" not in a.log_text()
    ping(lab.initiator, INITIATOR_V4, RESPONDER_V4, 3)  # some wait for the SA
    for node in (a, b):
        wait_for_log(node, r"CHILD SA established: host .* mode=transport")
    sent, received, output = ping(lab.initiator, INITIATOR_V4, RESPONDER_V4)
    assert (sent, received) == (PINGS, PINGS), output
    seen = wire.read()
    assert seen["esp_raw_out"] >= PINGS and seen["echo_out"] == seen["echo_in"] == 0, seen


@pytest.mark.parametrize(
    ("encap", "esp"),
    [(False, "aes256gcm16"), (True, "aes256gcm16"),
     (False, "aes256gcm16-esn")],  # 64-bit sequence numbers (RFC 4303 Appendix A)
    ids=["raw-esp", "esp-in-udp", "raw-esp-esn"],
)  # fmt: skip
def test_transport_mode_between_two_nodes_is_only_esp_on_the_wire(
    lab: Lab, encap: bool, esp: str
) -> None:
    a_conn, b_conn = transport_pair(encap=encap, esp=esp)
    b = lab.node([b_conn], node_id="b", extra_toml=worker_toml("ikecB"))
    wire = lab.wire_counters(
        "initiator",
        {
            "esp_raw_out": ("out", "ip protocol esp"),
            "esp_raw_in": ("in", "ip protocol esp"),
            "esp_udp_out": ("out", ESP_IN_UDP_OUT),
            "esp_udp_in": ("in", ESP_IN_UDP_IN),
            "ike_4500_out": ("out", IKE_ON_4500_OUT),
            "echo_out": ("out", "icmp type { echo-request, echo-reply }"),
            "echo_in": ("in", "icmp type { echo-request, echo-reply }"),
            "tcp_out": ("out", f"ip saddr {OUTER_PAIR} tcp dport {IPERF_PORT}"),
            "tcp_in": ("in", f"ip saddr {OUTER_PAIR} tcp sport {IPERF_PORT}"),
            "tcp_any_out": ("out", "meta l4proto tcp"),
            "tcp_any_in": ("in", "meta l4proto tcp"),
        },
    )
    a = lab.node(
        [a_conn], side="initiator", node_id="a", addresses=(INITIATOR_V4,),
        extra_toml=worker_toml("ikecA"),
    )  # fmt: skip
    suffix = " encap" if encap else ""
    for node in (a, b):
        line = wait_for_log(node, r"CHILD SA established: host .* mode=transport")[0]
        assert line.endswith(f"esp={esp} mode=transport{suffix}"), line

    before = wire.read()
    before_bytes = wire.read_bytes()
    # IKE floats to port 4500 only with encapsulation; either way no ESP has moved yet.
    assert (before["ike_4500_out"] > 0) is encap, before
    assert before["esp_raw_out"] == before["esp_udp_out"] == 0, before
    sent, received, output = ping(lab.initiator, INITIATOR_V4, RESPONDER_V4)
    report(f"transport {'udp' if encap else 'raw'} ping", output.strip().splitlines()[-2])
    assert (sent, received) == (PINGS, PINGS), output
    upload = lab.iperf3(
        server="responder", server_addr=RESPONDER_V4, client_addr=INITIATOR_V4,
        seconds=IPERF_SECONDS, port=IPERF_PORT,
    )  # fmt: skip
    download = lab.iperf3(
        server="responder", server_addr=RESPONDER_V4, client_addr=INITIATOR_V4,
        seconds=IPERF_SECONDS, port=IPERF_PORT, reverse=True,
    )  # fmt: skip
    report(f"transport {'udp' if encap else 'raw'} iperf3", str(upload))
    report(f"transport {'udp' if encap else 'raw'} iperf3", str(download))
    for result in (upload, download):
        assert result.received_bytes > 0 and result.seconds > IPERF_SECONDS / 2, result

    seen = wire.since(before)
    report(f"transport {'udp' if encap else 'raw'} wire (initiator veth)", str(seen))
    carrier, other = ("esp_udp", "esp_raw") if encap else ("esp_raw", "esp_udp")
    # in bytes: with encapsulation the worker sends ESP in UDP as GSO skbs (see above)
    seen_bytes = wire.bytes_since(before_bytes)
    assert seen_bytes[f"{carrier}_out"] >= upload.received_bytes, seen_bytes
    assert seen_bytes[f"{carrier}_in"] >= download.received_bytes, seen_bytes
    assert seen[f"{other}_out"] == seen[f"{other}_in"] == 0, seen
    assert seen["echo_out"] == seen["echo_in"] == 0, seen
    assert seen["tcp_out"] == seen["tcp_in"] == 0, seen
    assert seen["tcp_any_out"] == seen["tcp_any_in"] == 0, seen
    assert a.running() and b.running()


@pytest.mark.parametrize("encap", [False, True], ids=["raw", "udp"])
def test_transport_mode_between_two_nodes_keeps_each_packets_dscp_and_ecn(
        lab: Lab, encap: bool) -> None:
    """In transport mode the header is the packet's own, as a kernel's SA leaves it:
    A's pings with EF and ECT(1) leave in ESP with EF and ECT(1) and reach B's TUN with
    both; then a rule on A's veth plays a congested router and marks A's ESP CE: the
    ECT(1) pings reach B's TUN as CE, and Not-ECT ones too (RFC 6040's drop is a
    tunnel's), all answered."""
    a_conn, b_conn = transport_pair(encap=encap)
    b = lab.node([b_conn], node_id="b", extra_toml=worker_toml("ikecB"))
    carrier = ESP_IN_UDP_OUT if encap else "ip protocol esp"
    wire = lab.wire_counters("initiator", {
        "esp_out": ("out", carrier),
        "esp_out_ef_ect1": ("out", f"{carrier} ip dscp ef ip ecn ect1"),
    })
    a = lab.node([a_conn], side="initiator", node_id="a", addresses=(INITIATOR_V4,),
                 extra_toml=worker_toml("ikecA"))
    for node in (a, b):
        wait_for_log(node, r"CHILD SA established: host .* mode=transport")
    tun = WireCounters(lab.responder, {
        "echo": ("in", "icmp type echo-request"),
        "echo_ef_ect1": ("in", "icmp type echo-request ip dscp ef ip ecn ect1"),
        "echo_ef_ce": ("in", "icmp type echo-request ip dscp ef ip ecn ce"),
        "echo_ce": ("in", "icmp type echo-request ip dscp cs0 ip ecn ce"),
    }, device="ikecB")
    tun.install()
    before = wire.read()
    sent, received, output = ping(lab.initiator, INITIATOR_V4, RESPONDER_V4, tos=0xB8 | 1)
    assert (sent, received) == (PINGS, PINGS), output
    out, inside = wire.since(before), tun.read()
    report(f"transport dscp/ecn ({'udp' if encap else 'raw'})", f"wire {out}, B's TUN {inside}")
    assert out["esp_out_ef_ect1"] >= PINGS, out
    assert inside == {"echo": PINGS, "echo_ef_ect1": PINGS, "echo_ef_ce": 0, "echo_ce": 0}, \
        inside
    congested = WireCounters(lab.initiator, {"marked": ("out", f"{carrier} ip ecn set ce")})
    congested.install()
    for tos in (0xB8 | 1, 0):
        sent, received, output = ping(lab.initiator, INITIATOR_V4, RESPONDER_V4, tos=tos)
        assert (sent, received) == (PINGS, PINGS), output
    inside = tun.read()
    assert congested.read()["marked"] >= 2 * PINGS
    assert inside == {"echo": 3 * PINGS, "echo_ef_ect1": PINGS, "echo_ef_ce": PINGS,
                      "echo_ce": PINGS}, inside
    assert a.running() and b.running()


# --- no SA: nothing leaves ----------------------------------------------------------------

TEST_NET = "10.77.0.0/24"
TEST_TARGET = "10.77.0.5"
UDP_PROBES = 10


def send_udp(ns: Netns, target: str, count: int) -> None:
    ns.run([
        "python3", "-c",
        "import socket, sys\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "for _ in range(int(sys.argv[2])): s.sendto(b'x' * 100, (sys.argv[1], 9))\n",
        target, str(count),
    ])  # fmt: skip


def responder_wire(lab: Lab, target_net: str) -> WireCounters:
    return lab.wire_counters(
        "responder",
        {
            "ipv4_out": ("out", "meta protocol ip"),
            "to_target": ("out", f"ip daddr {target_net}"),
            "esp_raw_out": ("out", "ip protocol esp"),
            "udp4500_out": ("out", "udp dport 4500"),
        },
    )


def assert_dropped_without_sa(lab: Lab, node: Node, wire: WireCounters, target: str) -> None:
    """Pings and UDP to ``target`` (routed into the TUN) leave nothing on the wire."""
    before = wire.read()
    sent, received, output = ping(lab.responder, RESPONDER_INNER_V4, target, count=5)
    assert (sent, received) == (5, 0), output
    send_udp(lab.responder, target, UDP_PROBES)
    time.sleep(0.5)  # a packet that did leave has long crossed the veth by now
    seen = wire.since(before)
    assert seen == dict.fromkeys(seen, 0), f"packets left the namespace: {seen}"
    assert node.running(), node.log_text()
    node.stop()
    counters = data_plane_counters(node)
    report("no SA node counters", str(counters))
    assert counters.get("no_sa_out", 0) >= 5 + UDP_PROBES, counters
    assert counters.get("tun_read_packets", 0) >= 5 + UDP_PROBES, counters


def test_packet_routed_into_the_tun_without_sa_is_not_sent(lab: Lab) -> None:
    _, responder_conn = conn_pair()
    node = lab.node([responder_conn], extra_toml=worker_toml("ikec0"))
    wait_for_log(node, r"data plane on ikec0")
    wire = responder_wire(lab, TEST_NET)
    lab.responder.ip("route", "add", TEST_NET, "dev", "ikec0", "table", "1450")
    assert_dropped_without_sa(lab, node, wire, TEST_TARGET)
    assert "esp_sent_packets" not in data_plane_counters(node)


def test_packet_for_a_deleted_sa_is_not_sent(lab: Lab, initiator: Charon) -> None:
    initiator_conn, responder_conn = conn_pair(mode="tunnel")
    node = lab.node([responder_conn], extra_toml=worker_toml("ikec0"))
    initiator.load(initiator_conn)
    assert_initiated(initiator.initiate("net"), initiator)
    wait_for_log(node, r"CHILD SA established: net")
    sent, received, output = ping(lab.responder, RESPONDER_INNER_V4, INITIATOR_INNER_V4, 5)
    assert (sent, received) == (5, 5), output  # the SA worked while it existed

    assert initiator.terminate_ike().returncode == 0
    wait_for_log(node, r"IKE SA deleted")
    # The SA's route went with it; put one back so the packets reach the TUN again.
    routes = lab.responder.ip("route", "show", "table", "1450")
    assert "10.99.1.0/24" not in routes, routes
    lab.responder.ip("route", "add", "10.99.1.0/24", "dev", "ikec0", "table", "1450")
    wire = responder_wire(lab, "10.99.1.0/24")
    assert_dropped_without_sa(lab, node, wire, INITIATOR_INNER_V4)


PPK = ("pq-1", "0x" + "5a" * 32)


@pytest.mark.parametrize("case", ["shared", "responder lacks it", "different keys"])
def test_a_post_quantum_ppk_is_mixed_in_and_traffic_crosses(
        lab: Lab, initiator: Charon, case: str) -> None:
    """RFC 8784 with strongSwan's ppk_id / ppk_required. Shared: strongSwan logs that it
    used the PPK, our node marks the SA `ppk`, pings cross (the Child SA keys come from
    the PPK-mixed SK_d) and still do after a Child SA rekey. Our node without that PPK
    while strongSwan's is optional: it checks strongSwan's NO_PPK_AUTH and the SA comes
    up without one. Different PPK values under one PPK_ID: refused."""
    initiator_conn, responder_conn = conn_pair()
    required = case != "responder lacks it"
    initiator_conn = replace(initiator_conn, ppks=(PPK,), extra={
        "ppk_id": PPK[0], "ppk_required": "yes" if required else "no"})
    theirs = {"shared": PPK, "responder lacks it": ("pq-2", PPK[1]),
              "different keys": (PPK[0], "0x" + "a5" * 32)}[case]
    responder_conn = replace(responder_conn, ppks=(theirs,))
    node = lab.node([responder_conn], extra_toml=worker_toml("ikec0"))
    initiator.load(initiator_conn)
    result = initiator.initiate("net")
    if case == "different keys":
        assert result.returncode != 0, result.stdout
        wait_for_log(node, r"IKE SA failed: .* reason=PSK AUTH does not verify")
        return
    sa = assert_initiated(result, initiator)
    log = initiator.log_text()
    if case == "shared":
        assert "using PPK for PPK_ID 'pq-1'" in log, log
        wait_for_log(node, rf"IKE SA established: rw spi_i={sa['initiator-spi']} .* ppk")
    else:
        assert "using PPK" not in log, log
        wait_for_log(node, rf"IKE SA established: rw spi_i={sa['initiator-spi']} .*")
        assert " ppk" not in node.log_text()
    wait_for_log(node, r"CHILD SA established: net .* mode=tunnel")
    sent, received, output = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4)
    assert received == sent, output
    if case == "shared":
        initiator.rekey(child="net")
        wait_for_log(node, r"CHILD SA established: net ", count=2)
        wait_for_log(node, r"CHILD SA deleted: net .* reason=deleted by peer")
        sent, received, output = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4)
        assert received == sent, output


@pytest.mark.parametrize("case", ["shared", "responder lacks it", "required, user has none"])
def test_a_ppk_is_mixed_in_for_an_eap_user_too(lab: Lab, initiator: Charon, pki: Pki,
                                               case: str) -> None:
    """RFC 8784 with EAP (strongSwan's way): an EAP-MSCHAPv2 user with an optional PPK
    sends PPK_IDENTITY and NO_PPK_AUTH with its AUTH after EAP. With the PPK both final
    AUTHs and the Child SA keys use it (strongSwan says so, our node marks the SA `ppk`,
    pings cross); without it our node checks NO_PPK_AUTH and the SA comes up plain. A
    connection with ppk_required refuses a user without a PPK."""
    user = ("carol", "Carol's pa55word")
    initiator_conn, responder_conn = conn_pair(
        ca=pki.ca, initiator_cred=pki.client_ecdsa, responder_cred=pki.gw_ecdsa)
    initiator_conn = replace(initiator_conn, eap_users=(user,),
                             local=End("eap-mschapv2", "client.example.test", eap_id=user[0]))
    if case != "required, user has none":
        initiator_conn = replace(initiator_conn, ppks=(PPK,),
                                 extra={"ppk_id": PPK[0], "ppk_required": "no"})
    theirs = ("pq-2", PPK[1]) if case == "responder lacks it" else PPK
    responder_conn = replace(responder_conn, eap_users=(user,), ppks=(theirs,),
                             remote=End("eap-mschapv2", "%any", eap_id="%any"))
    if case == "required, user has none":
        responder_conn = replace(responder_conn, node_extra={"ppk_required": True})
    node = lab.node([responder_conn], extra_toml=worker_toml("ikec0"))
    initiator.load(initiator_conn)
    result = initiator.initiate("net")
    if case == "required, user has none":
        assert_not_established(result, initiator)
        assert "received AUTHENTICATION_FAILED notify error" in result.stdout, result.stdout
        wait_for_log(node, r"IKE SA failed: .* reason=PPK required, but the peer does not "
                           r"support PPK")
        return
    sa = assert_initiated(result, initiator)
    assert "EAP method EAP_MSCHAPV2 succeeded, MSK established" in result.stdout, result.stdout
    log = initiator.log_text()
    established = rf"IKE SA established: rw spi_i={sa['initiator-spi']} .* eap_id=carol"
    if case == "shared":
        assert "using PPK for PPK_ID 'pq-1'" in log, log
        wait_for_log(node, established + " .*ppk")
    else:
        assert "using PPK" not in log, log
        wait_for_log(node, established)
        assert " ppk" not in node.log_text()
    wait_for_log(node, r"CHILD SA established: net .* mode=tunnel")
    sent, received, output = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4)
    assert received == sent, output


def test_an_idle_child_sa_is_deleted_after_its_inactivity_timeout(
        lab: Lab, initiator: Charon) -> None:
    """swanctl's `inactivity` on our child: while pings cross (one every half second, for
    twice the timeout) the Child SA stays; once nothing crosses for the timeout our node
    deletes it with a Delete strongSwan receives, and the IKE SA stays up."""
    initiator_conn, responder_conn = conn_pair()
    responder_conn = responder_conn.with_child(inactivity="3s")
    node = lab.node([responder_conn], extra_toml=worker_toml("ikec0"))
    initiator.load(initiator_conn)
    sa = assert_initiated(initiator.initiate("net"), initiator)
    pings = lab.initiator.run(["ping", "-n", "-c", "12", "-i", "0.5", "-W", "1", "-I",
                               INITIATOR_INNER_V4, RESPONDER_INNER_V4], check=False)
    assert " 0% packet loss" in pings.stdout, pings.stdout + node.log_text()
    assert "CHILD SA deleted" not in node.log_text(), node.log_text()
    started = time.monotonic()
    wait_for_log(node, rf"CHILD SA deleted: net .*spi_in={child_sa(sa)['spi-out']}")
    waited = time.monotonic() - started
    assert 2.0 <= waited <= 8.0, waited
    assert re.search(r"idle for \d+ s \(inactivity\)", node.log_text()), node.log_text()
    wait_for_charon_log(initiator, f"received DELETE for ESP CHILD_SA with SPI "
                                   f"{child_sa(sa)['spi-out']}")
    (now,) = established_sas(initiator)
    assert now["initiator-spi"] == sa["initiator-spi"] and not now.get("child-sas"), now


@pytest.mark.parametrize("copy_dscp", [None, "no"])
def test_the_outer_header_carries_each_packets_dscp_unless_copy_dscp_is_no(
        lab: Lab, initiator: Charon, copy_dscp: str | None) -> None:
    """RFC 4301 5.1.2.1, swanctl's copy_dscp = out (the default): strongSwan pings with
    DSCP EF, then without; Linux answers each echo with its request's TOS, and our worker
    puts that DSCP on the ESP-in-UDP datagram that carries the answer, as counted on
    strongSwan's veth. With copy_dscp = "no" every datagram leaves with DSCP 0."""
    initiator_conn, responder_conn = conn_pair()
    if copy_dscp is not None:
        responder_conn = responder_conn.with_child(copy_dscp=copy_dscp)
    node = lab.node([responder_conn], extra_toml=worker_toml("ikec0"))
    wire = lab.wire_counters("initiator", {
        "esp_in": ("in", ESP_IN_UDP_IN),
        "esp_in_ef": ("in", f"{ESP_IN_UDP_IN} ip dscp ef"),
        "esp_in_cs0": ("in", f"{ESP_IN_UDP_IN} ip dscp cs0"),
    })
    initiator.load(initiator_conn)
    assert_initiated(initiator.initiate("net"), initiator)
    wait_for_log(node, r"CHILD SA established: net .* mode=tunnel")
    before = wire.read()
    marked = lab.initiator.run(["ping", "-n", "-c", str(PINGS), "-i", "0.05", "-W", "2",
                                "-Q", "0xb8", "-I", INITIATOR_INNER_V4, RESPONDER_INNER_V4],
                               check=False)
    assert f"{PINGS} received" in marked.stdout, marked.stdout + marked.stderr
    after_marked = wire.since(before)
    sent, received, output = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4)
    assert received == sent == PINGS, output
    seen = wire.since(before)
    report("dscp wire (initiator veth, in)", f"after EF pings {after_marked}, then {seen}")
    assert seen["esp_in"] == 2 * PINGS == seen["esp_in_ef"] + seen["esp_in_cs0"], seen
    if copy_dscp == "no":
        assert seen["esp_in_ef"] == 0, seen
    else:
        assert after_marked["esp_in_ef"] == PINGS == seen["esp_in_ef"], seen


@pytest.mark.parametrize("tfc", [1000, "mtu"])
def test_tfc_padding_makes_every_esp_packet_one_size_and_strongswan_reads_them(
        lab: Lab, initiator: Charon, tfc: int | str) -> None:
    """swanctl's tfc_padding on our child (RFC 4303 2.7): pings of 84 and of 428 bytes
    come back from our worker in ESP of one size, at least the padding (or the TUN's
    MTU, 1400 by default), and strongSwan's libipsec, which cuts each packet at its
    own length, answers every one."""
    initiator_conn, responder_conn = conn_pair()
    node = lab.node([responder_conn.with_child(tfc_padding=tfc)],
                    extra_toml=worker_toml("ikec0"))
    least = 1000 if tfc == 1000 else 1400
    wire = lab.wire_counters("initiator", {
        "esp_in": ("in", ESP_IN_UDP_IN),
        "esp_in_padded": ("in", f"{ESP_IN_UDP_IN} udp length >= {8 + least}"),
    })
    initiator.load(initiator_conn)
    assert_initiated(initiator.initiate("net"), initiator)
    wait_for_log(node, r"CHILD SA established: net .* mode=tunnel")
    before, before_bytes = wire.read(), wire.read_bytes()
    for size in (56, 400):
        sent, received, output = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4,
                                      size=size)
        assert received == sent == PINGS, output
    seen, seen_bytes = wire.since(before), wire.bytes_since(before_bytes)
    report(f"tfc_padding = {tfc}", f"{seen}, {seen_bytes}")
    assert seen["esp_in"] == seen["esp_in_padded"] == 2 * PINGS, seen
    # one size: every datagram carried the same number of bytes
    assert seen_bytes["esp_in"] % (2 * PINGS) == 0, seen_bytes


ECT0, CE = 0x02, 0x03


@pytest.mark.parametrize("copy_ecn", [None, False])
def test_ecn_crosses_the_tunnel_as_rfc_6040_says_unless_copy_ecn_is_false(
        lab: Lab, initiator: Charon, copy_ecn: bool | None) -> None:
    """swanctl's copy_ecn (default yes), RFC 6040 normal mode. Out: our pings with
    ECT(0) leave in ESP whose outer header is ECT(0), counted on strongSwan's veth. In:
    strongSwan's libipsec leaves the outer header Not-ECT, so a rule on its veth plays
    a congested router and marks each of its ESP datagrams CE. Its ECT(0) pings then
    reach our TUN marked CE, and its Not-ECT ones are dropped (RFC 6040 4.2), counted
    as esp_dropped_packets_total{reason="ecn"}. With copy_ecn = false the outer
    header stays Not-ECT and its ECN field is ignored."""
    initiator_conn, responder_conn = conn_pair()
    if copy_ecn is not None:
        responder_conn = responder_conn.with_child(copy_ecn=copy_ecn)
    copies = copy_ecn is None
    node = lab.node([responder_conn], extra_toml=worker_toml("ikec0"),
                    settings={"metrics": {"listen": METRICS, "interval": 0.1}})
    wire = lab.wire_counters("initiator", {
        "esp_in": ("in", ESP_IN_UDP_IN),
        "esp_in_ect0": ("in", f"{ESP_IN_UDP_IN} ip ecn ect0"),
    })
    initiator.load(initiator_conn)
    assert_initiated(initiator.initiate("net"), initiator)
    wait_for_log(node, r"CHILD SA established: net .* mode=tunnel")
    before = wire.read()
    sent, received, output = ping(lab.responder, RESPONDER_INNER_V4, INITIATOR_INNER_V4,
                                  tos=ECT0)
    assert received == sent == PINGS, output
    out = wire.since(before)
    report("ecn wire (initiator veth, in)", str(out))
    assert out["esp_in"] >= PINGS, out
    assert out["esp_in_ect0"] == (PINGS if copies else 0), out
    # from here on every ESP datagram strongSwan sends arrives marked CE
    congested = WireCounters(lab.initiator, {"marked": ("out", f"{ESP_IN_UDP_OUT} ip ecn set ce")})
    congested.install()
    tun = WireCounters(lab.responder, {
        "echo": ("in", "icmp type echo-request"),
        "echo_ce": ("in", "icmp type echo-request ip ecn ce"),
    }, device="ikec0")
    tun.install()
    sent, received, output = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4,
                                  tos=ECT0)
    assert received == sent == PINGS, output
    inside = tun.read()
    report("ecn inside (our TUN, ECT(0) pings under CE)", str(inside))
    assert inside["echo"] == PINGS, inside
    assert inside["echo_ce"] == (PINGS if copies else 0), inside
    sent, received, output = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4)
    assert congested.read()["marked"] >= 2 * PINGS
    drops = drop_counts(lab.responder).get("esp:ecn", 0)
    report("ecn drops (Not-ECT pings under CE)", f"{received}/{sent} answered, {drops} dropped")
    if copies:
        assert received == 0 and drops == PINGS, (output, drops)
    else:
        assert received == sent == PINGS and drops == 0, (output, drops)
    assert node.running(), node.log_text()


def test_a_childless_ike_sa_gets_its_child_sa_by_create_child_sa(
        lab: Lab, initiator: Charon) -> None:
    """RFC 6023 with strongSwan's `childless = force`: we announce the extension, its
    IKE_AUTH carries no SA or selectors and our answer none either; the Child SA comes
    with the next CREATE_CHILD_SA and carries pings."""
    initiator_conn, responder_conn = conn_pair()
    initiator_conn = replace(initiator_conn, extra={"childless": "force"})
    node = lab.node([responder_conn], extra_toml=worker_toml("ikec0"))
    initiator.load(initiator_conn)
    child = child_sa(assert_initiated(initiator.initiate("net"), initiator))
    assert child["state"] == "INSTALLED", child
    log = initiator.log_text()
    assert re.search(r"parsed IKE_SA_INIT response 0 \[[^]]*N\(CHDLESS_SUP\)", log), log
    auth = re.search(r"generating IKE_AUTH request 1 \[([^]]*)\]", log)
    assert auth is not None and "SA" not in auth.group(1).split() and "TSi" not in auth.group(1)
    assert re.search(r"generating CREATE_CHILD_SA request 2 \[[^]]*SA No TSi TSr", log), log
    wait_for_log(node, r"CHILD SA established: net .* mode=tunnel")
    sent, received, output = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4)
    assert received == sent, output


def test_our_node_initiates_childless_with_childless_force(lab: Lab) -> None:
    """swanctl's childless = force on our initiating node (RFC 6023): strongSwan, the
    responder, announces the extension; our IKE_AUTH carries no SA or selectors, and a
    CREATE_CHILD_SA of ours brings the Child SA, which strongSwan installs and pings
    cross."""
    ours, theirs = conn_pair(encap=True)
    ours = replace(ours.with_child(start_action="start"), node_extra={"childless": "force"})
    charon = lab.charon("responder")
    charon.load(theirs)
    node = lab.node([ours], side="initiator", node_id="a", addresses=(INITIATOR_V4,),
                    extra_toml=worker_toml("ikecA"))
    wait_for_log(node, r"CHILD SA established: net .* mode=tunnel encap")
    (sa,) = established_sas(charon)
    assert child_sa(sa)["state"] == "INSTALLED", sa
    log = charon.log_text()
    auth = re.search(r"parsed IKE_AUTH request 1 \[([^]]*)\]", log)
    assert auth is not None and "SA" not in auth.group(1).split() \
        and "TSi" not in auth.group(1), log
    assert re.search(r"parsed CREATE_CHILD_SA request 2 \[[^]]*SA No[^]]*TSi TSr", log), log
    sent, received, output = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4)
    assert (sent, received) == (PINGS, PINGS), output


@pytest.mark.parametrize(("ours", "theirs"), [("force", None), ("never", "force")])
def test_childless_force_or_never_on_our_responder_refuses_the_other_kind(
        lab: Lab, initiator: Charon, ours: str, theirs: str | None) -> None:
    """Our responder with childless = force refuses strongSwan's regular IKE_AUTH
    (INVALID_SYNTAX, as strongSwan's own responder does); with childless = never it
    does not announce the extension, and strongSwan's forced childless initiation gives
    up."""
    initiator_conn, responder_conn = conn_pair()
    if theirs is not None:
        initiator_conn = replace(initiator_conn, extra={"childless": theirs})
    node = lab.node([replace(responder_conn, node_extra={"childless": ours})],
                    extra_toml=worker_toml("ikec0"))
    initiator.load(initiator_conn)
    result = initiator.initiate("net")
    assert_not_established(result, initiator)
    if ours == "force":
        assert "received INVALID_SYNTAX notify error" in result.stdout, result.stdout
        wait_for_log(node, r"IKE SA failed: .*the peer did not initiate a childless IKE SA")
    else:
        assert re.search(r"parsed IKE_SA_INIT response 0 \[", initiator.log_text())
        assert "CHDLESS_SUP" not in initiator.log_text()
        assert "peer does not support childless IKE_SA initiation" in initiator.log_text()


def test_a_radius_server_assigns_the_virtual_ip_and_a_pool_serves_the_others(
        lab: Lab, pki: Pki, tmp_path: Path) -> None:
    """`pools = ["radius", "rw"]` (strongSwan's eap-radius attribute provider): carol's
    Access-Accept from FreeRADIUS carries Framed-IP-Address 10.99.3.9, which becomes her
    virtual IP (the Child SA narrowed to it, pings from it cross), and DNS and WINS
    servers strongSwan's resolve plugin installs or logs; dave's carries none, and he
    gets the pool's first address and no name servers. With `accounting = true` FreeRADIUS records
    a Start and a Stop for each: the user, the virtual IP, one session id for both,
    the pings' packets and octets both ways, and strongSwan's Delete as User-Request."""
    radius = FreeRadius(lab.responder, tmp_path / "radius", address=RESPONDER_V4,
                        client=RESPONDER_V4, secret="radius-shared-secret",
                        users={"carol": "Carol's pa55word", "dave": "Dave's pa55word"},
                        replies={"carol": ("Framed-IP-Address = 10.99.3.9",
                                           "MS-Primary-DNS-Server = 10.99.2.53",
                                           "MS-Primary-NBNS-Server = 10.99.2.137",
                                           "DNS-Server-IPv6-Address = fd99:2::53")}).start()
    charon = lab.charon("initiator", settings={"install_virtual_ip": "yes"},
                        plugins=PLUGINS + " resolve")
    initiator_conn, responder_conn = conn_pair(
        ca=pki.ca, initiator_cred=pki.client_ecdsa, responder_cred=pki.gw_ecdsa)
    responder_conn = replace(
        responder_conn, node_extra={"pools": ["radius", "rw"]},
        remote=End("eap-radius", "%any", eap_id="%any")).with_child(remote_ts=())
    node = lab.node([responder_conn], extra_toml=worker_toml("ikec0") + (
        '[pools.rw]\naddrs = "10.99.3.0/28"\n[radius]\naccounting = true\n'
        f'[radius.servers.lab]\naddress = "{RESPONDER_V4}"\n'
        'secret = "radius-shared-secret"\n'))
    for count, (user, password, vip) in enumerate(
            (("carol", "Carol's pa55word", "10.99.3.9"),
             ("dave", "Dave's pa55word", "10.99.3.1")), start=1):
        charon.load(replace(
            initiator_conn, eap_users=((user, password),), extra={"vips": "0.0.0.0"},
            local=End("eap-mschapv2", "client.example.test", eap_id=user),
        ).with_child(local_ts=()))
        sa = assert_initiated(charon.initiate("net"), charon)
        assert sa.get("local-vips") == [vip], sa
        assert child_sa(sa).get("local-ts") == [f"{vip}/32"], sa
        line = wait_for_log(node, r"IKE SA established: rw ", count=count)[-1]
        assert f" vip={vip} eap_id={user}" in line, line
        sent, received, output = ping(lab.initiator, vip, RESPONDER_INNER_V4)
        assert (sent, received) == (PINGS, PINGS), output
        servers = re.findall(r"nameserver (\S+)", charon.resolv_conf.read_text()
                             if charon.resolv_conf.exists() else "")
        wins = re.findall(r"handling INTERNAL_IP4_NBNS attribute failed", charon.log_text())
        if user == "carol":
            assert servers == ["10.99.2.53", "fd99:2::53"] and len(wins) == 1, (
                servers, charon.log_text())
        else:
            assert servers == [] and len(wins) == 1, (servers, charon.log_text())
        charon.terminate_ike()
        wait_for_log(node, r"IKE SA deleted: ", count=count)
        deadline = time.monotonic() + 10
        while radius.accounting().count("Acct-Status-Type = Stop") < count:
            assert time.monotonic() < deadline, radius.accounting() + node.log_text()
            time.sleep(0.1)
        start, stop = radius.records(f'User-Name = "{user}"')
        assert start["Acct-Status-Type"] == "Start" and stop["Acct-Status-Type"] == "Stop"
        for record in (start, stop):
            assert record["Framed-IP-Address"] == vip, record
            assert record["Calling-Station-Id"].startswith(f'"{INITIATOR_V4}['), record
        assert start["Acct-Session-Id"] == stop["Acct-Session-Id"], (start, stop)
        assert stop["Acct-Terminate-Cause"] == "User-Request", stop
        # the pings (and nothing else) crossed: PINGS packets each way, 84 octets each
        assert int(stop["Acct-Input-Packets"]) == int(stop["Acct-Output-Packets"]) == PINGS
        assert int(stop["Acct-Input-Octets"]) == int(stop["Acct-Output-Octets"]) == 84 * PINGS
    assert "Login OK: [dave]" in radius.log_text(), radius.log_text()
    assert node.running(), node.log_text()

