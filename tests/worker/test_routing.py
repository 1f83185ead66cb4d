"""Routes into the TUN and the "not fwmark" policy rules, inside a network namespace."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from cluster.worker.routing import DEFAULT_PRIORITY, DEFAULT_TABLE, Routes
from cluster.worker.tun import TunDevice

from .namespaces import ip, ip_json, run_in_netns

TUN = "ikt0"


def _table(table: int = DEFAULT_TABLE) -> list[tuple[str, str, str | None]]:
    """(dst, dev, prefsrc) of every route in `table`, IPv4 and IPv6."""
    routes = []
    for family in ("-4", "-6"):
        for r in ip_json(family, "route", "show", "table", str(table)):
            routes.append((r["dst"], r["dev"], r.get("prefsrc")))
    return sorted(routes)


def _our_rules(priority: int = DEFAULT_PRIORITY) -> list[dict[str, Any]]:
    rules = []
    for family in ("-4", "-6"):
        rules += [r for r in ip_json(family, "rule", "show") if r["priority"] == priority]
    return rules


def _route_get(address: str, *extra: str) -> dict[str, Any]:
    result: dict[str, Any] = ip_json("route", "get", address, *extra)[0]
    return result


def _leftovers() -> dict[str, Any]:
    """Everything beyond a fresh namespace's state: links, non-default rules, routes."""
    return {
        "links": sorted(link["ifname"] for link in ip_json("link", "show")),
        "rules": sorted(
            r["priority"]
            for family in ("-4", "-6")
            for r in ip_json(family, "rule", "show")
            if r["priority"] not in (0, 32766, 32767)
        ),
        "routes": [
            r for family in ("-4", "-6") for r in ip_json(family, "route", "show", "table", "all")
            if r.get("table") not in ("local",) and r.get("dev") != "lo"
        ],
    }


CLEAN = {"links": ["lo"], "rules": [], "routes": []}


def test_rules_send_unmarked_traffic_to_the_table_and_go_on_close(ns: str) -> None:
    def body() -> dict[str, Any]:
        with TunDevice.open(TUN) as tun:
            with Routes.open(tun.ifindex) as routes:
                present = _our_rules()
                seen = (routes.table, routes.priority, routes.mark)
            after_routes = _our_rules()
        return {"present": present, "seen": seen, "after": after_routes, "left": _leftovers()}

    got = run_in_netns(ns, body)
    assert got["seen"] == (1450, 1450, 0x1C5)
    present = got["present"]
    assert len(present) == 2  # IPv4 and IPv6
    for rule in present:
        # "not from all fwmark 0x1c5 lookup 1450": `ip -j` writes "not" as a key with
        # a null value and leaves out a full fwmask.
        assert rule == {
            "priority": 1450, "not": None, "src": "all", "fwmark": "0x1c5", "table": "1450",
        }
    assert got["after"] == []
    assert got["left"] == CLEAN


def test_added_networks_route_into_the_tun_with_the_source_hint(ns: str) -> None:
    def body() -> dict[str, Any]:
        with TunDevice.open(TUN) as tun, Routes.open(tun.ifindex) as routes:
            tun.add_address("10.99.2.1/32")
            tun.add_address("fd00:99:2::1/128")
            routes.add("10.99.1.0/24", src="10.99.2.1")
            routes.add("fd00:99:1::/64", src="fd00:99:2::1")
            routes.add("192.0.2.77")  # a bare address is a host route (transport peer)
            return {
                "table": _table(),
                "v4": _route_get("10.99.1.5"),
                "v6": _route_get("fd00:99:1::5"),
                # The worker's own marked packets do not see the table.
                "marked": subprocess.run(
                    ["ip", "route", "get", "10.99.1.5", "mark", "0x1c5"],
                    capture_output=True, text=True,
                ).returncode,
                "networks": routes.networks,
            }

    got = run_in_netns(ns, body)
    assert got["table"] == [
        ("10.99.1.0/24", TUN, "10.99.2.1"),
        ("192.0.2.77", TUN, None),
        ("fd00:99:1::/64", TUN, "fd00:99:2::1"),
    ]
    assert (got["v4"]["dev"], got["v4"]["prefsrc"]) == (TUN, "10.99.2.1")
    assert (got["v6"]["dev"], got["v6"]["prefsrc"]) == (TUN, "fd00:99:2::1")
    assert got["marked"] != 0  # main table has no route to 10.99.1.5 in this namespace
    assert got["networks"] == {"10.99.1.0/24": 1, "fd00:99:1::/64": 1, "192.0.2.77/32": 1}


def test_routes_are_reference_counted_per_network(ns: str) -> None:
    def body() -> list[Any]:
        with TunDevice.open(TUN) as tun, Routes.open(tun.ifindex) as routes:
            routes.add("10.99.1.0/24")
            routes.add("10.99.1.0/24")  # a second Child SA with the same selector
            routes.add("10.99.1.7/24")  # host bits are ignored: same network
            steps: list[Any] = [routes.networks, len(_table())]
            routes.remove("10.99.1.0/24")
            routes.remove("10.99.1.0/24")
            steps += [routes.networks, len(_table())]
            routes.remove("10.99.1.0/24")
            steps += [routes.networks, len(_table())]
            try:
                routes.remove("10.99.1.0/24")
            except KeyError:
                steps.append("KeyError")
        return steps

    assert run_in_netns(ns, body) == [
        {"10.99.1.0/24": 3}, 1, {"10.99.1.0/24": 1}, 1, {}, 0, "KeyError",
    ]


def test_everything_is_removed_when_the_block_raises(ns: str) -> None:
    def body() -> dict[str, Any]:
        try:
            with TunDevice.open(TUN) as tun, Routes.open(tun.ifindex) as routes:
                routes.add("10.99.1.0/24")
                routes.add("fd00:99:1::/64")
                routes.add("198.51.100.4")
                raise RuntimeError("boom")
        except RuntimeError:
            pass
        return _leftovers()

    assert run_in_netns(ns, body) == CLEAN


def test_routes_close_after_the_tun_is_gone_still_removes_the_rules(ns: str) -> None:
    def body() -> dict[str, Any]:
        tun = TunDevice.open(TUN)
        routes = Routes.open(tun.ifindex)
        routes.add("10.99.1.0/24")
        tun.close()  # takes its routes along
        routes.close()  # must not fail on the missing routes
        routes.close()  # idempotent
        return _leftovers()

    assert run_in_netns(ns, body) == CLEAN


def test_two_workers_with_their_own_table_priority_and_mark_coexist(ns: str) -> None:
    def body() -> dict[str, Any]:
        with (
            TunDevice.open("ikt0") as t0,
            TunDevice.open("ikt1") as t1,
            Routes.open(t0.ifindex) as r0,
            Routes.open(t1.ifindex, table=1451, priority=1451, mark=0x1C6) as r1,
        ):
            r0.add("10.99.1.0/24")
            r1.add("10.99.1.0/24")
            got = {
                "t0": _table(1450), "t1": _table(1451),
                "rule1": [(r["fwmark"], r["table"]) for r in _our_rules(1451)],
                # Unmarked: first rule wins; marked with r0's mark: r1's table.
                "plain": _route_get("10.99.1.5")["dev"],
                "mark0": _route_get("10.99.1.5", "mark", "0x1c5")["dev"],
            }
        got["left"] = _leftovers()
        return got

    got = run_in_netns(ns, body)
    assert got["t0"] == [("10.99.1.0/24", "ikt0", None)]
    assert got["t1"] == [("10.99.1.0/24", "ikt1", None)]
    assert got["rule1"] == [("0x1c6", "1451"), ("0x1c6", "1451")]
    assert (got["plain"], got["mark0"]) == ("ikt0", "ikt1")
    assert got["left"] == CLEAN


def test_a_rule_left_by_a_crashed_run_is_adopted_and_removed(ns: str) -> None:
    ip("rule", "add", "not", "fwmark", "0x1c5", "table", "1450", "pref", "1450", netns=ns)

    def body() -> dict[str, Any]:
        with TunDevice.open(TUN) as tun, Routes.open(tun.ifindex):
            during = len(_our_rules())
        return {"during": during, "left": _leftovers()}

    assert run_in_netns(ns, body) == {"during": 2, "left": CLEAN}


def test_source_of_another_family_is_refused(ns: str) -> None:
    def body() -> str:
        with TunDevice.open(TUN) as tun, Routes.open(tun.ifindex) as routes:
            try:
                routes.add("fd00:99:1::/64", src="10.99.2.1")
            except ValueError as exc:
                return f"ValueError {routes.networks}" if "family" in str(exc) else str(exc)
        return "accepted"

    assert run_in_netns(ns, body) == "ValueError {}"


@pytest.mark.parametrize(
    "kwargs",
    [{"table": 254}, {"table": 0}, {"priority": 0}, {"priority": 32766}, {"mark": 0},
     {"mark": 1 << 32}],
)
def test_reserved_tables_priorities_and_marks_are_refused(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        Routes.open(1, **kwargs)
