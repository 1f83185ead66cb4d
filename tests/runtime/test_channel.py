"""The responders' channel: INITIAL_CONTACT and unique = "replace" across the cluster's
responders, and `ike-cluster terminate`'s requests; a supervisor acting on them."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest
import trio

from cluster.ike.events import IkeSaDeleted
from cluster.runtime import supervisor as supervisor_module
from cluster.runtime.channel import (
    RESPONDERS_CHANNEL,
    Kept,
    Refusal,
    Rekeying,
    ResponderChannel,
    Termination,
    decode_untrusted,
    encode_identity,
    encode_refuse,
    encode_rekey,
    encode_terminate,
)
from cluster.store import MemoryStore
from cluster.store.interface import StoreError

from .conftest import Setup
from .test_node_loopback import _up, open_peer, start_node, wait_for

KEY = ("gw.example.test", "client.example.test")


async def _never(spi_i: bytes, spi_r: bytes, limit: int | None, child: bytes) -> bool:
    return False


SPI = bytes(range(8))
PEER = ("10.99.0.1", 4500)


def test_an_announcement_round_trips_and_junk_is_refused() -> None:
    assert decode_untrusted(encode_identity("r1", KEY, "replace", SPI)) == (
        "r1", KEY, "replace", SPI, None)
    assert decode_untrusted(encode_identity("r1", KEY, "replace", SPI, peer=PEER)) == (
        "r1", KEY, "replace", SPI, PEER)
    assert decode_untrusted(encode_terminate("@cli", SPI, SPI[::-1])) == Termination(
        "@cli", SPI, SPI[::-1])
    assert decode_untrusted(encode_terminate("r1", SPI, SPI[::-1], 120)) == Termination(
        "r1", SPI, SPI[::-1], 120)
    assert decode_untrusted(encode_terminate("@cli", SPI, SPI[::-1], child=b"\xc1\x01\x02\x03")
                            ) == Termination("@cli", SPI, SPI[::-1], None, b"\xc1\x01\x02\x03")
    good = [1, "identity", "r1", KEY[0], KEY[1], "initial_contact", SPI]
    for bad in ([2, *good[1:]], good[:6], [*good[:5], "keep", SPI], [*good[:6], SPI[:7]],
                [*good, ["10.99.0.1", 4500]],  # INITIAL_CONTACT: no reauthentication
                [*good[:5], "replace", SPI, ["10.99.0.1"]],
                [*good[:5], "replace", SPI, ["10.99.0.1", 65536]],
                [*good[:5], "replace", SPI, ["10.99.0.1", True]],
                [*good[:5], "replace", SPI, ["", 500]], [*good[:5], "replace", SPI, "x"],
                [1, "identity", 7, *good[3:]], [1, "identity", "r1", 7, *good[4:]],
                [1, "terminate", "@cli", SPI], [1, "terminate", "@cli", SPI, "x" * 8],
                [1, "terminate", "r1", SPI, SPI, -1], [1, "terminate", "r1", SPI, SPI, 1 << 32],
                [1, "terminate", "r1", SPI, SPI, 1.5], [1, "terminate", "r1", SPI, SPI, 1, 2],
                [1, "terminate", "r1", SPI, SPI, None, b"abc"],
                [1, "terminate", "r1", SPI, SPI, 1, b"abcd"],
                [1, "terminate", "r1", SPI, SPI, None, "abcd"],
                [1, "other", "r1", SPI, SPI], [1], {"a": 1}, "text"):
        assert decode_untrusted(msgpack.packb(bad)) is None, bad
    assert decode_untrusted(b"\xc1") is None
    assert decode_untrusted(b"") is None


def test_keep_announcements_carry_their_time_and_refusals_round_trip() -> None:
    assert decode_untrusted(encode_identity("r1", KEY, "keep", SPI, 1234.5)) == Kept(
        "r1", KEY, SPI, 1234.5)
    assert decode_untrusted(encode_identity("r1", KEY, "keep", SPI, 1234.5, PEER)) == Kept(
        "r1", KEY, SPI, 1234.5, PEER)
    assert decode_untrusted(encode_refuse("r2", KEY, SPI)) == Refusal("r2", KEY, SPI)
    keep = [1, "identity", "r1", KEY[0], KEY[1], "keep", SPI, 1234.5]
    for bad in (keep[:7], [*keep[:7], 1234], [*keep[:7], float("inf")],
                [*keep[:7], ["10.99.0.1", 500]], [*keep, ["10.99.0.1", 500], 1],
                [*keep[:5], "replace", SPI, 1234.5], [1, "refuse", "r2", KEY[0], KEY[1]],
                [1, "refuse", "r2", KEY[0], 7, SPI], [1, "refuse", "r2", *KEY, SPI[:7]]):
        assert decode_untrusted(msgpack.packb(bad)) is None, bad


class _Keeper:
    """A supervisor's unique = "keep" side: `older` says whether it holds an older SA."""

    def __init__(self, older: bool, held: bytes = b"") -> None:
        self.older, self.held = older, held
        self.asked: list[tuple[bytes, float]] = []
        self.refused: list[bytes] = []

    def since_of(self, spi_r: bytes) -> float:
        return 1000.25

    def keep_identity(self, key: tuple[str, str], newest: bytes, since: float,
                      peer: tuple[str, int] | None = None) -> bool:
        self.asked.append((newest, since))
        return self.older

    def refuse_identity(self, key: tuple[str, str], spi_r: bytes) -> bool:
        if spi_r != self.held:
            return False
        self.refused.append(spi_r)
        return True


async def test_a_responder_with_an_older_sa_refuses_the_new_one() -> None:
    store = MemoryStore()
    keepers = {"r1": _Keeper(older=False, held=SPI), "r2": _Keeper(older=True),
               "r3": _Keeper(older=False)}
    channels = {n: ResponderChannel(store, n, lambda k, p, s, peer: 0, _never, keep=keeper)
                for n, keeper in keepers.items()}
    async with trio.open_nursery() as nursery:
        for channel in channels.values():
            await nursery.start(channel.run)
        channels["r1"].identified(KEY, "keep", SPI)
        await wait_for(lambda: keepers["r1"].refused == [SPI])
        nursery.cancel_scope.cancel()
    assert keepers["r2"].asked == keepers["r3"].asked == [(SPI, 1000.25)]
    assert keepers["r1"].asked == [] and keepers["r2"].refused == keepers["r3"].refused == []
    assert channels["r1"].stats.ended == 1 and channels["r2"].stats.sent == 1


async def test_one_responders_announcement_reaches_the_others_not_itself() -> None:
    store = MemoryStore()
    calls: dict[str, list[tuple[tuple[str, str], str, bytes]]] = {"r1": [], "r2": [], "r3": []}

    def replacer(node: str):  # type: ignore[no-untyped-def]
        def replace(key: tuple[str, str], policy: str, spi: bytes, peer: object) -> int:
            calls[node].append((key, policy, spi))
            return 2 if node == "r2" else 0
        return replace

    announcers = {n: ResponderChannel(store, n, replacer(n), _never)
                  for n in calls}
    async with trio.open_nursery() as nursery:
        for announcer in announcers.values():
            await nursery.start(announcer.run)
        announcers["r1"].identified(KEY, "initial_contact", SPI)
        await store.publish(RESPONDERS_CHANNEL, b"junk")
        await wait_for(lambda: bool(calls["r2"] and calls["r3"]))
        await wait_for(lambda: announcers["r3"].stats.malformed == 1)
        nursery.cancel_scope.cancel()
    assert calls == {"r1": [], "r2": [(KEY, "initial_contact", SPI)],
                     "r3": [(KEY, "initial_contact", SPI)]}
    stats = {n: a.stats.as_dict() for n, a in announcers.items()}
    none = {"sent": 0, "received": 0, "lost": 0, "malformed": 1, "ended": 0, "terminated": 0,
            "rekeyed": 0}
    assert stats["r1"] == {**none, "sent": 1}
    assert stats["r2"] == {**none, "received": 1, "ended": 2}
    assert stats["r3"] == {**none, "received": 1}


class _DownStore(MemoryStore):
    async def execute(self, ops):  # type: ignore[no-untyped-def]
        raise StoreError("connection refused")


async def test_an_announcement_the_store_refuses_is_counted_lost() -> None:
    announcer = ResponderChannel(_DownStore(), "r1", lambda key, policy, spi, peer: 0,
                                 _never)
    async with trio.open_nursery() as nursery:
        await nursery.start(announcer.run)
        announcer.identified(KEY, "replace", SPI)
        await wait_for(lambda: announcer.stats.lost == 1)
        nursery.cancel_scope.cancel()
    assert announcer.stats.sent == 0


@pytest.mark.parametrize("policy", ["initial_contact", "replace", "keep"])
async def test_another_responders_announcement_ends_this_nodes_sa_of_the_identities(
        setup: Setup, policy: str) -> None:
    """INITIAL_CONTACT drops the SA quietly, "replace" deletes it (the peer sees the
    Delete); the announced SA itself and other policies are left alone."""
    async with trio.open_nursery() as nursery:
        node = await start_node(nursery, setup.node_config)
        peer = await open_peer(setup, "127.0.0.1")
        try:
            sa = await peer.establish()
            key = (sa.remote_id, sa.local_id)  # the node's view: (local, remote)
            supervisor = node.supervisor
            assert supervisor.replace_identity(key, policy, sa.spi_r) == 0  # itself
            assert supervisor.replace_identity(("x", "y"), policy, SPI) == 0
            ended = supervisor.replace_identity(key, policy, SPI)
            if policy == "keep":
                assert ended == 0
                await trio.sleep(0.2)
                assert supervisor.actor_for(sa.spi_r) is not None
            else:
                assert ended == 1
                if policy == "replace":
                    await peer.run_until(lambda e: isinstance(e, IkeSaDeleted))
                await wait_for(lambda: supervisor.actor_for(sa.spi_r) is None)
        finally:
            peer.close()
        node.shutdown()


async def test_a_terminate_request_reaches_every_responder_and_is_counted_where_done() -> None:
    store = MemoryStore()
    asked: dict[str, list[tuple[bytes, bytes, int | None, bytes]]] = {"r1": [], "r2": []}

    def terminator(node: str):  # type: ignore[no-untyped-def]
        async def terminate(spi_i: bytes, spi_r: bytes, limit: int | None,
                            child: bytes) -> bool:
            asked[node].append((spi_i, spi_r, limit, child))
            return node == "r2"
        return terminate

    channels = {n: ResponderChannel(store, n, lambda k, p, s, peer: 0, terminator(n))
                for n in asked}
    async with trio.open_nursery() as nursery:
        for channel in channels.values():
            await nursery.start(channel.run)
        await store.publish(RESPONDERS_CHANNEL, encode_terminate("@cli", SPI, SPI[::-1]))
        await wait_for(lambda: bool(asked["r1"] and asked["r2"])
                       and channels["r2"].stats.terminated == 1)
        # a RADIUS CoA's Session-Timeout travels the same way
        await store.publish(RESPONDERS_CHANNEL, encode_terminate("r1", SPI, SPI[::-1], 300))
        await wait_for(lambda: channels["r2"].stats.terminated == 2 and len(asked["r1"]) == 2)
        # and `terminate --child`
        await store.publish(RESPONDERS_CHANNEL, encode_terminate("@cli", SPI, SPI[::-1],
                                                                 child=b"\x0c\xaf\xe0\x01"))
        await wait_for(lambda: channels["r2"].stats.terminated == 3 and len(asked["r1"]) == 3)
        nursery.cancel_scope.cancel()
    expected = [(SPI, SPI[::-1], None, b""), (SPI, SPI[::-1], 300, b""),
                (SPI, SPI[::-1], None, b"\x0c\xaf\xe0\x01")]
    assert asked == {"r1": expected, "r2": expected}
    assert (channels["r1"].stats.terminated, channels["r2"].stats.terminated) == (0, 3)


def test_a_rekey_request_round_trips_and_junk_is_refused() -> None:
    assert decode_untrusted(encode_rekey("@cli", SPI, SPI[::-1])) == Rekeying(
        "@cli", SPI, SPI[::-1], b"")
    assert decode_untrusted(encode_rekey("@cli", SPI, SPI[::-1], b"\xc1\x01\x02\x03")) == \
        Rekeying("@cli", SPI, SPI[::-1], b"\xc1\x01\x02\x03")
    for bad in ([1, "rekey", "@cli", SPI, SPI], [1, "rekey", "@cli", SPI, SPI, b"abc"],
                [1, "rekey", "@cli", SPI, SPI[:7], b""], [1, "rekey", "@cli", SPI, SPI, "net"],
                [1, "rekey", "@cli", SPI, SPI, b"", 1]):
        assert decode_untrusted(msgpack.packb(bad)) is None, bad


async def test_a_rekey_request_reaches_every_responder_and_is_counted_where_done() -> None:
    store = MemoryStore()
    asked: dict[str, list[tuple[bytes, bytes, bytes]]] = {"r1": [], "r2": []}

    def rekeyer(node: str):  # type: ignore[no-untyped-def]
        async def rekey(spi_i: bytes, spi_r: bytes, child: bytes) -> bool:
            asked[node].append((spi_i, spi_r, child))
            return node == "r2"
        return rekey

    async def never(spi_i: bytes, spi_r: bytes, limit: int | None, child: bytes) -> bool:
        raise AssertionError("not a terminate")

    channels = {n: ResponderChannel(store, n, lambda k, p, s, peer: 0, never, rekey=rekeyer(n))
                for n in asked}
    async with trio.open_nursery() as nursery:
        for channel in channels.values():
            await nursery.start(channel.run)
        await store.publish(RESPONDERS_CHANNEL, encode_rekey("@cli", SPI, SPI[::-1]))
        await store.publish(RESPONDERS_CHANNEL, encode_rekey("@cli", SPI, SPI[::-1], b"cafe"))
        await wait_for(lambda: len(asked["r1"]) == 2 and channels["r2"].stats.rekeyed == 2)
        nursery.cancel_scope.cancel()
    assert asked["r1"] == asked["r2"] == [(SPI, SPI[::-1], b""), (SPI, SPI[::-1], b"cafe")]
    assert (channels["r1"].stats.rekeyed, channels["r2"].stats.rekeyed) == (0, 2)


async def test_delete_ike_deletes_a_held_sa_with_a_delete_and_nothing_else(
        setup: Setup) -> None:
    async with trio.open_nursery() as nursery:
        node = await start_node(nursery, setup.node_config)
        peer = await open_peer(setup, "127.0.0.1")
        try:
            sa = await peer.establish()
            supervisor = node.supervisor
            assert not supervisor.delete_ike(SPI, sa.spi_r)  # the wrong initiator SPI
            assert not supervisor.delete_ike(sa.spi_i, SPI)
            assert supervisor.delete_ike(sa.spi_i, sa.spi_r)
            await peer.run_until(lambda e: isinstance(e, IkeSaDeleted))
            await wait_for(lambda: supervisor.actor_for(sa.spi_r) is None)
        finally:
            peer.close()
        node.shutdown()


def test_a_redirect_message_reaches_the_responders_callback() -> None:
    from cluster.runtime.channel import Redirection, encode_redirect

    assert decode_untrusted(encode_redirect("@cli", "10.99.0.3", True)) == \
        Redirection("@cli", "10.99.0.3", True)
    for bad in ([1, "redirect", "@cli", "x" * 300, True], [1, "redirect", "@cli", 7, True],
                [1, "redirect", "@cli", "gw", "yes"]):
        assert decode_untrusted(msgpack.packb(bad)) is None, bad
    calls: list[tuple[str, bool]] = []

    def redirect(gateway: str, existing: bool) -> None:
        if gateway == "bad":
            raise ValueError("not a gateway")
        calls.append((gateway, existing))

    channel = ResponderChannel(MemoryStore(), "r1", lambda k, p, s, peer: 0, _never, redirect)
    channel.apply(encode_redirect("@cli", "10.99.0.3", True))
    channel.apply(encode_redirect("@cli", "", False))
    channel.apply(encode_redirect("@cli", "bad", False))
    assert calls == [("10.99.0.3", True), ("", False)]
    assert channel.stats.malformed == 1


async def test_keep_orders_two_sas_of_an_identity_by_time_and_the_later_one_goes(
        setup: Setup) -> None:
    """The supervisor's side of unique = "keep" in a cluster: an announced SA newer than
    ours must go (True: its responder is told); one older than ours means ours goes,
    with a Delete the peer sees; `refuse_identity` deletes ours when another responder
    holds an older one."""
    async with trio.open_nursery() as nursery:
        node = await start_node(nursery, setup.node_config)
        supervisor = node.supervisor
        peers = []
        try:
            for _ in range(2):
                peer = await open_peer(setup, "127.0.0.1")
                peers.append(peer)
                sa = await peer.establish()
                key = (sa.remote_id, sa.local_id)
                since = supervisor.since_of(sa.spi_r)
                assert since > 0
                assert supervisor.keep_identity(key, SPI, since + 1.0)  # ours is older
                assert supervisor.keep_identity(("x", "y"), SPI, since + 1.0) is False
                if len(peers) == 1:
                    assert supervisor.keep_identity(key, SPI, since - 1.0) is False
                else:
                    assert supervisor.refuse_identity(key, sa.spi_r)
                await peer.run_until(lambda e: isinstance(e, IkeSaDeleted))
                spi_r = sa.spi_r
                await wait_for(lambda: supervisor.actor_for(spi_r) is None)  # noqa: B023
            assert supervisor.refuse_identity(key, SPI) is False
        finally:
            for peer in peers:
                peer.close()
        node.shutdown()


async def test_an_announced_sa_from_the_peer_of_ours_reauthenticates_it(
        setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reauthentication that rendezvous put on another responder: the announced SA came
    from the address and port of our SA's peer, without INITIAL_CONTACT. "keep" does not
    refuse it (ours is left to the peer to delete); "replace" deletes ours only after
    REAUTH_GRACE. The same announcement from another peer is judged as before."""
    monkeypatch.setattr(supervisor_module, "REAUTH_GRACE", 1.0)
    async with trio.open_nursery() as nursery:
        node = await start_node(nursery, setup.node_config)
        supervisor = node.supervisor
        peer = await open_peer(setup, "127.0.0.1")
        try:
            sa = await peer.establish()
            key = (sa.remote_id, sa.local_id)
            since = supervisor.since_of(sa.spi_r)
            assert supervisor.keep_identity(key, SPI, since + 1.0, peer.local) is False
            assert supervisor.keep_identity(key, SPI, since + 1.0, ("127.0.0.9", 500))
            assert supervisor.keep_identity(key, SPI, since + 1.0)
            started = trio.current_time()
            assert supervisor.replace_identity(key, "replace", SPI, peer.local) == 1
            await trio.sleep(0.3)
            assert _up(node, sa.spi_r)
            await peer.run_until(lambda e: isinstance(e, IkeSaDeleted))
            assert trio.current_time() - started >= 0.9
            await wait_for(lambda: supervisor.actor_for(sa.spi_r) is None)
        finally:
            peer.close()
        node.shutdown()


def test_a_clusters_redirection_is_kept_for_responders_that_start_later() -> None:
    """`ike-cluster redirect` with a cluster's configuration stores the gateway beside
    publishing it; a responder starting afterwards finds it (and `--stop` clears it)."""
    from cluster.config import load_config
    from cluster.ops import _redirect_cluster
    from cluster.roles import _restore_redirect
    from cluster.runtime.channel import stored_redirect
    from cluster.runtime.node import ResponderFactory
    from cluster.runtime.stats import RuntimeStats
    from cluster.runtime.supervisor import Supervisor

    store = MemoryStore()
    assert trio.run(stored_redirect, store) == ""
    assert _redirect_cluster(store, "gw2.example.test", False) == 0
    assert trio.run(stored_redirect, store) == "gw2.example.test"

    config = load_config(Path(__file__).parents[2] / "config" / "example.toml")
    factory = ResponderFactory(config)
    supervisor = Supervisor(session_factory=factory, send=lambda datagram: None,
                            event_sink=lambda event: None, stats=RuntimeStats(),
                            half_open_timeout=30.0)
    trio.run(_restore_redirect, store, supervisor, factory)
    assert factory.redirect_to == "gw2.example.test"

    assert _redirect_cluster(store, "", False) == 0
    factory = ResponderFactory(config)
    trio.run(_restore_redirect, store, supervisor, factory)
    assert factory.redirect_to == ""
