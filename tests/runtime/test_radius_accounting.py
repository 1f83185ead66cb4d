"""RADIUS accounting from SA events: what is sent when, and what a server would record."""

from __future__ import annotations

import contextlib
import hashlib
import struct
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import trio

from cluster.ike.events import (
    AUTH_EXPIRED,
    KEPT,
    PEER_NOT_RESPONDING,
    REPLACED,
    TERMINATED,
    ChildSaDeleted,
    ChildSaEstablished,
    IkeSaAdopted,
    IkeSaDeleted,
    IkeSaEstablished,
    IkeSaRekeyed,
)
from cluster.ike.identity import parse_identity_pattern
from cluster.ike.policy import RemoteAuth, ResponderPolicy
from cluster.ike.radius import Attr, Packet, RadiusServer, RadiusSettings
from cluster.runtime.radius_accounting import (
    QUEUE,
    REPORT_WAIT,
    Accounting,
    terminate_cause,
)
from cluster.runtime.radius_client import RadiusClient
from cluster.transforms import ENCR_ALGORITHMS
from tests.ike.sessions import psk_connection, psk_policy

SECRET = b"accounting secret"
SERVERS = (RadiusServer("down", "192.0.2.8", secret=SECRET),
           RadiusServer("up", "192.0.2.9", secret=SECRET, acct_port=11813))


def policy(accounting: bool = True, servers: tuple[RadiusServer, ...] = SERVERS
           ) -> ResponderPolicy:
    conn = replace(psk_connection(), remote=RemoteAuth("eap-radius",
                                                       parse_identity_pattern("%any")))
    plain = psk_connection(name="site")
    return replace(psk_policy(conn, plain), radius=RadiusSettings(
        servers, tries=1, accounting=accounting))


class Recorder(RadiusClient):
    """A server at "up" that checks the Request Authenticator and answers; "down" is
    silent."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[dict[int, list[bytes]]] = []
        self.ports: list[tuple[str, int]] = []

    async def exchange(self, server: RadiusServer, request: bytes, settings: RadiusSettings,
                       accept: Callable[[bytes], bool]) -> bytes | None:
        self.ports.append((server.name, server.port))
        assert request[0] == Packet.ACCOUNTING_REQUEST
        assert request[4:20] == hashlib.md5(request[:4] + bytes(16) + request[20:]
                                            + SECRET).digest()
        if server.name == "down":
            return None
        record: dict[int, list[bytes]] = {}
        at = 20
        while at < len(request):
            record.setdefault(request[at], []).append(request[at + 2:at + request[at + 1]])
            at += request[at + 1]
        self.records.append(record)
        head = struct.pack("!BBH", Packet.ACCOUNTING_RESPONSE, request[1], 20)
        answer = head + hashlib.md5(head + request[4:20] + SECRET).digest()
        assert accept(answer)
        return answer


def established(spi: bytes, conn: str = "rw", user: str = "carol") -> IkeSaEstablished:
    return IkeSaEstablished(spi, b"R" * 8, conn, "gw", "client", ("192.0.2.1", 4500),
                            ("198.51.100.7", 4500), "aes", True, virtual_ips=("10.3.0.9",),
                            eap_identity=user, radius_classes=(b"group-a",))


def child(spi_in: bytes, ike: bytes) -> ChildSaEstablished:
    return ChildSaEstablished(ike, b"R" * 8, "net", "tunnel", spi_in, b"out!",
                              ENCR_ALGORITHMS["aes256gcm16"], None, False, b"", b"", b"", b"")


def u32(value: bytes) -> int:
    return int.from_bytes(value, "big")


async def run(events: list[object], *, accounting: bool = True,
              traffic: dict[bytes, tuple[int, int, int, int]] | None = None,
              servers: tuple[RadiusServer, ...] = SERVERS) -> tuple[Recorder, Accounting]:
    """A single node's accounting: with `traffic`, a data plane in this process counts
    (`traffic` what its Child SAs carried so far), and ("removed", spi) is it telling
    that an SA left its SAD, with that count; "later" moves the clock 75.4 s on."""
    now = [100.0]
    client = Recorder()
    acct = Accounting(lambda: policy(accounting, servers), client,
                      traffic=None if traffic is None else traffic.get,
                      reported=traffic is not None, clock=lambda: now[0])
    async with trio.open_nursery() as nursery:
        await nursery.start(acct.run)
        for event in events:
            if event == "later":
                now[0] += 75.4
            elif event == "interim":
                acct.interim()
            elif isinstance(event, tuple) and event[0] == "removed":
                assert traffic is not None
                acct.child_traffic(b"", b"", event[1], traffic[event[1]])
            else:
                acct.record(event)  # type: ignore[arg-type]
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    return client, acct


async def test_start_and_stop_carry_the_session_its_traffic_and_why_it_ended() -> None:
    first, second = b"I" * 8, b"J" * 8
    client, acct = await run([
        established(first), child(b"c1c1", first), "later",
        IkeSaRekeyed(first, b"R" * 8, second, b"R" * 8, False),  # the same session goes on
        ChildSaDeleted(first, b"R" * 8, "net", b"c1c1", b"out!", "rekeyed"),
        child(b"c2c2", second),
        ("removed", b"c1c1"),  # after its linger
        IkeSaDeleted(second, b"R" * 8, PEER_NOT_RESPONDING),
        ("removed", b"c2c2"),  # the data plane sees the event after accounting
    ], traffic={b"c1c1": (1000, 2000, 10, 20), b"c2c2": (2**32 + 5, 7, 3, 1)})
    start, stop = client.records
    assert u32(start[Attr.ACCT_STATUS_TYPE][0]) == 1 and u32(stop[Attr.ACCT_STATUS_TYPE][0]) == 2
    assert start[Attr.ACCT_SESSION_ID] == stop[Attr.ACCT_SESSION_ID] == [(first + b"R" * 8)
                                                                          .hex().encode()]
    for record in (start, stop):
        assert record[Attr.USER_NAME] == [b"carol"]
        assert record[Attr.FRAMED_IP_ADDRESS] == [bytes((10, 3, 0, 9))]
        assert record[Attr.CLASS] == [b"group-a"]
        assert record[Attr.CALLING_STATION_ID] == [b"198.51.100.7[4500]"]
    assert u32(stop[Attr.ACCT_SESSION_TIME][0]) == 75
    assert u32(stop[Attr.ACCT_TERMINATE_CAUSE][0]) == 2  # Lost-Carrier
    # input is what the user sent: the Child SAs' inbound bytes, over 2^32 in gigawords
    assert (u32(stop[Attr.ACCT_INPUT_GIGAWORDS][0]), u32(stop[Attr.ACCT_INPUT_OCTETS][0])) \
        == (1, 1005)
    assert u32(stop[Attr.ACCT_OUTPUT_OCTETS][0]) == 2007
    assert (u32(stop[Attr.ACCT_INPUT_PACKETS][0]), u32(stop[Attr.ACCT_OUTPUT_PACKETS][0])) \
        == (13, 21)
    # each request tried "down" first, then "up" at its accounting port
    assert client.ports == [("down", 1813), ("up", 11813)] * 2
    assert acct.stats.as_dict() == {"sent": 2, "failed": 0, "dropped": 0}


async def test_only_eap_radius_users_are_accounted_and_only_when_asked() -> None:
    client, _ = await run([established(b"I" * 8, conn="site"),
                           IkeSaDeleted(b"I" * 8, b"R" * 8, "deleted by peer")])
    assert client.records == []
    client, _ = await run([established(b"I" * 8), IkeSaDeleted(b"I" * 8, b"R" * 8, "x")],
                          accounting=False)
    assert client.records == []


async def test_without_a_data_plane_here_a_stop_carries_no_traffic() -> None:
    client, _ = await run([established(b"I" * 8),
                           IkeSaDeleted(b"I" * 8, b"R" * 8, "deleted by peer")])
    stop = client.records[1]
    assert Attr.ACCT_INPUT_OCTETS not in stop and Attr.ACCT_OUTPUT_PACKETS not in stop
    assert u32(stop[Attr.ACCT_TERMINATE_CAUSE][0]) == 1  # User-Request


async def test_requests_no_server_answers_or_that_find_the_queue_full_are_counted() -> None:
    client, acct = await run([established(b"I" * 8)], servers=SERVERS[:1])
    assert client.records == [] and acct.stats.as_dict() == {"sent": 0, "failed": 1,
                                                              "dropped": 0}
    idle = Accounting(policy, Recorder())  # nothing sends: the queue fills up
    for n in range(QUEUE + 2):
        idle.record(established(n.to_bytes(8, "big")))
    assert idle.stats.dropped == 2


def test_terminate_causes_follow_why_the_session_ended() -> None:
    assert [terminate_cause(r) for r in ("deleted by peer", PEER_NOT_RESPONDING, TERMINATED,
                                         REPLACED, "replaced (INITIAL_CONTACT)", KEPT,
                                         "deleted by us", AUTH_EXPIRED)] == [
        1, 2, 6, 13, 13, 10, 10, 5]


async def test_interim_updates_come_at_the_servers_interval_with_the_traffic_so_far() -> None:
    first = b"I" * 8
    start = replace(established(first), radius_interim=120)
    client, _ = await run([start, child(b"c1c1", first), "later", "interim", "later",
                           "interim", "interim"],
                          traffic={b"c1c1": (500, 600, 5, 6)})
    start_record, interim = client.records  # one update: at 150.8 s, not at 75.4 s
    assert u32(interim[Attr.ACCT_STATUS_TYPE][0]) == 3
    assert u32(interim[Attr.ACCT_SESSION_TIME][0]) == 150
    assert u32(interim[Attr.ACCT_INPUT_OCTETS][0]) == 500
    assert interim[Attr.ACCT_SESSION_ID] == start_record[Attr.ACCT_SESSION_ID]
    # without an interval from the server or the configuration: none
    client, _ = await run([established(first), "later", "later", "interim"])
    assert [u32(r[Attr.ACCT_STATUS_TYPE][0]) for r in client.records] == [1]


async def test_a_session_taken_over_goes_on_without_a_second_start() -> None:
    """After its responder died, the survivor that took the SA over sends its Interim-
    Updates and Stop under the same session id, its time counted from the login."""
    adopted = IkeSaAdopted(b"I" * 8, b"R" * 8, "rw", ("192.0.2.1", 4500),
                           ("198.51.100.7", 4500), ("10.3.0.9",), "carol", (b"group-a",), 0,
                           time.time() - 600.0, (b"c1c1",))
    client, _ = await run([adopted, "later", IkeSaDeleted(b"I" * 8, b"R" * 8, TERMINATED),
                           ("removed", b"c1c1")], traffic={b"c1c1": (10, 20, 1, 2)})
    [stop] = client.records
    assert u32(stop[Attr.ACCT_STATUS_TYPE][0]) == 2
    assert stop[Attr.ACCT_SESSION_ID] == [(b"I" * 8 + b"R" * 8).hex().encode()]
    assert 675 <= u32(stop[Attr.ACCT_SESSION_TIME][0]) <= 677  # 600 s before, then 75.4 s
    assert u32(stop[Attr.ACCT_TERMINATE_CAUSE][0]) == 6  # Admin-Reset
    assert u32(stop[Attr.ACCT_INPUT_OCTETS][0]) == 10  # its Child SA, known from the event
    assert stop[Attr.CLASS] == [b"group-a"]


async def test_a_rekeyed_child_sa_counts_while_it_lingers_and_in_full_once_removed() -> None:
    """Deleted after a rekey, a Child SA still receives for a few seconds: Interim-Updates
    go on counting it (so they never go down), and its final count comes with its
    removal; a Stop waits for the removals (REPORT_WAIT at most)."""
    first = b"I" * 8
    traffic = {b"c1c1": (100, 200, 1, 2), b"c2c2": (0, 0, 0, 0)}
    client, _ = await run([
        replace(established(first), radius_interim=60), child(b"c1c1", first), "later",
        "interim",
        child(b"c2c2", first), ChildSaDeleted(first, b"R" * 8, "net", b"c1c1", b"out!",
                                              "rekeyed"),
        "later", "interim",  # c1c1 lingers: still counted
    ], traffic=traffic)
    _, first_update, lingering = client.records
    assert u32(first_update[Attr.ACCT_INPUT_OCTETS][0]) == 100
    assert u32(lingering[Attr.ACCT_INPUT_OCTETS][0]) == 100
    traffic[b"c1c1"] = (150, 200, 2, 2)  # what arrived late, in its last seconds
    async with cluster_accounting(traffic) as (acct, client, _):
        for event in (established(first), child(b"c1c1", first), child(b"c2c2", first),
                      ChildSaDeleted(first, b"R" * 8, "net", b"c1c1", b"out!", "rekeyed"),
                      IkeSaDeleted(first, b"R" * 8, "deleted by peer")):
            acct.record(event)
        acct.child_traffic(b"", b"", b"c2c2", (7, 0, 1, 0))
        await trio.testing.wait_all_tasks_blocked()
        assert len(client.records) == 1  # the Stop waits for c1c1's removal
        acct.child_traffic(b"", b"", b"c1c1", traffic[b"c1c1"])
    stop = client.records[1]
    assert u32(stop[Attr.ACCT_STATUS_TYPE][0]) == 2
    assert (u32(stop[Attr.ACCT_INPUT_OCTETS][0]), u32(stop[Attr.ACCT_INPUT_PACKETS][0])) == (
        157, 3)


@contextlib.asynccontextmanager
async def cluster_accounting(traffic: dict[bytes, tuple[int, int, int, int]] | None = None
                             ) -> AsyncIterator[tuple[Accounting, Recorder, list[float]]]:
    """A cluster responder's accounting (`reported`), running, its clock at now[0]; what
    it queued is sent before the block ends. With `traffic`, a single node's."""
    now = [100.0]
    client = Recorder()
    acct = Accounting(policy, client, reported=True, clock=lambda: now[0],
                      traffic=None if traffic is None else traffic.get)
    async with trio.open_nursery() as nursery:
        await nursery.start(acct.run)
        yield acct, client, now
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()


async def test_a_cluster_responders_stop_waits_for_the_workers_reports() -> None:
    """`reported`: the traffic comes from the workers as they remove each Child SA; the
    Stop goes out when the last report is in (or after REPORT_WAIT with what came)."""
    first = b"I" * 8
    async with cluster_accounting() as (acct, client, now):
        acct.record(established(first))
        acct.record(child(b"c1c1", first))
        acct.record(child(b"c2c2", first))
        acct.record(ChildSaDeleted(first, b"R" * 8, "net", b"c1c1", b"out!", "rekeyed"))
        acct.child_traffic(first, b"R" * 8, b"c1c1", (100, 200, 1, 2))
        acct.child_traffic(first, b"R" * 8, b"c1c1", (100, 200, 1, 2))  # a repeat: once
        acct.record(IkeSaDeleted(first, b"R" * 8, "deleted by peer"))
        await trio.testing.wait_all_tasks_blocked()
        assert len(client.records) == 1  # the Start; the Stop waits for c2c2's report
        acct.child_traffic(first, b"R" * 8, b"c2c2", (10, 20, 3, 4))
        await trio.testing.wait_all_tasks_blocked()
        # a second session whose report never comes: sent after the wait
        second = b"J" * 8
        acct.record(established(second))
        acct.record(child(b"c3c3", second))
        acct.record(IkeSaDeleted(second, b"R" * 8, "deleted by peer"))
        now[0] += REPORT_WAIT
        acct._overdue_stops()
    _, stop, _, late = client.records
    assert u32(stop[Attr.ACCT_STATUS_TYPE][0]) == 2
    assert (u32(stop[Attr.ACCT_INPUT_OCTETS][0]), u32(stop[Attr.ACCT_OUTPUT_PACKETS][0])) == (
        110, 6)
    assert u32(late[Attr.ACCT_STATUS_TYPE][0]) == 2 and u32(late[Attr.ACCT_INPUT_OCTETS][0]) == 0


async def test_a_cluster_responders_interim_updates_carry_what_the_workers_told_so_far(
        ) -> None:
    """`reported`: CHILD_USAGE from the workers (child_usage) counts in Interim-Updates
    for the Child SAs still up, a late-arriving older count changes nothing, a removed
    Child SA's own report replaces its usage, and a Stop whose last report never came
    carries the usage told before."""
    first = b"I" * 8
    async with cluster_accounting() as (acct, client, now):
        acct.record(replace(established(first), radius_interim=60))
        acct.record(child(b"c1c1", first))
        acct.record(child(b"c2c2", first))
        acct.child_usage(first, b"R" * 8, b"c1c1", (1000, 2000, 10, 20))
        acct.child_usage(first, b"R" * 8, b"c1c1", (900, 1800, 9, 18))  # overtaken
        acct.child_usage(first, b"R" * 8, b"c2c2", (5, 6, 1, 1))
        acct.child_usage(first, b"R" * 8, b"c9c9", (7, 7, 7, 7))  # not this session's
        now[0] += 60
        acct.interim()
        acct.record(ChildSaDeleted(first, b"R" * 8, "net", b"c1c1", b"out!", "rekeyed"))
        acct.child_traffic(first, b"R" * 8, b"c1c1", (1100, 2100, 11, 21))
        acct.child_usage(first, b"R" * 8, b"c1c1", (1000, 2000, 10, 20))  # after: ignored
        now[0] += 60
        acct.interim()
        acct.record(IkeSaDeleted(first, b"R" * 8, "deleted by peer"))
        now[0] += REPORT_WAIT  # c2c2's removal is never told
        acct._overdue_stops()
    _, interim, later, stop = client.records
    assert [u32(r[Attr.ACCT_STATUS_TYPE][0]) for r in (interim, later, stop)] == [3, 3, 2]
    assert (u32(interim[Attr.ACCT_INPUT_OCTETS][0]),
            u32(interim[Attr.ACCT_OUTPUT_PACKETS][0])) == (1005, 21)
    assert (u32(later[Attr.ACCT_INPUT_OCTETS][0]), u32(later[Attr.ACCT_OUTPUT_PACKETS][0])) == (
        1105, 22)
    assert (u32(stop[Attr.ACCT_INPUT_OCTETS][0]), u32(stop[Attr.ACCT_OUTPUT_PACKETS][0])) == (
        1105, 22)
