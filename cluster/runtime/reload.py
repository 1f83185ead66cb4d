"""Reloading the configuration in a running node (SIGHUP), as `swanctl --load-all`.

What a reload changes: connections, secrets, CAs and CRLs (the responder policy) for
every IKE SA set up from then on, the `unique` policies, and the connections this node
initiates (`start_action = "start"`: new ones start, removed ones stop initiating,
changed ones use the new settings from their next attempt). Established SAs keep the
settings they were set up with and stay up, as in strongSwan.

What needs a restart: the node id and control socket, addresses and ports, the
`[worker]`, `[cluster]`, `[metrics]` tables, the `[ike]` DoS limits and dh_reuse, a
pool whose addresses changed, and on-demand (trap) connections. A reload that changes
any of those applies the rest and names each in a warning. A file that does not load
changes nothing: the error is logged in one line and the node runs on with what it had.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass, replace

import trio

from ..config import NodeConfig, load_config
from ..errors import ConfigError
from ..ike.policy import ConnectionConfig
from ..ike.pools import AddressPool

logger = logging.getLogger(__name__)

# NodeConfig fields a running node cannot change (name in the warning, attribute)
RESTART_ONLY = (
    ("[node] id", "node_id"), ("[ike] addresses", "addresses"), ("[ike] port", "ike_port"),
    ("[ike] port_nat_t", "natt_port"), ("[worker]", "worker"), ("[cluster]", "cluster"),
    ("[metrics]", "metrics"), ("[ike] DoS limits", "dos"), ("[ike] dh_reuse", "dh_reuse"),
    ("[node] control", "control"), ("[ike] crl_refresh", "crl_refresh"),
    ("[ike] crl_from_certificates", "crl_from_certificates"), ("[ike] ocsp", "ocsp"),
)


def _dae_listen(config: NodeConfig) -> tuple[str, int] | None:
    radius = config.policy.radius
    return None if radius is None or radius.dae is None else (radius.dae.host, radius.dae.port)


def _pool_definition(pool: AddressPool) -> tuple[object, ...]:
    return pool.name, pool.first, pool.size, pool.dns


def carry_over(old: NodeConfig, new: NodeConfig) -> tuple[NodeConfig, list[str]]:
    """`new`, its connections using `old`'s pool objects wherever a pool kept its name and
    addresses (so leases survive the reload); and what `new` changes that only a
    restart applies."""
    restart = [name for name, attribute in RESTART_ONLY
               if getattr(old, attribute) != getattr(new, attribute)]
    if _dae_listen(old) != _dae_listen(new):  # (its secret follows the reload)
        restart.append("[radius.dae] listen")
    pools = {p.name: p for c in old.policy.connections for p in c.pools}
    changed: set[str] = set()

    def keep(pool: AddressPool) -> AddressPool:
        before = pools.get(pool.name)
        if before is None:
            return pool
        if _pool_definition(before) != _pool_definition(pool):
            changed.add(pool.name)
        return before  # its leases stand; new addresses wait for a restart

    def connection(conn: ConnectionConfig) -> ConnectionConfig:
        return replace(conn, pools=tuple(keep(p) for p in conn.pools)) if conn.pools else conn

    connections = tuple(connection(c) for c in new.policy.connections)
    # (an initiation holds its own copy of the connection, the start child first)
    initiations = tuple(replace(i, connection=connection(i.connection))
                        for i in new.initiations)
    # the CRLs downloaded so far stay in use until their URIs are fetched again
    policy = replace(new.policy, connections=connections,
                     fetched_crls=old.policy.fetched_crls, ocsp=old.policy.ocsp,
                     radius_backend=old.policy.radius_backend)
    restart += [f"[pools.{name}]" for name in sorted(changed)]
    if [i for i in old.initiations if i.on_demand] != [i for i in initiations if i.on_demand]:
        restart.append("trap connections")
    return replace(new, policy=policy, initiations=initiations), restart


async def reload_on_signal(source: str, current: Callable[[], NodeConfig],
                           apply: Callable[[NodeConfig], None], *,
                           task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                           ) -> None:
    """On each SIGHUP: load `source` again and `apply` it (see the module docstring)."""
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        task_status.started()
        async for _ in signals:
            reload_from(source, current, apply)


@dataclass(frozen=True)
class ReloadResult:
    """What a reload did: `error` when the file did not load (then nothing changed),
    else the changes that wait for a restart. True when it applied."""

    error: str = ""
    restart: tuple[str, ...] = ()
    summary: str = ""

    def __bool__(self) -> bool:
        return not self.error


def reload_from(source: str, current: Callable[[], NodeConfig],
                apply: Callable[[NodeConfig], None]) -> ReloadResult:
    """Load `source` and `apply` it; when it does not load, nothing changes (logged)."""
    try:
        loaded = load_config(source)
    except ConfigError as exc:
        logger.error("configuration not reloaded: %s", exc)
        return ReloadResult(error=str(exc))
    new, restart = carry_over(current(), loaded)
    apply(new)
    policy = new.policy
    summary = (f"configuration reloaded from {source}: {len(policy.connections)} "
               f"connection(s), {len(policy.secrets)} secret(s)")
    logger.info("%s", summary)
    for name in restart:
        logger.warning("configuration reloaded: %s changed, which takes effect after a "
                       "restart", name)
    return ReloadResult(restart=tuple(restart), summary=summary)
