"""A single node: sockets, supervisor, the SAs it initiates, signals, graceful shutdown."""

from __future__ import annotations

import functools
import logging
import random
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

import trio

from ..config import Initiation, NodeConfig
from ..ike.constants import NATT_PORT
from ..ike.events import (
    PEER_NOT_RESPONDING,
    REAUTHENTICATED,
    ChildSaDeleted,
    ChildSaEstablished,
    ChildSaFailed,
    Event,
    IkeSaDeleted,
    IkeSaEstablished,
    IkeSaFailed,
    IkeSaMoved,
    IkeSaReauthDue,
    IkeSaRekeyed,
)
from ..ike.ike_init import redirect_data
from ..ike.policy import ResponderPolicy
from ..ike.session import Address, IkeSession
from ..ike.traffic_selectors import TrafficSelector
from ..key_exchange import ExponentialPool
from .actor import SaActor, Session
from .crl_fetch import RevocationStats, fetch_crls
from .dispatcher import Dispatcher, EspSink
from .radius_client import RadiusClient, RadiusStats
from .reload import reload_on_signal
from .stats import RuntimeStats
from .supervisor import DEFAULT_MAILBOX_SIZE, EventSink, InitiatedOutcome, Supervisor

logger = logging.getLogger(__name__)

# start_action = "start": the wait before the next attempt doubles from the first
# to the largest; each wait is 80-100 % of it, so nodes started together spread out.
INITIATE_BACKOFF_FIRST = 1.0
INITIATE_BACKOFF_MAX = 30.0
INITIATE_JITTER = 0.2
# a trapped child the peer deleted while its IKE SA stays: one CREATE_CHILD_SA per
# this many seconds at most, however many packets ask (a refused one is not retried
# for every packet)
CHILD_REQUEST_INTERVAL = 2.0
# how often an initiator checks whether the IKE SA the peer brought up has ended
PEER_SA_POLL = 1.0
# how often `Node.initiate` looks whether the Child SA it asked for is up
INITIATE_POLL = 0.05


class InitiateError(Exception):
    """`ike-cluster initiate` could not bring the child up; the message says why."""


@dataclass(frozen=True)
class Initiated:
    """A Child SA `Node.initiate` found up, and its IKE SA."""

    connection: str
    peer: Address
    spi_i: bytes
    spi_r: bytes
    child: str
    spi_in: bytes
    spi_out: bytes
    already: bool  # it was up before we were asked


@dataclass(eq=False)
class Node:
    """Handed to `task_status.started()`: what a test or the CLI may look at."""

    config: NodeConfig  # the one in force (replaced by `reconfigure`)
    stats: RuntimeStats
    dispatcher: Dispatcher
    supervisor: Supervisor
    cancel_scope: trio.CancelScope
    initiators: list[Initiator] = field(default_factory=list)  # per connection it starts
    factory: ResponderFactory | None = None  # the supervisor's, when it is one
    nursery: trio.Nursery | None = None  # where initiators run
    revocation: RevocationStats = field(default_factory=RevocationStats)  # CRL/OCSP fetches
    radius: RadiusStats = field(default_factory=RadiusStats)  # eap-radius round trips
    # `initiate` of a connection no start_action brings up: one IKE SA each, until it ends
    manual: list[Initiator] = field(default_factory=list)
    listeners: list[Callable[[Event], None]] = field(default_factory=list)  # see run_node

    def reconfigure(self, config: NodeConfig) -> None:
        """Use a reloaded configuration (`reload.carry_over` made it) for what comes next:
        new SAs, `unique`, and the connections this node starts. Established SAs keep
        theirs."""
        if self.factory is not None:
            self.factory.policy = config.policy
        self.supervisor.set_uniqueness({c.name: c.unique for c in config.policy.connections})
        starts = {i.connection.name: i for i in config.initiations if not i.on_demand}
        for initiator in self.manual:  # (`initiate`: each keeps its connection's copy)
            initiator.policy = config.policy
        for initiator in list(self.initiators):
            initiator.policy = config.policy
            if initiator.initiation.on_demand:
                continue  # traps are routed in the data plane: a restart changes them
            fresh = starts.pop(initiator.name, None)
            if fresh is not None and not initiator.gave_up:
                initiator.initiation = fresh  # from its next attempt
                continue
            if fresh is not None:  # it gave up (keyingtries): a reload tries again
                starts[initiator.name] = fresh
                self.initiators.remove(initiator)
                continue
            initiator.stop()
            self.initiators.remove(initiator)
            logger.info("connection %s: no longer in the configuration; not initiated "
                        "again (its SA stays up)", initiator.name)
        for initiation in starts.values():
            initiator = Initiator(initiation, config.policy, self.supervisor, self.dispatcher)
            self.initiators.append(initiator)
            if self.nursery is not None:
                self.nursery.start_soon(initiator.run, name=f"initiate {initiator.name}")
        self.config = config

    @property
    def local_addresses(self) -> list[Address]:
        return self.dispatcher.local_addresses

    def shutdown(self) -> None:
        """Start the same graceful shutdown as SIGTERM."""
        self.cancel_scope.cancel()

    def acquire(self, connection: str) -> None:
        """A packet for trapped connection `connection` found no SA: bring it up."""
        for initiator in self.initiators:
            if initiator.name == connection:
                initiator.acquire()

    async def initiate(self, child: str, timeout: float) -> Initiated:
        """`swanctl --initiate --child`: bring up a Child SA of `child` with its
        connection's peer: on the IKE SA up with that peer if there is one (CREATE_CHILD_SA),
        else on a new IKE SA, which stays until it ends and is not initiated again
        (strongSwan's `start_action = none` with `close_action = none`). InitiateError
        says why not, also when it is not up within `timeout` seconds."""
        policy = self.config.policy
        connection = next((c for c in policy.connections if c.child(child) is not None), None)
        if connection is None:
            raise InitiateError(f"no connection has a child {child!r}")
        target = self.config.initiable.get(connection.name)
        if not isinstance(target, Initiation):
            raise InitiateError(f"connection {connection.name}: cannot initiate: {target}")
        config = connection.child(child)
        assert config is not None
        others = tuple(c for c in connection.children if c is not config)
        initiation = replace(target, connection=replace(connection, children=(config, *others)))
        refused: list[str] = []

        def listen(event: Event) -> None:
            if isinstance(event, ChildSaFailed) and event.name == child:
                refused.append(event.reason)
        self.listeners.append(listen)
        try:
            with trio.move_on_after(timeout):
                return await self._bring_up(initiation, child, refused)
        finally:
            self.listeners.remove(listen)
        raise InitiateError(f"not up within {timeout:g} s")

    async def _bring_up(self, initiation: Initiation, child: str,
                        refused: list[str]) -> Initiated:
        name, remote = initiation.connection.name, initiation.remote
        one: Initiator | None = None
        if self.supervisor.established_for(name, remote) is None:
            running = next((i for i in [*self.initiators, *self.manual]
                            if i.name == name and not i.finished), None)
            if running is None:
                one = Initiator(initiation, self.config.policy, self.supervisor,
                                self.dispatcher, once=True)
                self.manual.append(one)
                assert self.nursery is not None
                self.nursery.start_soon(self._run_once, one, name=f"initiate {name}")
            elif running.initiation.on_demand:
                running.acquire()
            else:
                running.hurry()
        actor: SaActor | None = None
        requested = False  # of the current IKE SA: by us, or its IKE_AUTH (our new SA)
        ran: list[bool] = []  # our request ran: whether it sent a CREATE_CHILD_SA
        while True:
            if refused:
                raise InitiateError(f"the Child SA was refused: {refused[0]}")
            if one is not None and one.outcome is not None and not one.outcome.established:
                raise InitiateError(one.outcome.reason)
            current = self.supervisor.established_for(name, remote)
            if current is not None and current is not actor:  # new, or the last one went
                actor, ran = current, []
                requested = one is not None and current.session.spi_i == one.spi_i
                if requested:
                    ran.append(True)
            if actor is not None and current is actor:
                up = _child_up(actor, child, already=not requested)
                if up is not None:
                    return up
                session = actor.session
                if isinstance(session, IkeSession) and not session.creating_children:
                    if not requested:
                        requested = True
                        self._ask_for_child(actor, child, ran)
                    elif ran:  # answered (or never sent), and no Child SA: the log says why
                        raise InitiateError("the Child SA did not come up"
                                            + (f": {session.last_error}"
                                               if session.last_error else ""))
            await trio.sleep(INITIATE_POLL)

    def _ask_for_child(self, actor: SaActor, child: str, asked: list[bool]) -> None:
        def start(session: Session, now: float) -> None:
            asked.append(isinstance(session, IkeSession) and session.start_child(child, now))
        if not actor.mailbox.put_nowait(start):
            raise InitiateError("the IKE SA is too busy to take the request")

    async def _run_once(self, initiator: Initiator) -> None:
        try:
            await initiator.run()
        finally:
            self.manual.remove(initiator)


def _format_selectors(local: tuple[TrafficSelector, ...], remote: tuple[TrafficSelector, ...]
                      ) -> str:
    """`ts=10.99.2.0/24===10.99.3.1/32 ` (strongSwan's notation), or nothing."""
    if not (local or remote):
        return ""
    return f"ts={','.join(map(str, local))}==={','.join(map(str, remote))} "


def log_event(event: Event) -> None:
    """The single-node event sink: SA life in the log (the interop tests grep it)."""
    if isinstance(event, IkeSaEstablished):
        logger.info(
            "IKE SA established: %s spi_i=%s spi_r=%s local=%s peer=%s local_id=%s"
            " remote_id=%s %s%s%s",
            event.connection,
            event.spi_i.hex(),
            event.spi_r.hex(),
            _format_address(event.local),
            _format_address(event.remote),
            event.local_id,
            event.remote_id,
            event.algorithms,
            "".join(f" vip={address}" for address in event.virtual_ips)
            + "".join(f" own_vip={address}" for address in event.own_virtual_ips)
            + (f" eap_id={event.eap_identity}" if event.eap_identity else "")
            + (" ppk" if event.ppk else ""),
            " (NAT)" if event.nat else "",
        )
    elif isinstance(event, IkeSaDeleted):
        logger.info(
            "IKE SA deleted: spi_i=%s spi_r=%s reason=%s",
            event.spi_i.hex(),
            event.spi_r.hex(),
            event.reason,
        )
    elif isinstance(event, IkeSaRekeyed):
        logger.info(
            "IKE SA rekeyed: spi_i=%s spi_r=%s -> spi_i=%s spi_r=%s (initiated by %s)",
            event.old_spi_i.hex(),
            event.old_spi_r.hex(),
            event.spi_i.hex(),
            event.spi_r.hex(),
            "us" if event.we_initiated else "the peer",
        )
    elif isinstance(event, IkeSaMoved):
        logger.info(
            "IKE SA moved: spi_i=%s spi_r=%s peer=%s local=%s (%s)",
            event.spi_i.hex(),
            event.spi_r.hex(),
            _format_address(event.remote),
            _format_address(event.local),
            event.reason,
        )
    elif isinstance(event, IkeSaFailed):
        logger.info(
            "IKE SA failed: spi_i=%s spi_r=%s reason=%s",
            event.spi_i.hex(),
            event.spi_r.hex(),
            event.reason,
        )
    elif isinstance(event, ChildSaEstablished):
        # Field by field: the keys must never reach a log line.
        # the transforms in the configuration's syntax, e.g. esp=aes128-sha256-esn
        esp = [event.encr.name, *([event.integ.name] if event.integ else []),
               *(["esn"] if event.esn else [])]
        logger.info(
            "CHILD SA established: %s in IKE SA %s_i/%s_r spi_in=%s spi_out=%s %sesp=%s "
            "mode=%s%s",
            event.name,
            event.ike_spi_i.hex(),
            event.ike_spi_r.hex(),
            event.spi_in.hex(),
            event.spi_out.hex(),
            _format_selectors(event.local_ts, event.remote_ts),
            "-".join(esp),
            event.mode,
            " encap" if event.encap else "",
        )
    elif isinstance(event, ChildSaFailed):
        logger.info(
            "CHILD SA failed: %s in IKE SA %s_i/%s_r reason=%s",
            event.name,
            event.ike_spi_i.hex(),
            event.ike_spi_r.hex(),
            event.reason,
        )
    elif isinstance(event, ChildSaDeleted):
        logger.info(
            "CHILD SA deleted: %s in IKE SA %s_i/%s_r spi_in=%s spi_out=%s reason=%s",
            event.name,
            event.ike_spi_i.hex(),
            event.ike_spi_r.hex(),
            event.spi_in.hex(),
            event.spi_out.hex(),
            event.reason,
        )
    else:
        logger.debug("%s", event)


def _format_address(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ResponderFactory:
    """The supervisor's session factory: a responder session under `policy`, which a
    configuration reload replaces (SAs set up before keep theirs)."""

    def __init__(self, config: NodeConfig) -> None:
        self.policy = config.policy
        # one per process, shared by its SAs
        self._exponentials = ExponentialPool(config.dh_reuse)
        self.redirect_to = ""  # RFC 5685 4: send new initiators to this gateway instead

    def __call__(self, spi_r: bytes, local: Address, remote: Address) -> Session:
        session = IkeSession.responder(self.policy, spi_r, local, remote,
                                       exponentials=self._exponentials)
        session.sa.redirect_to = self.redirect_to
        return session


def redirect_node(supervisor: Supervisor, factory: ResponderFactory, gateway: str,
                  existing: bool) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """RFC 5685 on this node: new IKE_SA_INITs go to `gateway` ("" ends it) and, with
    `existing`, the established SAs of peers that support it are asked to move there.
    The SAs asked, and those whose peer did not announce REDIRECT_SUPPORTED; ValueError
    (nothing changed) for a gateway a REDIRECT cannot name."""
    if gateway:
        redirect_data(gateway)
    factory.redirect_to = gateway
    moved: list[dict[str, str]] = []
    unable: list[dict[str, str]] = []
    if gateway and existing:
        for session in supervisor.established_sessions():
            if not isinstance(session, IkeSession) or session.sa.original_initiator:
                continue  # (one of ours: we are its client, not its gateway)
            row = {"spi_i": session.spi_i.hex(), "spi_r": session.spi_r.hex()}
            if not session.sa.redirect_supported:
                unable.append(row)
                continue
            supervisor.send_command(session.spi_i, session.spi_r,
                                    functools.partial(_redirect_one, gateway))
            moved.append(row)
    logger.info("redirect: new IKE SAs %s; %d established SA(s) asked to move, %d cannot "
                "be (no REDIRECT_SUPPORTED)",
                f"go to {gateway}" if gateway else "are answered again", len(moved),
                len(unable))
    return moved, unable


def _redirect_one(gateway: str, session: Session, now: float) -> None:
    if isinstance(session, IkeSession):
        session.redirect(gateway, now)


def responder_factory(config: NodeConfig) -> ResponderFactory:
    return ResponderFactory(config)


def _child_up(actor: SaActor, child: str, *, already: bool) -> Initiated | None:
    """The installed Child SA of `child` on the actor's IKE SA, if there is one."""
    session = actor.session
    if not isinstance(session, IkeSession):
        return None
    sa = session.sa
    for installed in sa.children.values():
        if installed.name == child and not installed.deleting:
            assert sa.connection is not None
            return Initiated(sa.connection.name, sa.remote, session.spi_i,
                             session.spi_r, child, installed.spi_in, installed.spi_out,
                             already)
    return None


class Initiator:
    """Keeps one IKE SA of a `start_action = "start"` connection up, or brings up one of a
    `"trap"` connection each time a packet for it finds no SA (`acquire`).

    strongSwan initiates such a connection once at start-up and, with its default
    `close_action = none`, leaves it down when the peer deletes it. A link between
    two nodes should come back by itself, so here "start" means: initiate at
    start-up, retry a failed attempt (timeout, refusal) after a back-off forever,
    and initiate again when an established SA ends, whoever ended it.
    """

    def __init__(
        self,
        initiation: Initiation,
        policy: ResponderPolicy,
        supervisor: Supervisor,
        dispatcher: Dispatcher,
        *,
        jitter: Callable[[], float] = random.random,
        once: bool = False,
    ) -> None:
        self.initiation = initiation
        # `ike-cluster initiate`: one attempt, the IKE SA kept (reauthenticated) while it
        # lasts, nothing initiated after it ends
        self.once = once
        self.outcome: InitiatedOutcome | None = None  # (once) how its attempt ended
        self.policy = policy
        self.supervisor = supervisor
        self.dispatcher = dispatcher
        self._jitter = jitter
        self._acquired = trio.Event()  # on demand: a packet asked for the SA
        self._stopped = False  # `stop`: no attempt after the current one
        self._idle: trio.CancelScope | None = None  # the wait between attempts, if any
        self._current: _InitiatedSa | None = None  # the IKE SA that carries the connection
        self._first: _InitiatedSa | None = None  # the first IKE SA of the current attempt
        self._next_child_request = 0.0  # (trio time) see `acquire`
        self.attempts = 0  # IKE SAs initiated so far
        self.failures = 0  # attempts that ended before they were established
        self.established = 0  # attempts that came up
        self.reauthentications = 0  # IKE SAs that replaced an established one of ours
        self.gave_up = False  # keyingtries attempts failed in a row: it initiates no more

    @property
    def name(self) -> str:
        return self.initiation.connection.name

    @property
    def finished(self) -> bool:
        """It will initiate no more (stopped, gave up, or its one attempt ended)."""
        return self._stopped or self.gave_up or self.outcome is not None

    @property
    def spi_i(self) -> bytes:
        """Our SPI of the first IKE SA of its current attempt (zeros before it has one)."""
        current = self._first
        actor = current.actor if current is not None else None
        return actor.session.spi_i if actor is not None else bytes(8)

    @property
    def remote(self) -> Address:
        return self.initiation.remote, self.initiation.remote_port

    def stop(self) -> None:
        """Initiate no more (a reload removed the connection). An SA it brought up stays
        until it ends, as in strongSwan; it is not initiated again."""
        self._stopped = True
        self.hurry()  # (out of the wait it is in, to see that it stopped)

    def hurry(self) -> None:
        """Cut short the wait it is in (`ike-cluster initiate` of a start connection
        in its back-off after a failed attempt: the operator wants it now)."""
        if self._idle is not None:
            self._idle.cancel()

    async def _pause(self, wait: Callable[[], Awaitable[object]]) -> None:
        """`wait` unless `stop` comes first."""
        with trio.CancelScope() as self._idle:
            if not self._stopped:
                await wait()
        self._idle = None

    def source(self) -> tuple[Address, int]:
        """Our IKE address and NAT-T port; raises OSError when no route leads to the peer."""
        host = self.initiation.local
        if host in ("0.0.0.0", "::"):
            host = _route_source(self.initiation.remote)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        ike_port = natt_port = None
        for ep in self.dispatcher.endpoints:
            if ep.local[0] == host or (ep.wildcard and ep.sock.family == family):
                if ep.natt:
                    natt_port = natt_port or ep.local[1]
                else:
                    ike_port = ike_port or ep.local[1]
        if ike_port is None or natt_port is None:
            raise OSError(f"no socket bound to {host}")
        return (host, ike_port), natt_port

    def acquire(self) -> None:
        """On demand (start_action = "trap"): a packet needs the SA. Idempotent. With
        the IKE SA up (the peer deleted only the Child SA), the child comes back with a
        CREATE_CHILD_SA on it, asked for at most every CHILD_REQUEST_INTERVAL."""
        current = self._current
        actor = current.actor if current is not None and not current.ended.is_set() else None
        if actor is None or not actor.established:
            self._acquired.set()
            return
        now = trio.current_time()
        if now < self._next_child_request:
            return
        self._next_child_request = now + CHILD_REQUEST_INTERVAL
        name = self.initiation.child

        def start_child(session: Session, now: float) -> None:
            if isinstance(session, IkeSession):
                session.start_child(name, now)
        actor.mailbox.put_nowait(start_child)

    async def run(self) -> None:
        """Initiate until cancelled or stopped (on demand: each time a packet asks for it)."""
        backoff = INITIATE_BACKOFF_FIRST
        attempt = 0  # since the last SA that came up, for the log
        while True:
            if self.initiation.on_demand:
                await self._pause(self._acquired.wait)
            if self._stopped:
                return
            if not self.once and await self._peer_holds_it():
                continue
            attempt += 1
            started = trio.current_time()
            outcome = await self._attempt(attempt)
            if self.once:
                self.outcome = outcome
                logger.info("connection %s: IKE SA %s_i %s (%s); not initiated again",
                            self.name, outcome.spi_i.hex(),
                            "ended" if outcome.established else "failed", outcome.reason)
                return
            # on demand, only packets after the SA (or the attempt) ended ask again, unless
            # the SA timed out and dpd_action = "restart" asks at once (swanctl's)
            self._acquired = trio.Event()
            restart = self.initiation.on_demand and outcome.established and \
                outcome.reason == PEER_NOT_RESPONDING and \
                self.initiation.connection.dpd_action == "restart"
            if restart:
                self._acquired.set()
            wait = backoff * (1.0 - INITIATE_JITTER * self._jitter())
            if outcome.established:
                self.established += 1
                if trio.current_time() - started >= INITIATE_BACKOFF_MAX:
                    # a long-lived SA: start over; a peer deleting every SA at once
                    # keeps the back-off growing instead
                    backoff = INITIATE_BACKOFF_FIRST
                    wait = backoff * (1.0 - INITIATE_JITTER * self._jitter())
                attempt = 0
                logger.info(
                    "connection %s: IKE SA %s_i ended (%s); %s in %.1f s",
                    self.name, outcome.spi_i.hex(), outcome.reason,
                    "initiating again" if restart or not self.initiation.on_demand
                    else "trap armed again",
                    wait,
                )
            else:
                self.failures += 1
                tries = self.initiation.connection.keyingtries
                if tries and attempt >= tries and not self.initiation.on_demand:
                    logger.warning(
                        "connection %s: attempt %d failed (%s); giving up (keyingtries = %d)",
                        self.name, attempt, outcome.reason, tries,
                    )
                    self.gave_up = True
                    return
                logger.info(
                    "connection %s: attempt %d failed (%s); %s in %.1f s",
                    self.name, attempt, outcome.reason,
                    "trap armed again" if self.initiation.on_demand else "retrying", wait,
                )
            await self._pause(functools.partial(trio.sleep, wait))
            backoff = min(backoff * 2, INITIATE_BACKOFF_MAX)

    async def _peer_holds_it(self) -> bool:
        """Whether the peer brought the connection up itself (an IKE SA it initiated,
        e.g. its own reauthentication after deleting ours): then we do not initiate
        another, which with INITIAL_CONTACT would make the peer drop that one
        (RFC 7296 2.4), but wait until it ends, and a back-off more (the peer may be
        bringing up the next one, as after deleting ours). True once it has."""
        actor = self.supervisor.established_for(self.name, self.initiation.remote)
        if actor is None:
            return False
        logger.info("connection %s: the peer brought it up (IKE SA %s_i); initiating "
                    "again when that ends", self.name, actor.session.spi_i.hex())
        while self.supervisor.holds(actor) and not self._stopped:
            await self._pause(functools.partial(trio.sleep, PEER_SA_POLL))
        wait = INITIATE_BACKOFF_FIRST * (1.0 - INITIATE_JITTER * self._jitter())
        await self._pause(functools.partial(trio.sleep, wait))
        return True

    async def _attempt(self, attempt: int) -> InitiatedOutcome:
        """Bring up an IKE SA and keep it, through make-before-break reauthentications,
        until it ends: the outcome is the last one's, established if any of them was."""
        try:
            local, natt_port = self.source()
        except OSError as exc:
            return InitiatedOutcome(bytes(8), False, f"no source address: {exc}")
        self.attempts += 1
        logger.info(
            "connection %s: initiating IKE SA from %s to %s (attempt %d)",
            self.name, _format_address(local), _format_address(self.remote), attempt,
        )
        async with trio.open_nursery() as nursery:
            def start(sa: _InitiatedSa) -> None:
                nursery.start_soon(self._run_sa, sa, local, natt_port, start)
            sa = self._first = _InitiatedSa(initial_contact=True)
            start(sa)
            await sa.ended.wait()
            established = sa.established
            while sa.successor is not None:  # it is being replaced: the new one carries on
                sa = sa.successor
                await sa.ended.wait()
                established = established or sa.established
            nursery.cancel_scope.cancel()  # a reauthentication waiting to be tried again
        assert sa.outcome is not None
        return InitiatedOutcome(sa.outcome.spi_i, established, sa.outcome.reason)

    async def _run_sa(self, sa: _InitiatedSa, local: Address, natt_port: int,
                      start: Callable[[_InitiatedSa], None]) -> None:
        def new_session(spi_i: bytes, now: float) -> Session:
            # the first replaces whatever the peer still holds from us (RFC 7296 2.4); a
            # reauthentication must not: the SA it replaces is still up
            return IkeSession.initiator(
                self.initiation.connection, self.policy, spi_i, local, self.remote, now,
                natt_ports=(natt_port, NATT_PORT), initial_contact=sa.initial_contact,
                wanted_vips=sa.predecessor.own_vips if sa.predecessor is not None else (),
            )

        def watch(actor: SaActor, event: Event) -> None:
            sa.actor = actor
            if isinstance(event, IkeSaEstablished):
                sa.established = True
                sa.own_vips = event.own_virtual_ips
                self._current = sa
            elif isinstance(event, IkeSaReauthDue) and sa.successor is None \
                    and not self._stopped:
                self._reauthenticate(sa, start)
            old = sa.predecessor
            if old is not None and sa.established and isinstance(actor.session, IkeSession) \
                    and not actor.session.creating_children:
                sa.predecessor = None  # its replacement is up with its children: delete it
                self._delete(old, sa)

        outcome = await self.supervisor.run_initiated(new_session, watch)
        sa.outcome = outcome
        sa.ended.set()
        old = sa.predecessor
        if old is not None and not sa.established and not old.ended.is_set():
            # the reauthentication failed; the SA it was for stays until it ends: again later
            old.successor = None
            old.reauth_failures += 1
            logger.info("connection %s: reauthentication of IKE SA %s_i failed (%s)",
                        self.name, _spi_of(old), outcome.reason)
            wait = min(INITIATE_BACKOFF_FIRST * 2 ** (old.reauth_failures - 1),
                       INITIATE_BACKOFF_MAX)
            await self._pause(functools.partial(trio.sleep, wait))
            if not old.ended.is_set() and old.successor is None and not self._stopped:
                self._reauthenticate(old, start)

    def _reauthenticate(self, old: _InitiatedSa, start: Callable[[_InitiatedSa], None]) -> None:
        """RFC 7296 2.8.3, make-before-break (strongSwan's default): a new IKE SA with
        its children, then the old one is deleted."""
        new = _InitiatedSa(initial_contact=False, predecessor=old)
        old.successor = new
        self.reauthentications += 1
        logger.info("connection %s: reauthenticating IKE SA %s_i with a new IKE SA",
                    self.name, _spi_of(old))
        start(new)

    def _delete(self, old: _InitiatedSa, new: _InitiatedSa) -> None:
        actor = old.actor
        if actor is None or old.ended.is_set():
            return
        logger.info("connection %s: IKE SA %s_i replaced by %s_i; deleting it",
                    self.name, _spi_of(old), _spi_of(new))

        def delete(session: Session, now: float) -> None:
            if isinstance(session, IkeSession):
                session.delete_ike(now, REAUTHENTICATED)
        if not actor.mailbox.put_nowait(delete):  # flooded: it ends at its hard limit
            logger.warning("connection %s: IKE SA %s_i busy, not deleted", self.name,
                           _spi_of(old))


@dataclass(eq=False)
class _InitiatedSa:
    """One IKE SA an Initiator brought up, run in a task of its own."""

    initial_contact: bool
    predecessor: _InitiatedSa | None = None  # the SA it reauthenticates, until deleted
    successor: _InitiatedSa | None = None  # its reauthentication, if one is under way
    actor: SaActor | None = None  # (from its first event on)
    established: bool = False
    own_vips: tuple[str, ...] = ()  # the virtual IPs the responder assigned it
    reauth_failures: int = 0  # reauthentications of it that did not come up
    outcome: InitiatedOutcome | None = None
    ended: trio.Event = field(default_factory=trio.Event)


def _spi_of(sa: _InitiatedSa) -> str:
    return sa.actor.session.spi_i.hex() if sa.actor is not None else "?"


def _route_source(remote_host: str) -> str:
    """The address the routing table picks towards the peer (a UDP connect sends nothing)."""
    family = socket.AF_INET6 if ":" in remote_host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((remote_host, 500))
        return str(probe.getsockname()[0])


async def run_node(
    config: NodeConfig,
    *,
    event_sink: EventSink = log_event,
    mailbox_size: int = DEFAULT_MAILBOX_SIZE,
    handle_signals: bool = True,
    esp_sink: EspSink | None = None,
    esp_flush: Callable[[], None] | None = None,
    socket_mark: int | None = None,
    task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Bind, serve until SIGINT/SIGTERM (or `Node.shutdown()`), then shut down cleanly.

    Once the sockets serve, one `Initiator` per `config.initiations` entry starts;
    the SAs it brings up report to `event_sink` like the ones peers initiate.

    Shutdown order: the readers stop, the actors are cancelled, then the sockets
    close; the last log line carries the counters.
    """
    stats = RuntimeStats()
    with Dispatcher.bind(config.addresses, config.ike_port, config.natt_port, stats) as dispatcher:
        # single node with a data plane: ESP in UDP arriving on the NAT-T port goes to it,
        # and our sockets carry its firewall mark so policy routing lets them pass
        dispatcher.esp_sink = esp_sink
        dispatcher.esp_flush = esp_flush
        if socket_mark is not None:
            dispatcher.set_mark(socket_mark)
        factory = responder_factory(config)
        listeners: list[Callable[[Event], None]] = []  # Node.listeners (`initiate` waits)

        def sink(event: Event) -> None:
            event_sink(event)
            for listener in listeners:
                listener(event)
        supervisor = Supervisor(
            session_factory=factory,
            send=dispatcher.send,
            event_sink=sink,
            stats=stats,
            half_open_timeout=config.policy.half_open_timeout,
            mailbox_size=mailbox_size,
            cookie_threshold=config.dos.cookie_threshold,
            block_threshold=config.dos.block_threshold,
            init_limit_half_open=config.dos.init_limit_half_open,
            notify_rate=config.dos.notify_rate,
            uniqueness={c.name: c.unique for c in config.policy.connections},
        )
        try:
            async with trio.open_nursery() as nursery:
                initiators = [
                    Initiator(initiation, config.policy, supervisor, dispatcher)
                    for initiation in config.initiations
                ]
                node = Node(config, stats, dispatcher, supervisor, nursery.cancel_scope,
                            initiators, factory, nursery, listeners=listeners)
                if handle_signals:
                    await nursery.start(_shutdown_on_signal, nursery.cancel_scope)
                    await nursery.start(reload_on_signal, config.source, lambda: node.config,
                                        node.reconfigure)
                await nursery.start(supervisor.run)
                RadiusClient(node.radius).install(config.policy.radius_backend)
                await nursery.start(functools.partial(
                    fetch_crls, lambda: node.config.policy, config.crl_refresh,
                    from_certificates=config.crl_from_certificates, ocsp=config.ocsp,
                    stats=node.revocation))
                await nursery.start(dispatcher.serve, supervisor)
                for initiator in initiators:
                    nursery.start_soon(initiator.run, name=f"initiate {initiator.name}")
                logger.info(
                    "node %s listening on %s",
                    config.node_id,
                    ", ".join(f"udp {_format_address(a)}" for a in dispatcher.local_addresses),
                )
                task_status.started(node)
        finally:
            logger.info("node %s stopped: %s", config.node_id, stats.summary())


async def _shutdown_on_signal(
    scope: trio.CancelScope, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            logger.info("%s received; shutting down", signal.Signals(signum).name)
            scope.cancel()
            return
