"""`ike-cluster initiate` (swanctl's --initiate --child) on a single node.

Two nodes on loopback as in test_initiator.py, neither starting the connection by
itself: A is asked to bring a child up, on a new IKE SA or on the one it has with B.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import secrets
from pathlib import Path

import pytest
import trio

from cluster import control, ops
from cluster.config import NodeConfig, load_config
from cluster.ike.events import ChildSaEstablished, IkeSaDeleted, IkeSaEstablished
from cluster.ike.session import IkeSession
from cluster.runtime.node import InitiateError, Node

from .test_initiator import (
    A_HOST,
    B_HOST,
    Pair,
    established,
    free_ports,
    make_pair,
    node_config,
    wait_for,
)

# a tunnel-mode child of its own selectors (a second "dynamic" transport-mode one would
# be taken for the first by the responder, which picks the first child that fits)
MORE_CHILD = """
[connections.link.children.{name}]
esp_proposals = ["aes256gcm16"]
local_ts = ["{local}"]
remote_ts = ["{remote}"]
"""
A_NET, B_NET = "10.99.8.0/24", "10.99.9.0/24"


def with_children(config: NodeConfig, *names: str, node_id: str | None = None) -> NodeConfig:
    """The configuration reloaded from its file with more children (and another node id)."""
    path = Path(config.source)
    local, remote = (A_NET, B_NET) if config.node_id == "a" else (B_NET, A_NET)
    text = path.read_text() + "".join(MORE_CHILD.format(name=n, local=local, remote=remote)
                                      for n in names)
    if node_id is not None:
        text = text.replace(f'id = "{config.node_id}"', f'id = "{node_id}"', 1)
    path.write_text(text)
    return load_config(path)


def manual_pair(directory: Path, *, a_children: tuple[str, ...] = (),
                b_children: tuple[str, ...] = (), a_id: str | None = None) -> Pair:
    """A and B, neither with a start_action."""
    a_ports, b_ports = free_ports(A_HOST), free_ports(B_HOST)
    a = node_config(directory, "a", A_HOST, a_ports, B_HOST, b_ports[0], start=False)
    b = node_config(directory, "b", B_HOST, b_ports, A_HOST, a_ports[0], start=False)
    return Pair(with_children(a, *a_children, node_id=a_id), with_children(b, *b_children))


def children(events: list[object], name: str) -> list[ChildSaEstablished]:
    return [e for e in events if isinstance(e, ChildSaEstablished) and e.name == name]


async def test_initiate_brings_up_a_new_ike_sa_that_is_not_initiated_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    pair = manual_pair(tmp_path)
    async with trio.open_nursery() as nursery:
        b = await pair.start_b(nursery)
        a = await pair.start_a(nursery)
        assert a.initiators == [] and not established(pair.a_events)
        up = await a.initiate("host", 10.0)
        (sa,) = established(pair.a_events)
        (child,) = children(pair.a_events, "host")
        assert (up.spi_i, up.spi_r, up.spi_in, up.spi_out) == (
            sa.spi_i, sa.spi_r, child.spi_in, child.spi_out)
        assert (up.connection, up.peer, up.already) == ("link", (B_HOST, pair.b.ike_port),
                                                        False)
        again = await a.initiate("host", 10.0)  # up already: nothing new
        assert (again.spi_in, again.already) == (up.spi_in, True)
        assert len(established(pair.a_events)) == 1
        # B deletes it: A leaves it down (a connection with no start_action)
        actor = b.supervisor.actor_for(sa.spi_r)
        assert actor is not None

        def delete(session: object, now: float) -> None:
            assert isinstance(session, IkeSession)
            session.delete_ike(now)
        actor.mailbox.put_nowait(delete)
        await wait_for(lambda: any(isinstance(e, IkeSaDeleted) for e in pair.a_events))
        await wait_for(lambda: a.manual == [])
        await trio.sleep(1.5)  # (the first back-off of a start_action = "start")
        assert len(established(pair.a_events)) == 1
        a.shutdown()
        b.shutdown()
    assert f"connection link: IKE SA {sa.spi_i.hex()}_i ended (deleted by peer); not " \
        "initiated again" in [r.getMessage() for r in caplog.records]


async def test_initiate_adds_a_child_to_the_ike_sa_up_with_that_peer(tmp_path: Path) -> None:
    """On the IKE SA B brought up (A only responded), as swanctl does: CREATE_CHILD_SA."""
    pair = manual_pair(tmp_path, a_children=("second",), b_children=("second",))
    async with trio.open_nursery() as nursery:
        b = await pair.start_b(nursery)
        a = await pair.start_a(nursery)
        first = await b.initiate("host", 10.0)
        up = await a.initiate("second", 10.0)
        assert (up.spi_i, up.spi_r, up.already) == (first.spi_i, first.spi_r, False)
        assert len(established(pair.a_events)) == len(established(pair.b_events)) == 1
        (theirs,) = children(pair.b_events, "second")
        assert (up.spi_in, up.spi_out) == (theirs.spi_out, theirs.spi_in)
        a.shutdown()
        b.shutdown()


async def test_initiate_says_why_a_child_does_not_come_up(tmp_path: Path) -> None:
    pair = manual_pair(tmp_path, a_children=("only-a",))
    async with trio.open_nursery() as nursery:
        a = await pair.start_a(nursery)
        with pytest.raises(InitiateError, match="no connection has a child 'nothing'"):
            await a.initiate("nothing", 10.0)
        # B knows no child "only-a": its IKE_AUTH answer refuses it, the IKE SA stands
        b = await pair.start_b(nursery)
        with pytest.raises(InitiateError, match="the Child SA did not come up"):
            await a.initiate("only-a", 10.0)
        assert len(established(pair.a_events)) == 1
        # on that IKE SA, its CREATE_CHILD_SA is refused too, and we say with what
        with pytest.raises(InitiateError, match=r"the Child SA was refused: .*TS_UNACCEPTABLE"):
            await a.initiate("only-a", 10.0)
        up = await a.initiate("host", 10.0)
        assert not up.already and len(established(pair.a_events)) == 1
        a.shutdown()
        b.shutdown()


async def test_initiate_gives_up_waiting_but_the_attempt_goes_on(tmp_path: Path) -> None:
    """As with swanctl --initiate --timeout: the IKE SA comes up once the peer answers."""
    pair = manual_pair(tmp_path)
    async with trio.open_nursery() as nursery:
        a = await pair.start_a(nursery)
        with pytest.raises(InitiateError, match=r"not up within 0.5 s"):
            await a.initiate("host", 0.5)  # B is not running yet
        (attempt,) = a.manual
        b = await pair.start_b(nursery)  # and answers A's retransmission
        await wait_for(lambda: len(children(pair.a_events, "host")) == 1)
        up = await a.initiate("host", 1.0)
        assert up.already and a.manual == [attempt]
        a.shutdown()
        b.shutdown()


async def test_a_failed_ike_sa_is_reported_with_its_reason(tmp_path: Path) -> None:
    pair = manual_pair(tmp_path)
    path = Path(pair.b.source)
    path.write_text(path.read_text().replace('secret = "', 'secret = "not-', 1))
    async with trio.open_nursery() as nursery:
        b = await Pair(pair.a, load_config(path)).start_b(nursery)
        a = await pair.start_a(nursery)
        with pytest.raises(InitiateError, match="responder refused our authentication"):
            await a.initiate("host", 10.0)
        await wait_for(lambda: a.manual == [])
        a.shutdown()
        b.shutdown()


async def test_a_connection_with_no_single_peer_address_cannot_be_initiated(
    tmp_path: Path
) -> None:
    pair = manual_pair(tmp_path)
    path = Path(pair.a.source)
    path.write_text(path.read_text().replace(f'remote_addrs = ["{B_HOST}"]',
                                             'remote_addrs = ["%any"]'))
    config = load_config(path)
    async with trio.open_nursery() as nursery:
        a = await Pair(config, pair.b).start_a(nursery)
        with pytest.raises(InitiateError, match=r"connection link: cannot initiate: .*"
                           r"remote_addrs\[0\]: to initiate it needs a concrete peer"):
            await a.initiate("host", 1.0)
        a.shutdown()


async def test_the_initiate_command_asks_the_node_through_its_control_socket(
    tmp_path: Path
) -> None:
    node_id = f"ini-{os.getpid()}-{secrets.token_hex(3)}"
    pair = manual_pair(tmp_path, a_id=node_id)
    async with trio.open_nursery() as nursery:
        b = await pair.start_b(nursery)
        a: Node = await pair.start_a(nursery)
        await nursery.start(control.serve_control, node_id, ops.control_handlers(
            node_id, a.supervisor, None, a.factory, a.initiate))

        def run(child: str) -> tuple[int, str, str]:
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                status = ops.initiate_command(pair.a.source, child, 5.0)
            return status, out.getvalue(), err.getvalue()

        status, out, err = await trio.to_thread.run_sync(run, "host")
        (sa,) = established(pair.a_events)
        (child,) = children(pair.a_events, "host")
        assert (status, err) == (0, "")
        assert out == (f"initiated: CHILD SA host {child.spi_in.hex()} (in) "
                       f"{child.spi_out.hex()} (out) in IKE SA link {sa.spi_i.hex()}_i/"
                       f"{sa.spi_r.hex()}_r with {B_HOST}\n")
        status, out, err = await trio.to_thread.run_sync(run, "host")
        assert status == 0 and out.startswith("already up: CHILD SA host "), out
        status, out, err = await trio.to_thread.run_sync(run, "nothing")
        assert (status, out) == (1, "")
        assert err == "initiate failed: no connection has a child 'nothing'\n"
        a.shutdown()
        b.shutdown()
        nursery.cancel_scope.cancel()
    assert isinstance(established(pair.b_events)[0], IkeSaEstablished)


async def test_initiate_cuts_short_the_back_off_of_a_start_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start connection whose attempt failed waits out its back-off (made 30 s here);
    `initiate` of its child tries again at once, as an operator expects."""
    monkeypatch.setattr("cluster.runtime.node.INITIATE_BACKOFF_FIRST", 30.0)
    pair = make_pair(tmp_path, a_half_open_timeout=0.5)
    async with trio.open_nursery() as nursery:
        a = await pair.start_a(nursery)
        (initiator,) = a.initiators
        await wait_for(lambda: initiator.failures == 1)  # B is not running
        b = await pair.start_b(nursery)
        up = await a.initiate("host", 5.0)
        assert (initiator.attempts, initiator.failures) == (2, 1)
        (sa,) = established(pair.a_events)
        assert (up.spi_i, a.manual) == (sa.spi_i, [])
        a.shutdown()
        b.shutdown()
