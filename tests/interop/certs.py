"""A throw-away PKI for interop tests: a CA and end-entity certificates in PEM.

End-entity certificates carry the IKE identity as a subjectAltName dNSName, which is
what strongSwan matches an FQDN ID against.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True)
class Credential:
    cert: Path
    key: Path


def new_key(key_type: str, key_size: int = 2048) -> PrivateKey:
    """A P-256 key, or an RSA key of ``key_size`` bits."""
    if key_type == "ecdsa":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=key_size)
    raise ValueError(f"key_type must be 'ecdsa' or 'rsa', not {key_type!r}")


def _write_key(key: PrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


class TestCa:
    """A self-signed CA that issues certificates into ``directory``.

    Files are named after ``stem``: ``<stem>.pem`` / ``<stem>key.pem`` for the CA,
    ``<name>.pem`` / ``<name>key.pem`` for what it issues. With ``parent`` it is an
    intermediate CA signed by that CA instead (see `intermediate`).
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self, directory: Path, *, stem: str = "ca", common_name: str = "ike-cluster test CA",
        key_type: str = "ecdsa",
        key_size: int = 2048,
        parent: TestCa | None = None,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.key = new_key(key_type, key_size)
        self.parent = parent
        self.name = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ike-cluster tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ])
        now = datetime.datetime.now(datetime.UTC)
        ski = x509.SubjectKeyIdentifier.from_public_key(self.key.public_key())
        builder = x509.CertificateBuilder()
        if parent is not None:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(parent.key.public_key()),
                critical=False,
            )
        self.certificate = (
            builder
            .subject_name(self.name)
            .issuer_name(self.name if parent is None else parent.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False, content_commitment=False,
                    key_encipherment=False, data_encipherment=False, key_agreement=False,
                    key_cert_sign=True, crl_sign=True, encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(self.key if parent is None else parent.key, hashes.SHA256())
        )
        self.cert_path = directory / f"{stem}.pem"
        self.key_path = directory / f"{stem}key.pem"
        self.cert_path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))
        _write_key(self.key, self.key_path)

    def intermediate(
        self, stem: str, common_name: str, *, key_type: str = "ecdsa", key_size: int = 2048
    ) -> TestCa:
        """A CA below this one, in the same directory."""
        return TestCa(self.directory, stem=stem, common_name=common_name, key_type=key_type,
                      key_size=key_size, parent=self)

    def revoke(self, *revoked: Credential, stem: str = "ca", number: int = 1,
               delta_of: int | None = None, freshest: str | None = None) -> Path:
        """A CRL of this CA listing ``revoked`` (PEM, ``<stem>.crl``); with ``delta_of``
        a delta CRL on that base CRL number, with ``freshest`` a complete CRL naming
        its delta CRLs' URI (RFC 5280 5.2.4, 5.2.6)."""
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateRevocationListBuilder().issuer_name(self.name)
            .last_update(now - datetime.timedelta(hours=1))
            .next_update(now + datetime.timedelta(days=1))
            # RFC 5280 5.2.1, 5.2.3: both MUST be there (strongSwan finds CRLs by the AKI)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.key.public_key()), critical=False)
            .add_extension(x509.CRLNumber(number), critical=False)
        )
        if delta_of is not None:
            builder = builder.add_extension(x509.DeltaCRLIndicator(delta_of), critical=True)
        if freshest is not None:
            builder = builder.add_extension(x509.FreshestCRL([x509.DistributionPoint(
                [x509.UniformResourceIdentifier(freshest)], None, None, None)]),
                critical=False)
        for cred in revoked:
            serial = x509.load_pem_x509_certificate(cred.cert.read_bytes()).serial_number
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial)
                .revocation_date(now - datetime.timedelta(minutes=5)).build())
        path = self.directory / f"{stem}.crl"
        path.write_bytes(builder.sign(self.key, hashes.SHA256()).public_bytes(
            serialization.Encoding.PEM))
        return path

    def ocsp_index(self, good: Sequence[Credential], revoked: Sequence[Credential]) -> str:
        """An `openssl ocsp -index` database: these certificates valid or revoked."""
        lines = []
        now = datetime.datetime.now(datetime.UTC)
        for status, creds in (("V", good), ("R", revoked)):
            for cred in creds:
                cert = x509.load_pem_x509_certificate(cred.cert.read_bytes())
                revoked_at = (now - datetime.timedelta(minutes=5)).strftime("%y%m%d%H%M%SZ") \
                    if status == "R" else ""
                serial = f"{cert.serial_number:X}"
                serial = "0" * (len(serial) % 2) + serial
                lines.append("\t".join((
                    status, cert.not_valid_after_utc.strftime("%y%m%d%H%M%SZ"), revoked_at,
                    serial, "unknown", "/" + cert.subject.rfc4514_string().replace(",", "/"))))
        return "".join(line + "\n" for line in lines)

    def chain(self) -> list[x509.Certificate]:
        """This CA's certificate and its parents' below the root (an intermediate's chain)."""
        out: list[x509.Certificate] = []
        ca: TestCa | None = self
        while ca is not None and ca.parent is not None:
            out.append(ca.certificate)
            ca = ca.parent
        return out

    def issue(
        self, dns_name: str, *, key_type: str = "ecdsa", name: str | None = None,
        key_size: int = 2048, with_chain: bool = False, crl_uri: str | None = None,
        ocsp_uri: str | None = None,
    ) -> Credential:
        """An end-entity certificate for ``dns_name`` (CN and SAN dNSName).

        ``with_chain``: the certificate file holds the intermediate CAs after the end
        entity's certificate (leaf first, root left out), as our node's ``cert`` reads it.
        """
        name = name or dns_name.split(".")[0]
        key = new_key(key_type, key_size)
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ike-cluster tests"),
                x509.NameAttribute(NameOID.COMMON_NAME, dns_name),
            ]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False,
                    key_encipherment=key_type == "rsa", data_encipherment=False,
                    key_agreement=False, key_cert_sign=False, crl_sign=False,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if crl_uri is not None:  # a CRL distribution point (RFC 5280 4.2.1.13)
            builder = builder.add_extension(x509.CRLDistributionPoints([x509.DistributionPoint(
                [x509.UniformResourceIdentifier(crl_uri)], None, None, None)]), critical=False)
        if ocsp_uri is not None:  # an OCSP responder (authorityInfoAccess, RFC 5280 4.2.2.1)
            builder = builder.add_extension(x509.AuthorityInformationAccess([
                x509.AccessDescription(x509.oid.AuthorityInformationAccessOID.OCSP,
                                       x509.UniformResourceIdentifier(ocsp_uri))]),
                critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        cred = Credential(self.directory / f"{name}.pem", self.directory / f"{name}key.pem")
        chain = self.chain() if with_chain else []
        cred.cert.write_bytes(b"".join(
            c.public_bytes(serialization.Encoding.PEM) for c in (cert, *chain)
        ))
        _write_key(key, cred.key)
        return cred


def self_signed(directory: Path, dns_name: str, *, name: str | None = None) -> Credential:
    """An end-entity certificate for ``dns_name`` signed with its own key (no CA), as
    site-to-site set-ups pin them (swanctl's remote certs)."""
    name = name or dns_name.split(".")[0]
    key = new_key("ecdsa")
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cred = Credential(directory / f"{name}.pem", directory / f"{name}key.pem")
    cred.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, cred.key)
    return cred


@dataclass(frozen=True)
class Pki:
    """The credentials the interop tests use, all in one directory."""

    ca: Path
    gw_ecdsa: Credential
    client_ecdsa: Credential
    gw_rsa: Credential
    client_rsa: Credential
    other_ca: Path
    client_from_other_ca: Credential  # client's identity, signed by a CA nobody trusts
    client_revoked: Credential  # client's identity from the CA, listed in `crl`
    crl: Path  # the CA's CRL
    authority: TestCa  # the CA itself, for more CRLs (`revoke`)


def make_pki(directory: Path) -> Pki:
    ca = TestCa(directory)
    other = TestCa(directory, stem="otherca", common_name="untrusted test CA")
    revoked = ca.issue("client.example.test", name="clientrevoked")
    return Pki(
        ca=ca.cert_path,
        gw_ecdsa=ca.issue("gw.example.test", name="gw"),
        client_ecdsa=ca.issue("client.example.test", name="client"),
        gw_rsa=ca.issue("gw.example.test", key_type="rsa", name="gwrsa"),
        client_rsa=ca.issue("client.example.test", key_type="rsa", name="clientrsa"),
        other_ca=other.cert_path,
        client_from_other_ca=other.issue("client.example.test", name="clientother"),
        client_revoked=revoked,
        crl=ca.revoke(revoked),
        authority=ca,
    )
