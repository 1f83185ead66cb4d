"""strongSwan's updown hook for `ike-cluster run`: a child's `updown` command runs when
one of its Child SAs comes up and when it goes down for good (a rekey runs nothing),
once per pair of local and remote traffic selectors, with the PLUTO_* environment of
strongSwan's updown plugin, so scripts written for it (firewall rules, routes for a
road warrior's virtual IP, a notification) work here unchanged.

As in strongSwan the command is a shell command line (`/bin/sh -c`), its output goes to
our log a line at a time ("updown: ..."), and the runs happen one after another in the
order of the events: a Child SA's "down" never overtakes its "up". Unlike strongSwan's
(which blocks the thread that set up the SA), a run never delays an exchange: the
events queue for one task. A run that takes longer than `timeout` is killed.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

import trio

from ..ike.events import (
    ChildSaDeleted,
    ChildSaEstablished,
    Event,
    IkeSaDeleted,
    IkeSaEstablished,
    IkeSaMoved,
    IkeSaRekeyed,
)
from ..ike.policy import ResponderPolicy
from ..ike.traffic_selectors import TrafficSelector

logger = logging.getLogger(__name__)

TIMEOUT = 30.0  # seconds one run may take before it is killed
STOP_WAIT = 10.0  # seconds the node's stop waits for the last runs
QUEUE = 1024  # runs waiting at most; beyond, they are dropped and counted

Address = tuple[str, int]
Environment = dict[str, str]
# the interface the route to an address leaves by (PLUTO_INTERFACE), None if unknown
InterfaceOf = Callable[[str], str | None]


@dataclass
class UpdownStats:
    runs: int = 0
    failed: int = 0  # exited non-zero, could not start, or killed after the timeout
    dropped: int = 0  # the queue was full

    def as_dict(self) -> dict[str, int]:
        return {"runs": self.runs, "failed": self.failed, "dropped": self.dropped}


@dataclass
class _Ike:
    unique_id: int
    event: IkeSaEstablished
    local: Address
    remote: Address


@dataclass
class _Child:
    ike: bytes  # the IKE SA's SPIs, spi_i + spi_r
    event: ChildSaEstablished  # the first of its line (a rekey keeps it)
    command: str
    reqid: int
    interface: str | None = None  # PLUTO_INTERFACE, found at "up"


@dataclass(frozen=True)
class _Run:
    command: str
    up: bool
    child: _Child
    environments: tuple[Environment, ...]  # one per selector pair, without the interface


class Updown:
    """The hook of one node. `record` takes every event of the node's sessions (it
    never blocks); `run` carries out the commands they call for."""

    def __init__(self, policy: Callable[[], ResponderPolicy], *, timeout: float = TIMEOUT,
                 interface_of: InterfaceOf | None = None) -> None:
        self._policy = policy
        self._timeout = timeout
        self._interface_of = interface_of or interface_towards
        self._ike: dict[bytes, _Ike] = {}
        self._children: dict[bytes, _Child] = {}  # by the current Child SA's inbound SPI
        self._unique_ids = 0
        self._reqids = 0
        self._send, self._receive = trio.open_memory_channel[_Run](QUEUE)
        self._finished = trio.Event()
        self._policy_seen: ResponderPolicy | None = None
        self._any_command = False
        self.stats = UpdownStats()

    # --- events ------------------------------------------------------------------------

    def record(self, event: Event) -> None:
        if not (self._ike or self._children or self._configured()):
            return  # (no child has a command: nothing to keep per SA)
        if isinstance(event, IkeSaEstablished):
            self._unique_ids += 1
            self._ike[event.spi_i + event.spi_r] = _Ike(self._unique_ids, event, event.local,
                                                         event.remote)
        elif isinstance(event, IkeSaMoved):
            ike = self._ike.get(event.spi_i + event.spi_r)
            if ike is not None:
                ike.local, ike.remote = event.local, event.remote
        elif isinstance(event, IkeSaRekeyed):
            old, new = event.old_spi_i + event.old_spi_r, event.spi_i + event.spi_r
            if old in self._ike:
                self._ike[new] = self._ike.pop(old)
                for moved in self._children.values():
                    if moved.ike == old:
                        moved.ike = new
        elif isinstance(event, IkeSaDeleted):
            # (its Child SAs' ChildSaDeleted came first)
            self._ike.pop(event.spi_i + event.spi_r, None)
        elif isinstance(event, ChildSaEstablished):
            self._established(event)
        elif isinstance(event, ChildSaDeleted):
            child = self._children.pop(event.spi_in, None)
            if child is not None:
                self._queue(child, up=False)

    def _established(self, event: ChildSaEstablished) -> None:
        if event.replaces:  # a rekey: the same Child SA goes on, nothing runs
            previous = self._children.pop(event.replaces, None)
            if previous is not None:
                self._children[event.spi_in] = previous
            return
        key = event.ike_spi_i + event.ike_spi_r
        ike = self._ike.get(key)
        if ike is None:
            return
        command = self._command(ike.event.connection, event.name)
        if command is None:
            return
        self._reqids += 1
        child = _Child(key, event, command, self._reqids)
        self._children[event.spi_in] = child
        self._queue(child, up=True)

    def _configured(self) -> bool:
        """Whether any child of the configuration has an updown command."""
        policy = self._policy()
        if policy is not self._policy_seen:
            self._policy_seen = policy
            self._any_command = any(c.updown for conn in policy.connections
                                    for c in conn.children)
        return self._any_command

    def _command(self, connection: str, child: str) -> str | None:
        for conn in self._policy().connections:
            if conn.name == connection:
                for config in conn.children:
                    if config.name == child:
                        return config.updown
        return None

    def _queue(self, child: _Child, *, up: bool) -> None:
        ike = self._ike.get(child.ike)
        if ike is None:
            return
        pairs = [(mine, theirs) for mine in child.event.local_ts
                 for theirs in child.event.remote_ts]
        run = _Run(child.command, up, child,
                   tuple(environment(ike, child, up, mine, theirs) for mine, theirs in pairs))
        try:
            self._send.send_nowait(run)
        except trio.WouldBlock:
            self.stats.dropped += 1
            logger.warning("updown: %d runs wait already, %s of CHILD SA %s dropped", QUEUE,
                           "up" if up else "down", child.event.name)

    # --- the runs ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        task_status.started()
        try:
            await self._runs()
        finally:
            self._finished.set()

    async def stop(self, wait: float = STOP_WAIT) -> None:
        """The node stops, and its Child SAs with it: "down" for each still up, as
        strongSwan runs when it stops; then up to `wait` seconds for the runs queued."""
        for child in list(self._children.values()):
            self._queue(child, up=False)
        self._children.clear()
        self._send.close()
        with trio.move_on_after(wait):
            await self._finished.wait()
        if not self._finished.is_set():
            logger.warning("updown: stopped with %d runs not done",
                           self._receive.statistics().current_buffer_used + 1)

    async def _runs(self) -> None:
        async for run in self._receive:
            child = run.child
            if run.up:
                child.interface = await trio.to_thread.run_sync(self._interface_of,
                                                                child.event.remote[0])
            for env in run.environments:
                await self._invoke(run.command,
                                   {**env, "PLUTO_INTERFACE": child.interface or "unknown"})

    async def _invoke(self, command: str, env: Environment) -> None:
        self.stats.runs += 1
        verb = env["PLUTO_VERB"]
        with trio.move_on_after(self._timeout) as scope:
            try:
                # the output is read to its end, so the scope bounds the whole run
                done = await trio.run_process(["/bin/sh", "-c", command], env=env,
                                              check=False, capture_stdout=True,
                                              stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL)
            except OSError as exc:
                self.stats.failed += 1
                logger.warning("updown: %s (%s) cannot run: %s", command, verb, exc)
                return
        if scope.cancelled_caught:
            self.stats.failed += 1
            logger.warning("updown: %s (%s) killed after %g s", command, verb, self._timeout)
            return
        for line in done.stdout.decode(errors="replace").splitlines():
            logger.info("updown: %s", line)
        if done.returncode != 0:
            self.stats.failed += 1
            logger.warning("updown: %s (%s) exited with %d", command, verb, done.returncode)


def environment(ike: _Ike, child: _Child, up: bool, mine: TrafficSelector,
                theirs: TrafficSelector) -> Environment:
    """strongSwan's updown variables for one pair of selectors (its updown_listener.c),
    without PLUTO_INTERFACE."""
    established, event = ike.event, child.event
    me, peer = ike.local[0], ike.remote[0]
    host = _is_host(mine, me)
    v6 = ":" in me if host else len(mine.start_addr) == 16
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "PLUTO_VERSION": "1.1",
        "PLUTO_VERB": ("up" if up else "down") + ("-host" if host else "-client")
        + ("-v6" if v6 else ""),
        "PLUTO_CONNECTION": event.name,
        "PLUTO_REQID": str(child.reqid),
        "PLUTO_PROTO": "esp",
        "PLUTO_UNIQUEID": str(ike.unique_id),
        "PLUTO_ME": me,
        "PLUTO_MY_ID": established.local_id,
        "PLUTO_MY_CLIENT": _subnet(mine),
        "PLUTO_MY_PORT": _port(mine, theirs, local=True),
        "PLUTO_MY_PROTOCOL": str(mine.protocol),
        "PLUTO_PEER": peer,
        "PLUTO_PEER_ID": established.remote_id,
        "PLUTO_PEER_CLIENT": _subnet(theirs),
        "PLUTO_PEER_PORT": _port(mine, theirs, local=False),
        "PLUTO_PEER_PROTOCOL": str(theirs.protocol),
    }
    if established.eap_identity:
        env["PLUTO_XAUTH_ID"] = established.eap_identity
    for side, addresses in (("MY", established.own_virtual_ips),
                            ("PEER", established.virtual_ips)):
        counts = {4: 0, 6: 0}
        for n, address in enumerate(addresses):
            if n == 0:  # the legacy variable: the first one
                env[f"PLUTO_{side}_SOURCEIP"] = address
            version = ipaddress.ip_address(address).version
            counts[version] += 1
            env[f"PLUTO_{side}_SOURCEIP{version}_{counts[version]}"] = address
    if event.encap:
        env["PLUTO_UDP_ENC"] = str(ike.remote[1])
    return env


def _is_host(ts: TrafficSelector, address: str) -> bool:
    try:
        packed = ipaddress.ip_address(address).packed
    except ValueError:
        return False
    return ts.start_addr == ts.end_addr == packed


def _subnet(ts: TrafficSelector) -> str:
    """The selector's range as a subnet, the smallest that holds it (as strongSwan
    approximates a range that is no subnet)."""
    start = int.from_bytes(ts.start_addr, "big")
    end = int.from_bytes(ts.end_addr, "big")
    bits = len(ts.start_addr) * 8
    prefix = bits - (start ^ end).bit_length()
    network = ipaddress.ip_network((ts.start_addr, prefix), strict=False)
    return f"{network.network_address}/{prefix}"


def _port(mine: TrafficSelector, theirs: TrafficSelector, *, local: bool) -> str:
    """PLUTO_MY_PORT / PLUTO_PEER_PORT: the port, a range "from:to", or for ICMP the
    type (ours) and code (theirs), which the selectors carry in their ports (RFC 4301
    4.4.1.3)."""
    if max(mine.protocol, theirs.protocol) in (1, 58):
        port = max(mine.start_port, theirs.start_port)
        return str(port >> 8 if local else port & 0xFF)
    ts = mine if local else theirs
    if ts.start_port == ts.end_port or (ts.start_port, ts.end_port) == (0, 65535):
        return str(ts.start_port)
    return f"{ts.start_port}:{ts.end_port}"


def interface_towards(address: str) -> str | None:
    """The interface the route to `address` leaves by (a netlink query)."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with IPRoute() as ipr:
            routes = ipr.route("get", dst=address)
            index = routes[0].get_attr("RTA_OIF") if routes else None
            if index is None:
                return None
            links = ipr.get_links(index)
            return str(links[0].get_attr("IFLA_IFNAME")) if links else None
    except (NetlinkError, OSError, ValueError):
        return None
