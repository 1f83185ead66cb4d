"""RADIUS accounting (RFC 2866) of eap-radius users, as strongSwan's eap-radius sends it
with `accounting = yes`: an Accounting-Request Start when a user's IKE SA is
established, Stop when it ends, with its session time, virtual IPs, Class and, where
a data plane carries its Child SAs, their traffic.

The event sink calls `record`; the data plane tells what each Child SA carried as it
leaves the SAD for good (`child_traffic`), so a rekeyed SA's last seconds of linger and
an SA its hard lifetime removed count in full. `run` sends the requests, each to the
servers in order until one answers, without holding anything else up.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import trio

from ..ike.events import (
    AUTH_EXPIRED,
    PEER_NOT_RESPONDING,
    REPLACED,
    TERMINATED,
    ChildSaDeleted,
    ChildSaEstablished,
    Event,
    IkeSaAdopted,
    IkeSaDeleted,
    IkeSaEstablished,
    IkeSaRekeyed,
)
from ..ike.policy import ResponderPolicy
from ..ike.radius import (
    Attr,
    RadiusSettings,
    Station,
    acceptor,
    attribute,
    encode_accounting,
    nas_attributes,
    packed_address,
    u32,
)
from .radius_client import RadiusClient

logger = logging.getLogger(__name__)

START, STOP, INTERIM = 1, 2, 3  # Acct-Status-Type (RFC 2866 5.1, RFC 2869 5.1)
TICK = 1.0  # seconds between looks for Interim-Updates (and Stops) that are due
REPORT_WAIT = 3.0  # seconds a cluster responder's Stop waits for the workers' reports
# Acct-Terminate-Cause (RFC 2866 5.10)
USER_REQUEST, LOST_CARRIER, SESSION_TIMEOUT, ADMIN_RESET, NAS_REQUEST, PORT_PREEMPTED = (
    1, 2, 5, 6, 10, 13)
QUEUE = 1024  # requests waiting to be sent; beyond it they are dropped and counted
IN_FLIGHT = 32  # requests sent at once
# (bytes in, bytes out, packets in, packets out) of a Child SA by its inbound SPI
Traffic = Callable[[bytes], "tuple[int, int, int, int] | None"]


_CAUSES = {
    "deleted by peer": USER_REQUEST,
    PEER_NOT_RESPONDING: LOST_CARRIER,
    TERMINATED: ADMIN_RESET,
    AUTH_EXPIRED: SESSION_TIMEOUT,
    REPLACED: PORT_PREEMPTED,  # the user's newer session took over
    "replaced (INITIAL_CONTACT)": PORT_PREEMPTED,
}


def terminate_cause(reason: str) -> int:
    """The cause of an IKE SA's end, from the reason its session gave (otherwise our
    own decision: expiry, unique = keep, a failure)."""
    return _CAUSES.get(reason, NAS_REQUEST)


@dataclass
class _Session:
    id: bytes
    user: bytes
    station: Station
    start: float
    virtual_ips: tuple[str, ...]
    classes: tuple[bytes, ...]
    interval: float = 0.0  # seconds between Interim-Updates (0: none)
    next_interim: float = 0.0
    traffic: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    children: set[bytes] = field(default_factory=set)  # inbound SPIs of those up
    unreported: set[bytes] = field(default_factory=set)  # (reported) not yet told of
    # (reported) what those carried so far, as their workers last told (child_usage)
    usage: dict[bytes, tuple[int, int, int, int]] = field(default_factory=dict)
    stop: list[bytes] | None = None  # (reported) its Stop's status, waiting for reports
    stop_by: float = 0.0  # sent then at the latest


@dataclass
class AccountingStats:
    sent: int = 0  # answered by a server
    failed: int = 0  # no server answered
    dropped: int = 0  # the queue was full

    def as_dict(self) -> dict[str, int]:
        return {"sent": self.sent, "failed": self.failed, "dropped": self.dropped}


class Accounting:
    """`reported`: a data plane tells what each Child SA carried as it removes it
    (`child_traffic`: the one in this process, or a cluster responder's workers), and a
    Stop waits up to REPORT_WAIT seconds for its Child SAs' reports. `traffic` reads
    the counts so far of a Child SA still in this process's data plane, for
    Interim-Updates; a cluster's workers tell them instead (`child_usage`)."""

    def __init__(self, policy: Callable[[], ResponderPolicy], client: RadiusClient, *,
                 traffic: Traffic | None = None, reported: bool = False,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self._policy = policy
        self._client = client
        self._traffic = traffic
        self._reported = reported
        self._clock = clock
        self._wall_clock = wall_clock
        self._sessions: dict[bytes, _Session] = {}  # by the IKE SA's SPIs
        self._stopping: dict[bytes, _Session] = {}  # (reported) Stops waiting for reports
        self._child_of: dict[bytes, bytes] = {}  # Child SA inbound SPI -> IKE SA's SPIs
        self._send, self._receive = trio.open_memory_channel[list[bytes]](QUEUE)
        self.stats = AccountingStats()

    # --- events ------------------------------------------------------------------------

    def record(self, event: Event) -> None:
        if isinstance(event, IkeSaEstablished):
            self._started(event)
        elif isinstance(event, IkeSaAdopted):
            self._adopted(event)
        elif isinstance(event, ChildSaEstablished):
            key = event.ike_spi_i + event.ike_spi_r
            if key in self._sessions:
                self._child_of[event.spi_in] = key
                self._sessions[key].children.add(event.spi_in)
                if self._reported:
                    self._sessions[key].unreported.add(event.spi_in)
        elif isinstance(event, ChildSaDeleted):
            self._child_ended(event.spi_in)
        elif isinstance(event, IkeSaRekeyed):
            session = self._sessions.pop(event.old_spi_i + event.old_spi_r, None)
            if session is not None:  # one accounting session through rekeys
                key = event.spi_i + event.spi_r
                self._sessions[key] = session
                for spi in session.children | session.unreported:
                    self._child_of[spi] = key
        elif isinstance(event, IkeSaDeleted):
            self._stopped(event)

    def _started(self, event: IkeSaEstablished) -> None:
        opened = self._open(event, self._clock())
        if opened is not None:
            radius, session = opened
            self._queue(radius, session, [attribute(Attr.ACCT_STATUS_TYPE, u32(START))])

    def _adopted(self, event: IkeSaAdopted) -> None:
        """A session another responder started goes on here: no second Start; its time
        counts from when the user authenticated."""
        now = self._clock()
        since = max(0.0, self._wall_clock() - event.authenticated_at) \
            if event.authenticated_at else 0.0
        opened = self._open(event, now - since)
        if opened is not None:
            _, session = opened
            session.children.update(event.children)
            if self._reported:
                session.unreported.update(event.children)
            for spi in event.children:
                self._child_of[spi] = event.spi_i + event.spi_r

    def _open(self, event: IkeSaEstablished | IkeSaAdopted, start: float
              ) -> tuple[RadiusSettings, _Session] | None:
        """The accounting session of an eap-radius user's SA (None: not accounted)."""
        policy = self._policy()
        radius = policy.radius
        if radius is None or not radius.accounting or not event.eap_identity:
            return None
        conn = next((c for c in policy.connections if c.name == event.connection), None)
        if conn is None or conn.remote.method != "eap-radius":
            return None
        key = event.spi_i + event.spi_r
        station = Station(event.local, event.remote, int.from_bytes(event.spi_r[:4]))
        interval = float(event.radius_interim or radius.accounting_interval)
        next_interim = self._clock() + interval
        session = _Session(key.hex().encode(), event.eap_identity.encode(), station, start,
                           event.virtual_ips, event.radius_classes, interval, next_interim)
        self._sessions[key] = session
        return radius, session

    def _child_ended(self, spi_in: bytes, session: _Session | None = None) -> None:
        # (reported) its data plane tells what it carried when it is gone (child_traffic)
        key = self._child_of.get(spi_in) if self._reported else self._child_of.pop(spi_in, None)
        found = session or (self._sessions.get(key) if key is not None else None)
        if found is not None:
            found.children.discard(spi_in)

    def _stopped(self, event: IkeSaDeleted) -> None:
        session = self._sessions.pop(event.spi_i + event.spi_r, None)
        radius = self._policy().radius
        if session is None or radius is None:
            return
        for spi in list(session.children):
            self._child_ended(spi, session)
        session.stop = [attribute(Attr.ACCT_STATUS_TYPE, u32(STOP)),
                        attribute(Attr.ACCT_TERMINATE_CAUSE,
                                  u32(terminate_cause(event.reason)))]
        if session.unreported:  # (reported) its workers' reports are on their way
            session.stop_by = self._clock() + REPORT_WAIT
            self._stopping[event.spi_i + event.spi_r] = session
            return
        self._send_stop(radius, session)

    def _send_stop(self, radius: RadiusSettings, session: _Session) -> None:
        assert session.stop is not None
        for spi in session.unreported:  # (reported: not told in time)
            self._child_of.pop(spi, None)
        self._queue(radius, session, [*session.stop, *self._usage(session, self._sum(session))])

    def _sum(self, session: _Session) -> list[int]:
        """(reported) The traffic of the Child SAs removed and, of those not yet, what
        their workers last told or, of those deleted but still lingering (rekeyed away)
        in this process's data plane, what it counts."""
        traffic = list(session.traffic)
        for spi in session.unreported:
            usage = session.usage.get(spi)
            if usage is None and spi not in session.children and self._traffic is not None:
                usage = self._traffic(spi)
            if usage is not None:
                traffic = _plus(traffic, usage)
        return traffic

    def child_traffic(self, spi_i: bytes, spi_r: bytes, spi_in: bytes,
                      traffic: tuple[int, int, int, int]) -> None:
        """A data plane removed a Child SA and told what it carried."""
        key = self._child_of.pop(spi_in, None)
        if key is None:
            return
        session = self._sessions.get(key) or self._stopping.get(key)
        if session is None or spi_in not in session.unreported:
            return
        session.unreported.discard(spi_in)
        session.usage.pop(spi_in, None)
        session.traffic = _plus(session.traffic, traffic)
        if session.stop is not None and not session.unreported:
            del self._stopping[key]
            radius = self._policy().radius
            if radius is not None:
                self._send_stop(radius, session)

    def child_usage(self, spi_i: bytes, spi_r: bytes, spi_in: bytes,
                    traffic: tuple[int, int, int, int]) -> None:
        """A worker told what a Child SA it still has carried so far (a cluster responder).
        The counts only grow: a report overtaken by a later one changes nothing."""
        key = self._child_of.get(spi_in)
        session = self._sessions.get(key) if key is not None else None
        if session is None or spi_in not in session.unreported:
            return
        last = session.usage.get(spi_in)
        session.usage[spi_in] = traffic if last is None else (
            max(last[0], traffic[0]), max(last[1], traffic[1]),
            max(last[2], traffic[2]), max(last[3], traffic[3]))

    def _overdue_stops(self) -> None:
        """Stops whose Child SAs' reports did not all come in time: sent with what did."""
        now = self._clock()
        radius = self._policy().radius
        for key, session in list(self._stopping.items()):
            if now >= session.stop_by:
                del self._stopping[key]
                if radius is not None:
                    self._send_stop(radius, session)

    def interim(self) -> None:
        """Interim-Updates (RFC 2869 2.1) for the sessions whose interval is up: the
        session time and the traffic so far (strongSwan's accounting_interval, or the
        Access-Accept's Acct-Interim-Interval)."""
        radius = self._policy().radius
        if radius is None:
            return
        now = self._clock()
        for session in self._sessions.values():
            if not session.interval or now < session.next_interim:
                continue
            session.next_interim = now + session.interval
            traffic = self._sum(session)
            for spi in session.children:  # the Child SAs still up: their counts so far
                counts = self._traffic(spi) if self._traffic is not None else None
                if counts is not None:
                    traffic = _plus(traffic, counts)
            self._queue(radius, session, [attribute(Attr.ACCT_STATUS_TYPE, u32(INTERIM)),
                                          *self._usage(session, traffic)])

    def _usage(self, session: _Session, traffic: list[int]) -> list[bytes]:
        out = [attribute(Attr.ACCT_SESSION_TIME, u32(int(self._clock() - session.start)))]
        octets_in, octets_out, packets_in, packets_out = traffic
        if self._traffic is not None or self._reported:  # (someone counts the traffic)
            out += [attribute(Attr.ACCT_INPUT_OCTETS, u32(octets_in)),
                    attribute(Attr.ACCT_INPUT_GIGAWORDS, u32(octets_in >> 32)),
                    attribute(Attr.ACCT_OUTPUT_OCTETS, u32(octets_out)),
                    attribute(Attr.ACCT_OUTPUT_GIGAWORDS, u32(octets_out >> 32)),
                    attribute(Attr.ACCT_INPUT_PACKETS, u32(packets_in)),
                    attribute(Attr.ACCT_OUTPUT_PACKETS, u32(packets_out))]
        return out

    def _queue(self, radius: RadiusSettings, session: _Session, extra: list[bytes]) -> None:
        attributes = [*extra, attribute(Attr.ACCT_SESSION_ID, session.id),
                      *nas_attributes(radius, session.station, session.user)]
        for address in session.virtual_ips:
            kind = Attr.FRAMED_IPV6_ADDRESS if ":" in address else Attr.FRAMED_IP_ADDRESS
            attributes.append(attribute(kind, packed_address(address)))
        attributes += [attribute(Attr.CLASS, value) for value in session.classes]
        try:
            self._send.send_nowait(attributes)
        except trio.WouldBlock:
            self.stats.dropped += 1
            logger.warning("RADIUS accounting: queue full, a request for %s dropped",
                           session.user.decode(errors="replace"))

    # --- sending -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        limit = trio.Semaphore(IN_FLIGHT)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._tick)
            task_status.started()
            async for attributes in self._receive:
                await limit.acquire()
                nursery.start_soon(self._deliver, attributes, limit)

    async def _tick(self) -> None:
        while True:
            await trio.sleep(TICK)
            self.interim()
            self._overdue_stops()

    async def _deliver(self, attributes: list[bytes], limit: trio.Semaphore) -> None:
        try:
            radius = self._policy().radius
            if radius is None:
                return
            for server in radius.servers:
                identifier = os.urandom(1)[0]
                request = encode_accounting(identifier, attributes, server.secret)
                accept = acceptor(identifier, request[4:20], server.secret, [], accounting=True)
                target = replace(server, port=server.acct_port)
                if await self._client.exchange(target, request, radius, accept) is not None:
                    self.stats.sent += 1
                    return
            self.stats.failed += 1
        finally:
            limit.release()


def _plus(total: list[int], counts: tuple[int, int, int, int]) -> list[int]:
    return [a + b for a, b in zip(total, counts, strict=True)]
