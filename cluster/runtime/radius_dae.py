"""RADIUS Dynamic Authorization (RFC 5176), as strongSwan's eap-radius `dae`: a RADIUS
server (or an operator with radclient) ends a user's sessions with a Disconnect-Request
naming the User-Name or the Acct-Session-Id our accounting gave it, or gives them a new
Session-Timeout with a CoA-Request (the one authorization change strongSwan applies:
the peer is told AUTH_LIFETIME, the SA ends at the timeout unless it authenticated
again). A CoA-Request without a Session-Timeout is answered CoA-NAK.

Requests whose authenticator does not verify with the shared secret are dropped
silently (RFC 5176 3.5); a retransmitted request gets the answer sent before.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass

import trio

from ..config import NodeConfig
from ..ike.radius import (
    Attr,
    Packet,
    attribute,
    encode_dae_answer,
    parse_dae_request_untrusted,
    u32,
)

logger = logging.getLogger(__name__)

# RFC 5176 3.6 Error-Cause values
MISSING_ATTRIBUTE, UNSUPPORTED_SERVICE, SESSION_NOT_FOUND = 402, 405, 503
REMEMBER = 30.0  # seconds an answer is kept for a retransmitted request
MAX_DATAGRAM = 4096

Peer = tuple[object, ...]  # a socket address
# (User-Name, Acct-Session-Id, either may be None; a new Session-Timeout, None: end them)
# -> how many IKE SAs are being ended or limited
Disconnect = Callable[[bytes | None, bytes | None, int | None], Awaitable[int]]


@dataclass
class DaeStats:
    disconnected: int = 0  # Disconnect-ACKs: IKE SAs were ended
    limited: int = 0  # CoA-ACKs: IKE SAs got a new Session-Timeout
    not_found: int = 0  # Disconnect-/CoA-NAKs: no such session (or nothing named one)
    unsupported: int = 0  # CoA-NAKs: no Session-Timeout in it
    invalid: int = 0  # datagrams dropped: not a request, or the secret does not verify

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class DaeServer:
    def __init__(self, host: str, port: int, secret: Callable[[], bytes],
                 disconnect: Disconnect, *, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.host, self.port = host, port
        self._secret = secret  # (the current configuration's: a reload may change it)
        self._disconnect = disconnect
        self._clock = clock
        self._answered: dict[tuple[Peer, int, bytes], tuple[float, bytes]] = {}
        self.stats = DaeStats()

    async def run(self, *, task_status: trio.TaskStatus[tuple[str, int]]
                  = trio.TASK_STATUS_IGNORED) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        with trio.socket.socket(family, socket.SOCK_DGRAM) as sock:
            try:
                await sock.bind((self.host, self.port))
            except OSError as exc:  # (the CLI prints it as the one line that stops start-up)
                raise OSError(exc.errno, f"[radius.dae] listen {self.host} port {self.port}: "
                                         f"{exc.strerror}") from None
            bound = sock.getsockname()
            logger.info("RADIUS DAE on udp %s port %d", bound[0], bound[1])
            task_status.started((bound[0], bound[1]))
            async with trio.open_nursery() as nursery:
                while True:
                    data, peer = await sock.recvfrom(MAX_DATAGRAM)
                    nursery.start_soon(self._answer, sock, data, peer)

    async def _answer(self, sock: trio.socket.SocketType, data: bytes, peer: Peer) -> None:
        secret = self._secret()
        parsed = parse_dae_request_untrusted(data, secret)
        if parsed is None:
            self.stats.invalid += 1
            return
        request, identifier, authenticator = parsed
        now = self._clock()
        self._answered = {k: v for k, v in self._answered.items() if v[0] > now}
        key = (peer, identifier, authenticator)
        if key in self._answered:  # RFC 5176 2.3: a retransmission gets the same answer
            await _send(sock, self._answered[key][1], peer)
            return
        coa = request.code == Packet.COA_REQUEST
        kind = "CoA-Request" if coa else "Disconnect-Request"
        acked, naked = (Packet.COA_ACK, Packet.COA_NAK) if coa else \
            (Packet.DISCONNECT_ACK, Packet.DISCONNECT_NAK)
        timeout = request.first(Attr.SESSION_TIMEOUT)  # RFC 2865 5.27
        limit = int.from_bytes(timeout) if timeout is not None and len(timeout) == 4 else None
        user = request.first(Attr.USER_NAME)
        session = request.first(Attr.ACCT_SESSION_ID)
        what = " ".join(f"{name}={value.decode(errors='replace')!r}" for name, value in
                        (("user", user), ("session", session)) if value is not None)
        if coa and limit is None:  # the one change applied here
            self.stats.unsupported += 1
            code, cause = naked, UNSUPPORTED_SERVICE
            logger.info("RADIUS CoA-Request (%s) from %s: no Session-Timeout, nothing "
                        "applied", what or "naming nobody", _text(peer))
        else:
            if not coa:
                limit = None
            found = 0 if not what else await self._disconnect(user, session, limit)
            if found:
                if coa:
                    self.stats.limited += 1
                else:
                    self.stats.disconnected += 1
                code, cause = acked, 0
                logger.info("RADIUS %s (%s) from %s: %s %d IKE SA(s)", kind, what,
                            _text(peer), f"Session-Timeout {limit} s for" if coa else "ending",
                            found)
            else:
                self.stats.not_found += 1
                code = naked
                cause = SESSION_NOT_FOUND if what else MISSING_ATTRIBUTE
                logger.info("RADIUS %s (%s) from %s: no such session", kind,
                            what or "naming nobody", _text(peer))
        attributes = [attribute(Attr.ERROR_CAUSE, u32(cause))] if cause else []
        answer = encode_dae_answer(code, identifier, authenticator, attributes, secret)
        self._answered[key] = (now + REMEMBER, answer)
        await _send(sock, answer, peer)


async def _send(sock: trio.socket.SocketType, data: bytes, peer: Peer) -> None:
    try:
        await sock.sendto(data, peer)
    except OSError as exc:
        logger.warning("RADIUS DAE answer to %s not sent: %s", _text(peer), exc)


def _text(peer: Peer) -> str:
    return f"{peer[0]} port {peer[1]}"


def dae_server(config: NodeConfig, current: Callable[[], NodeConfig],
                disconnect: Disconnect) -> DaeServer | None:
    """[radius.dae]'s listener, if configured (its secret follows reloads, its address
    needs a restart)."""
    radius = config.policy.radius
    if radius is None or radius.dae is None:
        return None
    first = radius.dae

    def secret() -> bytes:
        now = current().policy.radius
        return now.dae.secret if now is not None and now.dae is not None else first.secret
    return DaeServer(first.host, first.port, secret, disconnect)

