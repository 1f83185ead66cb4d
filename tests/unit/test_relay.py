"""The relay envelope: its documented layout, authentication, anti-replay, and robustness."""

from __future__ import annotations

import hmac
import struct

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.errors import ParseError
from cluster.relay import (
    DEFAULT_MAX_SKEW_NS,
    MAC_SIZE,
    MAX_ENVELOPE,
    MIN_ENVELOPE,
    Envelope,
    Kind,
    RelayCodec,
    derive_relay_key,
    overhead,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
T0 = 1_700_000_000_000_000_000  # ns
SECOND = 1_000_000_000
IKE = bytes.fromhex("00112233445566770000000000000000212022080000000000000100") + b"x" * 228
WORKER_LOCAL = ("192.0.2.10", 4500)
PEER = ("198.51.100.7", 61234)
WORKER_LOCAL6 = ("2001:db8::a", 500)
PEER6 = ("2001:db8:ffff::7", 500)


class FakeClock:
    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def _pair(
    clock: FakeClock | None = None, **kwargs: int
) -> tuple[RelayCodec, RelayCodec, FakeClock]:
    clock = clock or FakeClock()
    worker = RelayCodec(KEY, "worker-1", clock=clock, **kwargs)
    responder = RelayCodec(KEY, "responder-2", clock=clock, **kwargs)
    return worker, responder, clock


def _from_peer(worker: RelayCodec, recipient: str = "responder-2") -> bytes:
    return worker.encode(Kind.IKE_FROM_PEER, recipient, data=IKE, local=WORKER_LOCAL, remote=PEER)


def _seal(body: bytes, key: bytes = KEY) -> bytes:
    """What a member holding `key` would send: any body, correctly authenticated."""
    return body + hmac.digest(derive_relay_key(key), body, "sha256")[:MAC_SIZE]


def _header(kind: int, flags: int, sender: bytes, recipient: bytes, seq: int) -> bytes:
    fixed = struct.pack("!BBBBBQ", 1, kind, flags, len(sender), len(recipient), seq)
    return fixed + sender + recipient


# --- format and round trips ----------------------------------------------------------


def test_relay_key_is_hkdf_sha256_of_the_cluster_key_with_the_relay_label() -> None:
    expected = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"ike-cluster relay v1"
    ).derive(KEY)
    assert derive_relay_key(KEY) == expected
    assert derive_relay_key(KEY) != KEY
    with pytest.raises(ValueError):
        derive_relay_key(KEY[:31])
    with pytest.raises(ValueError):
        RelayCodec(b"short", "worker-1")


def test_ike_from_peer_has_the_documented_layout() -> None:
    worker, _, _ = _pair()
    sealed = _from_peer(worker)
    body = (
        _header(1, 0, b"worker-1", b"responder-2", T0)
        + b"\x04" + bytes([192, 0, 2, 10]) + (4500).to_bytes(2, "big")
        + b"\x04" + bytes([198, 51, 100, 7]) + (61234).to_bytes(2, "big")
        + IKE
    )
    assert sealed == _seal(body)


def test_ike_from_peer_round_trips_with_worker_id_and_both_addresses() -> None:
    worker, responder, _ = _pair()
    env = responder.decode_untrusted(_from_peer(worker))
    assert env == Envelope(Kind.IKE_FROM_PEER, "worker-1", "responder-2", T0, IKE,
                           WORKER_LOCAL, PEER)
    assert responder.accepted == 1
    assert responder.drops.total() == 0


@pytest.mark.parametrize(("local", "remote"), [
    (WORKER_LOCAL6, PEER6), (WORKER_LOCAL, PEER6), (("::ffff:192.0.2.1", 1), ("::1", 65535)),
])
def test_ike_to_peer_round_trips_ipv4_and_ipv6_addresses(
    local: tuple[str, int], remote: tuple[str, int]
) -> None:
    worker, responder, _ = _pair()
    sealed = responder.encode(Kind.IKE_TO_PEER, "worker-1", data=IKE, local=local, remote=remote)
    env = worker.decode_untrusted(sealed)
    assert (env.kind, env.sender, env.recipient) == (Kind.IKE_TO_PEER, "responder-2", "worker-1")
    assert (env.data, env.local, env.remote, env.keepalive) == (IKE, local, remote, False)


def test_ike_to_peer_carries_the_nat_keepalive_flag() -> None:
    worker, responder, _ = _pair()
    sealed = responder.encode(Kind.IKE_TO_PEER, "worker-1", data=b"\xff", local=WORKER_LOCAL,
                              remote=PEER, keepalive=True)
    assert sealed[2] == 0x01
    env = worker.decode_untrusted(sealed)
    assert env.keepalive and env.data == b"\xff"


def test_ping_and_pong_round_trip_and_pong_echoes_the_ping_seq() -> None:
    worker, responder, clock = _pair()
    ping = responder.decode_untrusted(worker.encode(Kind.PING, "responder-2"))
    assert (ping.kind, ping.sender, ping.data, ping.local) == (Kind.PING, "worker-1", b"", ("", 0))
    assert len(worker.encode(Kind.PING, "responder-2")) == MIN_ENVELOPE - 2 + 8 + 11
    clock.now += 5
    pong = worker.decode_untrusted(responder.encode(Kind.PONG, "worker-1", echo=ping.seq))
    assert (pong.kind, pong.echo) == (Kind.PONG, T0)


def test_overhead_is_62_bytes_over_ipv4_and_86_over_ipv6_for_these_ids() -> None:
    worker, _, _ = _pair()
    assert len(_from_peer(worker)) - len(IKE) == overhead("worker-1", "responder-2") == 62
    v6 = worker.encode(Kind.IKE_FROM_PEER, "responder-2", data=IKE, local=WORKER_LOCAL6,
                       remote=PEER6)
    assert len(v6) - len(IKE) == overhead("worker-1", "responder-2", ipv6=True) == 86


def test_sequence_numbers_strictly_increase_when_the_clock_stands_still_or_steps_back() -> None:
    worker, _, clock = _pair()
    seqs = [struct.unpack_from("!Q", worker.encode(Kind.PING, "r"), 5)[0] for _ in range(3)]
    clock.now -= SECOND
    seqs.append(struct.unpack_from("!Q", worker.encode(Kind.PING, "r"), 5)[0])
    clock.now += 10 * SECOND
    seqs.append(struct.unpack_from("!Q", worker.encode(Kind.PING, "r"), 5)[0])
    assert seqs == [T0, T0 + 1, T0 + 2, T0 + 3, T0 + 9 * SECOND]


@pytest.mark.parametrize("call", [
    lambda c: c.encode(Kind.IKE_FROM_PEER, "r", data=IKE, local=("not-an-ip", 1), remote=PEER),
    lambda c: c.encode(Kind.IKE_FROM_PEER, "r", data=IKE, local=("fe80::1%eth0", 1), remote=PEER),
    lambda c: c.encode(Kind.IKE_FROM_PEER, "r", data=IKE, local=("192.0.2.1", 70000), remote=PEER),
    lambda c: c.encode(Kind.IKE_FROM_PEER, "r", data=b"", local=WORKER_LOCAL, remote=PEER),
    lambda c: c.encode(Kind.IKE_FROM_PEER, "r", data=IKE, local=WORKER_LOCAL),
    lambda c: c.encode(Kind.IKE_FROM_PEER, "r", data=IKE, local=WORKER_LOCAL, remote=PEER,
                       keepalive=True),
    lambda c: c.encode(Kind.PING, "r", data=IKE),
    lambda c: c.encode(Kind.PING, ""),
    lambda c: c.encode(Kind.PING, "r" * 65),
    lambda c: c.encode(99, "r"),
    lambda c: c.encode(Kind.IKE_TO_PEER, "r", local=WORKER_LOCAL, remote=PEER,
                       data=b"x" * (MAX_ENVELOPE - overhead("worker-1", "r") + 1)),
], ids=["hostname", "scoped-v6", "port", "no-data", "no-remote", "keepalive-from-peer",
        "ping-data", "empty-id", "long-id", "kind", "oversize"])
def test_encode_refuses_arguments_that_do_not_fit_with_value_error(call: object) -> None:
    worker, _, _ = _pair()
    with pytest.raises(ValueError):
        call(worker)  # type: ignore[operator]


def test_the_largest_envelope_fits_one_udp_datagram() -> None:
    worker, _, _ = _pair()
    size = MAX_ENVELOPE - overhead("worker-1", "r")
    sealed = worker.encode(Kind.IKE_TO_PEER, "r", local=WORKER_LOCAL, remote=PEER,
                           data=b"x" * size)
    assert len(sealed) == MAX_ENVELOPE == 65507


# --- authentication -------------------------------------------------------------------


def test_an_envelope_sealed_with_another_key_is_refused_and_counted() -> None:
    clock = FakeClock()
    forger = RelayCodec(OTHER_KEY, "worker-1", clock=clock)
    _, responder, _ = _pair(clock)
    for _ in range(3):
        with pytest.raises(ParseError):
            responder.decode_untrusted(_from_peer(forger))
    assert responder.drops.bad_mac == 3
    assert responder.drops.total() == 3
    assert responder.accepted == 0


def test_every_flipped_bit_is_refused_and_counted() -> None:
    worker, responder, _ = _pair()
    sealed = _from_peer(worker)
    attempts = 0
    for i in range(len(sealed)):
        for bit in (0x01, 0x80):
            forged = bytearray(sealed)
            forged[i] ^= bit
            with pytest.raises(ParseError):
                responder.decode_untrusted(bytes(forged))
            attempts += 1
    assert responder.drops.bad_version == 2  # byte 0
    assert responder.drops.bad_mac == attempts - 2
    assert responder.accepted == 0
    responder.decode_untrusted(sealed)  # the genuine one was not burnt by the forgeries
    assert responder.accepted == 1


def test_every_truncation_is_refused_and_counted() -> None:
    worker, responder, _ = _pair()
    sealed = _from_peer(worker)
    for n in range(len(sealed)):
        with pytest.raises(ParseError):
            responder.decode_untrusted(sealed[:n])
    # Shorter than the smallest envelope: truncated; longer: the tag no longer matches.
    assert responder.drops.truncated == MIN_ENVELOPE
    assert responder.drops.bad_mac == len(sealed) - MIN_ENVELOPE
    assert responder.drops.total() == len(sealed)
    assert responder.accepted == 0


class Ring:
    """A key ring as the store's ClusterKey is one: the first key seals, all open."""

    def __init__(self, *secrets: bytes) -> None:
        self.secrets = secrets

    def derive_each(self, label: bytes, length: int = 32) -> tuple[bytes, ...]:
        return tuple(
            HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=label).derive(s)
            for s in self.secrets
        )


def test_during_a_key_rotation_the_new_key_seals_and_both_open() -> None:
    clock = FakeClock()
    rotated = RelayCodec(Ring(KEY, OTHER_KEY), "responder-2", clock=clock)
    on_old = RelayCodec(OTHER_KEY, "worker-1", clock=clock)
    on_new = RelayCodec(KEY, "worker-2", clock=clock)
    rotated.decode_untrusted(_from_peer(on_old))
    rotated.decode_untrusted(_from_peer(on_new))
    ping = rotated.encode(Kind.PING, "worker-2")
    assert on_new.decode_untrusted(ping).sender == "responder-2"
    with pytest.raises(ParseError):
        RelayCodec(OTHER_KEY, "worker-2", clock=clock).decode_untrusted(ping)
    stranger = RelayCodec(bytes(range(2, 34)), "worker-3", clock=clock)
    with pytest.raises(ParseError):
        rotated.decode_untrusted(_from_peer(stranger))
    assert (rotated.accepted, rotated.drops.bad_mac) == (2, 1)


def test_an_unknown_version_is_refused_before_anything_else() -> None:
    _, responder, _ = _pair()
    with pytest.raises(ParseError):
        responder.decode_untrusted(b"\x02" + bytes(100))
    assert responder.drops.bad_version == 1


# --- authentic but wrong ----------------------------------------------------------------


@pytest.mark.parametrize(("body", "reason"), [
    (_header(9, 0, b"w", b"responder-2", T0), "unknown_kind"),
    (_header(3, 1, b"w", b"responder-2", T0), "malformed"),  # keepalive on PING
    (_header(2, 2, b"w", b"responder-2", T0), "malformed"),  # unknown flag
    (_header(3, 0, b"w", b"responder-2", T0) + b"\x00", "malformed"),  # trailing byte
    (_header(4, 0, b"w", b"responder-2", T0) + b"\x00" * 7, "malformed"),  # short echo
    (_header(3, 0, b"", b"responder-2", T0), "malformed"),  # empty sender
    (_header(3, 0, b"\xff", b"responder-2", T0), "malformed"),  # not UTF-8
    (_header(3, 0, b"w", b"responder-2", T0)[:-2], "malformed"),  # recipient overruns
    (_header(1, 0, b"w", b"responder-2", T0) + b"\x05" + bytes(6) + b"\x04" + bytes(6) + b"x",
     "malformed"),  # address family 5
    (_header(1, 0, b"w", b"responder-2", T0) + b"\x04" + bytes(6) + b"\x06" + bytes(18),
     "malformed"),  # no datagram
    (_header(3, 0, b"w", b"responder-1", T0), "wrong_recipient"),
])
def test_authentic_envelopes_that_are_wrong_are_refused_by_reason(body: bytes, reason: str) -> None:
    _, responder, _ = _pair()
    with pytest.raises(ParseError):
        responder.decode_untrusted(_seal(body))
    assert getattr(responder.drops, reason) == 1
    assert responder.drops.total() == 1


def test_an_envelope_is_not_accepted_by_another_recipient_nor_reflected_to_its_sender() -> None:
    worker, responder, clock = _pair()
    other = RelayCodec(KEY, "responder-3", clock=clock)
    sealed = _from_peer(worker)
    for node in (other, worker):
        with pytest.raises(ParseError):
            node.decode_untrusted(sealed)
        assert node.drops.wrong_recipient == 1
    responder.decode_untrusted(sealed)


# --- anti-replay ----------------------------------------------------------------------


def test_a_replayed_envelope_is_refused_and_counted() -> None:
    worker, responder, clock = _pair()
    sealed = _from_peer(worker)
    responder.decode_untrusted(sealed)
    clock.now += SECOND
    for _ in range(2):
        with pytest.raises(ParseError):
            responder.decode_untrusted(sealed)
    assert responder.drops.replayed == 2
    assert responder.accepted == 1


def test_reordering_inside_the_window_is_accepted_once_each() -> None:
    worker, responder, _ = _pair()
    first, second, third = (_from_peer(worker) for _ in range(3))
    for sealed in (third, first, second):
        responder.decode_untrusted(sealed)
    for sealed in (first, second, third):
        with pytest.raises(ParseError):
            responder.decode_untrusted(sealed)
    assert (responder.accepted, responder.drops.replayed) == (3, 3)


def test_senders_are_told_apart_by_id() -> None:
    clock = FakeClock()
    _, responder, _ = _pair(clock)
    a = RelayCodec(KEY, "worker-a", clock=clock)
    b = RelayCodec(KEY, "worker-b", clock=clock)
    responder.decode_untrusted(_from_peer(a))
    responder.decode_untrusted(_from_peer(b))  # the same seq T0, another sender
    assert responder.accepted == 2


def test_the_window_bounds_memory_and_refuses_what_fell_below_it() -> None:
    worker, responder, clock = _pair(window=8)
    withheld = _from_peer(worker)
    for _ in range(100):
        clock.now += 1000
        responder.decode_untrusted(_from_peer(worker))
    assert len(responder._senders["worker-1"].seen) <= 8  # bounded per sender
    with pytest.raises(ParseError):
        responder.decode_untrusted(withheld)  # never seen, but older than the window
    assert responder.drops.replayed == 1


def test_envelopes_outside_the_clock_window_are_stale() -> None:
    worker, responder, clock = _pair()
    old = _from_peer(worker)
    clock.now += DEFAULT_MAX_SKEW_NS + 1
    with pytest.raises(ParseError):
        responder.decode_untrusted(old)
    future = RelayCodec(KEY, "worker-9", clock=FakeClock(clock.now + DEFAULT_MAX_SKEW_NS + 1))
    with pytest.raises(ParseError):
        responder.decode_untrusted(_from_peer(future))
    skewed = RelayCodec(KEY, "worker-8", clock=FakeClock(clock.now + DEFAULT_MAX_SKEW_NS))
    responder.decode_untrusted(_from_peer(skewed))  # at the edge of the skew allowed
    assert (responder.drops.stale, responder.accepted) == (2, 1)


def test_a_restarted_receiver_refuses_what_was_sealed_for_its_predecessor() -> None:
    worker, responder, clock = _pair()
    sealed = _from_peer(worker)
    responder.decode_untrusted(sealed)
    clock.now += SECOND
    restarted = RelayCodec(KEY, "responder-2", clock=clock)
    with pytest.raises(ParseError):
        restarted.decode_untrusted(sealed)
    assert restarted.drops.stale == 1
    restarted.decode_untrusted(_from_peer(worker))


def test_the_sender_table_is_bounded_and_forgets_only_silent_senders() -> None:
    clock = FakeClock()
    _, responder, _ = _pair(clock, max_senders=2)
    codecs = [RelayCodec(KEY, f"worker-{i}", clock=clock) for i in range(3)]
    early = [_from_peer(c) for c in codecs]
    responder.decode_untrusted(early[0])
    responder.decode_untrusted(early[1])
    with pytest.raises(ParseError):
        responder.decode_untrusted(early[2])  # both others still active
    assert responder.drops.too_many_senders == 1
    clock.now += DEFAULT_MAX_SKEW_NS + 1
    responder.decode_untrusted(_from_peer(codecs[2]))  # the silent two were forgotten...
    assert responder.senders_tracked == 1
    with pytest.raises(ParseError):
        responder.decode_untrusted(early[0])  # ...and their old envelopes are still refused
    assert responder.drops.stale == 1


# --- fuzz -----------------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_parse_error(data: bytes) -> None:
    _, responder, _ = _pair()
    with pytest.raises(ParseError):
        responder.decode_untrusted(data)
    assert responder.drops.total() == 1


@settings(max_examples=1000, deadline=None)
@given(
    kind=st.integers(0, 255), flags=st.integers(0, 255),
    sender_len=st.integers(0, 255), recipient_len=st.integers(0, 255),
    seq=st.integers(0, 2**64 - 1), rest=st.binary(max_size=120),
)
def test_authentic_random_bodies_raise_only_parse_error(
    kind: int, flags: int, sender_len: int, recipient_len: int, seq: int, rest: bytes
) -> None:
    # Past the MAC, as a member with a bug (or a newer version) would send.
    _, responder, _ = _pair()
    body = struct.pack("!BBBBBQ", 1, kind, flags, sender_len, recipient_len, seq) + rest
    try:
        env = responder.decode_untrusted(_seal(body))
    except ParseError:
        assert responder.drops.total() == 1
    else:
        assert env.recipient == "responder-2"
        assert responder.accepted == 1


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_envelopes_raise_only_parse_error(data: st.DataObject) -> None:
    worker, responder, _ = _pair()
    sealed = bytearray(_from_peer(worker))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(sealed) - 1))
        sealed[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(sealed)))
    try:
        responder.decode_untrusted(bytes(sealed[:cut]))
    except ParseError:
        assert responder.drops.total() == 1
    else:
        assert bytes(sealed[:cut]) == _from_peer(RelayCodec(KEY, "worker-1", clock=FakeClock()))


def test_child_limit_round_trips_and_refuses_bad_bodies() -> None:
    from cluster.relay import LIMIT_EXPIRED, LIMIT_HARD, LIMIT_SOFT, child_limit, parse_child_limit

    worker, responder, _ = _pair()
    for limit in (LIMIT_SOFT, LIMIT_HARD, LIMIT_EXPIRED):
        body = child_limit(b"i" * 8, b"r" * 8, b"\x01\x02\x03\x04", limit)
        envelope = responder.decode_untrusted(worker.encode(Kind.CHILD_LIMIT, "responder-2",
                                                            data=body))
        assert envelope.kind is Kind.CHILD_LIMIT and envelope.sender == "worker-1"
        assert parse_child_limit(envelope.data) == (b"i" * 8, b"r" * 8, b"\x01\x02\x03\x04",
                                                    limit)
    with pytest.raises(ValueError):
        child_limit(b"i" * 8, b"r" * 8, b"\x01\x02\x03\x04", 4)
    with pytest.raises(ValueError):
        worker.encode(Kind.CHILD_LIMIT, "responder-2", data=body[:-1])
    with pytest.raises(ValueError):
        worker.encode(Kind.CHILD_LIMIT, "responder-2", data=body, local=WORKER_LOCAL,
                      remote=PEER)
    with pytest.raises(ParseError):  # a limit no version defines, from an authentic member
        responder.decode_untrusted(_seal(_header(5, 0, b"w", b"responder-2", T0) + body[:-1]
                                         + b"\x04"))
    assert responder.drops.malformed == 1


@pytest.mark.parametrize("kind", [Kind.CHILD_TRAFFIC, Kind.CHILD_USAGE])
def test_child_traffic_round_trips_and_refuses_bad_bodies(kind: Kind) -> None:
    from cluster.relay import child_traffic, parse_child_traffic

    worker, responder, _ = _pair()
    traffic = (2**40 + 3, 7, 11, 2**33)
    body = child_traffic(b"i" * 8, b"r" * 8, b"\x01\x02\x03\x04", traffic)
    envelope = responder.decode_untrusted(worker.encode(kind, "responder-2", data=body))
    assert envelope.kind is kind and envelope.sender == "worker-1"
    assert parse_child_traffic(envelope.data) == (b"i" * 8, b"r" * 8, b"\x01\x02\x03\x04",
                                                  traffic)
    with pytest.raises(ValueError):
        worker.encode(kind, "responder-2", data=body[:-1])
    with pytest.raises(ValueError):
        worker.encode(kind, "responder-2", data=body, local=WORKER_LOCAL, remote=PEER)


def test_child_active_round_trips_and_refuses_bad_bodies() -> None:
    from cluster.relay import ACTIVE_MAX, child_active, parse_child_active

    worker, responder, _ = _pair()
    spis = [n.to_bytes(4, "big") for n in range(1, ACTIVE_MAX + 1)]
    for some in (spis[:1], spis):
        envelope = responder.decode_untrusted(
            worker.encode(Kind.CHILD_ACTIVE, "responder-2", data=child_active(some)))
        assert envelope.kind is Kind.CHILD_ACTIVE and parse_child_active(envelope.data) == some
    for bad in (b"", b"\x00" * 5, b"\x00" * 4 * (ACTIVE_MAX + 1)):
        with pytest.raises(ValueError):
            worker.encode(Kind.CHILD_ACTIVE, "responder-2", data=bad)
        # one a member forged (authentic, with a sequence number of its own)
        with pytest.raises(ParseError):
            responder.decode_untrusted(_seal(_header(8, 0, b"w", b"responder-2", T0) + bad))
    assert responder.drops.malformed == 3
