"""`ike-cluster run`: the responder and, with a `[worker]` table, the data plane in one process.

They meet only here (runtime and worker never import each other): Child SA events go
to the data plane's key-install interface, ESP in UDP arriving on the NAT-T port goes
to its decapsulation, and it sends ESP in UDP from that same socket. With a `[metrics]`
table the events also go to `cluster.metrics`, which reads the runtime's and the data
plane's counters through callables and serves Prometheus on `[metrics] listen`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from .config import NodeConfig, WorkerConfig
from .ike.events import Event
from .metrics import Metrics, serve_metrics
from .runtime.radius_accounting import Accounting, Traffic
from .runtime.radius_client import RadiusClient
from .runtime.radius_dae import dae_server
from .runtime.updown import Updown

if TYPE_CHECKING:
    from .runtime.node import Node
    from .worker.dataplane import DataPlane

logger = logging.getLogger("cluster")


def _lifetime_handler(node: Node, log: Callable[[object], None]) -> Callable[[object], None]:
    """The data plane's byte/packet lifetimes drive the responder: soft -> rekey, hard or
    exhausted sequence numbers -> expire (gone at once, created again; the lifecycle of
    RFC 4301 4.4.2.1); so does an inactivity timeout (delete)."""
    from .esp import SaHardExpired, SaIdle, SaSequenceExhausted, SaSoftExpired

    def handle(event: object) -> None:
        log(event)
        if isinstance(event, SaSoftExpired):
            node.supervisor.rekey_child(event.spi_in)
        elif isinstance(event, SaHardExpired | SaSequenceExhausted):
            node.supervisor.expire_child(event.spi_in)
        elif isinstance(event, SaIdle):
            node.supervisor.delete_child(event.spi_in)

    return handle


async def single_node(config: NodeConfig) -> None:
    # looked up at call time: the CLI tests replace the runtime module
    from .runtime.node import run_node

    if config.worker is None:
        logger.info("no [worker] table: Child SAs are negotiated, no data plane runs here")
        if config.metrics is None and not config.control and config.policy.radius is None:
            await run_node(config)  # nothing beside the responder
        else:
            await _run(config, None)
        return
    await _with_data_plane(config, config.worker)


async def _with_data_plane(config: NodeConfig, w: WorkerConfig) -> None:
    from .worker.dataplane import DataPlane, DataPlaneSettings
    from .worker.keys import Limits

    settings = DataPlaneSettings(
        tun=w.tun, mtu=w.mtu, queues=w.queues, mark=w.mark, table=w.table,
        priority=w.priority,
        limits=Limits(w.replay_window, w.lifetime_bytes, w.lifetime_packets, w.mtu),
    )
    with DataPlane.open(settings, config.addresses) as plane:
        try:
            await _run(config, plane)
        finally:
            counters = " ".join(f"{k}={v}" for k, v in plane.stats().items() if v)
            logger.info("data plane stopped: %s", counters or "no traffic")


async def _run(config: NodeConfig, plane: DataPlane | None) -> None:
    """The responder; beside it the data plane's pumps and the metrics endpoint, if any."""
    from .control import serve_control
    from .ops import control_handlers, local_disconnect
    from .runtime.node import log_event, run_node
    from .runtime.reload import reload_from

    metrics = None
    if config.metrics is not None:
        names = [c.name for c in config.policy.connections]
        metrics = Metrics(config.node_id, connections=names)
        metrics.watch_pools(p for c in config.policy.connections for p in c.pools)

    node: Node | None = None
    accounting = Accounting(lambda: (node.config if node is not None else config).policy,
                            RadiusClient(), traffic=_traffic_of(plane),
                            reported=plane is not None)
    if plane is not None:  # what each Child SA carried, as it leaves the SAD for good
        plane.on_removed = lambda spi_in, ike, traffic: accounting.child_traffic(
            *(ike or (b"", b"")), spi_in, traffic)

    updown = Updown(lambda: (node.config if node is not None else config).policy)

    def sink(event: Event) -> None:
        log_event(event)
        accounting.record(event)
        updown.record(event)
        if plane is not None:
            plane.on_ike_event(event)
        if metrics is not None:
            metrics.record(event)

    async with trio.open_nursery() as nursery:
        if plane is not None:
            await nursery.start(plane.run)
        await nursery.start(accounting.run)
        await nursery.start(updown.run)

        async def responder(task_status: trio.TaskStatus[Node]) -> None:
            await run_node(config, event_sink=sink,
                           esp_sink=plane.receive_esp if plane is not None else None,
                           esp_flush=plane.flush if plane is not None else None,
                           socket_mark=config.worker.mark if config.worker else None,
                           task_status=task_status)
            await updown.stop()  # its Child SAs are gone: "down" for those still up
            nursery.cancel_scope.cancel()  # the node shut down: stop the pumps

        node = await nursery.start(responder)
        assert node is not None
        dae = dae_server(config, lambda: node.config if node is not None else config,
                          local_disconnect(config.node_id, node.supervisor))
        if dae is not None:
            await nursery.start(dae.run)
        if config.control:
            await nursery.start(serve_control, config.node_id, control_handlers(
                config.node_id, node.supervisor,
                lambda: reload_from(config.source, lambda: node.config, node.reconfigure),
                node.factory, node.initiate))
        if plane is not None and config.worker is not None:
            _set_traps(node, plane)
            plane.udp_send = node.dispatcher.send_esp
            plane.on_esp_event = _lifetime_handler(node, plane.on_esp_event)
            plane.on_activity = node.supervisor.traffic_seen  # ESP puts DPD off
            w = config.worker
            logger.info("data plane on %s (mtu %d, table %d, mark %#x)",
                        w.tun, w.mtu, w.table, w.mark)
        if metrics is not None and config.metrics is not None:
            metrics.watch_runtime(node.stats.as_dict, node.supervisor.session_counters,
                                  lambda: node.supervisor.half_open_count)
            metrics.watch_revocation(node.revocation.as_dict)
            metrics.watch_radius(node.radius.as_dict, accounting.stats.as_dict,
                                 dae.stats.as_dict if dae is not None else None)
            node.supervisor.handshake_observer = metrics.observe_handshake
            if plane is not None:
                metrics.watch_data_plane(plane.stats)
            m = config.metrics
            host, port = await nursery.start(serve_metrics, metrics, m.host, m.port, m.interval)
            listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            logger.info("metrics on http://%s/metrics (values at most %g s old)", listen,
                        m.interval)


def _traffic_of(plane: DataPlane | None) -> Traffic | None:
    """A Child SA's (bytes in, bytes out, packets in, packets out) for accounting."""
    if plane is None:
        return None
    sad = plane.sad

    def traffic(spi_in: bytes) -> tuple[int, int, int, int] | None:
        child = sad.get(spi_in)
        return None if child is None else child.counters.traffic()
    return traffic


def _set_traps(node: Node, plane: DataPlane) -> None:
    """Route the remote selectors of each start_action = "trap" child into the TUN; a
    packet there without an SA makes the node initiate that connection."""
    from .worker.keys import selectors

    for initiator in node.initiators:
        initiation = initiator.initiation
        if not initiation.on_demand:
            continue
        try:
            (local, _), _ = initiator.source()
        except OSError as exc:
            logger.error("connection %s: no trap: %s", initiator.name, exc)
            continue
        child = initiation.connection.children[0]
        remote = tuple(ts.resolve(initiation.remote) for ts in child.remote_ts)
        plane.trap(initiator.name, selectors(tuple(ts.resolve(local) for ts in child.local_ts)),
                   selectors(remote))
        logger.info("connection %s: trap on %s (child %s): initiating when a packet needs it",
                    initiator.name, ", ".join(map(str, remote)), child.name)
    plane.on_acquire = node.acquire
