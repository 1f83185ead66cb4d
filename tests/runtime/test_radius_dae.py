"""RADIUS Disconnect-Requests (RFC 5176) on loopback, built here as a RADIUS server (or
radclient) builds them; FreeRADIUS's radclient against strongSwan's SA is in
tests/interop."""

from __future__ import annotations

import hashlib
import hmac
import socket
import struct

import trio

from cluster.ike.radius import Attr, Packet
from cluster.runtime.radius_dae import DaeServer

SECRET = b"dae secret"


def request(code: int, identifier: int, attributes: list[tuple[int, bytes]],
            secret: bytes = SECRET, *, message_authenticator: bool = False) -> bytes:
    body = b"".join(bytes((kind, 2 + len(value))) + value for kind, value in attributes)
    if message_authenticator:
        body += bytes((Attr.MESSAGE_AUTHENTICATOR, 18)) + bytes(16)
    head = struct.pack("!BBH", code, identifier, 20 + len(body))
    if message_authenticator:
        body = body[:-16] + hmac.digest(secret, head + bytes(16) + body, "md5")
    return head + hashlib.md5(head + bytes(16) + body + secret).digest() + body


def check_answer(answer: bytes, sent: bytes) -> tuple[int, int | None]:
    """(code, Error-Cause) of an answer whose Response Authenticator verifies."""
    body = answer[20:]
    assert answer[1] == sent[1] and struct.unpack("!H", answer[2:4])[0] == len(answer)
    assert answer[4:20] == hashlib.md5(answer[:4] + sent[4:20] + body + SECRET).digest()
    cause = None
    if body:
        assert body[0] == Attr.ERROR_CAUSE and body[1] == 6
        cause = int.from_bytes(body[2:6])
    return answer[0], cause


async def test_disconnect_requests_are_answered_and_bad_ones_dropped() -> None:
    asked: list[tuple[bytes | None, bytes | None, int | None]] = []

    async def disconnect(user: bytes | None, session: bytes | None, limit: int | None) -> int:
        asked.append((user, session, limit))
        return 2 if user == b"carol" or session == b"abcd" else 0

    server = DaeServer("127.0.0.1", 0, lambda: SECRET, disconnect)
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(server.run)
        with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            await sock.connect((host, port))

            async def ask(data: bytes) -> bytes | None:
                await sock.send(data)
                with trio.move_on_after(0.5):
                    return await sock.recv(4096)
                return None

            carol = request(Packet.DISCONNECT_REQUEST, 1, [(Attr.USER_NAME, b"carol")])
            assert check_answer(await ask(carol) or b"", carol) == (Packet.DISCONNECT_ACK, None)
            # a retransmission: the same answer, not a second disconnect
            assert check_answer(await ask(carol) or b"", carol) == (Packet.DISCONNECT_ACK, None)
            by_session = request(Packet.DISCONNECT_REQUEST, 2, [(Attr.ACCT_SESSION_ID, b"abcd")],
                                 message_authenticator=True)
            assert check_answer(await ask(by_session) or b"", by_session) == (
                Packet.DISCONNECT_ACK, None)
            dave = request(Packet.DISCONNECT_REQUEST, 3, [(Attr.USER_NAME, b"dave")])
            assert check_answer(await ask(dave) or b"", dave) == (Packet.DISCONNECT_NAK, 503)
            nobody = request(Packet.DISCONNECT_REQUEST, 4, [])
            assert check_answer(await ask(nobody) or b"", nobody) == (Packet.DISCONNECT_NAK, 402)
            coa = request(Packet.COA_REQUEST, 5, [(Attr.USER_NAME, b"carol")])
            assert check_answer(await ask(coa) or b"", coa) == (Packet.COA_NAK, 405)
            # the one change applied: a new Session-Timeout (RFC 2865 5.27)
            timeout = (Attr.SESSION_TIMEOUT, (600).to_bytes(4, "big"))
            limit = request(Packet.COA_REQUEST, 8, [(Attr.USER_NAME, b"carol"), timeout])
            assert check_answer(await ask(limit) or b"", limit) == (Packet.COA_ACK, None)
            nobody_else = request(Packet.COA_REQUEST, 9, [(Attr.USER_NAME, b"dave"), timeout])
            assert check_answer(await ask(nobody_else) or b"", nobody_else) == (
                Packet.COA_NAK, 503)
            # a Session-Timeout in a Disconnect-Request changes nothing: it ends them
            ended = request(Packet.DISCONNECT_REQUEST, 10, [(Attr.ACCT_SESSION_ID, b"abcd"),
                                                            timeout])
            assert check_answer(await ask(ended) or b"", ended) == (Packet.DISCONNECT_ACK, None)
            forged = request(Packet.DISCONNECT_REQUEST, 6, [(Attr.USER_NAME, b"carol")],
                             b"guessed")
            assert await ask(forged) is None
            bad_mac = bytearray(request(Packet.DISCONNECT_REQUEST, 7, [(Attr.USER_NAME, b"x")],
                                        message_authenticator=True))
            bad_mac[-1] ^= 1  # (its authenticator is then recomputed over the bad MAC)
            body = bytes(bad_mac[20:])
            bad = bytes(bad_mac[:4]) + hashlib.md5(bytes(bad_mac[:4]) + bytes(16) + body
                                                  + SECRET).digest() + body
            assert await ask(bad) is None
            assert await ask(b"\x28\x01") is None
        nursery.cancel_scope.cancel()
    assert asked == [(b"carol", None, None), (None, b"abcd", None), (b"dave", None, None),
                     (b"carol", None, 600), (b"dave", None, 600), (None, b"abcd", None)]
    assert server.stats.as_dict() == {"disconnected": 3, "limited": 1, "not_found": 3,
                                      "unsupported": 1, "invalid": 3}
