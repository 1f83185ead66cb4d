"""Reloading the configuration in a running node (SIGHUP): what changes, what stays."""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from cluster.config import load_config
from cluster.ike.events import IkeSaFailed
from cluster.ike.policy import ResponderPolicy
from cluster.runtime.reload import carry_over, reload_from

from .conftest import PSK, Setup
from .initiator_peer import InitiatorPeer
from .test_initiator import _delete_from_b, make_pair
from .test_node_loopback import start_node, wait_for

POOL = '[pools.rw]\naddrs = "10.3.0.0/24"\n'


def _with_secret(policy: ResponderPolicy, secret: bytes) -> ResponderPolicy:
    return replace(policy, secrets=tuple(replace(s, secret=secret) for s in policy.secrets))


def _rewrite(setup: Setup, old: str, new: str) -> Path:
    path = Path(setup.node_config.source)
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    return path


async def test_a_reload_applies_to_new_sas_and_leaves_the_established_ones(
        setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    """A new PSK: a peer with it gets in, one with the old one no longer does, and the
    SA set up before the reload stays up and answers."""
    caplog.set_level(logging.INFO)
    config = setup.node_config
    address = ("127.0.0.1", config.ike_port)
    async with trio.open_nursery() as nursery:
        node = await start_node(nursery, config)
        before = await InitiatorPeer.open(address, config.natt_port, setup.connection,
                                          setup.initiator_policy)
        old_secret = await InitiatorPeer.open(address, config.natt_port, setup.connection,
                                              setup.initiator_policy)
        new_secret = await InitiatorPeer.open(
            address, config.natt_port, setup.connection,
            _with_secret(setup.initiator_policy, b"the-new-secret"))
        try:
            await before.establish()
            path = _rewrite(setup, f'secret = "{PSK}"', 'secret = "the-new-secret"')
            assert reload_from(str(path), lambda: node.config, node.reconfigure)
            assert node.config.policy.secrets[0].secret == b"the-new-secret"
            await new_secret.establish()
            failed = await old_secret.run_until(lambda e: isinstance(e, IkeSaFailed))
            assert isinstance(failed, IkeSaFailed)
            await before.check_liveness()  # the old SA is still served
        finally:
            for peer in (before, old_secret, new_secret):
                peer.close()
        node.shutdown()
    messages = [r.getMessage() for r in caplog.records]
    assert f"configuration reloaded from {path}: 1 connection(s), 1 secret(s)" in messages
    assert not any("the-new-secret" in m or PSK in m for m in messages)  # no secret logged


async def test_a_file_that_does_not_load_changes_nothing(
        setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    config = setup.node_config
    async with trio.open_nursery() as nursery:
        node = await start_node(nursery, config)
        path = _rewrite(setup, 'mode = "tunnel"', 'mode = "tunel"')
        assert not reload_from(str(path), lambda: node.config, node.reconfigure)
        assert node.config is config
        peer = await InitiatorPeer.open(("127.0.0.1", config.ike_port), config.natt_port,
                                        setup.connection, setup.initiator_policy)
        try:
            await peer.establish()  # still the old configuration
        finally:
            peer.close()
        node.shutdown()
    (error,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert error.startswith(f"configuration not reloaded: {path}: ")
    assert "connections.rw.children.net.mode" in error


def test_pools_keep_their_leases_and_restart_only_changes_are_named(setup: Setup) -> None:
    path = Path(setup.node_config.source)
    text = path.read_text().replace("[connections.rw]\n", '[connections.rw]\npools = ["rw"]\n')
    path.write_text(text + POOL)
    old = load_config(path)
    (pool,) = old.policy.connections[0].pools
    path.write_text(text.replace('id = "rt-test"', 'id = "renamed"') + POOL)
    new, restart = carry_over(old, load_config(path))
    assert new.policy.connections[0].pools == (pool,)  # the same object: its leases
    assert restart == ["[node] id"]
    path.write_text(text + POOL.replace("10.3.0.0/24", "10.4.0.0/24"))
    new, restart = carry_over(old, load_config(path))
    assert new.policy.connections[0].pools == (pool,)  # kept until a restart
    assert restart == ["[pools.rw]"]
    path.write_text(text.replace("half_open_timeout = 30.0", "half_open_timeout = 9.0")
                    + POOL + '[worker]\ntun = "ikec9"\n')
    _, restart = carry_over(old, load_config(path))
    assert restart == ["[worker]"]  # half_open_timeout is the policy's: reloaded
    radius = '[radius.servers.a]\naddress = "10.0.0.5"\nsecret = "x"\n'
    dae = '[radius.dae]\nlisten = "127.0.0.1:13799"\nsecret = "y"\n'
    path.write_text(text + POOL + radius + dae)
    with_dae = load_config(path)
    new, restart = carry_over(old, with_dae)
    assert restart == ["[radius.dae] listen"]
    assert new.policy.radius_backend is old.policy.radius_backend  # the runtime's transport
    path.write_text(text + POOL + radius + dae.replace('"y"', '"z"'))
    _, restart = carry_over(with_dae, load_config(path))
    assert restart == []  # a new DAE secret applies at once


async def test_connections_to_start_come_and_go_with_a_reload(tmp_path: Path) -> None:
    """A reload that adds a connection with start_action = "start" initiates it; one that
    removes it stops initiating, and the SA it brought up stays."""
    pair = make_pair(tmp_path)  # two nodes on loopback, "a" initiating
    path = Path(pair.a.source)
    text = path.read_text()
    without = text.replace('start_action = "start"', "")
    assert without != text
    path.write_text(without)
    async with trio.open_nursery() as nursery:
        b = await start_node(nursery, pair.b)
        a = await start_node(nursery, load_config(path))
        assert a.initiators == []
        path.write_text(text)
        assert reload_from(str(path), lambda: a.config, a.reconfigure)
        (initiator,) = a.initiators
        await wait_for(lambda: b.supervisor.actor_count == 1 and a.supervisor.initiated_count == 1)
        path.write_text(without)
        assert reload_from(str(path), lambda: a.config, a.reconfigure)
        assert a.initiators == []
        await trio.sleep(0.3)
        assert b.supervisor.actor_count == 1 and a.supervisor.initiated_count == 1
        assert initiator.attempts == 1
        # when that SA ends, nothing initiates it again
        (actor,) = b.supervisor.established_actors()
        _delete_from_b(b, actor.spi_r)
        await wait_for(lambda: a.supervisor.initiated_count == 0)
        await trio.sleep(1.5)  # past the first back-off
        assert initiator.attempts == 1 and b.supervisor.actor_count == 0
        a.shutdown()
        b.shutdown()


async def test_sighup_reloads_a_running_node(setup: Setup) -> None:
    """The signal itself, in this process: `run_node` with its signal handlers."""
    import functools

    from cluster.runtime.node import Node, run_node

    config = setup.node_config
    async with trio.open_nursery() as nursery:
        node: Node = await nursery.start(functools.partial(run_node, config))
        path = _rewrite(setup, 'proposals = ["aes256gcm16-prfsha256-x25519"]',
                        'proposals = ["aes128gcm16-prfsha256-x25519"]')
        os.kill(os.getpid(), signal.SIGHUP)
        await wait_for(lambda: node.config is not config)
        assert "aes128" in str(node.config.policy.connections[0].proposals)
        assert str(path) == node.config.source
        node.shutdown()
