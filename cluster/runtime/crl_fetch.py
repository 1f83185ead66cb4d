"""Downloading the CRLs that connections name by URI (`remote.crls = ["http://..."]`)
and those that the peers' certificates name in their CRL distribution points; asking
the OCSP responders the certificates name (`ask_ocsp`, RFC 6960).

Each URI is fetched at start-up and again every `[ike] crl_refresh` seconds, or at the
CRL's own nextUpdate if that comes first; a failed download is tried again after a
minute, and until one succeeds the last good CRL (or none) stays in use, as strongSwan
does with `strictcrlpolicy = no`. What arrives is only a candidate: a CRL counts for a
certificate only if its issuer signed it (auth.py), so whoever answers on the URI can
withhold revocations but never invent them. Downloads run in a worker thread, never on
the IKE path; the certificate checks read the newest CRL of each URI from
`ResponderPolicy.fetched_crls`.
"""

from __future__ import annotations

import datetime
import functools
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass

import trio
from cryptography import x509

from ..ike.ocsp import NONCE_SIZE, OcspAnswer, ocsp_answer_untrusted, ocsp_request
from ..ike.policy import ResponderPolicy

logger = logging.getLogger(__name__)

RETRY = 60.0  # seconds after a failed download
POLL = 5.0  # seconds between looks at the configuration (a reload may add URIs)
TIMEOUT = 10.0  # seconds one download may take
MAX_SIZE = 16 * 1024 * 1024  # bytes of one CRL


class CrlFetchError(Exception):
    pass


@dataclass(slots=True)
class RevocationStats:
    """Downloads and OCSP questions, for the metrics."""

    crl_fetched: int = 0
    crl_failed: int = 0
    ocsp_answered: int = 0
    ocsp_failed: int = 0  # no answer, or one that does not count

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _http(request: str | urllib.request.Request) -> bytes:
    """The body of an http(s) answer, or CrlFetchError saying why not (blocking)."""
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as answer:
            data: bytes = answer.read(MAX_SIZE + 1)
    except urllib.error.HTTPError as exc:
        raise CrlFetchError(f"HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise CrlFetchError(str(getattr(exc, "reason", exc))) from None
    if len(data) > MAX_SIZE:
        raise CrlFetchError(f"larger than {MAX_SIZE} bytes")
    return data


def download(uri: str) -> x509.CertificateRevocationList:
    """The CRL at `uri` (DER or PEM), or CrlFetchError saying why not (blocking)."""
    data = _http(uri)
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError as exc:
        raise CrlFetchError(f"not a CRL: {exc}") from None


def post_ocsp(uri: str, request: bytes) -> bytes:
    """An OCSP responder's DER answer to `request` (RFC 6960 A.1: HTTP POST; blocking)."""
    return _http(urllib.request.Request(uri, data=request, method="POST", headers={
        "Content-Type": "application/ocsp-request"}))


async def ask_ocsp(cert: x509.Certificate, issuer: x509.Certificate, uri: str,
                   post: Callable[[str, bytes], bytes] = post_ocsp,
                   stats: RevocationStats | None = None) -> OcspAnswer | None:
    """The checked answer of `uri` about `cert`, or None (logged) when there is none."""
    stats = stats if stats is not None else RevocationStats()
    subject = cert.subject.rfc4514_string()
    try:
        nonce = os.urandom(NONCE_SIZE)
        der = await trio.to_thread.run_sync(post, uri, ocsp_request(cert, issuer, nonce))
        answer = ocsp_answer_untrusted(der, cert, issuer, datetime.datetime.now(datetime.UTC),
                                       nonce)
    except (CrlFetchError, ValueError) as exc:
        stats.ocsp_failed += 1
        logger.warning("OCSP %s about %s: no usable answer: %s", uri, subject, exc)
        return None
    stats.ocsp_answered += 1
    logger.info("OCSP %s: %s (serial %x) is %s", uri, subject, cert.serial_number,
                answer.status)
    return answer


async def fetch_crls(current: Callable[[], ResponderPolicy], refresh: float,
                     fetch: Callable[[str], x509.CertificateRevocationList] = download,
                     *, from_certificates: bool = True, ocsp: bool = True,
                     stats: RevocationStats | None = None,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                     ) -> None:
    """Keep `current().fetched_crls` filled from every connection's CRL URIs and, with
    `from_certificates`, from the distribution points the peers' certificates name (the
    first time one is seen, the exchange that saw it waits for it: CrlPending)."""
    due: dict[str, float] = {}  # URI -> when to download it next
    counts = stats if stats is not None else RevocationStats()

    async def fetch_now(uri: str) -> x509.CertificateRevocationList | None:
        """One download (logged, counted, its next one scheduled); None when it failed."""
        learned = " (a certificate's distribution point)" \
            if uri in current().fetched_crls.learned else ""
        try:
            crl = await trio.to_thread.run_sync(fetch, uri)
        except CrlFetchError as exc:
            counts.crl_failed += 1
            due[uri] = trio.current_time() + RETRY
            logger.warning("CRL %s%s not fetched: %s; trying again in %.0f s", uri, learned,
                           exc, RETRY)
            return None
        counts.crl_fetched += 1
        wait = min(refresh, _until_next_update(crl))
        due[uri] = trio.current_time() + wait
        logger.info("CRL %s fetched: %s, %d revoked%s; next download in %.0f s", uri,
                    crl.issuer.rfc4514_string(), len(crl), learned, wait)
        return crl

    def enable(policy: ResponderPolicy) -> None:
        # (a reload's policy shares the caches; set them all the same)
        if from_certificates:
            policy.fetched_crls.fetcher = fetch_now
        if ocsp:
            policy.ocsp.fetcher = functools.partial(ask_ocsp, stats=counts)

    enable(current())  # before the first IKE_AUTH can need them
    task_status.started()
    while True:
        policy = current()
        enable(policy)
        uris = sorted({u for c in policy.connections for u in c.remote.crl_uris}
                      | policy.fetched_crls.learned)
        for uri in uris:
            if due.get(uri, 0.0) > trio.current_time():
                continue
            crl = await fetch_now(uri)
            if crl is not None:
                policy.fetched_crls.put(uri, crl)
        await trio.sleep(min(POLL, refresh))


def _until_next_update(crl: x509.CertificateRevocationList) -> float:
    """Seconds until the CRL says a newer one is out (at least RETRY; no date: never)."""
    next_update = crl.next_update_utc
    if next_update is None:
        return float("inf")
    left = (next_update - datetime.datetime.now(datetime.UTC)).total_seconds()
    return max(RETRY, left)
