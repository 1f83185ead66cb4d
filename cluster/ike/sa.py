"""The data of one IKE SA, shared by the exchange modules that read and change it."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..key_exchange import KeyExchange
from .events import Address, Event
from .fragments import Reassembler
from .identity import Identity
from .keymat import ChildKeys, IkeKeys
from .message import SkProtection
from .policy import ConnectionConfig, ResponderPolicy
from .pools import IPAddress, Lease
from .proposals import ChosenAlgorithms
from .state import State, Trigger, next_state
from .traffic_selectors import TrafficSelector

if TYPE_CHECKING:
    from .ike_auth import EapExchange

INFINITY = float("inf")


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
    rekey_at: float = INFINITY  # when we start rekeying it (lifetimes)
    expire_at: float = INFINITY  # when we delete it if nobody rekeyed it
    rekeying: bool = False  # our CREATE_CHILD_SA for it is in flight or queued
    rekey_nonce: bytes = b""  # the lowest nonce of our rekey exchange (RFC 7296 2.8.1)
    replaced_by: bytes = b""  # spi_in of the SA the peer's rekey created
    replaced_nonce: bytes = b""  # the lowest nonce of the peer's rekey exchange
    deleting: bool = False
    scheduled: bool = False  # lifetimes set
    # whether we sent the request that created it: KEYMAT's first keys are the exchange
    # initiator's outbound ones (RFC 7296 2.17)
    we_initiated: bool = False


@dataclass(slots=True)
class Outstanding:
    """Our request awaiting its response (RFC 7296 2.3: window size one)."""

    exchange: int
    message_id: int
    data: list[bytes]  # the datagram(s): several when fragmented
    deadline: float
    task: object  # what the response completes (see session.py)
    tries: int = 0


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
    exponential: int = 0  # the pooled DH value IKE_SA_INIT used (ExponentialPool), 0 if none
    keys: IkeKeys | None = field(default=None, repr=False)
    sk: SkProtection | None = field(default=None, repr=False)
    init_request: bytes = b""  # RealMessage1 (RFC 7296 2.15)
    init_response: bytes = b""  # RealMessage2
    nat_local: bool = False  # we are behind a NAT (or pretend to be: encap)
    nat_remote: bool = False  # the peer is behind a NAT
    behind_nat: bool = False  # a NAT really is in front of us (not faked): send keepalives
    keepalive_at: float = INFINITY
    peer_hashes: frozenset[int] = frozenset()
    peer_certreq: bool = False
    local_id: Identity | None = None
    remote_id: Identity | None = None
    leases: tuple[Lease, ...] = ()  # the peer's virtual IPs (RFC 7296 2.19)
    own_vips: tuple[str, ...] = ()  # ours, assigned by the responder (we initiated)
    eap: EapExchange | None = None  # an IKE_AUTH running EAP (RFC 7296 2.16)
    eap_identity: str = ""  # the EAP identity it authenticated
    # the virtual IPs a RADIUS server assigned that identity (pools = ["radius"])
    framed_addresses: tuple[IPAddress, ...] = ()
    # and its DNS servers, netmask... for the CFG_REPLY (RFC 7296 3.15.1)
    radius_attributes: tuple[tuple[int, bytes], ...] = ()
    radius_classes: tuple[bytes, ...] = ()  # its Access-Accept's Class, for accounting
    session_timeout: float = 0.0  # its Access-Accept's Session-Timeout (0: none)
    radius_interim: int = 0  # its Access-Accept's Acct-Interim-Interval (0: none)
    authenticated_at: float = 0.0  # wall-clock time the peer authenticated (kept by rekeys)
    pending_child_spi: bytes = b""
    initial_contact: bool = False  # send INITIAL_CONTACT in our IKE_AUTH request
    wanted_vips: tuple[str, ...] = ()  # the virtual IPs our CFG_REQUEST names (vips)
    children: dict[bytes, ChildSa] = field(default_factory=dict)  # by spi_in
    events: deque[Event] = field(default_factory=deque)
    # message IDs and retransmissions, per IKE SA (RFC 7296 2.1-2.3)
    peer_next_id: int = 0  # the next request ID we expect from the peer
    last_response: list[bytes] | None = None  # cached, resent for a retransmitted request
    last_request_digest: bytes = b""
    our_next_id: int = 0
    pending: Outstanding | None = None
    queue: deque[object] = field(default_factory=deque)  # our requests waiting their turn
    # lifetimes and liveness
    last_heard: float = 0.0  # when the peer last sent us an authenticated message
    rekey_at: float = INFINITY
    expire_at: float = INFINITY
    reauth_at: float = INFINITY  # deleted then unless the peer authenticated anew (RFC 4478)
    # we initiated it: IkeSaReauthDue then (our reauth_time, the peer's AUTH_LIFETIME)
    reauth_due: float = INFINITY
    rekeying: bool = False
    rekey_nonce: bytes = b""
    fragmentation: bool = False  # both announced IKEV2_FRAGMENTATION_SUPPORTED (RFC 7383)
    mid_sync: bool = False  # both announced IKEV2_MESSAGE_ID_SYNC_SUPPORTED (RFC 6311)
    # taken over from a node whose request may not have reached the peer: our message
    # IDs may be ahead of the peer's until an RFC 6311 sync completes
    ids_unsure: bool = False
    mobike: bool = False  # both announced MOBIKE_SUPPORTED (RFC 4555); we are its responder
    use_ppk: bool = False  # both announced USE_PPK in IKE_SA_INIT (RFC 8784 3)
    childless: bool = False  # the initiator may set it up without a Child SA (RFC 6023)
    redirect_supported: bool = False  # the initiator announced REDIRECT_SUPPORTED (RFC 5685)
    redirect_to: str = ""  # send IKE_SA_INIT initiators to this gateway instead (RFC 5685 4)
    ppk: bool = False  # a post-quantum preshared key is mixed into SK_d, SK_pi, SK_pr
    # we initiated the first IKE SA of this line (strongSwan's COND_ORIGINAL_INITIATOR):
    # the client, not the gateway. Unlike is_initiator, a rekey does not change it (RFC
    # 7296 2.18 makes whoever starts an IKE rekey the new SA's initiator)
    original_initiator: bool = False
    reassembly: dict[bool, Reassembler] = field(default_factory=dict)  # by "is a response"
    fragment1_digest: bytes = b""  # of the request being reassembled (retransmission check)

    @property
    def nat(self) -> bool:
        return self.nat_local or self.nat_remote

    def transition(self, trigger: Trigger) -> None:
        self.state = next_state(self.state, trigger)

    @property
    def spi_ours(self) -> bytes:
        return self.spi_i if self.is_initiator else self.spi_r
