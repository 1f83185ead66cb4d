"""What the operator allows, in the core's terms (built by `cluster.config`).

The session core reads only these frozen objects; it never sees TOML or file paths.
"""

from __future__ import annotations

import datetime
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from .auth import Revocation, delta_crl_uris_of
from .identity import Identity, IdentityPattern, eap_identity_untrusted
from .ocsp import OcspCache
from .pending import Pending
from .pools import AddressPool
from .proposals import ConfiguredProposal
from .radius import RadiusBackend, RadiusSettings
from .traffic_selectors import TsConfig

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


@dataclass(frozen=True)
class LocalAuth:
    """How we authenticate ourselves (`local = {...}` in a connection)."""

    method: Literal["psk", "pubkey"]
    identity: Identity | None  # None: our certificate's subject, or our IP address
    cert: x509.Certificate | None = None
    key: PrivateKey | None = None
    intermediates: tuple[x509.Certificate, ...] = ()


@dataclass(frozen=True)
class RemoteAuth:
    """What we demand of the peer (`remote = {...}` in a connection)."""

    method: Literal["psk", "pubkey", "eap-mschapv2", "eap-tls", "eap-radius"]
    identity: IdentityPattern
    cacerts: tuple[x509.Certificate, ...] = ()  # (pubkey, eap-tls)
    crls: tuple[x509.CertificateRevocationList, ...] = ()  # checked on the peer's chain
    crl_uris: tuple[str, ...] = ()  # CRLs the runtime fetches (ResponderPolicy.fetched_crls)
    # EAP: the identities the peer may claim in EAP-Identity (swanctl's eap_id)
    eap_id: IdentityPattern = field(default_factory=lambda: IdentityPattern(True, None))
    # swanctl's certs on the remote end (pubkey): the peer must authenticate with one
    # of these certificates, trusted as they are (self-signed ones too); with cacerts
    # as well, it must also chain to one of those
    certs: tuple[x509.Certificate, ...] = ()
    # swanctl's groups (eap-radius only): the peer must be in one of them, which its
    # Access-Accept shows with a Class attribute of that name, or a Filter-Id with an
    # ESP Tunnel-Type (strongSwan's class_group, filter_id; radius.groups_of)
    groups: tuple[str, ...] = ()
    # swanctl's revocation (with cacerts): a certificate on the peer's chain whose
    # status no OCSP answer or current CRL confirms is accepted ("relaxed"), accepted
    # only if it names nowhere to ask ("ifuri"), or refused ("strict")
    revocation: Revocation = "relaxed"


@dataclass(frozen=True)
class Lifetime:
    """strongSwan's rekey_time / life_time / rand_time (seconds; 0 disables rekeying).

    Rekeying starts at rekey_time minus a random part of rand_time; the SA is deleted
    at life_time if it was not rekeyed by then. Defaults as swanctl: life_time =
    1.1 x rekey_time, rand_time = life_time - rekey_time.
    """

    rekey_time: float
    life_time: float | None = None
    rand_time: float | None = None

    @property
    def hard(self) -> float:
        return self.life_time if self.life_time is not None else 1.1 * self.rekey_time

    @property
    def jitter(self) -> float:
        if self.rand_time is not None:
            return self.rand_time
        return max(0.0, self.hard - self.rekey_time)


@dataclass(frozen=True)
class Retransmission:
    """strongSwan's retransmit_timeout / retransmit_base / retransmit_tries."""

    timeout: float = 4.0
    base: float = 1.8
    tries: int = 5

    def delay(self, attempt: int) -> float:
        """Wait after send number `attempt` (0 = the first send)."""
        return self.timeout * self.base**attempt

    def total(self) -> float:
        return sum(self.delay(n) for n in range(self.tries + 1))


@dataclass(frozen=True)
class VolumeLimits:
    """swanctl's rekey_bytes, life_bytes, rekey_packets, life_packets (0: none), and
    rand_bytes, rand_packets: each Child SA rekeys a random part of them earlier, so two
    peers that count the same traffic against equal limits rarely start a rekey at once
    (the config resolves swanctl's default, life minus rekey)."""

    rekey_bytes: int = 0
    life_bytes: int = 0
    rekey_packets: int = 0
    life_packets: int = 0
    rand_bytes: int = 0
    rand_packets: int = 0

    def for_child(self, fraction: float) -> tuple[int, int, int, int]:
        """(rekey_bytes, life_bytes, rekey_packets, life_packets) of one Child SA,
        `fraction` (in [0, 1)) of each rand_* taken off its rekey_*."""
        rekey_bytes, rekey_packets = self.rekey_bytes, self.rekey_packets
        if rekey_bytes:
            rekey_bytes = max(1, rekey_bytes - int(self.rand_bytes * fraction))
        if rekey_packets:
            rekey_packets = max(1, rekey_packets - int(self.rand_packets * fraction))
        return rekey_bytes, self.life_bytes, rekey_packets, self.life_packets


@dataclass(frozen=True)
class ChildConfig:
    name: str
    mode: Literal["tunnel", "transport"]
    local_ts: tuple[TsConfig, ...]
    remote_ts: tuple[TsConfig, ...]
    esp_proposals: tuple[ConfiguredProposal, ...]
    # swanctl's: "start" initiates at start-up, "trap" when a packet for it finds no SA
    start_action: Literal["none", "start", "trap"] = "none"
    # swanctl's close_action: "start" brings a Child SA the peer deleted back at once
    # (CREATE_CHILD_SA on its IKE SA); "trap" (with start_action = "trap") leaves it to
    # the next packet, as the trap does anyway
    close_action: Literal["none", "start", "trap"] = "none"
    lifetime: Lifetime = field(default_factory=lambda: Lifetime(3600.0))  # strongSwan: 1 h
    # swanctl's place for dpd_action (the config folds it into the connection's)
    dpd_action: str | None = None
    # swanctl's updown: a shell command run as its Child SAs come up and go down
    updown: str | None = None
    # swanctl's hostaccess: updown gets PLUTO_HOST_ACCESS=1 (its scripts then let the
    # gateway itself reach the remote subnet too)
    hostaccess: bool = False
    # swanctl's inactivity: seconds without traffic either way before the data plane has
    # the Child SA deleted (its IKE SA stays); 0: never
    inactivity: float = 0.0
    # swanctl's copy_dscp = out (its default): each packet's DSCP goes on the outer
    # header (RFC 4301 5.1.2.1); False: copy_dscp = no, the outer DSCP stays 0
    copy_dscp: bool = True
    # swanctl's copy_ecn (default yes): in tunnel mode the ECN field goes on the outer
    # header and a CE mark on a received one into the packet (RFC 6040 normal mode)
    copy_ecn: bool = True
    # swanctl's sha256_96: HMAC-SHA-256 in ESP with a 96-bit ICV instead of RFC 4868's
    # 128 bits, for peers that get it wrong
    sha256_96: bool = False
    # swanctl's tfc_padding (RFC 4303 2.7, tunnel mode): each packet padded to at least
    # this many bytes before encryption; TFC_MTU: to the data plane's MTU; 0: none
    tfc_padding: int = 0
    # swanctl's replay_window (packets, RFC 4303 3.4.3) for this child's Child SAs; 0:
    # the data plane's ([worker] replay_window)
    replay_window: int = 0
    # swanctl's volume limits per direction, applied by the data plane: rekey at
    # rekey_*, delete at life_*; 0: none
    volume: VolumeLimits = field(default_factory=VolumeLimits)


@dataclass(frozen=True)
class ConnectionConfig:
    name: str
    version: int
    proposals: tuple[ConfiguredProposal, ...]
    local: LocalAuth
    remote: RemoteAuth
    children: tuple[ChildConfig, ...]
    encap: bool = False  # pretend NAT so ESP is UDP-encapsulated (strongSwan's `encap`)
    local_addrs: tuple[str, ...] = ()  # empty: any
    remote_addrs: tuple[str, ...] = ()  # empty: any
    lifetime: Lifetime = field(default_factory=lambda: Lifetime(14400.0))  # strongSwan: 4 h
    dpd_delay: float = 0.0  # seconds without traffic before a liveness check; 0: off
    # swanctl's reauth_time: the peer is told to authenticate again within it (RFC 4478
    # AUTH_LIFETIME) and the IKE SA is deleted a tenth later if it has not; an SA we
    # initiated is replaced make-before-break before then (RFC 7296 2.8.3); 0: never
    reauth_time: float = 0.0
    # on a liveness-check timeout (swanctl's): "restart" initiates an on-demand connection
    # again at once; a "start" connection is initiated again after any end anyway
    dpd_action: Literal["clear", "restart", "trap"] = "clear"
    mobike: bool = True  # offer MOBIKE (RFC 4555) to initiators that support it (swanctl's)
    # swanctl's uniqueness policy for SAs of the same identities: "no" (INITIAL_CONTACT
    # replaces), "never", "replace" (the older ones are deleted), "keep" (the new one is)
    unique: Literal["no", "never", "replace", "keep"] = "no"
    # virtual IPs for peers that ask (swanctl's `pools`), tried in order per family
    pools: tuple[AddressPool, ...] = ()
    # as the initiator: ask the responder for an address of these IP versions (swanctl's
    # vips = 0.0.0.0 / ::); `dynamic` local selectors then stand for it
    vips: tuple[int, ...] = ()
    # RFC 8784 post-quantum preshared key (swanctl's ppk_id / ppk_required): the PPK_ID
    # the peer must name (None: any we hold a PPK for), and whether an SA without a PPK
    # is refused
    ppk_id: bytes | None = None
    ppk_required: bool = False
    # swanctl's childless (RFC 6023): "allow" (the default) takes childless IKE SAs from
    # initiators and brings the first Child SA in IKE_AUTH when initiating; "force"
    # initiates childless (every Child SA by CREATE_CHILD_SA) and takes only childless
    # ones; "never" refuses a childless IKE_AUTH
    childless: Literal["allow", "force", "never"] = "allow"
    # swanctl's send_cert: our certificate (and its intermediates) with our AUTH
    # "always" (our default; swanctl's is "ifasked"), "ifasked" (when the peer sent a
    # CERTREQ) or "never"; send_certreq: CERTREQ for our cacerts (RFC 7296 3.7)
    send_cert: Literal["always", "ifasked", "never"] = "always"
    send_certreq: bool = True
    # swanctl's fragmentation (RFC 7383): "yes" (the default) announces it, takes
    # fragments and fragments our large messages; "accept" the same but never fragments
    # ours; "no" neither announces nor takes them ("force", IKEv1's, counts as "yes")
    fragmentation: Literal["yes", "accept", "no"] = "yes"
    # swanctl's keyingtries for a connection we start: attempts in a row that may fail
    # before we give up until the next start or reload; 0 (our default; swanctl's is 1):
    # never give up
    keyingtries: int = 0

    def child(self, name: str) -> ChildConfig | None:
        """The child configuration called `name` (a loop: see payloads.first_of)."""
        for config in self.children:
            if config.name == name:
                return config
        return None


@dataclass(frozen=True)
class SharedSecret:
    ids: tuple[IdentityPattern, ...]
    secret: bytes = field(repr=False)
    kind: Literal["ike", "eap", "ppk"] = "ike"  # swanctl's secrets ike-/eap-/ppk-NAME


# A CRL URI that could not be fetched is not waited for again before this long.
CRL_RETRY = datetime.timedelta(seconds=60)
CrlFetcher = Callable[[str], Awaitable["x509.CertificateRevocationList | None"]]


class FetchedCrls:
    """CRLs downloaded from URIs (runtime/crl_fetch.py), the newest of each: those of
    `RemoteAuth.crl_uris`, and, with a `fetcher`, those the peers' certificates name in
    their CRL distribution points (`learned`, fetched when first seen: CrlPending).
    Certificate checks read them with the configured ones."""

    def __init__(self) -> None:
        self._by_uri: dict[str, x509.CertificateRevocationList] = {}
        self._failed: dict[str, datetime.datetime] = {}
        self.learned: set[str] = set()  # distribution points seen in certificates
        self._deltas: dict[str, tuple[str, ...]] = {}  # a CRL's URI -> its delta CRLs'
        self.fetcher: CrlFetcher | None = None  # set by the runtime; None: learn nothing

    def put(self, uri: str, crl: x509.CertificateRevocationList) -> None:
        self._by_uri[uri] = crl
        self._failed.pop(uri, None)
        deltas = delta_crl_uris_of(crl)  # RFC 5280 5.2.6: where its delta CRLs are
        if deltas:
            self._deltas[uri] = deltas
            self.learned.update(d for d in deltas if d not in self._by_uri)
        else:
            self._deltas.pop(uri, None)

    def _with_deltas(self, uris: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(
            (*uris, *(d for u in uris for d in self._deltas.get(u, ())))))

    def of(self, uris: tuple[str, ...]) -> tuple[x509.CertificateRevocationList, ...]:
        """The CRLs of these URIs, and the delta CRLs they point to."""
        return tuple(self._by_uri[u] for u in self._with_deltas(uris) if u in self._by_uri)

    def missing(self, uris: tuple[str, ...], now: datetime.datetime) -> tuple[str, ...]:
        """Distribution points (and their delta CRLs') worth waiting for: never fetched,
        not failing lately."""
        if self.fetcher is None:
            return ()
        return tuple(u for u in self._with_deltas(uris) if u not in self._by_uri
                     and now - self._failed.get(u, now - 2 * CRL_RETRY) > CRL_RETRY)

    async def fetch(self, uris: tuple[str, ...], now: datetime.datetime) -> None:
        assert self.fetcher is not None
        for uri in uris:
            self.learned.add(uri)  # kept fresh from now on with the configured ones
            crl = await self.fetcher(uri)
            if crl is None:
                self._failed[uri] = now
            else:
                self.put(uri, crl)


class CrlPending(Pending):
    """A peer's certificate names CRLs not fetched yet: the exchange waits for them
    (strongSwan fetches them during the check too); one that cannot be had is not
    waited for (strictcrlpolicy = no)."""

    def __init__(self, crls: FetchedCrls, uris: tuple[str, ...], now: datetime.datetime
                 ) -> None:
        super().__init__(f"waiting for the CRLs at {', '.join(uris)}")
        self.crls, self.uris, self.now = crls, uris, now

    async def fetch(self) -> None:
        await self.crls.fetch(self.uris, self.now)


@dataclass(frozen=True)
class ResponderPolicy:
    connections: tuple[ConnectionConfig, ...]
    secrets: tuple[SharedSecret, ...] = ()
    legacy_algorithms: bool = False
    half_open_timeout: float = 30.0
    retransmission: Retransmission = field(default_factory=Retransmission)
    # strongSwan's charon.keep_alive: seconds between NAT keepalives when a NAT is in
    # front of us (RFC 3948 4); 0: none
    keep_alive: float = 20.0
    # shared with the runtime that fills it, kept across configuration reloads
    fetched_crls: FetchedCrls = field(default_factory=FetchedCrls, compare=False)
    ocsp: OcspCache = field(default_factory=OcspCache, compare=False)
    radius: RadiusSettings | None = None  # [radius]: the servers eap-radius relays to
    radius_backend: RadiusBackend = field(default_factory=RadiusBackend, compare=False)

    def find_psk(self, local: Identity | None, remote: Identity) -> bytes | None:
        """The best shared secret for this pair of identities (strongSwan's matching)."""
        best: tuple[int, bytes] | None = None
        for entry in self.secrets:
            if entry.kind != "ike":
                continue
            score = 0
            for ident in (local, remote):
                matched = [p.any for p in entry.ids if ident is not None and p.matches(ident)]
                if False in matched:  # a pattern other than %any matched
                    score += 2
                elif matched:
                    score += 1
            if score and (best is None or score > best[0]):
                best = (score, entry.secret)
        return best[1] if best else None

    @property
    def has_ppk(self) -> bool:
        return any(entry.kind == "ppk" for entry in self.secrets)

    def find_ppk(self, ppk_id: bytes) -> bytes | None:
        """The post-quantum preshared key named `ppk_id` (RFC 8784), if we hold it."""
        for entry in self.secrets:
            if entry.kind == "ppk" and any(
                    p.identity is not None and p.identity.data == ppk_id for p in entry.ids):
                return entry.secret
        return None

    def find_eap_secret(self, identity: bytes,
                        allowed: IdentityPattern | None = None) -> bytes | None:
        """The password of an EAP identity: an eap secret naming it (never via %any);
        none for an identity the connection's `allowed` (its eap_id) does not match."""
        ident = eap_identity_untrusted(identity)
        if ident is None or (allowed is not None and not allowed.matches(ident)):
            return None
        for entry in self.secrets:
            if entry.kind == "eap" and any(not p.any and p.matches(ident) for p in entry.ids):
                return entry.secret
        return None
