"""A single responder node: sockets, supervisor, signals, graceful shutdown."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass

import trio

from ..config import NodeConfig
from ..ike.events import (
    ChildSaDeleted,
    ChildSaEstablished,
    Event,
    IkeSaDeleted,
    IkeSaEstablished,
    IkeSaFailed,
)
from ..ike.session import Address, IkeSession
from .actor import Session
from .dispatcher import Dispatcher
from .stats import RuntimeStats
from .supervisor import DEFAULT_MAILBOX_SIZE, EventSink, Supervisor

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Node:
    """Handed to `task_status.started()`: what a test or the CLI may look at."""

    config: NodeConfig
    stats: RuntimeStats
    dispatcher: Dispatcher
    supervisor: Supervisor
    cancel_scope: trio.CancelScope

    @property
    def local_addresses(self) -> list[Address]:
        return self.dispatcher.local_addresses

    def shutdown(self) -> None:
        """Start the same graceful shutdown as SIGTERM."""
        self.cancel_scope.cancel()


def log_event(event: Event) -> None:
    """The single-node event sink: SA life in the log (the interop tests grep it)."""
    if isinstance(event, IkeSaEstablished):
        logger.info(
            "IKE SA established: %s spi_i=%s spi_r=%s local=%s peer=%s local_id=%s"
            " remote_id=%s %s%s",
            event.connection,
            event.spi_i.hex(),
            event.spi_r.hex(),
            _format_address(event.local),
            _format_address(event.remote),
            event.local_id,
            event.remote_id,
            event.algorithms,
            " (NAT)" if event.nat else "",
        )
    elif isinstance(event, IkeSaDeleted):
        logger.info(
            "IKE SA deleted: spi_i=%s spi_r=%s reason=%s",
            event.spi_i.hex(),
            event.spi_r.hex(),
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
        logger.info(
            "CHILD SA established: %s in IKE SA %s_i/%s_r spi_in=%s spi_out=%s mode=%s%s",
            event.name,
            event.ike_spi_i.hex(),
            event.ike_spi_r.hex(),
            event.spi_in.hex(),
            event.spi_out.hex(),
            event.mode,
            " encap" if event.encap else "",
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


def responder_factory(config: NodeConfig) -> Callable[[bytes, Address, Address], Session]:
    policy = config.policy

    def new_session(spi_r: bytes, local: Address, remote: Address) -> Session:
        return IkeSession.responder(policy, spi_r, local, remote)

    return new_session


async def run_node(
    config: NodeConfig,
    *,
    event_sink: EventSink = log_event,
    mailbox_size: int = DEFAULT_MAILBOX_SIZE,
    handle_signals: bool = True,
    task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Bind, serve until SIGINT/SIGTERM (or `Node.shutdown()`), then shut down cleanly.

    Shutdown order: the readers stop, the actors are cancelled, then the sockets
    close; the last log line carries the counters.
    """
    stats = RuntimeStats()
    with Dispatcher.bind(config.addresses, config.ike_port, config.natt_port, stats) as dispatcher:
        supervisor = Supervisor(
            session_factory=responder_factory(config),
            send=dispatcher.send,
            event_sink=event_sink,
            stats=stats,
            half_open_timeout=config.policy.half_open_timeout,
            mailbox_size=mailbox_size,
        )
        try:
            async with trio.open_nursery() as nursery:
                node = Node(config, stats, dispatcher, supervisor, nursery.cancel_scope)
                if handle_signals:
                    await nursery.start(_shutdown_on_signal, nursery.cancel_scope)
                await nursery.start(supervisor.run)
                await nursery.start(dispatcher.serve, supervisor)
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
