"""What the operator allows, in the core's terms (built by `cluster.config`).

The session core reads only these frozen objects; it never sees TOML or file paths.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from .identity import Identity, IdentityPattern
from .proposals import ConfiguredProposal
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

    method: Literal["psk", "pubkey"]
    identity: IdentityPattern
    cacerts: tuple[x509.Certificate, ...] = ()


@dataclass(frozen=True)
class ChildConfig:
    name: str
    mode: Literal["tunnel", "transport"]
    local_ts: tuple[TsConfig, ...]
    remote_ts: tuple[TsConfig, ...]
    esp_proposals: tuple[ConfiguredProposal, ...]
    start_action: Literal["none", "start"] = "none"  # swanctl's; "start": initiate at start-up


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


@dataclass(frozen=True)
class SharedSecret:
    ids: tuple[IdentityPattern, ...]
    secret: bytes = field(repr=False)


@dataclass(frozen=True)
class ResponderPolicy:
    connections: tuple[ConnectionConfig, ...]
    secrets: tuple[SharedSecret, ...] = ()
    legacy_algorithms: bool = False
    half_open_timeout: float = 30.0

    def find_psk(self, local: Identity | None, remote: Identity) -> bytes | None:
        """The best shared secret for this pair of identities (strongSwan's matching)."""
        best: tuple[int, bytes] | None = None
        for entry in self.secrets:
            score = 0
            for ident in (local, remote):
                matched = [p for p in entry.ids if ident is not None and p.matches(ident)]
                if any(not p.any for p in matched):
                    score += 2
                elif matched:
                    score += 1
            if score and (best is None or score > best[0]):
                best = (score, entry.secret)
        return best[1] if best else None
