"""The relay's UDP socket, shared by both roles: sealed envelopes in and out.

Like the IKE dispatcher it waits for readiness once and then drains a batch with
non-blocking calls (notes/building-blocks.md). Anything that does not open as an
envelope addressed to this node is dropped and counted by reason (`RelayCodec.drops`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import socket
import struct
from collections.abc import Callable, Iterator

import trio

from .errors import ParseError
from .relay import Address, Envelope, Kind, RelayCodec
from .store.membership import Membership

logger = logging.getLogger(__name__)

PINGS_MAX = 1024
_SEQ = struct.Struct("!Q")  # an envelope's sequence number, at offset 5
RECV_BATCH = 64
RECV_SIZE = 65535
SOCKET_BUFFER = 1 << 21


def parse_address(text: str) -> Address:
    """"host:port" or "[v6]:port" as membership info carries it."""
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def format_address(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class RelaySocket:
    def __init__(self, sock: socket.socket, codec: RelayCodec) -> None:
        self.sock = sock
        self.codec = codec
        self.sent = 0
        self.received = 0
        self.send_failed = 0
        self.dropped: dict[str, int] = {}  # reasons of our own: no_responder, no_worker, ...
        self._pings: dict[int, float] = {}  # seq of a PING in flight -> when it left
        self.rtt_count = 0  # PONGs back in time, and their round trips summed
        self.rtt_sum = 0.0

    @classmethod
    @contextlib.contextmanager
    def open(cls, host: str, port: int, codec: RelayCodec, *, mark: int | None = None
             ) -> Iterator[RelaySocket]:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
            if mark is not None:  # a worker's policy routing must let the relay pass
                sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_MARK", 36), mark)
            try:
                sock.bind((host, port))
            except OSError as exc:
                raise OSError(exc.errno, f"cannot bind the relay to {host}:{port}: "
                              f"{exc.strerror}") from None
            yield cls(sock, codec)
        finally:
            trio.lowlevel.notify_closing(sock)
            sock.close()

    @property
    def local(self) -> Address:
        host, port = self.sock.getsockname()[:2]
        return str(host), int(port)

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def send(self, envelope: bytes, to: Address) -> bool:
        try:
            self.sock.sendto(envelope, to)
        except OSError as exc:
            self.send_failed += 1
            logger.debug("relay send to %s failed: %s", to, exc)
            return False
        self.sent += 1
        return True

    def ping(self, recipient: str, to: Address) -> bool:
        """A PING whose PONG measures the relay's round trip to `recipient`."""
        envelope = self.codec.encode(Kind.PING, recipient)
        if len(self._pings) >= PINGS_MAX:  # unanswered ones: the oldest go
            for seq in list(self._pings)[:PINGS_MAX // 2]:
                del self._pings[seq]
        self._pings[_SEQ.unpack_from(envelope, 5)[0]] = trio.current_time()
        return self.send(envelope, to)

    async def ping_members(self, membership: Membership, role: str) -> None:
        """PING every live member of `role` once per heartbeat round, until cancelled."""
        while True:
            for member in membership.of_role(role):
                relay = member.info.get("relay")
                if isinstance(relay, str):
                    try:
                        self.ping(member.node, parse_address(relay))
                    except ValueError:
                        continue
            await trio.sleep(membership.ttl / 3)

    async def serve(self, handle: Callable[[Envelope, Address], None]) -> None:
        """Open every datagram and hand the envelopes on, until cancelled.

        PINGs are answered here (to the address they came from)."""
        sock, codec = self.sock, self.codec
        while True:
            await trio.lowlevel.wait_readable(sock)
            for _ in range(RECV_BATCH):
                try:
                    data, addr = sock.recvfrom(RECV_SIZE)
                except BlockingIOError:
                    break
                except OSError:
                    self.drop("recv_error")
                    continue
                try:
                    envelope = codec.decode_untrusted(data)
                except ParseError:
                    continue  # counted by the codec, by reason
                self.received += 1
                source = (str(addr[0]), int(addr[1]))
                if envelope.kind is Kind.PING:
                    self.send(codec.encode(Kind.PONG, envelope.sender, echo=envelope.seq),
                              source)
                    continue
                if envelope.kind is Kind.PONG:
                    sent = self._pings.pop(envelope.echo, None)
                    if sent is not None:
                        self.rtt_count += 1
                        self.rtt_sum += trio.current_time() - sent
                    continue
                try:
                    handle(envelope, source)
                except Exception:
                    self.drop("handler_error")
                    logger.exception("relay: handling an envelope from %s failed",
                                     envelope.sender)
            else:
                await trio.lowlevel.checkpoint()

    def stats(self) -> dict[str, int]:
        """sent, received, dropped_<reason> (the codec's and ours), for the metrics."""
        result = {"sent": self.sent, "received": self.received,
                  "dropped_send_failed": self.send_failed, "rtt_count": self.rtt_count,
                  "rtt_microseconds": int(self.rtt_sum * 1e6)}
        drops = self.codec.drops
        for f in dataclasses.fields(drops):
            result["dropped_" + f.name] = getattr(drops, f.name)
        for reason, value in self.dropped.items():
            result["dropped_" + reason] = value
        return result
