"""The RADIUS transport on loopback: retransmission, answers that are not ones, silence."""

from __future__ import annotations

import socket

import trio

from cluster.ike.radius import RadiusServer, RadiusSettings
from cluster.runtime.radius_client import RadiusClient

SETTINGS = RadiusSettings((), timeout=0.2, base=1.0, tries=3)


async def test_a_lost_request_is_sent_again_unchanged_and_noise_is_ignored() -> None:
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server_sock:
        await server_sock.bind(("127.0.0.1", 0))
        port = server_sock.getsockname()[1]
        seen: list[bytes] = []

        async def serve() -> None:
            first, _ = await server_sock.recvfrom(4096)  # lost
            seen.append(first)
            again, peer = await server_sock.recvfrom(4096)
            seen.append(again)
            await server_sock.sendto(b"noise", peer)
            await server_sock.sendto(b"the answer", peer)

        client = RadiusClient()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            answer = await client.exchange(RadiusServer("lab", "127.0.0.1", port, b"s"),
                                           b"request", SETTINGS, lambda d: d == b"the answer")
        assert answer == b"the answer"
        assert seen == [b"request", b"request"]
        assert client.stats.as_dict() == {"answered": 1, "timeouts": 0, "retransmits": 1,
                                          "invalid": 1, "skipped": 0}


async def test_nobody_listening_is_a_timeout_after_every_try() -> None:
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as closed:
        await closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    client = RadiusClient()
    answer = await client.exchange(RadiusServer("lab", "127.0.0.1", port, b"s"), b"request",
                                   SETTINGS, lambda d: True)
    assert answer is None
    assert client.stats.as_dict() == {"answered": 0, "timeouts": 1, "retransmits": 2,
                                      "invalid": 0, "skipped": 0}


async def test_a_server_that_did_not_answer_is_passed_over_for_a_while() -> None:
    """A dead primary costs its retransmission schedule once, not on every login."""
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        await silent.bind(("127.0.0.1", 0))
        server = RadiusServer("lab", "127.0.0.1", silent.getsockname()[1], b"s")
        client = RadiusClient(hold_down=0.5)
        assert await client.exchange(server, b"request", SETTINGS, lambda d: True) is None
        before = trio.current_time()
        assert await client.exchange(server, b"request", SETTINGS, lambda d: True) is None
        assert trio.current_time() - before < SETTINGS.timeout  # not sent at all
        assert (client.stats.timeouts, client.stats.skipped) == (1, 1)
        await trio.sleep(0.5)  # the hold is over: asked again (and it answers now)

        async def answer() -> None:
            while True:  # (the first request's tries are queued here too)
                _, peer = await silent.recvfrom(4096)
                await silent.sendto(b"the answer", peer)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer)
            assert await client.exchange(server, b"request", SETTINGS,
                                         lambda d: d == b"the answer") == b"the answer"
            nursery.cancel_scope.cancel()
        assert (client.stats.answered, client.stats.skipped) == (1, 1)
