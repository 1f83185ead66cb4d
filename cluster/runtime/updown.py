"""strongSwan's updown hook, where the Child SAs are (`ike-cluster run`, or a cluster's
workers): a child's `updown` command runs when one of its Child SAs comes up and when
it goes down for good (a rekey runs nothing),
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
    IkeSaMoved,
    IkeSaRekeyed,
)
from ..ike.policy import ChildConfig, ResponderPolicy
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
class _Child:
    ike: bytes  # its IKE SA's SPIs, spi_i + spi_r
    event: ChildSaEstablished  # the first of its line (a rekey keeps it)
    command: str
    reqid: int
    unique_id: int  # its IKE SA's number here
    local: Address  # where the SA is now (a NAT or MOBIKE move changes it)
    remote: Address
    interface: str | None = None  # PLUTO_INTERFACE, found at "up"
    hostaccess: bool = False  # its child's (PLUTO_HOST_ACCESS)


@dataclass(frozen=True)
class _Run:
    command: str
    up: bool
    child: _Child
    environments: tuple[Environment, ...]  # one per selector pair, without the interface


class Updown:
    """The hook of one node: `record` takes the events of a node's sessions, or a worker
    calls `up`, `down`, `moved` and `ike_changed` as its key table changes (none of them
    blocks); `run` carries out the commands they call for. A Child SA's event says all
    the environment needs (its IKE SA's identities, EAP user, virtual IPs)."""

    def __init__(self, policy: Callable[[], ResponderPolicy], *, timeout: float = TIMEOUT,
                 interface_of: InterfaceOf | None = None) -> None:
        self._policy = policy
        self._timeout = timeout
        self._interface_of = interface_of or interface_towards
        self._children: dict[bytes, _Child] = {}  # by the current Child SA's inbound SPI
        self._unique: dict[bytes, int] = {}  # IKE SA (spi_i + spi_r) -> its number here
        self._unique_ids = 0
        self._reqids = 0
        self._send, self._receive = trio.open_memory_channel[_Run](QUEUE)
        self._finished = trio.Event()
        self._running = False
        self._policy_seen: ResponderPolicy | None = None
        self._any_command = False
        self.stats = UpdownStats()

    # --- events ------------------------------------------------------------------------

    def record(self, event: Event) -> None:
        """A node's session event."""
        if isinstance(event, ChildSaEstablished):
            self.up(event)
        elif isinstance(event, ChildSaDeleted):
            self.down(event.spi_in)
        elif isinstance(event, IkeSaMoved | IkeSaRekeyed) and self._children:
            if isinstance(event, IkeSaMoved):
                key = event.spi_i + event.spi_r
                for child in self._children.values():
                    if child.ike == key:
                        child.local, child.remote = event.local, event.remote
            else:
                old, new = event.old_spi_i + event.old_spi_r, event.spi_i + event.spi_r
                for spi_in, child in list(self._children.items()):
                    if child.ike == old:
                        self.ike_changed(spi_in, new)

    def up(self, event: ChildSaEstablished) -> None:
        """A Child SA was installed: "up", unless it replaces one (a rekey goes on)."""
        if event.replaces:
            previous = self._children.pop(event.replaces, None)
            if previous is not None:
                self._children[event.spi_in] = previous
            return
        if not self._configured():
            return
        config = self._config(event.connection, event.name)
        if config is None or config.updown is None:
            return
        key = event.ike_spi_i + event.ike_spi_r
        if key not in self._unique:
            self._unique_ids += 1
            self._unique[key] = self._unique_ids
        self._reqids += 1
        child = _Child(key, event, config.updown, self._reqids, self._unique[key], event.local,
                       event.remote, hostaccess=config.hostaccess)
        self._children[event.spi_in] = child
        self._queue(child, up=True)

    def down(self, spi_in: bytes) -> None:
        """A Child SA left for good: "down" (nothing for one a rekey replaced)."""
        child = self._children.pop(spi_in, None)
        if child is None:
            return
        if not any(c.ike == child.ike for c in self._children.values()):
            self._unique.pop(child.ike, None)
        self._queue(child, up=False)

    def moved(self, spi_in: bytes, remote: Address) -> None:
        """The peer of a Child SA moved (a worker's "move")."""
        child = self._children.get(spi_in)
        if child is not None:
            child.remote = remote

    def ike_changed(self, spi_in: bytes, ike: bytes) -> None:
        """The Child SA's IKE SA was rekeyed: it has new SPIs, and keeps its number."""
        child = self._children.get(spi_in)
        if child is None or child.ike == ike:
            return
        number = self._unique.get(child.ike, child.unique_id)
        child.ike = ike
        self._unique.setdefault(ike, number)
        for old in [k for k in self._unique if k != ike]:
            if not any(c.ike == old for c in self._children.values()):
                del self._unique[old]

    def _configured(self) -> bool:
        """Whether any child of the configuration has an updown command."""
        policy = self._policy()
        if policy is not self._policy_seen:
            self._policy_seen = policy
            self._any_command = any(c.updown for conn in policy.connections
                                    for c in conn.children)
        return self._any_command

    def _config(self, connection: str, child: str) -> ChildConfig | None:
        for conn in self._policy().connections:
            if conn.name == connection:
                for config in conn.children:
                    if config.name == child:
                        return config
        return None

    def _queue(self, child: _Child, *, up: bool) -> None:
        pairs = [(mine, theirs) for mine in child.event.local_ts
                 for theirs in child.event.remote_ts]
        run = _Run(child.command, up, child,
                   tuple(environment(child, up, mine, theirs) for mine, theirs in pairs))
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
        self._running = True
        try:
            await self._runs()
        finally:
            self._running = False
            self._finished.set()

    async def stop(self, wait: float = STOP_WAIT) -> None:
        """The node stops, and its Child SAs with it: "down" for each still up, as
        strongSwan runs when it stops; then up to `wait` seconds for the runs queued
        (carried out here if `run` is no longer running: a worker's stop, after its
        tasks were cancelled)."""
        for spi_in in list(self._children):
            self.down(spi_in)
        self._send.close()
        with trio.move_on_after(wait) as waited:
            if self._running:
                await self._finished.wait()
            else:
                await self._runs()
        if waited.cancelled_caught:
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


def environment(child: _Child, up: bool, mine: TrafficSelector, theirs: TrafficSelector
                ) -> Environment:
    """strongSwan's updown variables for one pair of selectors (its updown_listener.c),
    without PLUTO_INTERFACE."""
    event = child.event
    me, peer = child.local[0], child.remote[0]
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
        "PLUTO_UNIQUEID": str(child.unique_id),
        "PLUTO_ME": me,
        "PLUTO_MY_ID": event.local_id,
        "PLUTO_MY_CLIENT": _subnet(mine),
        "PLUTO_MY_PORT": _port(mine, theirs, local=True),
        "PLUTO_MY_PROTOCOL": str(mine.protocol),
        "PLUTO_PEER": peer,
        "PLUTO_PEER_ID": event.remote_id,
        "PLUTO_PEER_CLIENT": _subnet(theirs),
        "PLUTO_PEER_PORT": _port(mine, theirs, local=False),
        "PLUTO_PEER_PROTOCOL": str(theirs.protocol),
    }
    if event.eap_identity:
        env["PLUTO_XAUTH_ID"] = event.eap_identity
    for side, addresses in (("MY", event.own_virtual_ips), ("PEER", event.virtual_ips)):
        counts = {4: 0, 6: 0}
        for n, address in enumerate(addresses):
            if n == 0:  # the legacy variable: the first one
                env[f"PLUTO_{side}_SOURCEIP"] = address
            version = ipaddress.ip_address(address).version
            counts[version] += 1
            env[f"PLUTO_{side}_SOURCEIP{version}_{counts[version]}"] = address
    if event.encap:
        env["PLUTO_UDP_ENC"] = str(child.remote[1])
    if child.hostaccess:
        env["PLUTO_HOST_ACCESS"] = "1"
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
