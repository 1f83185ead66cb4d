"""IKE identities (RFC 7296 3.5): parsing, printing, matching, and checks against certificates.

Text forms follow strongSwan's so operators can reuse their swanctl.conf ids:
`192.0.2.1`, `2001:db8::1`, `moon.example.test` or `@moon` (FQDN), `carol@example.test`
(RFC822), `C=CH, O=strongSwan, CN=moon` (DER_ASN1_DN), `@#0a1b` (KEY_ID), and explicit
prefixes such as `fqdn:`, `email:`, `dn:`, `keyid:`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID, ObjectIdentifier

from ..errors import ParseError
from .constants import IdType

# strongSwan's attribute names; the first name listed for an OID is the one printed.
_DN_ATTRIBUTES: tuple[tuple[str, ObjectIdentifier], ...] = (
    ("C", NameOID.COUNTRY_NAME),
    ("ST", NameOID.STATE_OR_PROVINCE_NAME),
    ("L", NameOID.LOCALITY_NAME),
    ("O", NameOID.ORGANIZATION_NAME),
    ("OU", NameOID.ORGANIZATIONAL_UNIT_NAME),
    ("CN", NameOID.COMMON_NAME),
    ("E", NameOID.EMAIL_ADDRESS),
    ("Email", NameOID.EMAIL_ADDRESS),
    ("emailAddress", NameOID.EMAIL_ADDRESS),
    ("SN", NameOID.SERIAL_NUMBER),
    ("serialNumber", NameOID.SERIAL_NUMBER),
    ("S", NameOID.SURNAME),
    ("G", NameOID.GIVEN_NAME),
    ("I", NameOID.INITIALS),
    ("T", NameOID.TITLE),
    ("DC", NameOID.DOMAIN_COMPONENT),
    ("UID", NameOID.USER_ID),
    ("dnQualifier", NameOID.DN_QUALIFIER),
    ("pseudonym", NameOID.PSEUDONYM),
)
_OID_BY_NAME = {name.casefold(): oid for name, oid in _DN_ATTRIBUTES}
_NAME_BY_OID: dict[ObjectIdentifier, str] = {}
for _name, _oid in _DN_ATTRIBUTES:
    _NAME_BY_OID.setdefault(_oid, _name)
_IA5_ATTRIBUTES = frozenset({NameOID.EMAIL_ADDRESS, NameOID.DOMAIN_COMPONENT})
_PRINTABLE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 '()+,-./:=?")

_PREFIXES = {
    "ipv4": IdType.IPV4_ADDR,
    "ipv6": IdType.IPV6_ADDR,
    "fqdn": IdType.FQDN,
    "email": IdType.RFC822_ADDR,
    "rfc822": IdType.RFC822_ADDR,
    "dn": IdType.DER_ASN1_DN,
    "asn1dn": IdType.DER_ASN1_DN,
    "keyid": IdType.KEY_ID,
}


@dataclass(frozen=True, slots=True)
class Identity:
    id_type: IdType
    data: bytes  # the ID payload's identification data

    def __str__(self) -> str:
        if self.id_type in (IdType.IPV4_ADDR, IdType.IPV6_ADDR):
            try:
                return str(ipaddress.ip_address(self.data))
            except ValueError:
                return self.data.hex()
        if self.id_type in (IdType.FQDN, IdType.RFC822_ADDR):
            return self.data.decode("utf-8", errors="backslashreplace")
        if self.id_type == IdType.DER_ASN1_DN:
            name = _decode_dn(self.data)
            return "dn:#" + self.data.hex() if name is None else _format_dn(name)
        if self.id_type == IdType.KEY_ID:
            return "@#" + self.data.hex()
        return f"{self.id_type.name}:#{self.data.hex()}"


def parse_identity(text: str) -> Identity:
    """Parse an identity written the strongSwan way; ValueError names what is wrong."""
    text = text.strip()
    if not text:
        raise ValueError("empty identity")
    if text.startswith("%"):
        raise ValueError(f"{text!r} is a pattern, not an identity")
    prefix, colon, rest = text.partition(":")
    if colon and prefix.casefold() in _PREFIXES:
        return _identity_of_type(_PREFIXES[prefix.casefold()], rest.strip())
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        pass
    else:
        kind = IdType.IPV4_ADDR if address.version == 4 else IdType.IPV6_ADDR
        return _identity_of_type(kind, text)
    if "=" in text:
        return _identity_of_type(IdType.DER_ASN1_DN, text)
    if text.startswith("@#"):
        return _identity_of_type(IdType.KEY_ID, text[2:])
    if text.startswith("@"):
        return _identity_of_type(IdType.FQDN, text[1:])
    if "@" in text:
        return _identity_of_type(IdType.RFC822_ADDR, text)
    return _identity_of_type(IdType.FQDN, text)


def _identity_of_type(id_type: IdType, text: str) -> Identity:
    if not text:
        raise ValueError(f"empty {id_type.name} identity")
    if id_type == IdType.IPV4_ADDR:
        return Identity(id_type, ipaddress.IPv4Address(text).packed)
    if id_type == IdType.IPV6_ADDR:
        return Identity(id_type, ipaddress.IPv6Address(text).packed)
    if id_type == IdType.DER_ASN1_DN:
        return Identity(id_type, _parse_dn(text).public_bytes())
    if id_type == IdType.KEY_ID:
        try:
            return Identity(id_type, bytes.fromhex(text.removeprefix("#")))
        except ValueError:
            raise ValueError(f"key id {text!r} is not hex") from None
    if not text.isascii():
        raise ValueError(f"{id_type.name} identity {text!r} is not ASCII")
    return Identity(id_type, text.encode("ascii"))


def identity_from_payload_untrusted(id_type: int, data: bytes) -> Identity:
    """Build an Identity from an IDi/IDr payload body, checking it is well formed."""
    try:
        kind = IdType(id_type)
    except ValueError:
        raise ParseError(f"unknown ID type {id_type}") from None
    expected = {IdType.IPV4_ADDR: 4, IdType.IPV6_ADDR: 16}.get(kind)
    if expected is not None and len(data) != expected:
        raise ParseError(f"{kind.name} identity has {len(data)} bytes, not {expected}")
    if not data:
        raise ParseError(f"empty {kind.name} identity")
    if kind == IdType.DER_ASN1_DN:
        try:
            x509.Name.from_bytes(data)
        except _DN_ERRORS as exc:
            raise ParseError(f"DER_ASN1_DN identity does not decode: {exc}") from None
    return Identity(kind, bytes(data))


@dataclass(frozen=True, slots=True)
class IdentityPattern:
    """What configuration says a peer must be: `%any` or one identity, maybe with wildcards."""

    any: bool
    identity: Identity | None

    def matches(self, ident: Identity) -> bool:
        if self.any:
            return True
        pattern = self.identity
        if pattern is None or pattern.id_type != ident.id_type:
            return False
        if pattern.id_type in (IdType.FQDN, IdType.RFC822_ADDR):
            want = pattern.data.decode("utf-8", errors="replace").casefold()
            have = ident.data.decode("utf-8", errors="replace").casefold()
            if want.startswith("*"):
                return have.endswith(want[1:])
            return have == want
        if pattern.id_type == IdType.DER_ASN1_DN:
            want_dn, have_dn = _decode_dn(pattern.data), _decode_dn(ident.data)
            if want_dn is None or have_dn is None:
                return False
            return _dn_matches(want_dn, have_dn)
        return pattern.data == ident.data


def eap_identity_untrusted(data: bytes) -> Identity | None:
    """An EAP identity a peer sent, read as strongSwan reads identities (None: not one)."""
    try:
        return parse_identity(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None


def parse_identity_pattern(text: str) -> IdentityPattern:
    if text.strip() == "%any":
        return IdentityPattern(any=True, identity=None)
    return IdentityPattern(any=False, identity=parse_identity(text))


def cert_matches_identity(cert: x509.Certificate, ident: Identity) -> bool:
    """RFC 4945 3.1: the ID must be the subject DN or appear in subjectAltName."""
    if ident.id_type == IdType.DER_ASN1_DN:
        want = _decode_dn(ident.data)
        if want is None:
            return False
        return _dn_matches(want, cert.subject, wildcards=False)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, x509.DuplicateExtension, ValueError):
        return False
    if ident.id_type in (IdType.IPV4_ADDR, IdType.IPV6_ADDR):
        addresses = san.get_values_for_type(x509.IPAddress)
        host = ipaddress.IPv4Address | ipaddress.IPv6Address  # SANs may hold networks too
        return any(isinstance(ip, host) and ip.packed == ident.data for ip in addresses)
    name_type: type[x509.DNSName] | type[x509.RFC822Name]
    if ident.id_type == IdType.FQDN:
        name_type = x509.DNSName
    elif ident.id_type == IdType.RFC822_ADDR:
        name_type = x509.RFC822Name
    else:
        return False
    want_text = ident.data.decode("utf-8", errors="replace").casefold()
    return any(value.casefold() == want_text for value in san.get_values_for_type(name_type))


# --- distinguished names ----------------------------------------------------------


def _parse_dn(text: str) -> x509.Name:
    """`C=CH, O=strongSwan, CN=moon` in written order, encoded the way strongSwan does."""
    attributes = []
    for part in _split_unescaped(text, ","):
        key, eq, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key or not value:
            raise ValueError(f"DN part {part.strip()!r} is not NAME=value")
        oid = _OID_BY_NAME.get(key.casefold())
        if oid is None:
            try:
                oid = ObjectIdentifier(key)
            except ValueError:
                raise ValueError(f"unknown DN attribute {key!r}") from None
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        attributes.append(x509.NameAttribute(oid, value, _type=_string_type(oid, value)))
    return x509.Name(attributes)


def _string_type(oid: ObjectIdentifier, value: str) -> _ASN1Type:
    # strongSwan (and its peers' certificates) use PrintableString where the value allows,
    # so our DER is byte-identical to what `pki --dn` produces for the same text.
    if oid in _IA5_ATTRIBUTES and value.isascii():
        return _ASN1Type.IA5String
    if all(ch in _PRINTABLE for ch in value):
        return _ASN1Type.PrintableString
    return _ASN1Type.UTF8String


def _split_unescaped(text: str, sep: str) -> list[str]:
    """Split on `sep` outside double quotes and not after a backslash (which is dropped)."""
    parts, current, escaped, quoted = [], [], False, False
    for ch in text:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == sep and not quoted:
            parts.append("".join(current))
            current = []
        else:
            quoted ^= ch == '"'
            current.append(ch)
    parts.append("".join(current))
    return parts


# What cryptography raises for a DN that does not decode: ValueError, or TypeError for
# an attribute whose ASN.1 type its OID cannot have (e.g. a commonName as a BIT STRING).
_DN_ERRORS = (ValueError, TypeError)


def _decode_dn(data: bytes) -> x509.Name | None:
    try:
        return x509.Name.from_bytes(data)
    except _DN_ERRORS:
        return None


def _format_dn(name: x509.Name) -> str:
    return ", ".join(
        f"{_NAME_BY_OID.get(attr.oid, attr.oid.dotted_string)}={_format_value(attr.value)}"
        for attr in name
    )


def _format_value(value: str | bytes) -> str:
    return value if isinstance(value, str) else "#" + value.hex()


def _dn_matches(pattern: x509.Name, name: x509.Name, wildcards: bool = True) -> bool:
    """RDN-wise equality, case-insensitive; a pattern value of `*` matches any value."""
    want, have = list(pattern), list(name)
    if len(want) != len(have):
        return False
    for w, h in zip(want, have, strict=True):
        if w.oid != h.oid:
            return False
        if wildcards and w.value == "*":
            continue
        if isinstance(w.value, str) and isinstance(h.value, str):
            if w.value.casefold() != h.value.casefold():
                return False
        elif w.value != h.value:
            return False
    return True
