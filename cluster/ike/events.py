"""What a session tells its runtime, as small frozen dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..transforms import EncrAlgorithm, IntegAlgorithm
from .traffic_selectors import TrafficSelector

Address = tuple[str, int]


@dataclass(frozen=True, slots=True)
class IkeSaEstablished:
    spi_i: bytes
    spi_r: bytes
    connection: str
    local_id: str
    remote_id: str
    local: Address
    remote: Address
    algorithms: str
    nat: bool
    initial_contact: bool = False  # RFC 7296 2.4: the peer holds no other SA with us
    virtual_ips: tuple[str, ...] = ()  # leased to the peer (RFC 7296 2.19)
    eap_identity: str = ""  # the user the peer authenticated as with EAP, if it did
    own_virtual_ips: tuple[str, ...] = ()  # ours, assigned by the responder
    ppk: bool = False  # a post-quantum preshared key was mixed into its keys (RFC 8784)
    radius_classes: tuple[bytes, ...] = ()  # Class of its Access-Accept (eap-radius)
    radius_interim: int = 0  # and its Acct-Interim-Interval (seconds; 0: none)


@dataclass(frozen=True, slots=True)
class IkeSaAdopted:
    """An established IKE SA this node took over from another (its responder died): what
    goes on with it here, such as its RADIUS accounting session, without a new Start."""

    spi_i: bytes
    spi_r: bytes
    connection: str
    local: Address
    remote: Address
    virtual_ips: tuple[str, ...]
    eap_identity: str
    radius_classes: tuple[bytes, ...]
    radius_interim: int
    authenticated_at: float  # wall-clock seconds
    children: tuple[bytes, ...]  # inbound SPIs of its Child SAs


@dataclass(frozen=True, slots=True)
class IkeSaFailed:
    """The SA never came up (bad proposal, auth failure, timeout)."""

    spi_i: bytes
    spi_r: bytes
    reason: str
    error: str = ""  # the IkeError subclass that failed it ("" when the peer went silent)


# A child's tfc_padding = "mtu" (swanctl's): pad to the data plane's MTU.
TFC_MTU = -1

# The reason of an SA that ended because the peer stopped answering (RFC 7296 2.4).
PEER_NOT_RESPONDING = "peer not responding"
# why we deleted an IKE SA, besides "deleted by us" (expiry, a failed reauthentication...)
TERMINATED = "terminated by an operator"  # ike-cluster terminate
REPLACED = "replaced (unique = replace)"  # a newer SA of the same identities
KEPT = "refused (unique = keep)"  # the newer SA, an older one of its identities stays
AUTH_EXPIRED = "not authenticated again in time"  # RFC 4478 AUTH_LIFETIME, Session-Timeout
REAUTHENTICATED = "reauthenticated"  # a new IKE SA of ours took over (RFC 7296 2.8.3)


@dataclass(frozen=True, slots=True)
class IkeSaDeleted:
    spi_i: bytes
    spi_r: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class ChildSaEstablished:
    """A Child SA and its keys: everything a data plane needs to install it."""

    ike_spi_i: bytes
    ike_spi_r: bytes
    name: str
    mode: str  # "tunnel" or "transport"
    spi_in: bytes  # ours: the peer sends with it
    spi_out: bytes  # the peer's: we send with it
    encr: EncrAlgorithm
    integ: IntegAlgorithm | None
    esn: bool
    encr_key_in: bytes = field(repr=False)
    integ_key_in: bytes = field(repr=False)
    encr_key_out: bytes = field(repr=False)
    integ_key_out: bytes = field(repr=False)
    local_ts: tuple[TrafficSelector, ...] = ()
    remote_ts: tuple[TrafficSelector, ...] = ()
    local: Address = ("", 0)
    remote: Address = ("", 0)
    encap: bool = False  # ESP in UDP (RFC 3948)
    replaces: bytes = b""  # a rekey: spi_in of the Child SA this one takes over from
    we_initiated: bool = True  # whether we sent the request that created it
    inactivity: float = 0.0  # its child's: seconds without traffic before it is deleted
    copy_dscp: bool = True  # its child's: the outer header takes each packet's DSCP
    copy_ecn: bool = True  # its child's: ECN across the tunnel (RFC 6040 normal mode)
    tfc_padding: int = 0  # its child's: bytes to pad each packet to (TFC_MTU: the MTU)
    replay_window: int = 0  # its child's anti-replay window; 0: the data plane's
    # its child's rekey_bytes, life_bytes, rekey_packets, life_packets (0: none)
    volume: tuple[int, int, int, int] = (0, 0, 0, 0)
    # its IKE SA's, for what runs where it is installed (a child's updown on a worker)
    connection: str = ""
    local_id: str = ""
    remote_id: str = ""
    eap_identity: str = ""  # the user the peer authenticated as with EAP, if it did
    virtual_ips: tuple[str, ...] = ()  # the peer's
    own_virtual_ips: tuple[str, ...] = ()  # ours


@dataclass(frozen=True, slots=True)
class ChildSaDeleted:
    ike_spi_i: bytes
    ike_spi_r: bytes
    name: str
    spi_in: bytes
    spi_out: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class ChildSaFailed:
    """A Child SA we asked for with CREATE_CHILD_SA did not come up (RFC 7296 1.3.1)."""

    ike_spi_i: bytes
    ike_spi_r: bytes
    name: str
    reason: str  # the notify or error that refused it


@dataclass(frozen=True, slots=True)
class IkeSaRekeyed:
    """The IKE SA continues under new SPIs (RFC 7296 2.18); its Child SAs moved along.

    The old SPIs stay valid until the old SA's Delete exchange ends (IkeSaRetired).
    """

    old_spi_i: bytes
    old_spi_r: bytes
    spi_i: bytes
    spi_r: bytes
    we_initiated: bool  # whether we are the initiator of the new IKE SA


@dataclass(frozen=True, slots=True)
class IkeSaReauthDue:
    """An IKE SA we initiated should authenticate again (RFC 7296 2.8.3: our reauth_time,
    or the peer's AUTH_LIFETIME, RFC 4478): its initiator brings up a new IKE SA, then
    deletes this one (make-before-break). Ignored, the SA is deleted at its hard limit."""

    spi_i: bytes
    spi_r: bytes
    connection: str


@dataclass(frozen=True, slots=True)
class IkeSaRetired:
    """A rekeyed-away IKE SA is gone; its SPIs route nowhere now. Nothing else changes."""

    spi_i: bytes
    spi_r: bytes


@dataclass(frozen=True, slots=True)
class IkeSaMoved:
    """The peer's address or port changed (NAT rebinding, RFC 7296 2.23, or a MOBIKE
    update, RFC 4555 3.5): tunnel-mode ESP follows."""

    spi_i: bytes
    spi_r: bytes
    local: Address
    remote: Address
    reason: str = "NAT mapping changed"  # or MOBIKE_UPDATE


# The reason of a move the peer asked for (RFC 4555 3.5).
MOBIKE_UPDATE = "MOBIKE address update"


@dataclass(frozen=True, slots=True)
class ExchangeCompleted:
    """One request/response pair finished (for metrics)."""

    exchange: int
    as_responder: bool
    result: str  # "ok" or the notify name that failed it


Event = (
    IkeSaEstablished | IkeSaFailed | IkeSaDeleted | ChildSaEstablished | ChildSaDeleted
    | ChildSaFailed | ExchangeCompleted | IkeSaRekeyed | IkeSaRetired | IkeSaMoved | IkeSaAdopted
    | IkeSaReauthDue
)
