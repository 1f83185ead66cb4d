"""`ike-cluster sas` and `ike-cluster nodes`: what they show of the store, and what never."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from cluster import cli, ops
from cluster.ike.identity import parse_identity
from cluster.ike.pools import AddressPool
from cluster.ike.session import IkeSession
from cluster.ike.snapshot import SECRET_FIELDS, Record, restore, snapshot_of
from cluster.ike.state import State
from cluster.ops import format_nodes, format_sas, list_nodes, list_sas
from cluster.store import ClusterKey, MemoryStore, RedisStore, StateStore, pack_snapshot
from tests.ike.sessions import psk_pair, run_handshake
from tests.store.conftest import redis_url_for_tests
from tests.store.redis_server import free_port

OWNER = "responder-a"


def established() -> tuple[IkeSession, Record]:
    client, gateway = psk_pair()
    run_handshake(client, gateway)
    assert gateway.state is State.ESTABLISHED
    return gateway, snapshot_of(gateway, 0.0)


def blob_of(record: Record, *, secret_fields: frozenset[str] = SECRET_FIELDS) -> bytes:
    return pack_snapshot(record, secret_fields, ClusterKey.generate(),
                         aad=record["spi_i"] + record["spi_r"])


async def persist(store: StateStore, key: bytes, blob: bytes, owner: str = OWNER) -> int:
    fence = await store.acquire(key, owner, 30.0)
    assert fence is not None
    await store.put_sa(key, blob, owner, fence)
    return fence


def key_material(record: Record) -> Iterator[bytes]:
    """Every secret value of the record (AEAD suites leave the integrity keys empty)."""
    yield from (k for k in record["keys"] if k)
    yield from (k for child in record["children_keys"] for k in child if k)


def assert_no_keys(record: Record, output: str) -> None:
    raw = output.encode("utf-8", "surrogateescape")
    lowered = output.lower()
    for secret in key_material(record):
        assert secret.hex() not in lowered
        assert secret not in raw
        assert base64.b64encode(secret).decode() not in output


# --- sas ---------------------------------------------------------------------------------


async def test_sas_lists_an_ike_sa_with_its_children_like_swanctl() -> None:
    _, record = established()
    store = MemoryStore()
    fence = await persist(store, record["spi_i"], blob_of(record))
    rows = await list_sas(store)
    text = format_sas(rows)
    [child] = record["children"]
    spi_i, spi_r = record["spi_i"].hex(), record["spi_r"].hex()
    lines = text.splitlines()
    # we are the responder: our SPI is the one marked
    assert lines[0] == f"rw: #{OWNER}, ESTABLISHED, IKEv2, {spi_i}_i {spi_r}_r*"
    assert "  local  'gw.example.test' @ 10.99.0.2[500]" in lines
    assert "  remote 'client.example.test' @ 10.99.0.1[500]" in lines
    assert "  aes256gcm16/prfsha256/x25519" in lines
    assert "  message IDs: next request from the peer 2, next request of ours 0" in lines
    assert f"  owner {OWNER}, fence {fence}" in lines
    assert (f"  net: INSTALLED, TUNNEL, ESP SPIs: {child['spi_in'].hex()}_i "
            f"{child['spi_out'].hex()}_o") in lines
    assert "    10.99.2.0/24 === 10.99.1.0/24" in lines


async def test_sas_names_the_eap_user_of_an_sa() -> None:
    gateway, _ = established()
    gateway.sa.eap_identity = "carol"
    record = snapshot_of(gateway, 0.0)
    assert restore(record, gateway.sa.policy, 0.0).sa.eap_identity == "carol"
    store = MemoryStore()
    await persist(store, record["spi_i"], blob_of(record))
    rows = await list_sas(store)
    assert rows[0]["remote_eap_id"] == "carol"
    assert "  remote EAP identity: 'carol'" in format_sas(rows).splitlines()


async def test_sas_names_the_virtual_ips_of_an_sa() -> None:
    gateway, _ = established()
    pool = AddressPool.parse("rw", "10.99.3.0/24")
    lease = pool.acquire(parse_identity("client.example.test"))
    assert lease is not None
    gateway.sa.leases = (lease,)
    record = snapshot_of(gateway, 0.0)
    store = MemoryStore()
    await persist(store, record["spi_i"], blob_of(record))
    rows = await list_sas(store)
    assert rows[0]["remote_vips"] == ["10.99.3.1"]
    assert "  remote virtual IPs: 10.99.3.1" in format_sas(rows).splitlines()


async def test_sas_shows_an_sa_whose_delete_is_in_flight_as_deleting() -> None:
    gateway, _ = established()
    gateway.delete_ike(1.0)
    gateway.datagrams_to_send()
    record = snapshot_of(gateway, 1.0)
    store = MemoryStore()
    await persist(store, record["spi_i"], blob_of(record))
    [row] = await list_sas(store)
    assert row["state"] == "DELETING"
    assert f"rw: #{OWNER}, DELETING, IKEv2" in format_sas([row])


async def test_sas_json_carries_the_same_information() -> None:
    _, record = established()
    store = MemoryStore()
    fence = await persist(store, record["spi_i"], blob_of(record))
    [row] = json.loads(json.dumps(await list_sas(store)))
    assert row["key"] == record["spi_i"].hex()
    assert (row["owner"], row["fence"]) == (OWNER, fence)
    assert (row["connection"], row["state"], row["version"]) == ("rw", "ESTABLISHED", 2)
    assert (row["spi_i"], row["spi_r"]) == (record["spi_i"].hex(), record["spi_r"].hex())
    assert row["initiator"] is False
    assert row["local"] == {"address": "10.99.0.2", "port": 500}
    assert row["local_id"] == {"type": "FQDN", "data": b"gw.example.test".hex(),
                               "text": "gw.example.test"}
    assert row["remote_id"]["text"] == "client.example.test"
    assert row["algorithms"] == {"encryption": "aes256gcm16", "integrity": None,
                                 "prf": "prfsha256", "dh": "x25519", "esn": None}
    assert (row["peer_next_id"], row["our_next_id"]) == (2, 0)
    [child] = row["children"]
    [recorded] = record["children"]
    assert (child["name"], child["mode"], child["state"]) == ("net", "tunnel", "INSTALLED")
    assert (child["spi_in"], child["spi_out"]) == (recorded["spi_in"].hex(),
                                                   recorded["spi_out"].hex())
    assert (child["local_ts"], child["remote_ts"]) == (["10.99.2.0/24"], ["10.99.1.0/24"])
    assert child["algorithms"]["encryption"] == "aes256gcm16"


async def test_no_key_material_in_either_output() -> None:
    _, record = established()
    assert list(key_material(record))  # the check below has something to look for
    store = MemoryStore()
    await persist(store, record["spi_i"], blob_of(record))
    # a careless writer that left the keys in the clear part: still never shown
    await persist(store, b"careless", blob_of(record, secret_fields=frozenset()))
    rows = await list_sas(store)
    assert len(rows) == 2 and not any("unreadable" in r for r in rows)
    for output in (format_sas(rows), json.dumps(rows)):
        assert_no_keys(record, output)


def test_the_key_check_would_notice_a_key() -> None:
    _, record = established()
    secret = next(key_material(record))
    for leaked in (secret.hex(), secret.hex().upper(), base64.b64encode(secret).decode()):
        with pytest.raises(AssertionError):
            assert_no_keys(record, f"some output {leaked} more")


async def test_an_undecodable_snapshot_is_listed_as_unreadable() -> None:
    _, record = established()
    store = MemoryStore()
    await persist(store, b"good-key", blob_of(record))
    await persist(store, b"\x01junk", b"not msgpack at all", owner="responder-b")
    await persist(store, b"\x02future", blob_of({**record, "v": 99}))
    await persist(store, b"\x03wrong", blob_of({**record, "children": "nope"}))
    rows = await list_sas(store)
    assert rows[0]["key"] == b"good-key".hex() and "unreadable" not in rows[0]
    junk, future, wrong = b"\x01junk".hex(), b"\x02future".hex(), b"\x03wrong".hex()
    unreadable = {r["key"]: r for r in rows[1:]}
    assert set(unreadable) == {junk, future, wrong}
    assert unreadable[junk]["owner"] == "responder-b"
    assert "schema 99" in unreadable[future]["unreadable"]
    text = format_sas(rows)
    assert f"unreadable snapshot {junk}: " in text
    assert text.count("unreadable snapshot") == 3


async def test_text_from_the_store_cannot_drive_the_terminal() -> None:
    # the clear part is not authenticated without the key: anyone who can write the
    # store can put anything in it
    _, record = established()
    store = MemoryStore()
    await persist(store, b"k", blob_of({**record, "connection": "rw\x1b[2J\nfake: #x"}),
                  owner="node\r\n")
    text = format_sas(await list_sas(store))
    assert "\x1b" not in text and "\r" not in text
    assert "\nfake" not in text
    assert text.startswith("rw\\x1b[2J\\nfake: #x: #node\\r\\n, ESTABLISHED")


async def test_an_empty_store_says_so() -> None:
    assert format_sas(await list_sas(MemoryStore())) == "no IKE SAs in the store"


# --- nodes -------------------------------------------------------------------------------


async def test_nodes_lists_live_members_with_the_age_of_their_heartbeat(
        autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryStore()
    await store.heartbeat("worker-1", "worker", 5.0, {"relay": "10.0.0.7:4800"})
    await store.heartbeat("gone", "responder", 1.0)
    await trio.sleep(1.5)
    await store.heartbeat("responder-1", "responder", 5.0,
                          {"relay": "10.0.0.5:4800", "raw": b"\x01\x02"})
    rows = await list_nodes(store)
    assert json.loads(json.dumps(rows)) == rows
    assert [(r["node"], r["role"], r["age"]) for r in rows] == [
        ("responder-1", "responder", 0.0), ("worker-1", "worker", 1.5)]
    assert rows[0]["info"] == {"relay": "10.0.0.5:4800", "raw": "0102"}
    lines = format_nodes(rows).splitlines()
    assert lines[0].split() == ["NODE", "ROLE", "LAST", "HEARTBEAT", "INFO"]
    assert lines[1].split() == ["responder-1", "responder", "0.0s", "ago",
                                "relay=10.0.0.5:4800,", "raw=0102"]
    assert lines[2].split() == ["worker-1", "worker", "1.5s", "ago", "relay=10.0.0.7:4800"]
    # the columns line up
    assert lines[0].index("ROLE") == lines[1].index("responder ") == lines[2].index("worker ")
    assert lines[0].index("INFO") == lines[1].index("relay=") == lines[2].index("relay=")
    assert format_nodes([]) == "no live members"


# --- the commands ------------------------------------------------------------------------

BASE = """
[node]
id = "ops"
[ike]
addresses = ["127.0.0.1"]
[connections.rw]
version = 2
local = { auth = "psk", id = "gw.example.test" }
remote = { auth = "psk", id = "%any" }
[connections.rw.children.net]
local_ts = ["10.99.2.0/24"]
[secrets.rw]
ids = ["gw.example.test", "%any"]
secret = "s"
"""


def write_config(tmp_path: Path, cluster: str) -> str:
    key_file = tmp_path / "cluster_key"
    key_file.write_text(ClusterKey.generate().to_text())
    path = tmp_path / "node.toml"
    path.write_text(BASE + cluster.replace("KEYFILE", str(key_file)))
    return str(path)


@pytest.mark.parametrize("cluster", [
    "",
    '[cluster]\nrelay = "0.0.0.0:4800"\n',
    '[cluster]\nstore = "memory://"\n',
])
def test_without_a_shared_store_sas_asks_the_single_node_and_nodes_has_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], cluster: str) -> None:
    """A single node's SAs are in its memory: `sas` asks its control socket (no node with
    this id runs here, so that fails), `nodes` has no members to list."""
    path = write_config(tmp_path, cluster)
    assert cli.main(["nodes", "--config", path]) == cli.EXIT_CONFIG
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"{path}: no [cluster] store: a single node has no members to list\n"
    assert cli.main(["sas", "--config", path]) == cli.EXIT_FAILURE
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("node ") and "runs in this network namespace" in err, err


def test_a_bad_configuration_is_a_config_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[node\n")
    assert cli.main(["sas", "--config", str(path)]) == cli.EXIT_CONFIG
    assert capsys.readouterr().err.startswith(f"{path}: ")


@pytest.mark.parametrize("command", ["sas", "nodes"])
def test_an_unreachable_store_is_one_line_and_exit_1(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str) -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"  # nothing listens there
    path = write_config(tmp_path, f'[cluster]\nstore = "{url}"\nkey = "KEYFILE"\n')
    assert cli.main([command, "--config", path, "--json"]) == cli.EXIT_FAILURE
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("reading the cluster store failed: ") and err.count("\n") == 1
    assert "hunter2" not in err


@pytest.fixture
def redis_config(tmp_path: Path) -> tuple[str, str]:
    url = redis_url_for_tests()
    return url, write_config(tmp_path, f'[cluster]\nstore = "{url}"\nkey = "KEYFILE"\n')


def test_sas_and_nodes_read_redis_end_to_end(
        redis_config: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    url, path = redis_config
    _, record = established()
    key = record["spi_i"]  # random: other SAs in this Redis do not collide with it
    node = f"ops-test-{os.getpid()}-{key.hex()}"

    async def setup() -> int:
        store = RedisStore.from_url(url)  # the key names the commands read (default prefix)
        try:
            await store.heartbeat(node, "responder", 30.0, {"relay": "192.0.2.9:4800"})
            return await persist(store, key, blob_of(record))
        finally:
            await store.aclose()

    async def cleanup(fence: int) -> None:
        store = RedisStore.from_url(url)
        try:
            await store.delete_sa(key, fence)
            await store.leave(node)
        finally:
            await store.aclose()

    fence = trio.run(setup)
    try:
        assert cli.main(["sas", "--config", path, "--json"]) == cli.EXIT_OK
        rows: list[dict[str, Any]] = json.loads(capsys.readouterr().out)
        [row] = [r for r in rows if r["key"] == key.hex()]
        assert (row["owner"], row["fence"], row["connection"]) == (OWNER, fence, "rw")
        assert row["spi_r"] == record["spi_r"].hex()
        assert row["children"][0]["spi_in"] == record["children"][0]["spi_in"].hex()
        assert_no_keys(record, json.dumps(rows))

        assert cli.main(["sas", "--config", path]) == cli.EXIT_OK
        text = capsys.readouterr().out
        assert f"rw: #{OWNER}, ESTABLISHED, IKEv2, {key.hex()}_i" in text
        assert_no_keys(record, text)

        assert cli.main(["nodes", "--config", path, "--json"]) == cli.EXIT_OK
        members = json.loads(capsys.readouterr().out)
        [member] = [m for m in members if m["node"] == node]
        assert member["role"] == "responder"
        assert member["info"] == {"relay": "192.0.2.9:4800"}
        assert 0 <= member["age"] < 30

        assert cli.main(["nodes", "--config", path]) == cli.EXIT_OK
        [line] = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(node)]
        assert line.split()[1] == "responder" and line.endswith("relay=192.0.2.9:4800")
    finally:
        trio.run(cleanup, fence)


# --- terminate ---------------------------------------------------------------------------


async def test_terminate_asks_the_responders_and_reports_what_left_the_store() -> None:
    """The request goes out on the responders' channel with the SA's SPIs; an SA whose
    record leaves the store is terminated, one that stays is reported as left."""
    from cluster.ops import terminate
    from cluster.runtime.channel import RESPONDERS_CHANNEL, Termination, decode_untrusted

    store = MemoryStore()
    records = [established()[1] for _ in range(2)]
    keys = [r["spi_i"] + r["spi_r"] for r in records]
    for key, record in zip(keys, records, strict=True):
        await persist(store, key, blob_of(record))
    asked: list[object] = []

    async def responder(task_status: trio.TaskStatus[None]) -> None:
        async with store.subscribe(RESPONDERS_CHANNEL) as subscription:
            task_status.started()
            async for message in subscription:
                assert message is not None
                asked_to = decode_untrusted(message)
                assert isinstance(asked_to, Termination) and asked_to.limit is None
                spi_i, spi_r = asked_to.spi_i, asked_to.spi_r
                asked.append((asked_to.origin, spi_i + spi_r))
                if spi_i + spi_r == keys[0]:  # the first goes, the second stays
                    await store.delete_sa(spi_i + spi_r, 1)

    async with trio.open_nursery() as nursery:
        await nursery.start(responder)
        gone, left = await terminate(store, lambda row: True, timeout=1.0, poll=0.05)
        nursery.cancel_scope.cancel()
    assert sorted(asked) == sorted(("@cli", key) for key in keys)  # type: ignore[type-var]
    assert [row["key"] for row in gone] == [keys[0].hex()]
    assert [row["key"] for row in left] == [keys[1].hex()]


def test_terminate_reads_spis_as_sas_and_the_log_print_them() -> None:
    from cluster.ops import _spis

    a, b = "0011223344556677", "8899aabbccddeeff"
    assert _spis(a) == (a,)
    assert _spis(f"{a}_i/{b}_r") == (a, b)
    assert _spis(f"{a.upper()} {b}") == (a, b)
    assert _spis(a + b) == (a, b)
    for bad in ("", "0011", a + "0", f"{a}/{b}/{a}", "zz" * 8):
        assert _spis(bad) is None, bad


def _row(key: str, *children: tuple[str, str], remote: str = "client.example.test") -> dict[
        str, Any]:
    return {"key": key * 32, "spi_i": key * 16, "spi_r": "f" * 16, "connection": "rw",
            "remote_id": {"text": remote}, "remote_eap_id": "", "owner": "gw1",
            "children": [{"name": name, "spi_in": spi} for name, spi in children]}


async def test_rekey_reports_each_sa_once_the_listing_shows_its_successor() -> None:
    """`ike-cluster rekey` asks, then watches the listing: an IKE SA is rekeyed when its
    record is gone and a new one holds its Child SAs; a Child SA when its IKE SA shows
    another of the same child instead of it. One never rekeyed is reported as left."""
    before = [_row("a", ("net", "0a0a0a0a"), ("web", "0b0b0b0b")), _row("c", ("net", "0c"))]
    after_ike = [_row("d", ("net", "0a0a0a0a"), ("web", "0b0b0b0b")), before[1]]
    listings = iter([before, before, before, after_ike])
    asked: list[tuple[str, bytes]] = []

    async def rows() -> list[dict[str, Any]]:
        return next(listings, after_ike)

    async def ask(row: dict[str, Any], spi_in: bytes) -> None:
        asked.append((row["key"], spi_in))

    chosen = ops._chooser("a" * 16, None)
    assert chosen is not None
    done, left = await ops.rekey(rows, ask, chosen, None, timeout=5, poll=0)
    assert asked == [("a" * 32, b"")] and left == []
    assert done == [f"rekeyed IKE SA rw {'a' * 16}_i/{'f' * 16}_r, remote "
                    f"'client.example.test', owner gw1: now {'d' * 16}_i/{'f' * 16}_r"]

    after_child = [_row("a", ("net", "0e0e0e0e"), ("web", "0b0b0b0b")), before[1]]
    listings = iter([before, before, before, after_child])
    by_identity = ops._chooser(None, "client.example.test")
    assert by_identity is not None
    done, left = await ops.rekey(rows, ask, by_identity, "net", timeout=0.3, poll=0)
    assert asked[1:] == [("a" * 32, bytes.fromhex("0a0a0a0a")), ("c" * 32, bytes.fromhex("0c"))]
    assert done == [f"rekeyed CHILD SA net 0a0a0a0a (in) of IKE SA {'a' * 16}_i/{'f' * 16}_r: "
                    "now 0e0e0e0e (in)"]
    assert left == [f"CHILD SA net 0c (in) of IKE SA {'c' * 16}_i/{'f' * 16}_r"]
