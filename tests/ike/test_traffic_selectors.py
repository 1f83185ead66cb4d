"""Traffic selector narrowing (RFC 7296 2.9) and the configuration syntax."""

from __future__ import annotations

import ipaddress

import pytest

from cluster.ike.constants import TsType
from cluster.ike.traffic_selectors import TrafficSelector, TsConfig, narrow, parse_ts_config


def ts(text: str) -> TrafficSelector:
    """`net`, `a..b`, optionally `[proto/lo-hi]`, as a selector."""
    spec = ""
    if "[" in text:
        text, spec = text[:-1].split("[")
    protocol, lo, hi = 0, 0, 65535
    if spec:
        proto, _, ports = spec.partition("/")
        protocol = int(proto)
        if ports:
            a, _, b = ports.partition("-")
            lo, hi = int(a), int(b or a)
    if ".." in text:
        start, end = (ipaddress.ip_address(x) for x in text.split(".."))
        kind = TsType.IPV4_ADDR_RANGE if start.version == 4 else TsType.IPV6_ADDR_RANGE
        return TrafficSelector(kind, protocol, lo, hi, start.packed, end.packed)
    return TrafficSelector.from_network(text, protocol, lo, hi)


NARROWING: list[tuple[str, list[str], list[str], list[str]]] = [
    # name, proposed, allowed, expected
    ("subset stays", ["10.1.1.0/24"], ["10.1.0.0/16"], ["10.1.1.0/24"]),
    ("superset narrows to policy", ["0.0.0.0/0"], ["10.1.0.0/16"], ["10.1.0.0/16"]),
    ("equal", ["10.1.0.0/16"], ["10.1.0.0/16"], ["10.1.0.0/16"]),
    ("disjoint", ["192.168.0.0/16"], ["10.0.0.0/8"], []),
    ("adjacent is disjoint", ["10.0.1.0/24"], ["10.0.0.0/24"], []),
    ("partial overlap", ["10.0.0.0..10.0.0.200"], ["10.0.0.100..10.0.1.0"],
     ["10.0.0.100..10.0.0.200"]),
    ("single host inside", ["10.1.2.3/32"], ["10.1.0.0/16"], ["10.1.2.3/32"]),
    ("ports narrow", ["10.0.0.0/8[6]"], ["10.0.0.0/8[6/80]"], ["10.0.0.0/8[6/80]"]),
    ("port ranges intersect", ["10.0.0.0/8[0/1000-2000]"], ["10.0.0.0/8[0/1500-3000]"],
     ["10.0.0.0/8[0/1500-2000]"]),
    ("disjoint ports", ["10.0.0.0/8[6/1-10]"], ["10.0.0.0/8[6/11-20]"], []),
    ("any protocol narrows to ours", ["10.0.0.0/8"], ["10.0.0.0/8[17]"], ["10.0.0.0/8[17]"]),
    ("their protocol inside our any", ["10.0.0.0/8[6]"], ["10.0.0.0/8"], ["10.0.0.0/8[6]"]),
    ("different protocols", ["10.0.0.0/8[6]"], ["10.0.0.0/8[17]"], []),
    ("IPv6 subset", ["fd00:1:2::/48"], ["fd00::/16"], ["fd00:1:2::/48"]),
    ("IPv6 superset", ["::/0"], ["fd00:1::/64"], ["fd00:1::/64"]),
    ("IPv6 disjoint", ["fd00:2::/32"], ["fd00:1::/32"], []),
    ("IPv6 with ports", ["::/0[17/0-65535]"], ["2001:db8::1/128[17/500]"],
     ["2001:db8::1/128[17/500]"]),
    ("IPv4 never meets IPv6", ["0.0.0.0/0"], ["::/0"], []),
    ("trigger packet and network both kept", ["10.1.0.5/32[6/443]", "10.1.0.0/16"],
     ["10.1.0.0/24"], ["10.1.0.5/32[6/443]", "10.1.0.0/24"]),
    ("one proposal against two allowed", ["10.0.0.0/8"], ["10.1.0.0/16", "10.2.0.0/16"],
     ["10.1.0.0/16", "10.2.0.0/16"]),
    ("duplicates collapse", ["10.1.0.0/16", "10.0.0.0/8"], ["10.1.0.0/16"], ["10.1.0.0/16"]),
    ("mixed families keep each", ["0.0.0.0/0", "::/0"], ["10.0.0.0/8", "fd00::/8"],
     ["10.0.0.0/8", "fd00::/8"]),
    ("nothing proposed", [], ["10.0.0.0/8"], []),
]


@pytest.mark.parametrize(("name", "proposed", "allowed", "expected"), NARROWING,
                         ids=[n[0] for n in NARROWING])
def test_narrowing(name: str, proposed: list[str], allowed: list[str],
                   expected: list[str]) -> None:
    got = narrow([ts(p) for p in proposed], [ts(a) for a in allowed])
    assert got == tuple(ts(e) for e in expected)


def test_narrowing_result_is_inside_both() -> None:
    proposed, allowed = ts("10.0.0.0..10.0.3.255[6/100-200]"), ts("10.0.2.0/23[0/150-400]")
    [common] = narrow([proposed], [allowed])
    for outer in (proposed, allowed):
        assert outer.start_addr <= common.start_addr <= common.end_addr <= outer.end_addr
        assert outer.start_port <= common.start_port <= common.end_port <= outer.end_port
    assert common.protocol == 6


def test_intersect_is_symmetric() -> None:
    a, b = ts("10.0.0.0/8[0/0-100]"), ts("10.5.0.0/16[6/50-200]")
    assert a.intersect(b) == b.intersect(a) == ts("10.5.0.0/16[6/50-100]")


# --- selector values ---------------------------------------------------------------------

def test_from_network_covers_the_whole_network() -> None:
    sel = TrafficSelector.from_network("10.1.2.3/16")  # host bits are dropped
    assert sel.ts_type is TsType.IPV4_ADDR_RANGE
    assert (sel.start_addr, sel.end_addr) == (bytes([10, 1, 0, 0]), bytes([10, 1, 255, 255]))
    assert (sel.protocol, sel.start_port, sel.end_port) == (0, 0, 65535)
    v6 = TrafficSelector.for_host("fd00::1")
    assert v6.ts_type is TsType.IPV6_ADDR_RANGE and v6.is_host()
    assert v6.start_addr == ipaddress.IPv6Address("fd00::1").packed


@pytest.mark.parametrize(("selector", "text"), [
    (ts("10.1.0.0/16"), "10.1.0.0/16"),
    (ts("10.0.0.1..10.0.0.5"), "10.0.0.1..10.0.0.5"),
    (ts("fd00::/64"), "fd00::/64"),
    (ts("10.0.0.0/8[6/80]"), "10.0.0.0/8[6/80]"),
    (ts("10.0.0.0/8[17/1000-2000]"), "10.0.0.0/8[17/1000-2000]"),
])
def test_selector_text(selector: TrafficSelector, text: str) -> None:
    assert str(selector) == text


# --- parse_ts_config ---------------------------------------------------------------------

VALID_CONFIG: list[tuple[str, TrafficSelector | None, int, int, int]] = [
    ("10.1.0.0/16", ts("10.1.0.0/16"), 0, 0, 65535),
    (" 10.1.0.0/16 ", ts("10.1.0.0/16"), 0, 0, 65535),
    ("10.1.2.3/16", ts("10.1.0.0/16"), 0, 0, 65535),
    ("192.0.2.7", ts("192.0.2.7/32"), 0, 0, 65535),
    ("fd00::1", ts("fd00::1/128"), 0, 0, 65535),
    ("fd00:1::/64", ts("fd00:1::/64"), 0, 0, 65535),
    ("dynamic", None, 0, 0, 65535),
    ("dynamic[tcp/443]", None, 6, 443, 443),
    ("10.0.0.0/8[udp/1000-2000]", ts("10.0.0.0/8[17/1000-2000]"), 17, 1000, 2000),
    ("10.0.0.0/8[17]", ts("10.0.0.0/8[17]"), 17, 0, 65535),
    ("10.0.0.0/8[any/53]", ts("10.0.0.0/8[0/53]"), 0, 53, 53),
    ("10.0.0.0/8[icmp]", ts("10.0.0.0/8[1]"), 1, 0, 65535),
    ("fd00::/8[ipv6-icmp]", ts("fd00::/8[58]"), 58, 0, 65535),
    ("10.0.0.0/8[tcp/any]", ts("10.0.0.0/8[6]"), 6, 0, 65535),
    ("10.0.0.0/8[/22]", ts("10.0.0.0/8[0/22]"), 0, 22, 22),
]


@pytest.mark.parametrize(("text", "selector", "protocol", "lo", "hi"), VALID_CONFIG,
                         ids=[v[0].strip() for v in VALID_CONFIG])
def test_parse_ts_config(text: str, selector: TrafficSelector | None, protocol: int, lo: int,
                         hi: int) -> None:
    conf = parse_ts_config(text)
    assert conf == TsConfig(selector, protocol, lo, hi)


def test_dynamic_resolves_to_the_sa_address() -> None:
    conf = parse_ts_config("dynamic[udp/500]")
    assert conf.resolve("192.0.2.1") == ts("192.0.2.1/32[17/500]")
    assert conf.resolve("2001:db8::5") == ts("2001:db8::5/128[17/500]")
    fixed = parse_ts_config("10.0.0.0/8")
    assert fixed.resolve("192.0.2.1") == ts("10.0.0.0/8")


@pytest.mark.parametrize("text", [
    "10.0.0.0/8[tcp/443", "foo", "", "10.0.0.0/33", "10.0.0.256/32", "10.0.0.0/8[xyz]",
    "10.0.0.0/8[tcp/80-70]", "10.0.0.0/8[tcp/65536]", "10.0.0.0/8[tcp/a]",
    "10.0.0.0/8[tcp/-5]", "10.0.0.0/8[256]", "dynamic[tcp/http]",
])
def test_parse_ts_config_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_ts_config(text)
