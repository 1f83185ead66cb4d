"""`ike-cluster responder` in this process, on the in-memory store: what it says at start."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import pytest
import trio

from cluster.config import load_config
from cluster.roles import run_responder

CONFIG = """\
[node]
id = "r1"
[ike]
addresses = ["127.0.0.1"]
[connections.link]
remote_addrs = ["127.0.0.9"]
local = { auth = "psk", id = "gw.example.test" }
remote = { auth = "psk", id = "peer.example.test" }
[connections.link.children.net]
local_ts = ["10.99.2.0/24"]
remote_ts = ["10.99.1.0/24"]
start_action = "start"
[secrets.link]
ids = ["gw.example.test", "peer.example.test"]
secret = "change-me"
[cluster]
store = "memory://"
key = "cluster.key"
relay = "127.0.0.1:0"
"""


async def test_a_cluster_responder_says_it_ignores_start_action(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "cluster.key").write_text(os.urandom(32).hex() + "\n")
    path = tmp_path / "responder.toml"
    path.write_text(CONFIG)
    caplog.set_level(logging.INFO)
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: run_responder(
            load_config(path), handle_signals=False, task_status=task_status))
        nursery.cancel_scope.cancel()
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert messages == ["connection link: start_action of child net ignored: a cluster "
                        "responder only responds (initiating is `ike-cluster run`'s)"]


async def test_a_cluster_responder_hands_out_its_pools_through_the_store(
        tmp_path: Path) -> None:
    """Pools are shared: the responder's connections use the store's pools."""
    (tmp_path / "cluster.key").write_text(os.urandom(32).hex() + "\n")
    path = tmp_path / "responder.toml"
    path.write_text(CONFIG.replace('[connections.link]\n', '[connections.link]\npools = ["rw"]\n')
                    + '[pools.rw]\naddrs = "10.99.3.0/24"\n')
    async with trio.open_nursery() as nursery:
        started = await nursery.start(lambda task_status: run_responder(
            load_config(path), handle_signals=False, task_status=task_status))
        _, persistence, _, _ = started
        (conn,) = persistence.policy.connections
        assert [(type(p).__name__, p.name, p.size) for p in conn.pools] == [
            ("SharedPool", "rw", 254)]
        nursery.cancel_scope.cancel()


async def test_ended_sas_addresses_are_freed_in_the_store_also_after_a_failure() -> None:
    """The responder's free loop hands back what its pools queued, and tries again when
    the store fails (a held address is one nobody gets)."""
    from cluster.ike.identity import parse_identity
    from cluster.ike.pools import AddressPool, SharedPool
    from cluster.roles import _free_addresses
    from cluster.store import ClaimAddress, HoldAddress, MemoryStore, StoreError

    class Flaky(MemoryStore):
        failures = 1

        async def execute(self, ops):  # type: ignore[no-untyped-def]
            if self.failures:
                self.failures -= 1
                raise StoreError("the store is away")
            return await super().execute(ops)

    store = Flaky()

    async def claim(pool: str, size: int, holder: bytes, identity: bytes,
                    ttl: float) -> int | None:
        results = await MemoryStore.execute(store, [ClaimAddress(pool, size, holder, identity,
                                                                 ttl)])
        return results[0]  # type: ignore[no-any-return]

    pool = SharedPool(AddressPool.parse("rw", "10.99.3.0/30"), claim, 3600.0)
    alice = parse_identity("alice@example.test")
    assert await pool.fetch(b"sa-1", alice)
    lease = pool.acquire(alice, b"sa-1")
    assert lease is not None
    pool.release(lease)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_free_addresses, store, [pool])
        with trio.fail_after(5):
            while pool.to_free or store.failures:
                await trio.sleep(0.05)
            await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    # freed in the store: sa-1 holds nothing any more
    assert not (await MemoryStore.execute(store, [HoldAddress("rw", 0, b"sa-1", 60.0)]))[0]


async def test_sighup_reloads_a_cluster_responder_and_its_pools_stay_shared(
        tmp_path: Path) -> None:
    """A pool that stays is the same SharedPool (its leases), a new one is shared too."""
    from cluster.ike.pools import SharedPool

    (tmp_path / "cluster.key").write_text(os.urandom(32).hex() + "\n")
    path = tmp_path / "responder.toml"
    base = CONFIG.replace('[connections.link]\n', '[connections.link]\npools = ["rw"]\n')
    path.write_text(base + '[pools.rw]\naddrs = "10.99.3.0/24"\n')
    async with trio.open_nursery() as nursery:
        started = await nursery.start(lambda task_status: run_responder(
            load_config(path), handle_signals=True, task_status=task_status))
        supervisor, persistence, _, _ = started
        (before,) = persistence.policy.connections[0].pools
        path.write_text(base.replace('pools = ["rw"]', 'pools = ["rw", "more"]')
                        .replace('"change-me"', '"changed"')
                        + '[pools.rw]\naddrs = "10.99.3.0/24"\n'
                        + '[pools.more]\naddrs = "10.99.4.0/24"\n')
        policy = persistence.policy
        os.kill(os.getpid(), signal.SIGHUP)
        with trio.fail_after(5):
            while persistence.policy is policy:
                await trio.sleep(0.01)
        rw, more = persistence.policy.connections[0].pools
        assert rw is before
        assert isinstance(more, SharedPool) and more.name == "more"
        assert persistence.policy.secrets[0].secret == b"changed"
        assert supervisor._session_factory.policy is persistence.policy
        nursery.cancel_scope.cancel()


async def test_ike_cluster_reload_reaches_a_responder_through_its_control_socket(
        tmp_path: Path) -> None:
    import secrets

    from cluster import control

    node_id = f"r-{os.getpid()}-{secrets.token_hex(3)}"
    (tmp_path / "cluster.key").write_text(os.urandom(32).hex() + "\n")
    path = tmp_path / "responder.toml"
    path.write_text(CONFIG.replace('id = "r1"', f'id = "{node_id}"'))
    async with trio.open_nursery() as nursery:
        _, persistence, _, _ = await nursery.start(lambda task_status: run_responder(
            load_config(path), handle_signals=False, task_status=task_status))
        path.write_text(path.read_text().replace('"change-me"', '"changed"'))
        answer = await trio.to_thread.run_sync(lambda: control.request(node_id, "reload"))
        assert answer["reloaded"] and answer["restart"] == []
        assert persistence.policy.secrets[0].secret == b"changed"
        with pytest.raises(control.ControlError, match="unknown command 'sas'"):
            await trio.to_thread.run_sync(lambda: control.request(node_id, "sas"))
        nursery.cancel_scope.cancel()
