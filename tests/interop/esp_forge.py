"""Capture ESP in UDP leaving this namespace and send it back in forms a peer must refuse.

Run inside a test namespace (``python esp_forge.py IFACE PEER COUNT``). It prints
"listening" once its packet socket is open, captures COUNT outgoing ESP-in-UDP
datagrams to PEER:4500 (RFC 3948: a non-zero first word), then sends from another
port: each of them again (replays, RFC 4303 3.4.3), one with a sequence number far
ahead (so it passes the replay pre-check and fails the ICV), one cut short after the
SPI, and one under an SPI nobody installed. It prints what it sent as JSON.

``python esp_forge.py --keep IFACE PEER FILE`` captures one such datagram into FILE
(hex) and ``python esp_forge.py --send PEER FILE`` sends it again, later: ESP the peer
sent on an SA before a rekey, arriving after it.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time

ETH_P_ALL = 0x0003  # a tap on every protocol: the only kind that sees outgoing packets
ETH_P_IP = 0x0800
PACKET_OUTGOING = 4
NAT_T = 4500


def capture(iface: str, peer: str, count: int, timeout: float) -> list[bytes]:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
    sock.bind((iface, ETH_P_ALL))
    sock.settimeout(timeout)
    print("listening", flush=True)
    peer_packed = socket.inet_aton(peer)
    found: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(found) < count and time.monotonic() < deadline:
        packet, address = sock.recvfrom(65535)
        if address[1] != ETH_P_IP or address[2] != PACKET_OUTGOING or len(packet) < 28 \
                or packet[9] != 17:
            continue
        ihl = (packet[0] & 0x0F) * 4
        _, dport = struct.unpack_from("!HH", packet, ihl)
        payload = packet[ihl + 8:]
        if packet[16:20] == peer_packed and dport == NAT_T and payload[:4] != bytes(4):
            found.append(payload)
    return found


def main() -> int:
    if sys.argv[1] == "--keep":
        iface, peer, path = sys.argv[2:5]
        kept = capture(iface, peer, 1, timeout=15.0)
        with open(path, "w") as file:
            file.write(kept[0].hex() if kept else "")
        return 0 if kept else 1
    if sys.argv[1] == "--send":
        peer, path = sys.argv[2:4]
        with open(path) as file:
            datagram = bytes.fromhex(file.read())
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(datagram, (peer, NAT_T))
        return 0
    iface, peer, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    captured = capture(iface, peer, count, timeout=15.0)
    if len(captured) < count:
        print(json.dumps({"error": f"captured {len(captured)} of {count}"}))
        return 1
    time.sleep(0.5)  # the originals are through
    first = captured[0]
    seq = struct.unpack_from("!I", first, 4)[0]
    ahead = first[:4] + struct.pack("!I", seq + 5000) + first[8:]
    sent = {"replays": len(captured), "seq_ahead": 1, "truncated": 1, "unknown_spi": 1}
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for datagram in [*captured, ahead, first[:6], b"\xde\xad\xbe\xef" + first[4:]]:
        out.sendto(datagram, (peer, NAT_T))
    print(json.dumps(sent), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
