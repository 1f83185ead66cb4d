"""EAP-TLS (RFC 5216) as the authenticator: the peer proves itself with a certificate in a
TLS handshake carried in EAP, as strongSwan's eap-tls plugin does for road warriors.

Sans-IO like EapMschapv2Server: `start` gives the EAP-Request/Identity, `process` takes
each EAP response and gives the next request; once the peer acknowledged our last TLS
flight, `msk` is the key both AUTH payloads are computed with (RFC 7296 2.16) and the
next packet is EAP-Success.

TLS runs in OpenSSL through pyOpenSSL with memory BIOs: Python's ssl module cannot
export keying material, and the MSK is TLS-PRF(master secret, "client EAP encryption",
randoms) (RFC 5216 2.3), which is RFC 5705's exporter with no context. TLS 1.2 only:
RFC 9190's TLS 1.3 profile needs its own exporter label and a commitment message, and
strongSwan's client negotiates 1.2 with a server that offers no more. OpenSSL checks
nothing of the peer's certificate; `verify` does, with the chain the peer sent, as the
connection's pubkey peers are checked (CA, validity, CRLs, OCSP, the identity).

Messages longer than FRAGMENT_SIZE go out in fragments (RFC 5216 2.1.5: the first with
the L flag and the total length, all but the last with M), each acknowledged by an
empty EAP-TLS response; the peer's fragments are acknowledged with an empty request.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from OpenSSL import SSL

from ..errors import AuthenticationFailed
from .eap import Code, EapAuthenticator, EapType, Random, packet, parse_response_untrusted

EAP_TLS = 13
FRAGMENT_SIZE = 1024  # TLS bytes per EAP-TLS request (strongSwan's eap-tls default)
MAX_MESSAGE = 64 * 1024  # what we reassemble from the peer's fragments, at most
MAX_ROUNDS = 64  # EAP round trips one conversation may take (a peer that never ends)
MSK_LABEL = b"client EAP encryption"  # RFC 5216 2.3
FLAG_LENGTH, FLAG_MORE, FLAG_START = 0x80, 0x40, 0x20
_LENGTH = struct.Struct("!I")

# (the peer's certificate, the chain it sent after it, its EAP identity): raises
# AuthenticationFailed unless the certificate is one this connection accepts, or a
# Pending while revocation data it names is fetched (then `process` is called again
# with the same response and checks again)
Verify = Callable[[x509.Certificate, Sequence[x509.Certificate], bytes], None]


@functools.lru_cache(maxsize=32)
def _context(cert: x509.Certificate, key: CertificateIssuerPrivateKeyTypes,
             intermediates: tuple[x509.Certificate, ...]) -> SSL.Context:
    """One per gateway certificate (the objects a configuration holds), shared by its
    conversations: making one costs about 0.35 ms, a connection on it 0.01 ms."""
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_max_proto_version(SSL.TLS1_2_VERSION)
    context.set_options(SSL.OP_NO_TICKET | SSL.OP_NO_RENEGOTIATION)
    # no resumption: every login shows its certificate (and `verify` sees its chain)
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    context.use_certificate(cert)
    context.use_privatekey(key)  # type: ignore[arg-type]
    for extra in intermediates:
        context.add_extra_chain_cert(extra)
    # ask for a client certificate (naming no CA: the peer picks its own, RFC 5246
    # 7.4.4) and accept whatever comes: `verify` judges it once the handshake is done
    context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
                       lambda *_: True)
    return context


class EapTlsServer(EapAuthenticator):
    """One peer's EAP conversation: Identity, then EAP-TLS until the handshake is done."""

    def __init__(self, rng: Random, cert: x509.Certificate,
                 key: CertificateIssuerPrivateKeyTypes,
                 intermediates: Sequence[x509.Certificate], verify: Verify,
                 fragment_size: int = FRAGMENT_SIZE) -> None:
        super().__init__(rng)
        self._tls = SSL.Connection(_context(cert, key, tuple(intermediates)), None)
        self._tls.set_accept_state()
        self._verify = verify
        self._fragment_size = fragment_size
        self._inbound = b""  # the peer's TLS bytes, while its fragments arrive
        self._outbound = b""  # our TLS bytes not sent yet
        self._rounds = 0
        # the response whose completed handshake waits for the certificate check
        self._unchecked: bytes | None = None

    def process(self, data: bytes) -> bytes:
        """The next EAP packet for the peer's response `data`."""
        if self._unchecked is not None:
            if data != self._unchecked:
                raise AuthenticationFailed("EAP-TLS: a response while its certificate check waits")
            return self._check()
        self._rounds += 1
        if self._rounds > MAX_ROUNDS:
            raise AuthenticationFailed("EAP-TLS: too many round trips")
        eap_type, body = parse_response_untrusted(data, self._id)
        if eap_type == EapType.NAK:
            raise AuthenticationFailed("EAP: the peer refused EAP-TLS")
        if self._step == "identity" and eap_type == EapType.IDENTITY:
            self.identity = body
            self._step = "tls"
            return self._request(EAP_TLS, bytes((FLAG_START,)))  # RFC 5216 2.1.1
        if self._step != "tls" or eap_type != EAP_TLS or not body:
            raise AuthenticationFailed(f"EAP: unexpected type {eap_type} in step {self._step}")
        flags, tls_data = body[0], body[1:]
        if flags & FLAG_LENGTH:
            if len(tls_data) < 4 or _LENGTH.unpack_from(tls_data)[0] > MAX_MESSAGE:
                raise AuthenticationFailed("EAP-TLS: bad TLS message length")
            tls_data = tls_data[4:]
        if not tls_data and not flags & FLAG_MORE:  # an acknowledgement
            return self._acknowledged()
        if self._outbound:
            raise AuthenticationFailed("EAP-TLS: data from the peer while our fragments wait")
        self._inbound += tls_data
        if len(self._inbound) > MAX_MESSAGE:
            raise AuthenticationFailed("EAP-TLS: the peer's message is too long")
        if flags & FLAG_MORE:  # more of it to come: acknowledge this fragment
            return self._request(EAP_TLS, b"\x00")
        inbound, self._inbound = self._inbound, b""
        if self._handshake(inbound):
            self._unchecked = data
            return self._check()
        if not self._outbound:
            raise AuthenticationFailed("EAP-TLS: the peer's message left us nothing to say")
        return self._next_fragment(first=True)

    def _handshake(self, inbound: bytes) -> bool:
        """Feed the peer's TLS bytes; our answer goes to `_outbound`. True when this
        completed the handshake."""
        tls = self._tls
        tls.bio_write(inbound)
        try:
            tls.do_handshake()
            complete = True
        except SSL.WantReadError:
            complete = False
        except SSL.Error as exc:
            self._outbound = self._pending()  # (an alert, which we do not send)
            raise AuthenticationFailed(f"EAP-TLS: handshake failed: {_reason(exc)}") from None
        self._outbound = self._pending()
        return complete and self.msk is None

    def _check(self) -> bytes:
        """The peer's certificate judged (a Pending leaves `_unchecked` for the call
        again), then our last flight."""
        self._authenticated()
        self._unchecked = None
        if not self._outbound:
            raise AuthenticationFailed("EAP-TLS: the handshake left us nothing to say")
        return self._next_fragment(first=True)

    def _pending(self) -> bytes:
        out = b""
        while True:
            try:
                chunk = self._tls.bio_read(65536)
            except SSL.WantReadError:
                return out
            if not chunk:
                return out
            out += chunk

    def _authenticated(self) -> None:
        tls = self._tls
        cert = tls.get_peer_certificate(as_cryptography=True)
        if cert is None:
            raise AuthenticationFailed("EAP-TLS: no certificate from the peer")
        # (on a server, OpenSSL's chain leaves out the peer's own certificate)
        chain = [c for c in tls.get_peer_cert_chain(as_cryptography=True) or ()
                 if c != cert]
        self._verify(cert, chain, self.identity)
        self.msk = tls.export_keying_material(MSK_LABEL, 64)

    def _next_fragment(self, *, first: bool = False) -> bytes:
        total = len(self._outbound)
        piece, self._outbound = (self._outbound[:self._fragment_size],
                                 self._outbound[self._fragment_size:])
        flags = FLAG_MORE if self._outbound else 0
        head = bytes((flags,))
        if first and self._outbound:  # the first of several: L and the total length
            head = bytes((flags | FLAG_LENGTH,)) + _LENGTH.pack(total)
        return self._request(EAP_TLS, head + piece)

    def _acknowledged(self) -> bytes:
        if self._outbound:
            return self._next_fragment()
        if self.msk is not None:  # our last flight arrived: RFC 5216 2.1.1
            self._step = "done"
            return packet(Code.SUCCESS, self._id)
        raise AuthenticationFailed("EAP-TLS: an acknowledgement with nothing to send")


def _reason(exc: SSL.Error) -> str:
    """OpenSSL's reason strings of a handshake failure, without the library noise."""
    reasons = [str(e[2]) for e in exc.args[0] if isinstance(e, tuple) and len(e) == 3] \
        if exc.args and isinstance(exc.args[0], list) else []
    return ", ".join(reasons) or str(exc)
