"""A one-SA IKEv2 initiator for cluster tests; runs inside the initiator namespace.

    python -m tests.interop.ike_probe establish LOCAL REMOTE
        brings up one IKE SA (PSK, conn_pair's ids and secret), then sends one liveness
        request; prints JSON {spi_i, spi_r, request, response} (hex) and exits. The SA
        stays up on the responder side.
    python -m tests.interop.ike_probe resend LOCAL REMOTE HEX [SECONDS]
        sends the datagram HEX once a second until anything comes back; prints that
        reply's hex (or nothing after SECONDS).
"""

from __future__ import annotations

import json
import os
import select
import socket
import sys
import tempfile
import time
from pathlib import Path

CLIENT_TOML = """
[node]
id = "probe"
[ike]
addresses = ["{local}"]
[connections.probe]
proposals = ["aes256gcm16-prfsha256-x25519"]
remote_addrs = ["{remote}"]
local = {{ auth = "psk", id = "client.example.test" }}
remote = {{ auth = "psk", id = "gw.example.test" }}
[connections.probe.children.net]
local_ts = ["10.99.1.0/24"]
remote_ts = ["10.99.2.0/24"]
esp_proposals = ["aes256gcm16"]
[secrets.probe]
ids = ["client.example.test", "gw.example.test"]
secret = "change-me"
"""


PORT = 10500  # not 500: a charon in the same namespace may hold it


def _socket(local: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((local, PORT))
    return sock


def establish(local: str, remote: str) -> dict[str, str]:
    from cluster.config import load_config
    from cluster.ike.session import IkeSession
    from cluster.ike.state import State

    with tempfile.TemporaryDirectory() as workdir:
        path = Path(workdir) / "probe.toml"
        path.write_text(CLIENT_TOML.format(local=local, remote=remote))
        config = load_config(path)
    conn = config.policy.connections[0]
    me, peer = (local, PORT), (remote, 500)
    session = IkeSession.initiator(conn, config.policy, os.urandom(8), me, peer,
                                   time.monotonic())
    sock = _socket(local)
    sent: list[bytes] = []

    def step(until: float) -> bytes | None:
        """Send what the session has; return the next datagram from the peer."""
        for datagram in session.datagrams_to_send():
            sent.append(datagram.data)
            sock.sendto(datagram.data, datagram.remote)
        while time.monotonic() < until:
            timer = session.get_timer()
            wait = min(until, timer if timer is not None else until) - time.monotonic()
            if select.select([sock], [], [], max(wait, 0.0))[0]:
                data, addr = sock.recvfrom(65535)
                session.receive_datagram_untrusted(data, me, (addr[0], addr[1]),
                                                   time.monotonic())
                return data
            now = time.monotonic()
            timer = session.get_timer()
            if timer is not None and timer <= now:
                session.handle_timer(now)
                for datagram in session.datagrams_to_send():
                    sent.append(datagram.data)
                    sock.sendto(datagram.data, datagram.remote)
        return None

    deadline = time.monotonic() + 20
    while session.state is not State.ESTABLISHED:
        if step(deadline) is None or session.closed:
            raise SystemExit(f"not established: {session.state} {session.last_error}")
    assert session.check_liveness(time.monotonic())
    response = step(time.monotonic() + 10)
    if response is None:
        raise SystemExit("no answer to the liveness request")
    return {"spi_i": session.spi_i.hex(), "spi_r": session.spi_r.hex(),
            "request": sent[-1].hex(), "response": response.hex()}


def resend(local: str, remote: str, data: bytes, seconds: float) -> bytes | None:
    """The first response to `data`: the same message ID, the response flag set (other
    datagrams, e.g. a new owner's own requests, are not the answer)."""
    sock = _socket(local)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sock.sendto(data, (remote, 500))
        while select.select([sock], [], [], 1.0)[0]:
            reply = sock.recvfrom(65535)[0]
            if len(reply) >= 28 and reply[19] & 0x20 and reply[20:24] == data[20:24]:
                return reply
    return None


def main(argv: list[str]) -> int:
    command, local, remote = argv[:3]
    if command == "establish":
        print(json.dumps(establish(local, remote)))
        return 0
    reply = resend(local, remote, bytes.fromhex(argv[3]),
                   float(argv[4]) if len(argv) > 4 else 20.0)
    print(reply.hex() if reply is not None else "")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
