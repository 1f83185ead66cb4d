"""CRLs fetched from URIs: what the fetch loop keeps and when it fetches again."""

from __future__ import annotations

import datetime
import http.server
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from cluster.ike.policy import ResponderPolicy
from cluster.runtime import crl_fetch
from cluster.runtime.crl_fetch import CrlFetchError, download, fetch_crls
from tests.ike.sessions import psk_connection

from .test_node_loopback import wait_for

NAME = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "test CA")])


def crl(next_update_in: datetime.timedelta | None = datetime.timedelta(days=1),
        revoked: int = 0, freshest: tuple[str, ...] = ()) -> x509.CertificateRevocationList:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = x509.CertificateRevocationListBuilder().issuer_name(NAME).last_update(now)
    builder = builder.next_update(now + (next_update_in or datetime.timedelta(days=1)))
    if freshest:  # RFC 5280 5.2.6: where the delta CRLs are
        builder = builder.add_extension(x509.FreshestCRL([x509.DistributionPoint(
            [x509.UniformResourceIdentifier(u) for u in freshest], None, None, None)]),
            critical=False)
    for serial in range(1, revoked + 1):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build())
    return builder.sign(key, hashes.SHA256())


def policy_with(*uris: str) -> ResponderPolicy:
    conn = psk_connection()
    conn = replace(conn, remote=replace(conn.remote, crl_uris=uris))
    return ResponderPolicy((conn,))


async def test_each_uri_is_kept_fresh_and_a_failure_keeps_the_last_good_crl(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(crl_fetch, "RETRY", 0.3)
    monkeypatch.setattr(crl_fetch, "POLL", 0.02)
    monkeypatch.setattr(crl_fetch, "_until_next_update", lambda crl: float("inf"))
    policy = policy_with("http://ca.example/a.crl", "http://ca.example/b.crl")
    answers = {"http://ca.example/a.crl": [crl(revoked=1), crl(revoked=2)],
               "http://ca.example/b.crl": [CrlFetchError("connection refused"), crl()]}
    asked: list[tuple[float, str]] = []
    started = trio.current_time()

    def fetch(uri: str) -> x509.CertificateRevocationList:
        asked.append((trio.from_thread.run_sync(trio.current_time) - started, uri))
        answer = answers[uri].pop(0) if len(answers[uri]) > 1 else answers[uri][0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    a, b = ("http://ca.example/a.crl",), ("http://ca.example/b.crl",)
    async with trio.open_nursery() as nursery:
        await nursery.start(fetch_crls, lambda: policy, 1.0, fetch)
        await wait_for(lambda: len(policy.fetched_crls.of(a)) == 1)
        assert len(policy.fetched_crls.of(a)[0]) == 1
        assert policy.fetched_crls.of(b) == ()  # failed so far: no CRL yet
        await wait_for(lambda: len(policy.fetched_crls.of(b)) == 1)  # tried again
        await wait_for(lambda: len(policy.fetched_crls.of(a)[0]) == 2)  # after crl_refresh
        nursery.cancel_scope.cancel()
    times = {uri: [t for t, u in asked if u == uri] for _, uri in asked}
    assert times[b[0]][1] - times[b[0]][0] >= 0.3  # RETRY after the failure
    assert times[a[0]][1] - times[a[0]][0] >= 1.0  # crl_refresh


def test_a_crl_that_expires_sooner_is_fetched_sooner() -> None:
    soon = crl(next_update_in=datetime.timedelta(minutes=10))
    assert 590 <= crl_fetch._until_next_update(soon) <= 600
    assert crl_fetch._until_next_update(crl(next_update_in=datetime.timedelta(seconds=1))) \
        == crl_fetch.RETRY


def test_download_reads_pem_or_der_over_http_and_says_why_not(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding

    good = crl(revoked=3)
    (tmp_path / "ca.pem").write_bytes(good.public_bytes(Encoding.PEM))
    (tmp_path / "ca.der").write_bytes(good.public_bytes(Encoding.DER))
    (tmp_path / "junk").write_bytes(b"not a crl")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(tmp_path), **kwargs)  # type: ignore[arg-type]

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert len(download(f"{base}/ca.pem")) == 3
        assert len(download(f"{base}/ca.der")) == 3
        with pytest.raises(CrlFetchError, match="not a CRL"):
            download(f"{base}/junk")
        with pytest.raises(CrlFetchError, match="HTTP 404"):
            download(f"{base}/missing.crl")
    finally:
        server.shutdown()
        server.server_close()


async def test_a_distribution_point_is_waited_for_once_and_a_failing_one_not_again() -> None:
    from cluster.ike.policy import CRL_RETRY, CrlPending, FetchedCrls

    cache = FetchedCrls()
    now = datetime.datetime.now(datetime.UTC)
    assert cache.missing(("http://a/1.crl",), now) == ()  # no fetcher: nothing to wait for
    answers = {"http://a/1.crl": crl(revoked=1), "http://a/2.crl": None}

    async def fetcher(uri: str) -> x509.CertificateRevocationList | None:
        return answers[uri]

    cache.fetcher = fetcher
    uris = ("http://a/1.crl", "http://a/2.crl", "http://a/1.crl")
    assert cache.missing(uris, now) == ("http://a/1.crl", "http://a/2.crl")
    await CrlPending(cache, cache.missing(uris, now), now).fetch()
    assert [len(c) for c in cache.of(uris[:2])] == [1]
    assert cache.learned == {"http://a/1.crl", "http://a/2.crl"}
    assert cache.missing(uris, now) == ()  # one fetched, one failed just now
    assert cache.missing(uris, now + CRL_RETRY * 2) == ("http://a/2.crl",)


async def test_a_crls_delta_crls_are_waited_for_read_with_it_and_kept_fresh() -> None:
    """A fetched CRL whose Freshest CRL extension names delta CRLs: those are fetched
    before the certificate is checked (the next `missing`), read with it (`of`), and
    learned, so the runtime keeps them fresh like the distribution points."""
    from cluster.ike.policy import CrlPending, FetchedCrls

    cache = FetchedCrls()
    now = datetime.datetime.now(datetime.UTC)
    answers = {"http://a/base.crl": crl(freshest=("http://a/delta.crl", "ldap://a/x")),
               "http://a/delta.crl": crl(revoked=2)}

    async def fetcher(uri: str) -> x509.CertificateRevocationList | None:
        return answers[uri]

    cache.fetcher = fetcher
    uris = ("http://a/base.crl",)
    await CrlPending(cache, cache.missing(uris, now), now).fetch()
    assert cache.missing(uris, now) == ("http://a/delta.crl",)  # only http(s)
    assert "http://a/delta.crl" in cache.learned
    await CrlPending(cache, cache.missing(uris, now), now).fetch()
    assert cache.missing(uris, now) == ()
    assert [len(c) for c in cache.of(uris)] == [0, 2]


def test_crl_distribution_points_are_read_from_a_certificate() -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    from cluster.ike.auth import crl_uris_of

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(NAME).issuer_name(NAME)
               .public_key(key.public_key()).serial_number(1).not_valid_before(now)
               .not_valid_after(now + datetime.timedelta(days=1)))
    assert crl_uris_of(builder.sign(key, hashes.SHA256())) == ()
    points = x509.CRLDistributionPoints([
        x509.DistributionPoint([x509.UniformResourceIdentifier("http://ca/1.crl"),
                                x509.UniformResourceIdentifier("ldap://ca/cn=x")],
                               None, None, None),
        x509.DistributionPoint([x509.UniformResourceIdentifier("HTTPS://ca/2.crl")],
                               None, None, None)])
    cert = builder.add_extension(points, critical=False).sign(key, hashes.SHA256())
    assert crl_uris_of(cert) == ("http://ca/1.crl", "HTTPS://ca/2.crl")
