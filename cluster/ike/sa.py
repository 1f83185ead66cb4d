"""The data of one IKE SA, shared by the exchange modules that read and change it."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..key_exchange import KeyExchange
from .events import Address, Event
from .identity import Identity
from .keymat import ChildKeys, IkeKeys
from .message import SkProtection
from .policy import ConnectionConfig, ResponderPolicy
from .proposals import ChosenAlgorithms
from .state import State, Trigger, next_state
from .traffic_selectors import TrafficSelector


@dataclass
class ChildSa:
    name: str
    mode: str
    spi_in: bytes
    spi_out: bytes
    chosen: ChosenAlgorithms
    keys: ChildKeys = field(repr=False)
    local_ts: tuple[TrafficSelector, ...]
    remote_ts: tuple[TrafficSelector, ...]


@dataclass
class IkeSa:
    policy: ResponderPolicy
    is_initiator: bool
    spi_i: bytes
    spi_r: bytes
    local: Address
    remote: Address
    state: State = State.INITIAL
    connection: ConnectionConfig | None = None
    chosen: ChosenAlgorithms | None = None
    nonce_i: bytes = b""
    nonce_r: bytes = b""
    ke: KeyExchange | None = None
    keys: IkeKeys | None = field(default=None, repr=False)
    sk: SkProtection | None = field(default=None, repr=False)
    init_request: bytes = b""  # RealMessage1 (RFC 7296 2.15)
    init_response: bytes = b""  # RealMessage2
    nat_local: bool = False  # we are behind a NAT (or pretend to be: encap)
    nat_remote: bool = False  # the peer is behind a NAT
    peer_hashes: frozenset[int] = frozenset()
    peer_certreq: bool = False
    local_id: Identity | None = None
    remote_id: Identity | None = None
    pending_child_spi: bytes = b""
    children: dict[bytes, ChildSa] = field(default_factory=dict)  # by spi_in
    events: deque[Event] = field(default_factory=deque)

    @property
    def nat(self) -> bool:
        return self.nat_local or self.nat_remote

    def transition(self, trigger: Trigger) -> None:
        self.state = next_state(self.state, trigger)

    @property
    def spi_ours(self) -> bytes:
        return self.spi_i if self.is_initiator else self.spi_r
