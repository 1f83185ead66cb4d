"""DoS resistance of the responder runtime: cookies, half-open limits, notify rate.

Most tests run the supervisor on the memory-only path (`route_untrusted`, replies
into a list), many under `autojump_clock`; one runs a node on loopback sockets.
"""

from __future__ import annotations

import functools
import math
import random
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from cluster.config import DosConfig, load_config
from cluster.errors import ConfigError
from cluster.ike.constants import ExchangeType, NotifyType, ProtocolId
from cluster.ike.cookies import CookieSecrets
from cluster.ike.events import IkeSaEstablished
from cluster.ike.message import Message, decode_untrusted, encode_plain
from cluster.ike.payloads import NoncePayload, NotifyPayload
from cluster.ike.proposals import parse_proposal
from cluster.ike.session import Address, Datagram, IkeSession
from cluster.runtime import supervisor as supervisor_module
from cluster.runtime.node import Node, responder_factory, run_node
from cluster.runtime.stats import RuntimeStats
from cluster.runtime.supervisor import (
    DEFAULT_BLOCK_THRESHOLD,
    DEFAULT_COOKIE_THRESHOLD,
    DEFAULT_NOTIFY_RATE,
    EXPIRY_QUEUE_SLACK,
    NOTIFY_BUCKETS_MAX,
    Supervisor,
)

from .conftest import Setup, free_port_pair, write_responder_config
from .harness import CLIENT, SERVER
from .harness import Harness as SupervisorHarness
from .initiator_peer import InitiatorPeer


@dataclass
class Harness(SupervisorHarness):
    """The supervisor's test harness with several clients and chosen proposals."""

    def initiator(  # type: ignore[override]
        self, spi_i: bytes = b"\x01" * 8, client: Address = CLIENT, proposal: str | None = None
    ) -> IkeSession:
        connection = self.setup.connection
        if proposal is not None:
            connection = replace(
                connection, proposals=(parse_proposal(proposal, ProtocolId.IKE, False),)
            )
        return IkeSession.initiator(
            connection, self.setup.initiator_policy, spi_i, client, SERVER, trio.current_time()
        )

    def route(self, data: bytes, client: Address = CLIENT) -> None:
        self.supervisor.route_untrusted(data, SERVER, client, trio.current_time())

    def to_initiator(self, session: IkeSession) -> None:
        """Only the replies addressed to this session's client."""
        mine = [d for d in self.sent if d.remote == session.sa.local]
        self.sent[:] = [d for d in self.sent if d.remote != session.sa.local]
        for d in mine:
            session.receive_datagram_untrusted(d.data, d.remote, d.local, trio.current_time())

    def check_host_counters(self) -> None:
        """The per-address counters describe the half-open table exactly."""
        counted: dict[str, int] = {}
        for _spi, (host, _port) in self.supervisor._half_open:
            counted[host] = counted.get(host, 0) + 1
        assert self.supervisor.half_open_hosts == counted


@asynccontextmanager
async def running(setup: Setup, **options: Any) -> AsyncIterator[Harness]:
    stats = RuntimeStats()
    h = Harness(setup, None, stats)  # type: ignore[arg-type]
    options.setdefault("half_open_timeout", 30.0)
    h.supervisor = Supervisor(
        session_factory=responder_factory(setup.node_config),
        send=h.sent.append,
        event_sink=h.events.append,
        stats=stats,
        **options,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(h.supervisor.run)
        yield h
        nursery.cancel_scope.cancel()


def first_request(session: IkeSession) -> bytes:
    (datagram,) = session.datagrams_to_send()
    return datagram.data


def with_spi(template: bytes, spi_i: bytes) -> bytes:
    return spi_i + template[8:]


def cookie_of(datagram: Datagram) -> bytes:
    """The cookie of a stateless reply, checking its shape (RFC 7296 2.6)."""
    decoded = decode_untrusted(datagram.data)
    header = decoded.header
    assert header.exchange == ExchangeType.IKE_SA_INIT and header.message_id == 0
    assert header.is_response and not header.is_initiator
    assert header.spi_r == bytes(8)
    (payload,) = decoded.payloads
    assert isinstance(payload, NotifyPayload) and payload.notify_type == NotifyType.COOKIE
    return payload.data


def nonce_of(data: bytes) -> bytes:
    return next(p.data for p in decode_untrusted(data).payloads if isinstance(p, NoncePayload))


def with_cookie(request: bytes, cookie: bytes) -> bytes:
    """The same request with N(COOKIE) in front of its payloads."""
    decoded = decode_untrusted(request)
    header = decoded.header
    msg = Message(header.spi_i, header.spi_r, header.exchange, header.message_id, False, True,
                  [NotifyPayload(NotifyType.COOKIE, cookie), *decoded.payloads])
    return encode_plain(msg)


async def fill_half_open(h: Harness, count: int, host_prefix: str = "203.0.113.") -> None:
    """`count` half-open SAs from distinct addresses, each answered, none completed."""
    template = first_request(h.initiator(b"\x0f" * 8))
    for i in range(count):
        h.route(with_spi(template, bytes([0xF0, i]) + bytes(6)), (f"{host_prefix}{i + 1}", 500))
    await trio.testing.wait_all_tasks_blocked()
    assert h.supervisor.half_open_count == count
    h.sent.clear()


# --- cookies ---------------------------------------------------------------------------


async def test_under_the_threshold_no_cookie_is_asked(setup: Setup) -> None:
    async with running(setup, cookie_threshold=3) as h:
        await fill_half_open(h, 2)
        h.to_responder(h.initiator())
        await trio.testing.wait_all_tasks_blocked()
        (reply,) = h.sent
        assert reply.data[8:16] != bytes(8)  # a real IKE_SA_INIT response
        assert h.supervisor.half_open_count == 3
        assert h.stats.cookies_sent == 0


async def test_over_the_threshold_a_stateless_cookie_reply(setup: Setup) -> None:
    async with running(setup, cookie_threshold=2) as h:
        await fill_half_open(h, 2)
        started = h.stats.actors_started
        init = h.initiator()
        request = first_request(init)
        h.route(request)
        await trio.testing.wait_all_tasks_blocked()
        (reply,) = h.sent
        assert reply.remote == CLIENT and reply.local == SERVER
        assert reply.data[:8] == init.spi_i
        cookie = cookie_of(reply)
        jar: CookieSecrets = h.supervisor._cookies
        assert jar.check_cookie(cookie, init.spi_i, nonce_of(request), CLIENT[0],
                                trio.current_time())
        # nothing was kept for it
        assert h.stats.actors_started == started
        assert h.supervisor.actor_count == h.supervisor.half_open_count == 2
        assert h.supervisor.expiry_queue_length == 2
        assert h.stats.cookies_sent == 1


async def test_a_retry_with_the_cookie_gets_an_actor(setup: Setup) -> None:
    async with running(setup, cookie_threshold=2) as h:
        await fill_half_open(h, 2)
        init = h.initiator()
        request = first_request(init)
        h.route(request)
        (reply,) = h.sent
        h.sent.clear()
        h.route(with_cookie(request, cookie_of(reply)))
        await trio.testing.wait_all_tasks_blocked()
        (answer,) = h.sent
        spi_r = answer.data[8:16]
        assert spi_r != bytes(8)
        assert h.supervisor.actor_for(spi_r) is not None
        assert h.supervisor.half_open_count == 3
        assert h.stats.cookies_accepted == 1


@pytest.mark.parametrize("wrong", ["spi", "nonce", "address", "digest"])
async def test_a_wrong_cookie_is_dropped(setup: Setup, wrong: str) -> None:
    async with running(setup, cookie_threshold=1) as h:
        await fill_half_open(h, 1)
        request = first_request(h.initiator())
        h.route(request)
        cookie = cookie_of(h.sent.pop())
        client = CLIENT
        if wrong == "spi":
            request = with_spi(request, b"\x02" * 8)
        elif wrong == "nonce":
            other = first_request(h.initiator())  # same SPI, a fresh nonce
            assert nonce_of(other) != nonce_of(request)
            request = other
        elif wrong == "address":
            client = ("198.51.100.8", 500)
        else:
            cookie = cookie[:-1] + bytes([cookie[-1] ^ 0x80])
        h.route(with_cookie(request, cookie), client)
        await trio.testing.wait_all_tasks_blocked()
        assert h.sent == []  # no reply at all
        assert h.stats.dropped_bad_cookie == 1
        assert h.supervisor.half_open_count == 1
        assert h.stats.cookies_accepted == 0


async def test_a_cookie_of_a_retired_secret_gets_a_fresh_cookie(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(setup, cookie_threshold=1, half_open_timeout=100.0,
                       cookies=CookieSecrets(lifetime=5.0)) as h:
        await fill_half_open(h, 1)
        request = first_request(h.initiator())
        h.route(request)
        old = cookie_of(h.sent.pop())
        await trio.sleep(7.0)  # one rotation: still valid
        assert h.supervisor._cookies.check_cookie(
            old, request[:8], nonce_of(request), CLIENT[0], trio.current_time())
        await trio.sleep(5.0)  # two rotations: retired
        h.route(with_cookie(request, old))
        fresh = cookie_of(h.sent.pop())
        assert fresh != old
        assert h.stats.cookies_expired == 1 and h.stats.dropped_bad_cookie == 0
        h.route(with_cookie(request, fresh))
        await trio.testing.wait_all_tasks_blocked()
        assert h.stats.cookies_accepted == 1
        assert h.supervisor.half_open_count == 2


async def test_a_cookie_that_is_not_the_first_payload_is_no_cookie(setup: Setup) -> None:
    async with running(setup, cookie_threshold=1) as h:
        await fill_half_open(h, 1)
        request = first_request(h.initiator())
        h.route(request)
        cookie = cookie_of(h.sent.pop())
        decoded = decode_untrusted(request)
        header = decoded.header
        late = encode_plain(Message(header.spi_i, bytes(8), header.exchange, 0, False, True,
                                    [*decoded.payloads, NotifyPayload(NotifyType.COOKIE, cookie)]))
        h.route(late)
        await trio.testing.wait_all_tasks_blocked()
        cookie_of(h.sent.pop())  # asked again
        assert h.stats.cookies_sent == 2 and h.stats.cookies_accepted == 0
        assert h.supervisor.half_open_count == 1


async def test_below_the_threshold_a_request_with_a_cookie_is_processed(setup: Setup) -> None:
    async with running(setup, cookie_threshold=5) as h:
        request = first_request(h.initiator())
        h.route(with_cookie(request, b"\x00" * 36))  # not ours, but not asked for either
        await trio.testing.wait_all_tasks_blocked()
        (answer,) = h.sent
        assert answer.data[8:16] != bytes(8)
        assert h.stats.dropped_bad_cookie == 0 and h.supervisor.half_open_count == 1


async def test_a_request_without_nonce_over_the_threshold_is_dropped(setup: Setup) -> None:
    async with running(setup, cookie_threshold=1) as h:
        await fill_half_open(h, 1)
        decoded = decode_untrusted(first_request(h.initiator()))
        header = decoded.header
        no_nonce = [p for p in decoded.payloads if not isinstance(p, NoncePayload)]
        h.route(encode_plain(Message(header.spi_i, bytes(8), header.exchange, 0, False, True,
                                     no_nonce)))
        h.route(b"\x03" * 8 + bytes(8) + bytes([33, 0x20, 34, 0x08, 0, 0, 0, 0, 0, 0, 0, 32])
                + b"\x00\x00\x00\x04")  # a payload header that lies about its length
        assert h.sent == []
        assert h.stats.dropped_malformed == 2


async def test_our_initiator_completes_through_the_cookie_round_trip(setup: Setup) -> None:
    async with running(setup, cookie_threshold=1) as h:
        await fill_half_open(h, 1)
        init = h.initiator()
        event = await h.establish(init)
        assert event.spi_i == init.spi_i
        assert h.stats.cookies_sent == 1 and h.stats.cookies_accepted == 1
        # the request the responder accepted, and AUTH signed, carries the cookie first
        first = decode_untrusted(init.sa.init_request).payloads[0]
        assert isinstance(first, NotifyPayload) and first.notify_type == NotifyType.COOKIE
        assert any(isinstance(e, IkeSaEstablished) for e in h.events)
        assert h.supervisor.half_open_count == 1
        h.check_host_counters()


# --- half-open limits ------------------------------------------------------------------


async def test_per_address_block_threshold(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(setup, cookie_threshold=0, block_threshold=2, half_open_timeout=10.0) as h:
        template = first_request(h.initiator())
        for i in range(3):
            h.route(with_spi(template, bytes([i + 1]) * 8))
        await trio.testing.wait_all_tasks_blocked()
        assert len(h.sent) == 2  # the third got no reply
        assert h.stats.dropped_block_threshold == 1
        assert h.supervisor.half_open_hosts == {CLIENT[0]: 2}
        h.route(with_spi(template, b"\x04" * 8), ("198.51.100.9", 500))  # another address
        assert h.supervisor.half_open_count == 3
        await trio.sleep(11.0)  # both expire; the address may start again
        assert h.supervisor.half_open_hosts == {}
        h.route(with_spi(template, b"\x05" * 8))
        assert h.supervisor.half_open_hosts == {CLIENT[0]: 1}
        assert h.stats.dropped_block_threshold == 1


async def test_block_threshold_applies_to_cookie_holders_too(setup: Setup) -> None:
    async with running(setup, cookie_threshold=1, block_threshold=1) as h:
        await fill_half_open(h, 1, host_prefix="198.51.100.")  # 198.51.100.1 holds one
        request = first_request(h.initiator())
        client = ("198.51.100.1", 500)
        h.route(request, client)
        h.route(with_cookie(request, cookie_of(h.sent.pop())), client)
        assert h.stats.cookies_accepted == 1 and h.stats.dropped_block_threshold == 1
        assert h.supervisor.half_open_count == 1


async def test_init_limit_half_open_is_a_hard_cap(setup: Setup) -> None:
    async with running(setup, cookie_threshold=0, block_threshold=0,
                       init_limit_half_open=3) as h:
        template = first_request(h.initiator())
        for i in range(5):
            h.route(with_spi(template, bytes([i + 1]) * 8), (f"198.51.100.{i + 1}", 500))
        await trio.testing.wait_all_tasks_blocked()
        assert h.supervisor.half_open_count == 3 and len(h.sent) == 3
        assert h.stats.dropped_half_open_limit == 2


async def test_host_counters_follow_every_way_out_of_half_open(
    setup: Setup, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(setup, cookie_threshold=0, half_open_timeout=10.0) as h:
        # established
        await h.establish(h.initiator(b"\x01" * 8))
        assert h.supervisor.half_open_hosts == {}
        # refused: NO_PROPOSAL_CHOSEN closes the session at once
        h.to_responder(h.initiator(b"\x02" * 8, proposal="aes128gcm16-prfsha256-ecp256"))
        await trio.testing.wait_all_tasks_blocked()
        assert h.stats.actors_retired == 1 and h.supervisor.half_open_hosts == {}
        # expired
        h.to_responder(h.initiator(b"\x03" * 8))
        await trio.testing.wait_all_tasks_blocked()
        assert h.supervisor.half_open_hosts == {CLIENT[0]: 1}
        await trio.sleep(11.0)
        assert h.stats.half_open_expired == 1 and h.supervisor.half_open_hosts == {}
        # the actor failed
        original = IkeSession.receive_datagram_untrusted

        def explode(self: IkeSession, data: bytes, local: Address, remote: Address,
                    now: float) -> None:
            if data[:8] == b"\x04" * 8:
                raise RuntimeError("injected")
            original(self, data, local, remote, now)

        monkeypatch.setattr(IkeSession, "receive_datagram_untrusted", explode)
        h.to_responder(h.initiator(b"\x04" * 8))
        await trio.testing.wait_all_tasks_blocked()
        assert h.stats.actor_failures == 1 and h.supervisor.half_open_hosts == {}
        # still half-open when the supervisor is cancelled (shutdown)
        h.to_responder(h.initiator(b"\x05" * 8))
        await trio.testing.wait_all_tasks_blocked()
        assert h.supervisor.half_open_hosts == {CLIENT[0]: 1}
        supervisor = h.supervisor
    assert supervisor.half_open_hosts == {} and supervisor.half_open_count == 0


# --- notify rate -----------------------------------------------------------------------


async def test_cookie_replies_are_rate_limited_per_address(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(setup, cookie_threshold=1, notify_rate=5.0) as h:
        await fill_half_open(h, 1)
        template = first_request(h.initiator())
        for i in range(20):
            h.route(with_spi(template, bytes([i + 1]) * 8))
        assert h.stats.cookies_sent == 5 and h.stats.notifies_suppressed == 15
        h.route(with_spi(template, b"\x31" * 8), ("198.51.100.99", 500))  # its own bucket
        assert h.stats.cookies_sent == 6
        await trio.sleep(1.0)  # five more tokens
        for i in range(10):
            h.route(with_spi(template, bytes([i + 0x40]) * 8))
        assert h.stats.cookies_sent == 11 and h.stats.notifies_suppressed == 20
        assert len(h.sent) == 11


async def test_refusals_of_ike_sa_init_are_rate_limited(setup: Setup) -> None:
    async with running(setup, cookie_threshold=0, block_threshold=0, notify_rate=3.0) as h:
        for i in range(8):
            h.to_responder(h.initiator(bytes([i + 1]) * 8, proposal="aes128gcm16-prfsha256-ecp256"))
        await trio.testing.wait_all_tasks_blocked()
        assert h.stats.actors_started == 8 and h.stats.actors_retired == 8
        assert len(h.sent) == 3 and h.stats.notifies_suppressed == 5
        for d in h.sent:
            notify = decode_untrusted(d.data).payloads[0]
            assert isinstance(notify, NotifyPayload)
            assert notify.notify_type == NotifyType.NO_PROPOSAL_CHOSEN
        # a real response is never held back
        await h.establish(h.initiator(b"\x09" * 8))


async def test_notify_rate_zero_means_no_limit(setup: Setup) -> None:
    async with running(setup, cookie_threshold=1, notify_rate=0.0) as h:
        await fill_half_open(h, 1)
        template = first_request(h.initiator())
        for i in range(200):
            h.route(with_spi(template, i.to_bytes(8, "big")))
        assert h.stats.cookies_sent == 200 and h.stats.notifies_suppressed == 0
        assert h.supervisor.notify_buckets == 0


def test_notify_buckets_stay_bounded_with_ever_new_addresses() -> None:
    limiter = supervisor_module.NotifyLimiter(10.0, max_entries=100)
    for i in range(10_000):
        assert limiter.allow(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", now=i * 1e-4)
        assert len(limiter) <= 100
    # a busy address is limited while the table churns
    allowed = sum(limiter.allow("192.0.2.1", now=1.0) for _ in range(50))
    assert allowed == 10


def test_notify_limiter_infinite_rate_and_clock_skew() -> None:
    unlimited = supervisor_module.NotifyLimiter(math.inf)
    assert all(unlimited.allow("192.0.2.1", now=0.0) for _ in range(1000))
    assert len(unlimited) == 0
    limiter = supervisor_module.NotifyLimiter(2.0)
    assert limiter.allow("192.0.2.1", now=10.0) and limiter.allow("192.0.2.1", now=10.0)
    # an earlier `now` (another caller's clock) neither refills nor moves the bucket back
    assert not limiter.allow("192.0.2.1", now=9.0)
    assert not limiter.allow("192.0.2.1", now=10.2)
    assert limiter.allow("192.0.2.1", now=10.5)


# --- floods ----------------------------------------------------------------------------


def spoofed(rng: random.Random) -> Address:
    return (f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}", 500)


async def test_flood_of_spoofed_requests_keeps_the_tables_bounded(setup: Setup) -> None:
    """10,000 IKE_SA_INIT requests from random addresses with the default limits."""
    rng = random.Random(7)
    async with running(setup) as h:
        template = first_request(h.initiator())
        for i in range(10_000):
            h.route(with_spi(template, rng.randbytes(8)), spoofed(rng))
            if i % 500 == 499:
                await trio.testing.wait_all_tasks_blocked()  # let the actors answer
                h.sent.clear()
        await trio.testing.wait_all_tasks_blocked()
        sup = h.supervisor
        assert sup.half_open_count == DEFAULT_COOKIE_THRESHOLD
        assert sup.actor_count == DEFAULT_COOKIE_THRESHOLD
        assert sup.expiry_queue_length <= 3 * DEFAULT_COOKIE_THRESHOLD + EXPIRY_QUEUE_SLACK
        assert sum(sup.half_open_hosts.values()) == DEFAULT_COOKIE_THRESHOLD
        assert sup.notify_buckets <= NOTIFY_BUCKETS_MAX
        assert h.stats.actors_started == DEFAULT_COOKIE_THRESHOLD
        answered = h.stats.cookies_sent + h.stats.notifies_suppressed
        assert answered == 10_000 - DEFAULT_COOKIE_THRESHOLD
        assert h.stats.cookies_sent > 9_000  # random addresses: hardly any bucket runs dry
        h.check_host_counters()
        # and a legitimate peer still gets in, through the cookie round trip
        event = await h.establish(h.initiator(b"\x5a" * 8, client=("198.51.100.200", 500)))
        assert event.spi_i == b"\x5a" * 8
        assert h.stats.cookies_accepted == 1


async def test_flood_of_refused_requests_does_not_grow_the_expiry_queue(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    """Actors that end at once (NO_PROPOSAL_CHOSEN) leave the expiry queue, too.

    No cookies and no per-address limit here, so every request gets an actor.
    """
    rng = random.Random(11)
    async with running(setup, cookie_threshold=0, block_threshold=0, notify_rate=0) as h:
        template = first_request(h.initiator(proposal="aes128gcm16-prfsha256-ecp256"))
        longest = 0
        for i in range(10_000):
            h.route(with_spi(template, rng.randbytes(8)), spoofed(rng))
            longest = max(longest, h.supervisor.expiry_queue_length)
            if i % 100 == 99:
                await trio.testing.wait_all_tasks_blocked()
                h.sent.clear()
        await trio.testing.wait_all_tasks_blocked()
        assert h.stats.actors_started == 10_000 == h.stats.actors_retired
        assert h.supervisor.half_open_count == 0 and h.supervisor.half_open_hosts == {}
        # at most the actors of one batch are alive at an append, so:
        assert longest <= 2 * 100 + EXPIRY_QUEUE_SLACK + 1
        await trio.sleep(31.0)  # the expiry task drains what is left
        assert h.supervisor.expiry_queue_length == 0


# --- a node on loopback sockets ------------------------------------------------------------


async def test_node_answers_with_a_cookie_and_our_initiator_comes_through(
    setup: Setup, tmp_path: Path
) -> None:
    ike_port, natt_port = free_port_pair()
    path = write_responder_config(tmp_path, ("127.0.0.1",), ike_port, natt_port)
    text = path.read_text().replace("[ike]\n", "[ike]\ncookie_threshold = 1\n", 1)
    path.write_text(text)
    config = load_config(path)
    assert config.dos.cookie_threshold == 1
    async with trio.open_nursery() as nursery:
        node: Node = await nursery.start(functools.partial(run_node, config,
                                                           handle_signals=False))
        # one half-open SA: a request nobody follows up
        stranger = IkeSession.initiator(setup.connection, setup.initiator_policy, b"\x77" * 8,
                                        ("127.0.0.1", 1), ("127.0.0.1", ike_port), 0.0)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(first_request(stranger), ("127.0.0.1", ike_port))
            with trio.fail_after(5):
                while node.supervisor.half_open_count < 1:
                    await trio.sleep(0.01)
        peer = await InitiatorPeer.open(("127.0.0.1", ike_port), natt_port, setup.connection,
                                        setup.initiator_policy)
        try:
            event = await peer.establish(timeout=5.0)
        finally:
            peer.close()
        assert event.spi_i == peer.session.spi_i
        assert node.stats.cookies_sent == 1 and node.stats.cookies_accepted == 1
        assert node.stats.ike_sas_established == 1
        node.shutdown()


# --- configuration -------------------------------------------------------------------------


def load_with(tmp_path: Path, lines: str) -> DosConfig:
    path = write_responder_config(tmp_path, ("127.0.0.1",), 5000, 5001)
    path.write_text(path.read_text().replace("[ike]\n", f"[ike]\n{lines}\n", 1))
    return load_config(path).dos


def test_config_defaults_are_strongswans_and_the_supervisors(tmp_path: Path) -> None:
    dos = load_with(tmp_path, "")
    assert dos == DosConfig()
    assert dos.cookie_threshold == DEFAULT_COOKIE_THRESHOLD == 30
    assert dos.block_threshold == DEFAULT_BLOCK_THRESHOLD == 5
    assert dos.init_limit_half_open == 0
    assert dos.notify_rate == DEFAULT_NOTIFY_RATE


def test_config_reads_the_dos_keys(tmp_path: Path) -> None:
    dos = load_with(tmp_path, "cookie_threshold = 5\nblock_threshold = 0\n"
                              "init_limit_half_open = 1000\nnotify_rate = 12.5")
    assert dos == DosConfig(cookie_threshold=5, block_threshold=0, init_limit_half_open=1000,
                            notify_rate=12.5)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("cookie_threshold = -1", "ike.cookie_threshold: must not be negative"),
        ("block_threshold = -5", "ike.block_threshold: must not be negative"),
        ("init_limit_half_open = -2", "ike.init_limit_half_open: must not be negative"),
        ("cookie_threshold = 2.5", "ike.cookie_threshold: expected an integer, got a float"),
        ('block_threshold = "5"', "ike.block_threshold: expected an integer, got a string"),
        ("notify_rate = -1", "ike.notify_rate: must be a non-negative number"),
        ("notify_rate = nan", "ike.notify_rate: must be a non-negative number"),
        ("notify_rate = true", "ike.notify_rate: expected a number, got a boolean"),
        ("cookie_treshold = 5", "ike.cookie_treshold: unknown key (did you mean"),
    ],
)
def test_bad_dos_keys_fail_with_one_line(tmp_path: Path, line: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_with(tmp_path, line)
    text = str(info.value)
    assert message in text and "\n" not in text

