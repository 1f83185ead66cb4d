"""strongSwan connects through the COOKIE round trip while spoofed IKE_SA_INITs flood our node.

Issue 4, item 7: a bounded flood of IKE_SA_INIT requests with random SPIs from
random spoofed addresses (10.99.50.x, sent through a raw socket in the
initiator's namespace) keeps our node, with a low `cookie_threshold`, in cookie
mode; strongSwan initiates meanwhile, is asked for a cookie, repeats its request
with it and is ESTABLISHED within 2 seconds; the node's memory stays bounded.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest

from cluster.config import load_config
from cluster.ike.session import IkeSession
from tests.interop.lab import (
    INITIATOR_V4,
    RESPONDER_V4,
    Lab,
    Node,
    conn_pair,
    render_node_config,
)
from tests.interop.netns import stop_process
from tests.interop.responders import responder_kind
from tests.interop.sa_checks import assert_initiated

pytestmark = pytest.mark.interop

SPOOFED_NET = "10.99.50.0/24"
FLOOD_RATE = 2000  # packets per second
FLOOD_SECONDS = 5.0
COOKIE_THRESHOLD = 5
ESTABLISH_WITHIN = 2.0  # seconds, the acceptance criterion
RSS_GROWTH_MAX_KB = 50 * 1024

# Stdlib only; runs in the initiator's namespace as root and stops by itself.
FLOOD_SCRIPT = r'''
import os, random, socket, struct, sys, time

template = bytes.fromhex(open(sys.argv[1]).read())
dst, rate, seconds = sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
prefix = sys.argv[5]  # e.g. "10.99.50."
dst_packed = socket.inet_aton(dst)
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)  # IP_HDRINCL
udp_len = 8 + len(template)
sent = 0
start = time.monotonic()
while True:
    elapsed = time.monotonic() - start
    if elapsed >= seconds:
        break
    due = int(elapsed * rate) + 1
    while sent < due:
        src = socket.inet_aton(prefix + str(random.randint(1, 254)))
        ike = os.urandom(8) + template[8:]  # a fresh initiator SPI
        # the kernel fills in the IP checksum and id; UDP checksum 0 is allowed on IPv4
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 0, 0, 64, 17, 0, src,
                         dst_packed)
        udp = struct.pack("!HHHH", random.randint(1024, 65535), 500, udp_len, 0)
        sock.sendto(ip + udp + ike, (dst, 0))
        sent += 1
    time.sleep(0.002)
print(f"sent {sent} in {time.monotonic() - start:.2f} s", flush=True)
'''


class DosNode(Node):
    """Our node with `[ike]` DoS settings added to the rendered configuration."""

    def __init__(self, *args: object, ike_lines: str, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.ike_lines = ike_lines

    def write_config(self) -> Path:
        path = super().write_config()
        text = path.read_text()
        assert "[ike]\n" in text
        path.write_text(text.replace("[ike]\n", f"[ike]\n{self.ike_lines}\n", 1))
        return path


def vm_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def ike_sa_init_template(lab: Lab) -> bytes:
    """A real IKE_SA_INIT request of our initiator, as strongSwan's peer would see one."""
    initiator_conn, _ = conn_pair()
    directory = lab.dir / "flood-config"
    directory.mkdir()
    path = directory / "flood.toml"
    path.write_text(render_node_config([initiator_conn], directory, node_id="flood",
                                       addresses=[INITIATOR_V4]))
    config = load_config(path)
    session = IkeSession.initiator(config.policy.connections[0], config.policy, b"\x01" * 8,
                                   (INITIATOR_V4, 500), (RESPONDER_V4, 500), 0.0)
    (datagram,) = session.datagrams_to_send()
    return datagram.data


def counters(log: str) -> dict[str, int]:
    """The counters of the node's last line ("node gw1 stopped: name=value ...")."""
    stopped = [line for line in log.splitlines() if " stopped: " in line]
    assert stopped, f"no shutdown line in the node's log:\n{log[-3000:]}"
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", stopped[-1].split(" stopped: ")[1])}


def test_strongswan_establishes_through_cookies_under_a_spoofed_flood(lab: Lab) -> None:
    if responder_kind() == "charon":
        pytest.skip("checks our node's cookies and memory")
    initiator_conn, responder_conn = conn_pair()
    node = DosNode(lab.responder, lab.dir / "node-dos", [responder_conn],
                   ike_lines=f"cookie_threshold = {COOKIE_THRESHOLD}")
    lab.nodes.append(node)  # the lab stops it
    node.start()
    assert node.proc is not None
    pid = node.proc.pid
    assert "cluster" in Path(f"/proc/{pid}/cmdline").read_text()  # ip netns exec exec'd
    # replies to the spoofed addresses go back over the veth (and die there); the
    # route also satisfies a strict rp_filter on the responder's side
    lab.responder.ip("route", "add", SPOOFED_NET, "via", INITIATOR_V4)

    charon = lab.charon("initiator", log_levels={"ike": 2})
    charon.load(initiator_conn)

    template = lab.dir / "ike_sa_init.hex"
    template.write_text(ike_sa_init_template(lab).hex())
    script = lab.dir / "flood.py"
    script.write_text(FLOOD_SCRIPT)
    rss_before = vm_rss_kb(pid)
    flood_log = lab.dir / "flood.log"
    flood = lab.initiator.spawn(
        [sys.executable, str(script), str(template), RESPONDER_V4, str(FLOOD_RATE),
         str(FLOOD_SECONDS), SPOOFED_NET.rsplit(".", 1)[0] + "."],
        output=flood_log,
    )  # fmt: skip
    try:
        time.sleep(1.0)  # the node is past its cookie threshold by now
        assert flood.poll() is None, flood_log.read_text()
        started = time.monotonic()
        result = charon.initiate("net", timeout=10)
        took = time.monotonic() - started
        sa = assert_initiated(result, charon)
        assert flood.poll() is None, "the flood ended before strongSwan was through"
        flood.wait(timeout=FLOOD_SECONDS + 10)
    finally:
        stop_process(flood)
    rss_after = vm_rss_kb(pid)
    assert flood.returncode == 0, flood_log.read_text()
    sent = int(flood_log.read_text().split()[1])

    assert sa["state"] == "ESTABLISHED"
    assert took < ESTABLISH_WITHIN, f"swanctl --initiate took {took:.2f} s"
    # strongSwan's side of the round trip (ENC at level 1, IKE at level 2)
    log = charon.log_text()
    assert re.search(r"parsed IKE_SA_INIT response 0 \[ N\(COOKIE\) \]", log), log
    assert "received COOKIE notify" in log, log
    assert re.search(r"generating IKE_SA_INIT request 0 \[ N\(COOKIE\) SA KE No", log), log
    assert rss_after - rss_before < RSS_GROWTH_MAX_KB, (rss_before, rss_after)

    assert node.stop() == 0
    stats = counters(node.log_text())
    assert sent >= FLOOD_RATE * FLOOD_SECONDS * 0.9, sent
    assert stats.get("cookies_accepted", 0) >= 1, stats
    assert stats.get("actors_started", 0) <= COOKIE_THRESHOLD + 5, stats  # strongSwan's + spare
    # every flood packet past the threshold got a cookie or was rate limited
    assert stats.get("cookies_sent", 0) + stats.get("notifies_suppressed", 0) >= sent * 0.9, stats
    print(
        f"\nflood: {sent} spoofed IKE_SA_INIT in {FLOOD_SECONDS:g} s; strongSwan established "
        f"in {took:.3f} s; node RSS {rss_before} -> {rss_after} kB; counters {stats}"
    )

