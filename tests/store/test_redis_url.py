"""Redis URLs: redis-py's own forms, our Sentinel form, TLS with AUTH; parsed and live."""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cluster.errors import ConfigError
from cluster.store import MemoryStore, RedisStore, StoredSa, StoreError, open_store
from cluster.store.redis_url import client_from_url, parse_sentinel_url

from .redis_server import RedisServer, free_port


def test_sentinel_url_with_several_hosts_auth_and_db() -> None:
    parsed = parse_sentinel_url(
        "redis+sentinel://:p%40ss@10.0.0.1:26380,[fd00::2]:26381,sentinel-3/ike/2"
        "?sentinel_password=s3&socket_timeout=0.5")
    assert parsed == {
        "hosts": [("10.0.0.1", 26380), ("fd00::2", 26381), ("sentinel-3", 26379)],
        "service": "ike", "db": 2, "username": None, "password": "p@ss", "tls": False,
        "options": {"sentinel_password": "s3", "socket_timeout": 0.5},
    }


def test_sentinel_url_minimal_and_with_user_and_tls() -> None:
    assert parse_sentinel_url("redis+sentinel://h/svc") == {
        "hosts": [("h", 26379)], "service": "svc", "db": 0, "username": None,
        "password": None, "tls": False, "options": {}}
    parsed = parse_sentinel_url(
        "rediss+sentinel://ike:pw@h:1/svc?ssl_ca_certs=/ca.pem&ssl_check_hostname=no")
    assert (parsed["username"], parsed["password"], parsed["tls"]) == ("ike", "pw", True)
    assert parsed["options"] == {"ssl_ca_certs": "/ca.pem", "ssl_check_hostname": False}


@pytest.mark.parametrize(("url", "reason"), [
    ("redis+sentinel://h:1", "path must be /service_name"),
    ("redis+sentinel://h:1/", "path must be /service_name"),
    ("redis+sentinel://h:1/svc/0/x", "path must be /service_name"),
    ("redis+sentinel://h:1/svc/zero", "database 'zero' is not a number"),
    ("redis+sentinel://h:99999/svc", "not a port number"),
    ("redis+sentinel://h:1,:2/svc", "is empty"),
    ("redis+sentinel://secret@h:1/svc", "write ':password@'"),
    ("redis+sentinel://h:1/svc?colour=blue", "unknown option 'colour'"),
    ("redis+sentinel://h:1/svc?socket_timeout=soon", "socket_timeout='soon' is invalid"),
])
def test_bad_sentinel_urls_are_config_errors(url: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        parse_sentinel_url(url)


def test_tls_options_without_tls_are_refused() -> None:
    with pytest.raises(ConfigError, match="need rediss\\+sentinel"):
        client_from_url("redis+sentinel://h:1/svc?ssl_ca_certs=/ca.pem")


def test_unknown_schemes_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="'http' is not one of"):
        client_from_url("http://h:1/0")
    with pytest.raises(ConfigError, match="expected memory:// or a Redis URL"):
        open_store("mysql://h/db")


def test_open_store_picks_the_implementation_and_url_options_win() -> None:
    assert isinstance(open_store(None), MemoryStore)
    assert isinstance(open_store("memory://"), MemoryStore)
    store = open_store("redis://127.0.0.1:1/3?socket_timeout=0.7", prefix="x:")
    assert isinstance(store, RedisStore) and store.prefix == "x:"
    kwargs = store.client.connection_pool.connection_kwargs
    assert (kwargs["socket_timeout"], kwargs["db"], kwargs["socket_connect_timeout"]) == (
        0.7, 3, 1.0)


async def test_store_through_sentinel_with_auth(tmp_path: Path) -> None:
    master = RedisServer(tmp_path / "master", password="master-pw")
    sentinel = RedisServer(
        tmp_path / "sentinel", password="sentinel-pw",
        sentinel_conf=(f"sentinel monitor ike 127.0.0.1 {0} 1\n"
                       "sentinel auth-pass ike master-pw\n"
                       "sentinel down-after-milliseconds ike 60000\n"
                       "requirepass sentinel-pw\n"))
    await trio.to_thread.run_sync(master.start)
    assert sentinel.sentinel_conf is not None
    sentinel.sentinel_conf = sentinel.sentinel_conf.replace(" 0 1\n", f" {master.port} 1\n")
    try:
        await trio.to_thread.run_sync(sentinel.start)
        store = RedisStore.from_url(
            f"redis+sentinel://:master-pw@127.0.0.1:{free_port()},127.0.0.1:{sentinel.port}"
            "/ike/1?sentinel_password=sentinel-pw")
        try:
            key = os.urandom(8)
            fence = await store.acquire(key, "resp-1", 30.0)
            assert fence is not None
            await store.put_sa(key, b"via sentinel", "resp-1", fence)
            assert await store.get_sa(key) == StoredSa(b"via sentinel", "resp-1", fence)
        finally:
            await store.aclose()
        direct = RedisStore.from_url(f"redis://:master-pw@127.0.0.1:{master.port}/1")
        try:  # it really went to the master's db 1
            assert await direct.get_sa(key) == StoredSa(b"via sentinel", "resp-1", fence)
        finally:
            await direct.aclose()
        wrong = RedisStore.from_url(
            f"redis+sentinel://127.0.0.1:{sentinel.port}/ike/1?sentinel_password=nope")
        try:
            with pytest.raises(StoreError):
                await wrong.get_sa(key)
        finally:
            await wrong.aclose()
    finally:
        sentinel.stop()
        master.stop()


def _tls_files(directory: Path) -> tuple[Path, Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "store test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.DNSName("localhost")]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


async def test_store_over_tls_with_auth(tmp_path: Path) -> None:
    ca, cert, key_file = _tls_files(tmp_path / "tls")
    port = free_port()
    server = RedisServer(tmp_path / "redis", port=port, password="tls-pw", args=(
        "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert),
        "--tls-key-file", str(key_file), "--tls-ca-cert-file", str(ca),
        "--tls-auth-clients", "no"))
    await trio.to_thread.run_sync(server.start)
    try:
        good = RedisStore.from_url(f"rediss://:tls-pw@127.0.0.1:{port}/0?ssl_ca_certs={ca}")
        try:
            await good.heartbeat("resp-1", "responder", 30.0)
            assert [m.node for m in await good.members()] == ["resp-1"]
        finally:
            await good.aclose()
        for url in (f"rediss://:wrong@127.0.0.1:{port}/0?ssl_ca_certs={ca}",  # bad password
                    f"rediss://:tls-pw@127.0.0.1:{port}/0",  # server not verifiable
                    f"redis://:tls-pw@127.0.0.1:{port}/0"):  # plain text to a TLS port
            bad = RedisStore.from_url(url)
            try:
                with trio.fail_after(10), pytest.raises(StoreError):
                    await bad.members()
            finally:
                await bad.aclose()
    finally:
        server.stop()
