"""What the node fuzzer sends: bursts of datagrams, one strategy per burst.

The generator never touches the node. The driver tells it about the SAs it holds keys
for (`LiveSa`, refreshed before every burst with the message ID the responder expects
and the request the responder has outstanding) and the cookies the node handed out;
it answers with `Shot`s for the driver to send.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cluster.ike.constants import (
    NON_ESP_MARKER,
    ExchangeType,
    Flag,
    NotifyType,
    PayloadType,
    ProtocolId,
)
from cluster.ike.payloads import DeletePayload, NotifyPayload, Payload, encode_payloads, type_of
from cluster.ike.session import Address

from .mutations import (
    INTERESTING_U32,
    Chain,
    SaKeys,
    Seeds,
    Segment,
    corrupt_message_length,
    fix_length,
    flip_bits,
    join_chain,
    message_chain,
    mutate_bytes,
    mutate_chain,
    rewrite_header,
    seal,
    seal_fragment,
    splice,
    split_chain,
    truncate,
)

# Relative frequencies. The keyed strategies (resealed, fragments) reach past the ICV,
# where most of the parsing and state lives, so they get the largest share.
WEIGHTS: dict[str, int] = {
    "bitflip": 8,
    "bytes": 8,
    "truncate": 4,
    "length": 7,
    "splice": 7,
    "live_header": 8,
    "resealed": 24,
    "fragments": 6,
    "natt": 6,
    "init_flood": 3,
    "spoofed_flood": 3,
    "cookie_echo": 3,
    "random": 2,
}
# Spoofed sources stay on loopback: the node's answers must not leave the machine.
SPOOF_NET = "127.{}.{}.{}"
# what a peer may answer our requests with instead of doing them
REFUSALS = (NotifyType.TEMPORARY_FAILURE, NotifyType.INVALID_KE_PAYLOAD,
            NotifyType.CHILD_SA_NOT_FOUND, NotifyType.NO_PROPOSAL_CHOSEN,
            NotifyType.INVALID_SYNTAX, NotifyType.AUTHENTICATION_FAILED, 16, 47, 9999)
REQUEST = int(Flag.INITIATOR)
RESPONSE = int(Flag.INITIATOR | Flag.RESPONSE)


@dataclass(frozen=True, slots=True)
class Shot:
    strategy: str
    data: bytes
    natt: bool = False  # to the NAT-T port; `data` carries the non-ESP marker when it should
    source: int = 0  # which of the driver's sockets sends it (modulo their number)
    spoofed: Address | None = None  # handed to route_untrusted as coming from here instead


@dataclass
class LiveSa:
    """An IKE SA (or a half-open one) whose initiator keys the driver holds."""

    keys: SaKeys
    auth: Chain | None  # half-open: the IKE_AUTH body our initiator would have sent
    children: tuple[bytes, ...] = ()  # our inbound Child SA SPIs (what our Delete names)
    established: bool = False
    next_id: int = 1  # the request message ID the responder expects next
    pending: tuple[int, int] | None = None  # the responder's outstanding request


@dataclass(frozen=True, slots=True)
class Cookie:
    """A COOKIE the node sent in answer to one of our IKE_SA_INIT requests."""

    request: bytes
    cookie: bytes
    source: int


class ShotMaker:
    def __init__(self, rng: random.Random, seeds: Seeds, sockets: int,
                 weights: dict[str, int] | None = None) -> None:
        self.rng = rng
        self.seeds = seeds
        self.sockets = sockets
        weights = weights if weights is not None else WEIGHTS
        self._names = [n for n, w in weights.items() if w > 0]
        self._weights = [weights[n] for n in self._names]
        self.counts: Counter[str] = Counter()
        self._makers: dict[str, Callable[[Sequence[LiveSa], Sequence[LiveSa],
                                          Sequence[Cookie]], list[Shot]]] = {
            "bitflip": self._bitflip, "bytes": self._bytes, "truncate": self._truncate,
            "length": self._length, "splice": self._splice, "live_header": self._live_header,
            "resealed": self._resealed, "fragments": self._fragments, "natt": self._natt,
            "init_flood": self._init_flood, "spoofed_flood": self._spoofed_flood,
            "cookie_echo": self._cookie_echo, "random": self._random,
        }
        self._recent_inits: deque[tuple[bytes, int]] = deque(maxlen=32)

    def burst(self, live: Sequence[LiveSa], witnesses: Sequence[LiveSa],
              cookies: Sequence[Cookie]) -> list[Shot]:
        """The next few datagrams. `witnesses` only ever get unauthenticated ones."""
        name = self.rng.choices(self._names, self._weights)[0]
        shots = self._makers[name](live, witnesses, cookies)
        self.counts.update(s.strategy for s in shots)
        return shots

    # --- helpers -------------------------------------------------------------------------

    def _source(self) -> int:
        return self.rng.randrange(self.sockets)

    def _seed(self) -> bytes:
        return self.rng.choice(self.seeds.datagrams)

    def _maybe_fix(self, data: bytes) -> bytes:
        return fix_length(data) if self.rng.random() < 0.6 else data

    def _plain(self, name: str, data: bytes) -> list[Shot]:
        """To the IKE port, or to the NAT-T port behind the marker."""
        if self.rng.random() < 0.2:
            return [Shot(name, NON_ESP_MARKER + data, True, self._source())]
        return [Shot(name, data, False, self._source())]

    def _message_id(self, sa: LiveSa) -> int:
        r = self.rng.random()
        if r < 0.8:
            return sa.next_id
        if r < 0.87:
            return max(sa.next_id - 1, 0)  # the retransmission path
        if r < 0.94:
            return sa.next_id + self.rng.randint(1, 3)
        return self.rng.choice(INTERESTING_U32)

    # --- unauthenticated -----------------------------------------------------------------

    def _bitflip(self, *_args: object) -> list[Shot]:
        return self._plain("bitflip", self._maybe_fix(flip_bits(self.rng, self._seed())))

    def _bytes(self, *_args: object) -> list[Shot]:
        return self._plain("bytes", self._maybe_fix(mutate_bytes(self.rng, self._seed())))

    def _truncate(self, *_args: object) -> list[Shot]:
        return self._plain("truncate", self._maybe_fix(truncate(self.rng, self._seed())))

    def _length(self, *_args: object) -> list[Shot]:
        return self._plain("length", corrupt_message_length(self.rng, self._seed()))

    def _splice(self, *_args: object) -> list[Shot]:
        rng = self.rng
        if rng.random() < 0.6:  # a new IKE_SA_INIT request made of parts of others
            base = rng.choice(self.seeds.init_requests)
            donors = [message_chain(d) for d in self.seeds.init_requests]
            donors += [message_chain(self._seed()), rng.choice(self.seeds.chains)]
            header = rewrite_header(base, spi_i=rng.randbytes(8))
        else:
            header = self._seed()
            donors = [message_chain(self._seed()) for _ in range(3)]
        chain = splice(rng, donors)
        data = header[:16] + bytes([chain.first]) + header[17:28] + chain.data
        return self._plain("splice", self._maybe_fix(data))

    def _random(self, *_args: object) -> list[Shot]:
        rng = self.rng
        if rng.random() < 0.5:
            return self._plain("random", rng.randbytes(rng.randint(0, 120)))
        data = rewrite_header(self._seed()[:28], message_id=rng.randrange(1 << 32))
        return self._plain("random", fix_length(data + rng.randbytes(rng.randint(0, 200))))

    def _live_header(self, live: Sequence[LiveSa], witnesses: Sequence[LiveSa],
                     _: object) -> list[Shot]:
        """A live SA's SPIs on bytes nobody authenticated: nothing may change."""
        rng = self.rng
        targets = [*live, *witnesses]
        if not targets:
            return self._bitflip()
        sa = rng.choice(targets)
        seed = rng.choice((*self.seeds.datagrams, *self.seeds.fragments))
        flags = REQUEST if rng.random() < 0.8 else rng.choice((RESPONSE, 0, Flag.RESPONSE))
        spi_r = sa.keys.spi_r if rng.random() < 0.9 else bytes(8)
        data = rewrite_header(seed, spi_i=sa.keys.spi_i, spi_r=spi_r, flags=flags,
                              message_id=self._message_id(sa))
        if rng.random() < 0.3:
            data = mutate_bytes(rng, data)
        return self._plain("live_header", self._maybe_fix(data))

    def _natt(self, *_args: object) -> list[Shot]:
        """Non-ESP marker games on the NAT-T port (RFC 3948 2.2, 2.3)."""
        rng = self.rng
        seed = self._seed()
        variant = rng.randrange(10)
        if variant == 0:
            data = b"\xff"  # a NAT keepalive
        elif variant == 1:
            data = rng.choice((b"", b"\x00", b"\xff\xff", b"\xff" * 8, NON_ESP_MARKER,
                               NON_ESP_MARKER[:3], b"\x00\x00\x00\x00\xff"))
        elif variant == 2:
            data = seed  # IKE without the marker: taken for ESP
        elif variant == 3:
            data = NON_ESP_MARKER + NON_ESP_MARKER + seed
        elif variant == 4:
            data = b"\x00\x00\x00" + bytes([rng.randint(1, 255)]) + seed  # ESP, SPI < 256
        elif variant == 5:
            data = rng.randbytes(4) + rng.randbytes(rng.randint(0, 80))  # ESP-like
        elif variant == 6:
            data = NON_ESP_MARKER + mutate_bytes(rng, seed)
        elif variant == 7:
            data = NON_ESP_MARKER + rng.randbytes(rng.randint(0, 40))
        else:
            data = NON_ESP_MARKER + seed
        return [Shot("natt", data, True, self._source())]

    def _init_request(self) -> bytes:
        rng = self.rng
        # ours (x25519) mostly: the recorded MODP-2048 ones cost the node a millisecond each
        seed = self.seeds.init_requests[0] if rng.random() < 0.7 else rng.choice(
            self.seeds.init_requests)
        data = rewrite_header(seed, spi_i=rng.randbytes(8))
        if rng.random() < 0.15:
            data = fix_length(mutate_bytes(rng, data, 1))
        return data

    def _init_flood(self, *_args: object) -> list[Shot]:
        rng = self.rng
        if self._recent_inits and rng.random() < 0.2:  # retransmitted: the same half-open SA
            data, source = rng.choice(self._recent_inits)
            return [Shot("init_flood", data, False, source)]
        source = self._source()
        shots = [Shot("init_flood", self._init_request(), False, source)
                 for _ in range(rng.randint(1, 4))]
        self._recent_inits.extend((s.data, source) for s in shots)
        return shots

    def _spoofed_flood(self, *_args: object) -> list[Shot]:
        rng = self.rng
        shots = []
        for _ in range(rng.randint(1, 4)):
            host = SPOOF_NET.format(rng.randint(64, 127), rng.randrange(256),
                                    rng.randint(1, 254))
            shots.append(Shot("spoofed_flood", self._init_request(), False, 0,
                              (host, rng.randint(1024, 65535))))
        return shots

    def _cookie_echo(self, _: object, __: object, cookies: Sequence[Cookie]) -> list[Shot]:
        """RFC 7296 2.6: the request again with the node's cookie, honest or not."""
        rng = self.rng
        if not cookies:
            return self._init_flood()
        c = rng.choice(cookies)
        chain = message_chain(c.request)
        cookie = c.cookie
        spi_i = c.request[:8]
        variant = rng.randrange(8)
        if variant == 4:
            cookie = mutate_bytes(rng, cookie, 1)  # forged
        elif variant == 5:
            spi_i = rng.randbytes(8)  # made for another request
        notify = Chain(41, encode_payloads([NotifyPayload(NotifyType.COOKIE, cookie)]))
        if variant == 6:
            body = _join(chain, notify)  # not first: no cookie at all
        elif variant == 7:
            body = _join(notify, notify, chain)  # twice
        else:
            body = _join(notify, chain)
        data = fix_length(rewrite_header(c.request[:16] + bytes([body.first]) + c.request[17:28],
                                         spi_i=spi_i) + body.data)
        return [Shot("cookie_echo", data, False, c.source)]

    # --- past the integrity check ---------------------------------------------------------

    def _target(self, live: Sequence[LiveSa]) -> LiveSa:
        """A live SA; often one waiting for our answer, which is rare and short-lived."""
        waiting = [sa for sa in live if sa.pending is not None]
        if waiting and self.rng.random() < 0.5:
            return self.rng.choice(waiting)
        return self.rng.choice(live)

    def _plan(self, sa: LiveSa) -> tuple[int, int, Chain, bool]:
        """(exchange, message ID, plaintext, is a response) for a keyed message to `sa`."""
        rng = self.rng
        seeds = self.seeds
        if not sa.established and sa.auth is not None:
            r = rng.random()
            if r < 0.6:
                chain = mutate_chain(rng, sa.auth, seeds.chains)
            elif r < 0.85:
                chain = splice(rng, (sa.auth, *seeds.chains_of(ExchangeType.IKE_AUTH)))
            elif r < 0.97:
                chain = rng.choice(seeds.chains)
            else:
                chain = sa.auth  # the SA comes up; later bursts reach it established
            return ExchangeType.IKE_AUTH, self._message_id(sa), chain, False
        if sa.pending is not None and rng.random() < 0.7:
            exchange, message_id = sa.pending
            donors = seeds.chains_of(exchange, True) or seeds.chains
            r = rng.random()
            if r < 0.25:
                chain = Chain(0, b"")  # what an empty INFORMATIONAL response looks like
            elif r < 0.4:  # a refusal (RFC 7296 3.10.1), with or without its data
                kind = rng.choice(REFUSALS)
                data = (rng.choice((19, 31, 14, 2, 0)).to_bytes(2, "big")
                        if kind == NotifyType.INVALID_KE_PAYLOAD and rng.random() < 0.8 else b"")
                chain = _chain([NotifyPayload(kind, data)])
            elif r < 0.6:
                chain = rng.choice(donors)
            else:
                chain = mutate_chain(rng, rng.choice(donors), seeds.chains)
            return exchange, message_id, chain, True
        exchange = rng.choices(
            (ExchangeType.INFORMATIONAL, ExchangeType.CREATE_CHILD_SA, ExchangeType.IKE_AUTH,
             ExchangeType.IKE_SA_INIT, rng.randrange(256)), (45, 45, 4, 2, 4))[0]
        r = rng.random()
        if r < 0.12:
            chain = Chain(0, b"")  # a liveness check
        elif r < 0.2 and sa.children:
            spi = rng.choice(sa.children)
            chain = _chain([DeletePayload(ProtocolId.ESP, (spi,))])
        elif r < 0.22:
            chain = _chain([DeletePayload(ProtocolId.IKE)])
        elif r < 0.32 and sa.children:
            exchange = ExchangeType.CREATE_CHILD_SA
            chain = self._rekey_child(sa)
        elif r < 0.45:
            chain = rng.choice(seeds.chains_of(exchange) or seeds.chains)
        elif r < 0.6:
            chain = splice(rng, seeds.chains)
        else:
            chain = mutate_chain(rng, rng.choice(seeds.chains_of(exchange) or seeds.chains),
                                 seeds.chains)
        # a response flag on a request now and then: the responder's own response path
        return exchange, self._message_id(sa), chain, rng.random() < 0.05

    def _rekey_child(self, sa: LiveSa) -> Chain:
        """strongSwan's Child SA rekey request, its REKEY_SA notify naming one of ours."""
        rng = self.rng
        recorded = [c for c in self.seeds.chains_of(ExchangeType.CREATE_CHILD_SA)
                    if c.first == PayloadType.NOTIFY]
        segments = split_chain(*_pair(rng.choice(recorded)))
        notify = segments[0]
        body = notify.body  # protocol, SPI size, notify type, SPI (RFC 7296 3.10)
        if len(body) >= 8 and body[1] == 4:
            body = body[:4] + rng.choice(sa.children) + body[8:]
        segments[0] = Segment(notify.type, notify.flags, body)
        chain = join_chain(segments)
        return mutate_chain(rng, chain, self.seeds.chains) if rng.random() < 0.3 else chain

    def _keyed_shot(self, name: str, data: bytes) -> Shot:
        rng = self.rng
        if rng.random() < 0.3:
            marker = NON_ESP_MARKER if rng.random() < 0.95 else b""
            return Shot(name, marker + data, True, self._source())
        return Shot(name, data, False, self._source())

    def _resealed(self, live: Sequence[LiveSa], *_args: object) -> list[Shot]:
        """Mutated plaintexts sealed with the SA's keys: they get past the ICV."""
        rng = self.rng
        if not live:
            return self._bytes()
        sa = self._target(live)
        exchange, message_id, chain, response = self._plan(sa)
        pad = rng.choice((1, 8, 255)) if rng.random() < 0.03 else None
        data = seal(sa.keys, exchange, message_id, chain, response=response, pad_length=pad)
        if rng.random() < 0.03:  # a retransmission storm: the cache, a full mailbox
            return [self._keyed_shot("resealed", data) for _ in range(rng.randint(2, 48))]
        return [self._keyed_shot("resealed", data)]

    def _fragments(self, live: Sequence[LiveSa], *_args: object) -> list[Shot]:
        """SKF messages (RFC 7383) with honest keys and dishonest numbers and totals."""
        rng = self.rng
        if not live:
            return self._bytes()
        sa = self._target(live)
        exchange, message_id, chain, response = self._plan(sa)
        if rng.random() < 0.2:  # strongSwan's own split of its IKE_AUTH, resealed
            split = rng.choice(self.seeds.fragment_chunks)
            chunks = [c.data for c in split]
            first = split[0].first
        else:
            total = rng.choice((1, 2, 2, 3, 3, 4, 5, 8))
            cuts = sorted(rng.randint(0, len(chain.data)) for _ in range(total - 1))
            bounds = [0, *cuts, len(chain.data)]
            chunks = [chain.data[a:b] for a, b in itertools.pairwise(bounds)]
            first = chain.first
        total = len(chunks)
        order = list(range(1, total + 1))
        variant = rng.randrange(10)
        claimed = total
        if variant == 0:
            rng.shuffle(order)
        elif variant == 1:
            order += rng.choices(order, k=rng.randint(1, 3))  # duplicates
        elif variant == 2 and total > 1:
            order.remove(rng.choice(order))  # one missing: the set never completes
        elif variant == 3:
            claimed = rng.choice((0, total + 1, 64, 65, 65535))  # a lie in Total Fragments
        elif variant == 4:
            order.insert(rng.randrange(len(order) + 1), rng.choice((0, total + 1, 65535)))
        elif variant == 5 and total > 1:  # re-split: the older, coarser split goes on
            claimed = total - 1
        shots: list[Shot] = []
        for number in order:
            chunk = chunks[number - 1] if 1 <= number <= total else rng.randbytes(8)
            head = first if number == 1 else (0 if rng.random() < 0.95 else first)
            data = seal_fragment(sa.keys, exchange, message_id, chunk, number, claimed, head,
                                 response=response)
            if rng.random() < 0.05:
                data = flip_bits(rng, data)  # fails its ICV
            shots.append(self._keyed_shot("fragments", data))
        if rng.random() < 0.1:  # a recorded strongSwan fragment on this SA's SPIs
            recorded = rewrite_header(rng.choice(self.seeds.fragments), spi_i=sa.keys.spi_i,
                                      spi_r=sa.keys.spi_r, message_id=message_id)
            shots.insert(rng.randrange(len(shots) + 1), self._keyed_shot("fragments",
                                                                         recorded))
        return shots


def _pair(chain: Chain) -> tuple[int, bytes]:
    return chain.first, chain.data


def _chain(payloads: Sequence[Payload]) -> Chain:
    return Chain(type_of(payloads[0]), encode_payloads(list(payloads)))


def _join(*chains: Chain) -> Chain:
    """Chains one after the other, each last next-payload field naming the next chain."""
    segments = [seg for c in chains for seg in split_chain(c.first, c.data)]
    return join_chain(segments)
