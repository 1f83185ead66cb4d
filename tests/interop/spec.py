"""Connection parameters shared by both peers of an interop test.

One ``Conn`` describes a connection from one side's point of view; ``Charon``
renders it as swanctl.conf and ``Node`` as our TOML. Names follow swanctl.conf.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

# The lab's addressing: a veth pair between the initiator's and the responder's
# namespace, plus one "inner" address per side on lo for tunnel traffic.
INITIATOR_V4 = "10.99.0.1"
RESPONDER_V4 = "10.99.0.2"
INITIATOR_V6 = "fd99::1"
RESPONDER_V6 = "fd99::2"
INITIATOR_INNER_V4 = "10.99.1.1"
RESPONDER_INNER_V4 = "10.99.2.1"
INITIATOR_INNER_V6 = "fd99:1::1"
RESPONDER_INNER_V6 = "fd99:2::1"
INITIATOR_NETS = {4: "10.99.1.0/24", 6: "fd99:1::/64"}
RESPONDER_NETS = {4: "10.99.2.0/24", 6: "fd99:2::/64"}

INITIATOR_ID = "client.example.test"
RESPONDER_ID = "gw.example.test"


@dataclass(frozen=True)
class End:
    """The ``local`` or ``remote`` authentication round of a connection."""

    auth: str = "psk"  # "psk" or "pubkey"
    id: str = "%any"
    cert: Path | None = None  # own certificate (local end, pubkey)
    key: Path | None = None  # own private key, PEM (local end, pubkey)
    cacerts: tuple[Path, ...] = ()  # trust anchors for the peer (remote end, pubkey)
    crls: tuple[Path, ...] = ()  # revocation lists checked on the peer's chain (remote end)
    crl_uris: tuple[str, ...] = ()  # and ones our node downloads (remote end)
    eap_id: str | None = None  # the EAP identity (auth = "eap-mschapv2")
    groups: tuple[str, ...] = ()  # our node's remote groups (auth = "eap-radius")
    pins: tuple[Path, ...] = ()  # our node's remote certs: the peer's own certificates
    revocation: str | None = None  # our node's remote revocation ("strict", "ifuri")


@dataclass(frozen=True)
class Child:
    name: str = "net"
    mode: str = "tunnel"  # or "transport"
    local_ts: tuple[str, ...] = ()
    remote_ts: tuple[str, ...] = ()
    esp_proposals: tuple[str, ...] = ("aes256gcm16",)
    rekey_time: str | None = None  # strongSwan duration, e.g. "20s"
    start_action: str = "none"  # "start": the side holding this child initiates it
    life_time: str | None = None  # strongSwan duration; default 1.1 x rekey_time
    rand_time: str | None = None  # strongSwan duration; default life_time - rekey_time
    updown: str | None = None  # our node's updown command (charon's config leaves it out)
    inactivity: str | None = None  # our node's inactivity timeout (likewise)
    copy_dscp: str | None = None  # our node's copy_dscp (likewise)
    copy_ecn: bool | None = None  # our node's copy_ecn (likewise)
    close_action: str | None = None  # our node's close_action (likewise)
    tfc_padding: int | str | None = None  # our node's tfc_padding (likewise)
    volume: tuple[tuple[str, int], ...] = ()  # our node's rekey_bytes, life_bytes, ...
    sha256_96: bool | None = None  # both sides' (swanctl's sha256_96)


@dataclass(frozen=True)
class Conn:
    local: End
    remote: End
    name: str = "rw"
    version: int = 2
    proposals: tuple[str, ...] = ("aes256gcm16-prfsha256-x25519",)
    children: tuple[Child, ...] = (Child(),)
    local_addrs: tuple[str, ...] = ()
    remote_addrs: tuple[str, ...] = ()
    psk: str | None = None  # shared between local.id and remote.id when set
    eap_users: tuple[tuple[str, str], ...] = ()  # (EAP identity, password) secrets
    ppks: tuple[tuple[str, str], ...] = ()  # (PPK_ID, secret) post-quantum keys (RFC 8784)
    encap: bool = False
    rekey_time: str | None = None
    dpd_delay: str | None = None
    extra: dict[str, str] = field(default_factory=dict)  # more swanctl.conf settings
    # more settings of our node's [connections.NAME] table (life_time, over_time, ...)
    node_extra: dict[str, object] = field(default_factory=dict)

    @property
    def child(self) -> Child:
        return self.children[0]

    def with_child(self, **changes: object) -> Conn:
        """A copy with the first child changed, e.g. ``conn.with_child(mode="transport")``."""
        return replace(self, children=(replace(self.child, **changes), *self.children[1:]))  # type: ignore[arg-type]
