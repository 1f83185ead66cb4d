"""TunDevice inside a network namespace: created up with its MTU, read, written, removed."""

from __future__ import annotations

import fcntl
import os
import select
import socket
import struct
from typing import Any

import trio

from cluster.worker import IoCounters
from cluster.worker.routing import Routes
from cluster.worker.tun import TunDevice

from .namespaces import ip_json, run_in_netns

TUN = "ikt0"


def _link(name: str) -> dict[str, Any] | None:
    links = [link for link in ip_json("-d", "link", "show") if link["ifname"] == name]
    return links[0] if links else None


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _ipv4(src: str, dst: str, proto: int, payload: bytes) -> bytes:
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0x1234, 0, 64, proto, 0,
        socket.inet_aton(src), socket.inet_aton(dst),
    )
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return header + payload


def _echo_request(ident: int, seq: int, data: bytes) -> bytes:
    body = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + data
    return body[:2] + struct.pack("!H", _checksum(body)) + body[4:]


def _fields(packet: bytes) -> dict[str, Any]:
    """Version, addresses and ICMP type/id/seq of an IPv4 packet (what the tests assert on)."""
    ihl = (packet[0] & 0x0F) * 4
    icmp = packet[ihl:]
    return {
        "version": packet[0] >> 4,
        "proto": packet[9],
        "src": socket.inet_ntoa(packet[12:16]),
        "dst": socket.inet_ntoa(packet[16:20]),
        "icmp": struct.unpack("!BBHHH", icmp[:8]) if packet[9] == 1 else None,
        "payload": bytes(icmp[8:]),
    }


def test_open_creates_up_link_with_mtu_and_close_removes_it(ns: str) -> None:
    def body() -> dict[str, Any]:
        with TunDevice.open(TUN, mtu=1380) as tun:
            link = _link(TUN)
            nonblocking = all(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK for fd in tun.fds)
            seen = (tun.name, tun.ifindex, len(tun.fds), tun.created, nonblocking)
        return {"link": link, "seen": seen, "after": _link(TUN)}

    got = run_in_netns(ns, body)
    link = got["link"]
    assert link is not None
    name, ifindex, nfds, created, nonblocking = got["seen"]
    assert (name, ifindex, nfds, created, nonblocking) == (TUN, link["ifindex"], 1, True, True)
    assert link["mtu"] == 1380
    assert "UP" in link["flags"]
    info = link["linkinfo"]["info_data"]
    assert link["linkinfo"]["info_kind"] == "tun"
    assert (info["type"], info["pi"], info["multi_queue"]) == ("tun", False, False)
    assert got["after"] is None


def test_multi_queue_opens_one_fd_per_queue(ns: str) -> None:
    def body() -> dict[str, Any]:
        with TunDevice.open(TUN, queues=3) as tun:
            return {"fds": len(set(tun.fds)), "info": _link(TUN)["linkinfo"]["info_data"]}  # type: ignore[index]

    got = run_in_netns(ns, body)
    assert got["fds"] == 3
    assert got["info"]["multi_queue"] is True
    assert got["info"]["numqueues"] == 3


def test_attaching_to_an_existing_queue_leaves_the_link_to_its_creator(ns: str) -> None:
    def body() -> list[Any]:
        owner = TunDevice.open(TUN, multi_queue=True)
        second = TunDevice.open(TUN, multi_queue=True)
        steps = [second.created, second.ifindex == owner.ifindex]
        second.close()
        steps.append(_link(TUN) is not None)
        owner.close()
        steps.append(_link(TUN) is None)
        return steps

    assert run_in_netns(ns, body) == [False, True, True, True]


def test_bad_arguments_are_refused_before_touching_the_kernel() -> None:
    for kwargs in ({"queues": 0}, {"queues": 2, "multi_queue": False}):
        try:
            TunDevice.open("ikt0", **kwargs)  # type: ignore[arg-type]
        except ValueError:
            pass
        else:
            raise AssertionError(f"accepted {kwargs}")
    for name in ("", "a-name-far-too-long"):
        try:
            TunDevice.open(name)
        except ValueError:
            pass
        else:
            raise AssertionError(f"accepted name {name!r}")


def test_add_address_is_idempotent_and_ipv6_is_usable_at_once(ns: str) -> None:
    def body() -> dict[str, Any]:
        with TunDevice.open(TUN) as tun:
            tun.add_address("10.99.2.1/32")
            tun.add_address("10.99.2.1/32")
            tun.add_address("fd00:99:2::1/128")
            addrs = ip_json("addr", "show", "dev", TUN)[0]["addr_info"]
            # Not tentative: binding succeeds right away.
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
                s.bind(("fd00:99:2::1", 0))
        return {"addrs": sorted((a["local"], a["prefixlen"]) for a in addrs)}

    assert run_in_netns(ns, body)["addrs"] == [("10.99.2.1", 32), ("fd00:99:2::1", 128)]


def test_ping_routed_into_the_tun_is_read_from_its_fd(ns: str) -> None:
    # `ping` is not installed on these machines: an ICMP socket sends the same echo
    # request, through the same routing as any locally originated packet.
    def body() -> list[dict[str, Any]]:
        async def main() -> list[dict[str, Any]]:
            with TunDevice.open(TUN) as tun, Routes.open(tun.ifindex) as routes:
                tun.add_address("10.99.2.1/32")
                routes.add("10.99.1.0/24", src="10.99.2.1")
                with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
                    s.sendto(_echo_request(0x77, 1, b"ikc-ping"), ("10.99.1.5", 0))
                with trio.fail_after(5):
                    packets: list[bytes] = []
                    while not packets:
                        packets = await tun.read_batch(tun.fds[0])
                assert tun.counters.tun_read_packets == len(packets)
                assert tun.counters.tun_read_bytes == sum(map(len, packets))
                return [_fields(p) for p in packets]

        return trio.run(main)

    packets = run_in_netns(ns, body)
    assert len(packets) == 1
    echo = packets[0]
    assert (echo["version"], echo["proto"]) == (4, 1)
    # The route's source hint chose the inner address.
    assert (echo["src"], echo["dst"]) == ("10.99.2.1", "10.99.1.5")
    assert echo["icmp"][0] == 8 and echo["icmp"][3:] == (0x77, 1)
    assert echo["payload"] == b"ikc-ping"


def test_packet_written_into_the_tun_reaches_the_kernel_which_answers(ns: str) -> None:
    request = _ipv4("10.99.1.5", "10.99.2.1", 1, _echo_request(0x4242, 7, b"ikc-tun-test"))

    def body() -> dict[str, Any]:
        async def main() -> dict[str, Any]:
            with TunDevice.open(TUN) as tun, Routes.open(tun.ifindex) as routes:
                tun.add_address("10.99.2.1/32")
                routes.add("10.99.1.0/24", src="10.99.2.1")
                written = tun.write(tun.fds[0], request)
                refused = tun.write(tun.fds[0], b"\x00not an ip packet")
                with trio.fail_after(5):
                    packets: list[bytes] = []
                    while not packets:
                        packets = await tun.read_batch(tun.fds[0])
                counters = tun.counters.as_dict()
            return {"ok": (written, refused), "reply": _fields(packets[0]), "c": counters}

        return trio.run(main)

    got = run_in_netns(ns, body)
    assert got["ok"] == (True, False)
    reply = got["reply"]
    assert (reply["src"], reply["dst"]) == ("10.99.2.1", "10.99.1.5")
    assert reply["icmp"][0] == 0 and reply["icmp"][3:] == (0x4242, 7)  # echo reply, id, seq
    assert reply["payload"] == b"ikc-tun-test"
    counters = got["c"]
    assert (counters["tun_write_packets"], counters["tun_write_bytes"]) == (1, len(request))
    assert counters["tun_write_errors"] == 1


def test_drain_returns_at_most_the_batch_and_empty_when_nothing_waits(ns: str) -> None:
    def body() -> list[int]:
        counters = IoCounters()
        with TunDevice.open(TUN, counters=counters) as tun, Routes.open(tun.ifindex) as routes:
            routes.add("10.99.1.0/24")
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                for i in range(5):
                    s.sendto(b"x" * i, ("10.99.1.9", 9))
            sizes = [len(tun.drain(tun.fds[0], 2)) for _ in range(4)]
        # The counters object given to open is the one counted into.
        return [*sizes, counters.tun_read_packets]

    assert run_in_netns(ns, body) == [2, 2, 1, 0, 5]


def test_fresh_tun_carries_no_ipv6_housekeeping_packets(ns: str) -> None:
    def body() -> dict[str, Any]:
        with TunDevice.open(TUN) as tun:
            tun.add_address("fd00:99:2::1/128")
            # Router solicitations leave within about a second of link-up when a
            # link-local address exists; wait longer than that.
            ready = select.select([tun.fds[0]], [], [], 1.5)[0]
            scopes = [a["scope"] for a in ip_json("addr", "show", "dev", TUN)[0]["addr_info"]]
            return {"ready": bool(ready), "drained": len(tun.drain(tun.fds[0])), "scopes": scopes}

    got = run_in_netns(ns, body)
    assert got == {"ready": False, "drained": 0, "scopes": ["global"]}
