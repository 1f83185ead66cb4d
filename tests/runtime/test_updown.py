"""The updown hook: which events run the child's command, with which environment, in
which order (a real script records each run; strongSwan in tests/interop is the judge of
the variables a road warrior's SA gives)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio

from cluster.ike.events import (
    ChildSaDeleted,
    ChildSaEstablished,
    Event,
    IkeSaDeleted,
    IkeSaEstablished,
    IkeSaMoved,
    IkeSaRekeyed,
)
from cluster.ike.policy import ResponderPolicy
from cluster.ike.traffic_selectors import TrafficSelector
from cluster.runtime.updown import Updown
from cluster.transforms import ENCR_ALGORITHMS
from tests.ike.sessions import child, psk_connection, psk_policy

GW = ("192.0.2.1", 4500)
PEER = ("198.51.100.7", 4500)
IKE = b"I" * 8, b"R" * 8
NET = TrafficSelector.from_network("10.99.2.0/24")
VIP = TrafficSelector.from_network("10.3.0.9/32")


def script(tmp_path: Path, *, exit_code: int = 0, sleep: float = 0.0) -> tuple[str, Path]:
    """A command that appends its PLUTO_* variables to a file as one JSON line and
    prints a line."""
    record = tmp_path / "runs.jsonl"
    program = tmp_path / "updown.py"
    program.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys, time\n"
        f"time.sleep({sleep})\n"
        f"with open({str(record)!r}, 'a') as f:\n"
        "    f.write(json.dumps({k: v for k, v in os.environ.items()\n"
        "                        if k.startswith('PLUTO_')}) + '\\n')\n"
        "print('hello from', os.environ['PLUTO_VERB'])\n"
        f"sys.exit({exit_code})\n")
    program.chmod(0o755)
    return f"{program} --some-argument", record


def policy(command: str | None, hostaccess: bool = False) -> ResponderPolicy:
    conn = psk_connection(children=(replace(child(), updown=command, hostaccess=hostaccess),
                                    child(name="quiet")))
    return psk_policy(conn)


def ike_up(spis: tuple[bytes, bytes] = IKE, **fields: Any) -> IkeSaEstablished:
    return replace(IkeSaEstablished(*spis, "rw", "gw.example.test", "client.example.test", GW,
                                    PEER, "aes", True), **fields)


def child_up(spi_in: bytes, *, name: str = "net", replaces: bytes = b"",
             ike: tuple[bytes, bytes] = IKE, local_ts: Sequence[TrafficSelector] = (NET,),
             remote_ts: Sequence[TrafficSelector] = (VIP,),
             mode: str = "tunnel", local: tuple[str, int] = GW, connection: str = "rw",
             **context: Any) -> ChildSaEstablished:
    """A Child SA of connection "rw" between gw.example.test and client.example.test;
    `context`: more of its IKE SA's (eap_identity, virtual_ips, ...)."""
    return ChildSaEstablished(*ike, name, mode, spi_in, b"out!",
                              ENCR_ALGORITHMS["aes256gcm16"], None, False, b"", b"", b"", b"",
                              tuple(local_ts), tuple(remote_ts), local, PEER, encap=True,
                              replaces=replaces, connection=connection,
                              local_id="gw.example.test", remote_id="client.example.test",
                              **context)


def child_down(spi_in: bytes, *, name: str = "net", ike: tuple[bytes, bytes] = IKE
               ) -> ChildSaDeleted:
    return ChildSaDeleted(*ike, name, spi_in, b"out!", "deleted by peer")


async def run(events: list[Event], command: str | None, record: Path | None = None,
              timeout: float = 10.0, hostaccess: bool = False
              ) -> tuple[list[dict[str, str]], Updown]:
    updown = Updown(lambda: policy(command, hostaccess), timeout=timeout,
                    interface_of=lambda address: "eth7" if address == PEER[0] else None)
    async with trio.open_nursery() as nursery:
        await nursery.start(updown.run)
        for event in events:
            updown.record(event)
        updown._send.close()  # (the test's end of the queue: run drains and returns)
    if record is None or not record.exists():
        return [], updown
    return [json.loads(line) for line in record.read_text().splitlines()], updown


async def test_a_child_sa_up_and_down_runs_the_command_with_strongswans_variables(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    command, record = script(tmp_path)
    caplog.set_level("INFO", logger="cluster.runtime.updown")
    runs, updown = await run([
        ike_up(),
        child_up(b"in-1", virtual_ips=("10.3.0.9", "fd00::9"), eap_identity="carol"),
        child_down(b"in-1"),
        IkeSaDeleted(*IKE, "deleted by peer"),
    ], command, record)
    up, down = runs
    assert up == {
        "PLUTO_VERSION": "1.1", "PLUTO_VERB": "up-client", "PLUTO_CONNECTION": "net",
        "PLUTO_INTERFACE": "eth7", "PLUTO_REQID": "1", "PLUTO_PROTO": "esp",
        "PLUTO_UNIQUEID": "1", "PLUTO_ME": "192.0.2.1", "PLUTO_MY_ID": "gw.example.test",
        "PLUTO_MY_CLIENT": "10.99.2.0/24", "PLUTO_MY_PORT": "0", "PLUTO_MY_PROTOCOL": "0",
        "PLUTO_PEER": "198.51.100.7", "PLUTO_PEER_ID": "client.example.test",
        "PLUTO_PEER_CLIENT": "10.3.0.9/32", "PLUTO_PEER_PORT": "0",
        "PLUTO_PEER_PROTOCOL": "0", "PLUTO_XAUTH_ID": "carol",
        "PLUTO_PEER_SOURCEIP": "10.3.0.9", "PLUTO_PEER_SOURCEIP4_1": "10.3.0.9",
        "PLUTO_PEER_SOURCEIP6_1": "fd00::9", "PLUTO_UDP_ENC": "4500",
    }
    assert down == {**up, "PLUTO_VERB": "down-client"}
    assert updown.stats.as_dict() == {"runs": 2, "failed": 0, "dropped": 0}
    assert "updown: hello from up-client" in caplog.text


async def test_hostaccess_gives_the_command_pluto_host_access(tmp_path: Path) -> None:
    """swanctl's hostaccess on the child: PLUTO_HOST_ACCESS=1, as strongSwan's updown
    plugin sets it; without it the variable is absent."""
    command, record = script(tmp_path)
    runs, _ = await run([ike_up(), child_up(b"in-1"), child_down(b"in-1")], command, record,
                        hostaccess=True)
    assert [r.get("PLUTO_HOST_ACCESS") for r in runs] == ["1", "1"]
    record.unlink()
    runs, _ = await run([ike_up(), child_up(b"in-1")], command, record)
    assert [r.get("PLUTO_HOST_ACCESS") for r in runs] == [None]


async def test_rekeys_run_nothing_and_down_follows_the_sa_through_them(tmp_path: Path
                                                                       ) -> None:
    """A Child SA rekey (and an IKE SA rekey under it) is the same Child SA going on:
    only its final Delete runs "down", with the reqid of its "up" and the address the
    peer has moved to by then."""
    command, record = script(tmp_path)
    moved = ("203.0.113.5", 4500)
    new_ike = b"i" * 8, b"r" * 8
    runs, _ = await run([
        ike_up(),
        child_up(b"in-1"),
        child_up(b"in-2", replaces=b"in-1"),
        child_down(b"in-1"),  # the rekeyed SA goes: nothing runs
        IkeSaRekeyed(*IKE, *new_ike, we_initiated=False),
        IkeSaMoved(*new_ike, GW, moved),
        child_down(b"in-2", ike=new_ike),
    ], command, record)
    assert [(r["PLUTO_VERB"], r["PLUTO_REQID"], r["PLUTO_PEER"]) for r in runs] == [
        ("up-client", "1", "198.51.100.7"), ("down-client", "1", "203.0.113.5")]


async def test_each_pair_of_selectors_runs_once_and_hosts_and_ipv6_name_the_verb(
        tmp_path: Path) -> None:
    command, record = script(tmp_path)
    gw6 = ("2001:db8::1", 4500)
    host6 = TrafficSelector.from_network("2001:db8::1/128")
    web = TrafficSelector.from_network("10.99.2.0/24", protocol=6, start_port=80,
                                       end_port=80)
    ping = TrafficSelector.from_network("10.99.5.0/24", protocol=1, start_port=0x0800,
                                        end_port=0x0800)  # ICMP echo request, code 0
    ranged = TrafficSelector(NET.ts_type, 17, 1000, 2000, bytes([10, 99, 3, 4]),
                             bytes([10, 99, 3, 9]))
    runs, _ = await run([
        ike_up(), child_up(b"in-1", local_ts=(web, ping), remote_ts=(VIP, ranged)),
        ike_up((b"6" * 8, b"R" * 8), local=gw6),
        child_up(b"in-6", ike=(b"6" * 8, b"R" * 8), local_ts=(host6,), remote_ts=(host6,),
                 mode="transport", local=gw6),
    ], command, record)
    pairs = [(r["PLUTO_VERB"], r["PLUTO_MY_CLIENT"], r["PLUTO_MY_PORT"],
              r["PLUTO_PEER_CLIENT"], r["PLUTO_PEER_PORT"]) for r in runs]
    assert pairs == [
        ("up-client", "10.99.2.0/24", "80", "10.3.0.9/32", "0"),
        # a range that is no subnet: the smallest subnet that holds it
        ("up-client", "10.99.2.0/24", "80", "10.99.3.0/28", "1000:2000"),
        ("up-client", "10.99.5.0/24", "8", "10.3.0.9/32", "0"),  # ICMP: type, code
        # (as strongSwan: the larger protocol decides, so this pair shows ports)
        ("up-client", "10.99.5.0/24", "2048", "10.99.3.0/28", "1000:2000"),
        ("up-host-v6", "2001:db8::1/128", "0", "2001:db8::1/128", "0"),
    ]


async def test_children_without_updown_and_sas_we_never_saw_run_nothing(
        tmp_path: Path) -> None:
    command, record = script(tmp_path)
    runs, updown = await run([
        ike_up(), child_up(b"in-q", name="quiet"), child_down(b"in-q", name="quiet"),
        child_up(b"in-x", connection="gone"),  # a connection a reload removed
        child_up(b"in-r", replaces=b"in-unknown"),  # a rekey of one without updown
    ], command, record)
    assert runs == [] and updown.stats.runs == 0
    _, updown = await run([ike_up(), child_up(b"in-1")], None)  # no child has a command
    assert updown.stats.runs == 0 and not updown._children  # nothing kept per SA either


async def test_a_failing_or_hanging_command_is_counted_and_the_next_runs(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    failing, record = script(tmp_path, exit_code=3)
    runs, updown = await run([ike_up(), child_up(b"in-1")], failing, record)
    assert len(runs) == 1 and updown.stats.failed == 1
    assert "exited with 3" in caplog.text

    (tmp_path / "h").mkdir()
    hanging, _ = script(tmp_path / "h", sleep=30)
    runs, updown = await run([ike_up(), child_up(b"in-1"), child_down(b"in-1")], hanging,
                             None, timeout=0.5)
    assert updown.stats.as_dict() == {"runs": 2, "failed": 2, "dropped": 0}
    assert "killed after 0.5 s" in caplog.text

    missing = str(tmp_path / "gone")
    _, updown = await run([ike_up(), child_up(b"in-1")], missing)
    assert updown.stats.failed == 1  # the shell's "not found", exit 127


async def test_a_stopping_node_runs_down_for_each_child_sa_still_up(tmp_path: Path) -> None:
    """The node's Child SAs end with it (as when strongSwan stops): "down" for those
    still up, after what was queued, within the stop's wait."""
    command, record = script(tmp_path)
    updown = Updown(lambda: policy(command), interface_of=lambda address: None)
    async with trio.open_nursery() as nursery:
        await nursery.start(updown.run)
        for event in (ike_up(), child_up(b"in-1"), child_up(b"in-2"), child_down(b"in-2")):
            updown.record(event)
        await updown.stop()
    runs = [json.loads(line) for line in record.read_text().splitlines()]
    assert [(r["PLUTO_VERB"], r["PLUTO_REQID"]) for r in runs] == [
        ("up-client", "1"), ("up-client", "2"), ("down-client", "2"), ("down-client", "1")]
    assert runs[0]["PLUTO_INTERFACE"] == "unknown"


async def test_a_stop_waits_a_bounded_time(tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    command, _ = script(tmp_path, sleep=30)
    updown = Updown(lambda: policy(command), interface_of=lambda address: None)
    async with trio.open_nursery() as nursery:
        await nursery.start(updown.run)
        for event in (ike_up(), child_up(b"in-1")):
            updown.record(event)
        with trio.fail_after(5):
            await updown.stop(wait=0.5)
        nursery.cancel_scope.cancel()
    assert "updown: stopped with 2 runs not done" in caplog.text
