"""A whole responder node under a mutation fuzzer (issue 4): no exception escapes an actor,
nothing grows without bound, legitimate exchanges still work afterwards.

Bounded runs with a fixed seed, one per cookie setting; `benchmarks/fuzz_node.py` runs the
same driver for as long as you like.
"""

from __future__ import annotations

import random

import pytest

from cluster.ike.constants import ExchangeType
from cluster.ike.state import State
from tests.ike.sessions import psk_connection, psk_pair, run_handshake

from .driver import FuzzOptions, FuzzReport, run_fuzz
from .mutations import Chain, SaKeys, join_chain, load_seeds, seal, seal_fragment, split_chain
from .strategies import WEIGHTS, ShotMaker

SEED = 4_2024


@pytest.mark.parametrize(
    ("cookie_threshold", "datagrams"),
    [(1_000_000, 15_000), (8, 20_000)],
    ids=["cookies-off", "cookies-on"],
)
async def test_node_survives_mutated_datagrams(cookie_threshold: int, datagrams: int) -> None:
    report = await run_fuzz(FuzzOptions(seed=SEED, datagrams=datagrams,
                                        cookie_threshold=cookie_threshold))
    assert report.problems() == [], report.summary()
    assert report.datagrams >= datagrams
    assert report.witness_alive
    assert report.final_handshakes == {"127.0.0.1": "ok", "::1": "ok"}
    # every strategy ran (the cookie echo needs cookies, so it stands in for a flood without)
    expected = set(WEIGHTS) - ({"cookie_echo"} if cookie_threshold > datagrams else set())
    assert set(report.strategies) >= expected, report.strategies
    # resealed messages got past the ICV into each exchange: our own peers never send
    # CREATE_CHILD_SA, and only four INFORMATIONAL requests at the end
    assert report.events.get("CREATE_CHILD_SA:ok", 0) > 50, report.events
    assert report.events.get("INFORMATIONAL:ok", 0) > 50, report.events
    assert report.events.get("IKE_AUTH:AuthenticationFailed", 0) > 0, report.events
    assert report.stats["dropped_malformed"] > 0 and report.stats["dropped_no_sa"] > 0
    if cookie_threshold < datagrams:
        assert report.stats["cookies_sent"] > 0 and report.stats["cookies_accepted"] > 0
        assert report.maxima["notify_buckets"] > 100  # the spoofed sources have buckets
    else:
        assert report.stats["cookies_sent"] == 0
        assert report.maxima["half_open_count"] > 100  # the floods held half-open SAs


def test_problems_names_every_failed_check() -> None:
    good = FuzzReport(
        FuzzOptions(rss_limit=1 << 20), stats={"actor_failures": 0}, sas_created=3,
        settled={"actor_count": 6, "half_open_count": 0, "half_open_hosts": 0,
                 "expiry_queue_length": 0},
        maxima={"notify_buckets": 4096}, rss_before=100 << 20, rss_after=101 << 20,
        witness_alive=True, final_handshakes={"127.0.0.1": "ok"},
    )
    assert good.problems() == []
    bad = FuzzReport(
        good.options, stats={"actor_failures": 2, "dropped_route_error": 1},
        errors=["cluster.runtime.supervisor: IKE SA failed\nTraceback ..."], sas_created=3,
        settled={"actor_count": 7, "half_open_count": 1, "half_open_hosts": 1,
                 "expiry_queue_length": 5},
        maxima={"notify_buckets": 4097}, rss_before=100 << 20, rss_after=102 << 20,
        witness_alive=False, final_handshakes={"127.0.0.1": "not established"},
    )
    problems = "\n".join(bad.problems())
    for words in ("escaped actors", "escaped the router", "errors logged", "notify buckets",
                  "half_open_count", "half_open_hosts", "expiry_queue_length", "7 actors",
                  "RSS grew", "no longer answers", "127.0.0.1 failed"):
        assert words in problems
    assert "no handshake after the run" in FuzzReport(good.options).problems()


def test_shots_depend_only_on_the_seed() -> None:
    def shots(seed: int) -> list[tuple[str, bytes, bool, int]]:
        maker = ShotMaker(random.Random(seed), load_seeds(), 8)
        return [(s.strategy, s.data, s.natt, s.source)
                for _ in range(300) for s in maker.burst([], [], [])]

    assert shots(7) == shots(7)
    assert shots(7) != shots(8)


def test_chains_split_and_join_back() -> None:
    for chain in load_seeds().chains:
        joined = join_chain(split_chain(chain.first, chain.data))
        assert (joined.first, joined.data) == (chain.first, chain.data)


@pytest.mark.parametrize("proposal", ["aes256gcm16-prfsha256-x25519", "aes128-sha256-x25519"])
def test_sealed_requests_and_fragments_reach_the_responder(proposal: str) -> None:
    """What the fuzzer seals with an initiator's keys passes the responder's ICV."""
    client, gateway = psk_pair(psk_connection(proposals=(proposal,)))
    run_handshake(client, gateway)
    assert gateway.state is State.ESTABLISHED
    keys = SaKeys.of(client)
    liveness = seal(keys, ExchangeType.INFORMATIONAL, 2, Chain(0, b""))
    gateway.receive_datagram_untrusted(liveness, gateway.sa.local, gateway.sa.remote, 1.0)
    assert gateway.drops == {} and gateway.sa.peer_next_id == 3
    assert len(gateway.datagrams_to_send()) == 1
    # the same request in two fragments, the second one first
    assert gateway.sa.fragmentation
    parts = [seal_fragment(keys, ExchangeType.INFORMATIONAL, 3, b"", n, 2, 0) for n in (2, 1)]
    for data in parts:
        gateway.receive_datagram_untrusted(data, gateway.sa.local, gateway.sa.remote, 2.0)
    assert gateway.drops == {} and gateway.sa.peer_next_id == 4
    # a lying Pad Length authenticates and is then refused as malformed
    lie = seal(keys, ExchangeType.INFORMATIONAL, 4, Chain(0, b""), pad_length=200)
    gateway.receive_datagram_untrusted(lie, gateway.sa.local, gateway.sa.remote, 3.0)
    assert gateway.drops == {"malformed": 1}
