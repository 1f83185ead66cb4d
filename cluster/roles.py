"""`ike-cluster responder` and `ike-cluster worker`: the two roles of a cluster node.

A responder runs the supervisor and its actors behind the relay socket; it persists SA
snapshots and distributes Child SA keys through the shared store, and takes over the SAs
of responders that died. A worker owns the public addresses (UDP 500/4500, raw ESP), its
TUN device and SAD: it relays IKE to the responders and installs the keys they store for
it. Both heartbeat into the store's membership. Runtime and worker never import each
other; they meet here, as in `single_node`.
"""

from __future__ import annotations

import functools
import logging
import socket
import urllib.parse
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import replace
from typing import TYPE_CHECKING

import trio

from .config import ClusterConfig, NodeConfig
from .errors import ConfigError
from .ike.events import Event
from .ike.pools import AddressPool, FramedPool, SharedPool
from .metrics import Metrics, serve_metrics
from .relay import LIMIT_EXPIRED, LIMIT_HARD, LIMIT_SOFT, RelayCodec
from .relay_socket import RelaySocket, format_address
from .store import (
    ClaimAddress,
    ClusterKey,
    FreeAddress,
    Member,
    StateStore,
    StoreError,
    open_store,
    open_store_writer,
)
from .store.membership import Membership

if TYPE_CHECKING:
    from .runtime.node import ResponderFactory
    from .runtime.supervisor import Supervisor

logger = logging.getLogger("cluster")

ADDRESS_CLAIM_HOLD = 3600.0  # a new address is held this long until its SA's record holds it
ADDRESS_FREE_INTERVAL = 0.5  # seconds between handing back the addresses of ended SAs


def cluster_settings(config: NodeConfig) -> tuple[ClusterConfig, ClusterKey]:
    """The `[cluster]` table and the key it names; ConfigError (one line) otherwise."""
    if config.cluster is None:
        raise ConfigError(f"{config.source}: cluster: the responder and worker roles need a "
                          "[cluster] table")
    cluster = config.cluster
    if cluster.key is None:
        raise ConfigError(f"{config.source}: cluster.key: the roles need the cluster key")
    try:
        key = ClusterKey.load(cluster.key)
    except ConfigError as exc:
        raise ConfigError(f"{config.source}: cluster.key: {exc}") from None
    return cluster, key


def advertised_relay(cluster: ClusterConfig, bound: tuple[str, int]) -> str:
    """Where other nodes send to reach our relay socket."""
    if cluster.advertise is not None:
        return cluster.advertise
    host, port = bound
    if host not in ("0.0.0.0", "::"):
        return format_address((host, port))
    return format_address((_source_towards(cluster.store, host == "::"), port))


def _source_towards(store_url: str | None, ipv6: bool) -> str:
    """The address the routing table picks towards the store (a UDP connect sends nothing)."""
    target = None
    if store_url:
        target = urllib.parse.urlsplit(store_url.split(",")[0]).hostname
    family = socket.AF_INET6 if ipv6 else socket.AF_INET
    try:
        if target is None:
            raise OSError("no store host")
        address = socket.getaddrinfo(target, 6379, family, socket.SOCK_DGRAM)[0][4]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(address)
            return str(probe.getsockname()[0])
    except OSError:
        return socket.gethostbyname(socket.gethostname())


def _responders(members: Sequence[Member]) -> list[str]:
    return [m.node for m in members if m.role == "responder"]


async def _serve_metrics(nursery: trio.Nursery, config: NodeConfig, metrics: Metrics) -> None:
    if config.metrics is None:
        return
    m = config.metrics
    host, port = await nursery.start(serve_metrics, metrics, m.host, m.port, m.interval)
    logger.info("metrics on http://%s/metrics", format_address((host, port)))


async def run_responder(config: NodeConfig, *, handle_signals: bool = True,
                        task_status: trio.TaskStatus[object] = trio.TASK_STATUS_IGNORED
                        ) -> None:
    from .control import serve_control
    from .ops import cluster_disconnect, reload_handler
    from .runtime.channel import ResponderChannel
    from .runtime.crl_fetch import RevocationStats, fetch_crls
    from .runtime.node import _shutdown_on_signal, log_event, redirect_node, responder_factory
    from .runtime.persistence import SaPersistence
    from .runtime.radius_accounting import Accounting
    from .runtime.radius_client import RadiusClient
    from .runtime.radius_dae import dae_server
    from .runtime.relay_endpoint import ResponderRelay
    from .runtime.reload import reload_from, reload_on_signal
    from .runtime.stats import RuntimeStats
    from .runtime.supervisor import Supervisor

    cluster, key = cluster_settings(config)
    for initiation in config.initiations:
        logger.warning("connection %s: start_action of child %s ignored: a cluster responder "
                       "only responds (initiating is `ike-cluster run`'s)",
                       initiation.connection.name, initiation.child)
    store = open_store(cluster.store)
    config, pools = _share_pools(config, store)
    codec = RelayCodec(key, config.node_id)
    metrics = Metrics(config.node_id, connections=[c.name for c in config.policy.connections])
    metrics.watch_pools(pools)

    # (no data plane here: the workers report each Child SA's traffic as they remove it)
    accounting = Accounting(lambda: config.policy, RadiusClient(), reported=True)

    def sink(event: Event) -> None:
        log_event(event)
        accounting.record(event)
        metrics.record(event)

    async with AsyncExitStack() as stack:
        stack.push_async_callback(store.aclose)
        relay = stack.enter_context(
            RelaySocket.open(cluster.relay_host, cluster.relay_port, codec))
        advertise = advertised_relay(cluster, relay.local)
        membership = Membership(store, config.node_id, "responder", cluster.membership_ttl,
                                {"relay": advertise})
        endpoint = ResponderRelay(relay, membership)
        writer = await stack.enter_async_context(open_store_writer(store))
        stats = RuntimeStats()
        dos = config.dos
        factory = responder_factory(config)
        supervisor = Supervisor(
            session_factory=factory, send=endpoint.send, event_sink=sink,
            stats=stats, half_open_timeout=config.policy.half_open_timeout,
            cookie_threshold=dos.cookie_threshold, block_threshold=dos.block_threshold,
            init_limit_half_open=dos.init_limit_half_open, notify_rate=dos.notify_rate,
            uniqueness={c.name: c.unique for c in config.policy.connections},
        )
        persistence = SaPersistence(
            writer, key, config.node_id, config.policy, supervisor,
            lease_ttl=cluster.membership_ttl, worker_of=endpoint.worker_of,
            learn_worker=endpoint.learn_worker,
            sa_arrived=lambda s: metrics.sa_arrived(s.spi_i, s.spi_r, s.sa.connection.name
                                                    if s.sa.connection else "unknown",
                                                    list(s.sa.children)),
            sa_left=metrics.sa_left,
        )

        def reconfigure(new: NodeConfig) -> None:
            nonlocal config
            config, added = _share_pools(new, store, pools)
            pools.extend(added)
            metrics.watch_pools(pools)
            factory.policy = persistence.policy = config.policy
            supervisor.set_uniqueness({c.name: c.unique for c in config.policy.connections})

        async def holder_does(spi_i: bytes, spi_r: bytes, act: Callable[[], bool]) -> bool:
            # an operator's command for an IKE SA: its holder does `act`; an SA whose owner
            # died is loaded by the responder rendezvous gives it to, once the dead owner's
            # lease has run out (tried again until then), and acted on there
            done = trio.Event()

            def attempt() -> None:
                if act():
                    done.set()

            with trio.move_on_after(TERMINATE_PATIENCE * cluster.membership_ttl):
                while True:
                    attempt()
                    if done.is_set():
                        return True
                    if persistence.ours_by_rendezvous(spi_i):
                        persistence.load_then(spi_i + spi_r, attempt)
                    with trio.move_on_after(TERMINATE_RETRY):
                        await done.wait()
            return False

        async def terminate(spi_i: bytes, spi_r: bytes, limit: int | None,
                            child: bytes) -> bool:
            # `ike-cluster terminate`: delete it, or one Child SA of it (or limit its
            # service, a RADIUS CoA)
            def act() -> bool:
                if child:
                    return supervisor.delete_child_of(spi_i, spi_r, child)
                if limit is None:
                    return supervisor.delete_ike(spi_i, spi_r)
                return supervisor.limit_session(spi_i, spi_r, limit)
            return await holder_does(spi_i, spi_r, act)

        async def rekey(spi_i: bytes, spi_r: bytes, child: bytes) -> bool:
            # `ike-cluster rekey`
            return await holder_does(spi_i, spi_r,
                                     lambda: supervisor.rekey(spi_i, spi_r, child))

        channel = ResponderChannel(
            store, config.node_id, supervisor.replace_identity, terminate,
            lambda gateway, existing: redirect_node(supervisor, factory, gateway, existing),
            keep=supervisor, rekey=rekey)
        supervisor.on_identified = channel.identified
        metrics.watch_channel(channel.stats.as_dict)
        revocation = RevocationStats()
        metrics.watch_revocation(revocation.as_dict)
        radius = RadiusClient()
        radius.install(config.policy.radius_backend)
        dae = dae_server(config, lambda: config, cluster_disconnect(store, config.node_id))
        metrics.watch_radius(radius.stats.as_dict, accounting.stats.as_dict,
                             dae.stats.as_dict if dae is not None else None)

        def members_changed(members: Sequence[Member]) -> None:
            persistence.responders = _responders(members)

        def child_limit(spi_i: bytes, spi_r: bytes, spi_in: bytes, limit: int) -> None:
            # the worker's limits: rekey (soft), delete (inactivity), or expire (a hard
            # byte/packet limit or exhausted sequence numbers removed it there)
            command = {LIMIT_SOFT: supervisor.rekey_child, LIMIT_HARD: supervisor.delete_child,
                       LIMIT_EXPIRED: supervisor.expire_child}[limit]

            def after_load() -> None:
                if not command(spi_in):
                    logger.info("Child SA %s: no IKE SA here or in the store owns it",
                                spi_in.hex())

            if not command(spi_in):  # not held here: load its IKE SA first
                persistence.load_then(spi_i + spi_r, after_load, routed=True)

        endpoint.on_child_limit = child_limit
        endpoint.on_child_traffic = accounting.child_traffic
        endpoint.on_child_usage = accounting.child_usage
        endpoint.on_child_active = supervisor.traffic_seen  # (SAs held here only)

        membership.on_change = members_changed
        try:
            async with trio.open_nursery() as nursery:
                if handle_signals:
                    await nursery.start(_shutdown_on_signal, nursery.cancel_scope)
                    await nursery.start(reload_on_signal, config.source, lambda: config,
                                        reconfigure)
                await nursery.start(supervisor.run)
                await nursery.start(accounting.run)
                await nursery.start(functools.partial(
                    fetch_crls, lambda: config.policy, config.crl_refresh,
                    from_certificates=config.crl_from_certificates, ocsp=config.ocsp,
                    stats=revocation))
                await nursery.start(persistence.run)
                await nursery.start(channel.run)
                if dae is not None:
                    await nursery.start(dae.run)
                if config.control:  # `ike-cluster reload`; `sas`/`terminate` use the store
                    await nursery.start(serve_control, config.node_id, {
                        "reload": reload_handler(lambda: reload_from(
                            config.source, lambda: config, reconfigure))})
                await _restore_redirect(store, supervisor, factory)
                await nursery.start(endpoint.serve, supervisor)
                await nursery.start(membership.run)
                nursery.start_soon(relay.ping_members, membership, "worker")
                if pools:
                    nursery.start_soon(_free_addresses, store, pools)
                metrics.watch_runtime(stats.as_dict, supervisor.session_counters,
                                      lambda: supervisor.half_open_count)
                supervisor.handshake_observer = metrics.observe_handshake
                _watch_cluster(metrics, store, relay.stats, persistence.stats.as_dict,
                               membership)
                await _serve_metrics(nursery, config, metrics)
                logger.info("responder %s: relay on %s (advertised %s), store %s",
                            config.node_id, format_address(relay.local), advertise,
                            _describe_store(cluster.store))
                task_status.started((supervisor, persistence, endpoint, membership))
        finally:
            logger.info("responder %s stopped: %s; failover %s", config.node_id,
                        stats.summary(), _nonzero(persistence.stats.as_dict()))


# `ike-cluster terminate` of an SA whose owner died: how many membership TTLs a
# responder keeps trying to load it, and how often
TERMINATE_PATIENCE = 4
TERMINATE_RETRY = 0.5


async def _restore_redirect(store: StateStore, supervisor: Supervisor,
                            factory: ResponderFactory) -> None:
    """A redirection the cluster was given before this responder started (RFC 5685)."""
    from .runtime.channel import stored_redirect
    from .runtime.node import redirect_node

    try:
        gateway = await stored_redirect(store)
        if gateway:
            redirect_node(supervisor, factory, gateway, existing=False)
    except (StoreError, ValueError) as exc:
        logger.warning("the cluster's redirection not restored: %s", exc)


def _share_pools(config: NodeConfig, store: StateStore, existing: Sequence[SharedPool] = ()
                 ) -> tuple[NodeConfig, list[SharedPool]]:
    """The configuration with every virtual IP pool handed out through the store, so no
    two responders lease one address; and the pools it added to `existing` (those in use
    before a reload, which it keeps)."""
    shared: dict[str, SharedPool] = {p.name: p for p in existing}
    added: list[SharedPool] = []

    async def claim(pool: str, size: int, holder: bytes, identity: bytes,
                    ttl: float) -> int | None:
        try:
            return await store.run(ClaimAddress(pool, size, holder, identity, ttl))
        except StoreError as exc:
            logger.warning("pool %s: no address from the store: %s", pool, exc)
            return None

    def share(pool: AddressPool) -> AddressPool:
        if isinstance(pool, SharedPool | FramedPool):  # carried over; the RADIUS server's
            return pool
        if pool.name not in shared:
            shared[pool.name] = SharedPool(pool, claim, ADDRESS_CLAIM_HOLD)
            added.append(shared[pool.name])
        return shared[pool.name]

    connections = tuple(replace(c, pools=tuple(share(p) for p in c.pools))
                        for c in config.policy.connections)
    policy = replace(config.policy, connections=connections)
    return replace(config, policy=policy), added


async def _free_addresses(store: StateStore, pools: Sequence[SharedPool]) -> None:
    """Give back in the store the addresses of SAs that ended here."""
    while True:
        taken = [(pool, list(pool.to_free)) for pool in pools if pool.to_free]
        for pool, _ in taken:
            pool.to_free.clear()
        ops = [FreeAddress(pool.name, offset, holder)
               for pool, entries in taken for offset, holder in entries]
        if ops:
            try:
                await store.execute(ops)
            except StoreError as exc:  # try again: a held address is one nobody gets
                logger.warning("addresses not freed in the store yet: %s", exc)
                for pool, entries in taken:
                    pool.to_free.extend(entries)
        await trio.sleep(ADDRESS_FREE_INTERVAL)


async def run_worker(config: NodeConfig, *, handle_signals: bool = True,
                     task_status: trio.TaskStatus[object] = trio.TASK_STATUS_IGNORED
                     ) -> None:
    from .runtime.dispatcher import Dispatcher
    from .runtime.node import _shutdown_on_signal
    from .runtime.stats import RuntimeStats
    from .runtime.updown import Updown
    from .worker.dataplane import DataPlane, DataPlaneSettings
    from .worker.edge import (
        ActivityReports,
        ChildLimits,
        KeySubscriber,
        TrafficReports,
        WorkerRelay,
    )
    from .worker.keys import Limits

    cluster, key = cluster_settings(config)
    w = config.worker
    if w is None:
        raise ConfigError(f"{config.source}: worker: the worker role needs a [worker] table")
    store: StateStore = open_store(cluster.store)
    codec = RelayCodec(key, config.node_id)
    metrics = Metrics(config.node_id, connections=[])
    limits = Limits(w.replay_window, w.lifetime_bytes, w.lifetime_packets, w.mtu)
    settings = DataPlaneSettings(tun=w.tun, mtu=w.mtu, queues=w.queues, mark=w.mark,
                                 table=w.table, priority=w.priority, limits=limits)
    stats = RuntimeStats()
    async with AsyncExitStack() as stack:
        stack.push_async_callback(store.aclose)
        plane = stack.enter_context(DataPlane.open(settings, config.addresses))
        dispatcher = stack.enter_context(
            Dispatcher.bind(config.addresses, config.ike_port, config.natt_port, stats))
        relay = stack.enter_context(
            RelaySocket.open(cluster.relay_host, cluster.relay_port, codec, mark=w.mark))
        dispatcher.esp_sink = plane.receive_esp
        dispatcher.esp_flush = plane.flush
        dispatcher.set_mark(w.mark)
        plane.udp_send = dispatcher.send_esp
        advertise = advertised_relay(cluster, relay.local)
        membership = Membership(store, config.node_id, "worker", cluster.membership_ttl,
                                {"relay": advertise})
        edge = WorkerRelay(relay, membership, dispatcher.send)
        limits_out = ChildLimits(edge, plane)
        plane.on_esp_event = limits_out.on_esp_event
        plane.on_activity = ActivityReports(edge, plane).active  # ESP puts DPD off
        membership.on_change = lambda members: edge.refresh()
        keys = KeySubscriber(store, config.node_id, key, plane, limits)
        radius = config.policy.radius
        reports = None
        if radius is not None and radius.accounting:  # the responders' accounting
            reports = TrafficReports(edge, plane)
        # a child's updown runs here, where its Child SAs are (the key table tells)
        updown = Updown(lambda: config.policy)
        keys.on_install, keys.on_ike, keys.on_move = updown.up, updown.ike_changed, \
            updown.moved

        def removed(spi_in: bytes, ike: tuple[bytes, bytes] | None,
                    traffic: tuple[int, int, int, int]) -> None:
            if reports is not None:
                reports.removed(spi_in, ike, traffic)
            updown.down(spi_in)  # (a rekeyed-away SA's line went on: nothing runs)

        plane.on_removed = removed
        try:
            async with trio.open_nursery() as nursery:
                if handle_signals:
                    await nursery.start(_shutdown_on_signal, nursery.cancel_scope)
                await nursery.start(membership.run)
                edge.refresh()
                await nursery.start(plane.run)
                await nursery.start(updown.run)
                await nursery.start(keys.run)
                nursery.start_soon(keys.checkpoints)
                nursery.start_soon(limits_out.run)
                if reports is not None:
                    nursery.start_soon(reports.run)
                nursery.start_soon(relay.serve, edge.handle)
                nursery.start_soon(relay.ping_members, membership, "responder")
                await nursery.start(dispatcher.serve, edge)
                metrics.watch_runtime(stats.as_dict, dict, lambda: 0)
                metrics.watch_data_plane(plane.stats)
                _watch_cluster(metrics, store, relay.stats, None, membership)
                await _serve_metrics(nursery, config, metrics)
                logger.info("worker %s: IKE on %s, relay on %s (advertised %s), TUN %s",
                            config.node_id,
                            ", ".join(format_address(a) for a in dispatcher.local_addresses),
                            format_address(relay.local), advertise, w.tun)
                task_status.started((plane, keys, edge, membership))
        finally:
            counters = " ".join(f"{k}={v}" for k, v in plane.stats().items() if v)
            logger.info("worker %s stopped: %s; data plane: %s", config.node_id,
                        stats.summary(), counters or "no traffic")
            with trio.CancelScope(shield=True):  # its Child SAs leave this host: "down"
                await updown.stop()


def _watch_cluster(metrics: Metrics, store: StateStore, relay: Callable[[], dict[str, int]],
                   failover: Callable[[], dict[str, int]] | None,
                   membership: Membership) -> None:
    metrics.watch_store(lambda: store.stats)
    metrics.watch_relay(relay)
    if failover is not None:
        metrics.watch_failover(failover)
    metrics.watch_members(lambda: membership.members)


def _describe_store(url: str | None) -> str:
    if not url:
        return "in memory"
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{':' + str(parts.port) if parts.port else ''}"


def _nonzero(counters: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in counters.items() if v) or "nothing"
