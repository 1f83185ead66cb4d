"""The control socket of `ike-cluster run` (a single node): sas, terminate, reload."""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from cluster import control, ops
from cluster.config import NodeConfig
from cluster.ike.events import ChildSaDeleted, IkeSaDeleted
from cluster.ops import control_handlers
from cluster.runtime.node import Node, run_node
from cluster.runtime.reload import reload_from

from .conftest import Setup
from .test_node_loopback import open_peer, wait_for


async def _ask(node_id: str, command: str, **fields: object) -> control.Answer:
    return await trio.to_thread.run_sync(
        lambda: control.request(node_id, command, answer_within=10.0, **fields))


async def _start(nursery: trio.Nursery, config: NodeConfig) -> tuple[Node, str]:
    """The node and its control socket, under a node id no other test uses."""
    node_id = f"ctl-{os.getpid()}-{secrets.token_hex(3)}"
    config = replace(config, node_id=node_id)
    node: Node = await nursery.start(lambda task_status: run_node(
        config, handle_signals=False, task_status=task_status))
    handlers = control_handlers(node_id, node.supervisor, lambda: reload_from(
        config.source, lambda: node.config, node.reconfigure))
    name = await nursery.start(control.serve_control, node_id, handlers)
    assert name == control.address(node_id)
    return node, node_id


async def test_sas_lists_the_nodes_sas_and_terminate_deletes_one(setup: Setup) -> None:
    async with trio.open_nursery() as nursery:
        node, node_id = await _start(nursery, setup.node_config)
        assert (await _ask(node_id, "sas"))["sas"] == []
        peer = await open_peer(setup, "127.0.0.1")
        try:
            sa = await peer.establish()
            (row,) = (await _ask(node_id, "sas"))["sas"]
            assert (row["spi_i"], row["spi_r"]) == (sa.spi_i.hex(), sa.spi_r.hex())
            assert row["owner"] == node_id and row["connection"] == "rw"
            assert row["remote_id"]["text"] == "client.example.test"
            assert [c["name"] for c in row["children"]] == ["net"]
            assert "keys" not in row and "children_keys" not in row
            none = await _ask(node_id, "terminate", id="nobody.example.test")
            assert none == {"ok": True, "terminated": [], "left": []}
            answers: list[control.Answer] = []

            async def terminate() -> None:
                answers.append(await _ask(node_id, "terminate", id="client.example.test"))

            nursery.start_soon(terminate)
            await peer.run_until(lambda e: isinstance(e, IkeSaDeleted))  # answers the Delete
            await wait_for(lambda: bool(answers))
            (done,) = answers
            assert [r["spi_r"] for r in done["terminated"]] == [sa.spi_r.hex()]
            assert done["left"] == []
            assert (await _ask(node_id, "sas"))["sas"] == []
        finally:
            peer.close()
        node.shutdown()
        nursery.cancel_scope.cancel()


async def test_reload_through_the_socket_says_what_happened(setup: Setup) -> None:
    path = Path(setup.node_config.source)
    async with trio.open_nursery() as nursery:
        node, node_id = await _start(nursery, setup.node_config)
        answer = await _ask(node_id, "reload")
        assert answer["reloaded"] and answer["summary"].startswith(
            f"configuration reloaded from {path}: 1 connection(s)")
        # the file names another node id: reloaded, the id waits for a restart
        assert answer["restart"] == ["[node] id"]
        path.write_text(path.read_text().replace('mode = "tunnel"', 'mode = "tunel"'))
        answer = await _ask(node_id, "reload")
        assert not answer["reloaded"] and "connections.rw.children.net.mode" in answer["error"]
        node.shutdown()
        nursery.cancel_scope.cancel()


async def test_bad_requests_get_an_error_and_the_node_goes_on(setup: Setup) -> None:
    async with trio.open_nursery() as nursery:
        node, node_id = await _start(nursery, setup.node_config)

        def raw(data: bytes) -> bytes:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(10)
                sock.connect(control.address(node_id))
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
                return sock.recv(65536)

        for data in (b"not json\n", b"[1, 2]\n", b'{"command": 7}\n', b"x" * 5000 + b"\n",
                     b""):
            answer = await trio.to_thread.run_sync(raw, data)
            assert answer == b'{"ok": false, "error": "not a request"}\n', (data[:20], answer)
        with pytest.raises(control.ControlError, match="unknown command 'shutdown'"):
            await _ask(node_id, "shutdown")
        assert (await _ask(node_id, "sas"))["sas"] == []
        node.shutdown()
        nursery.cancel_scope.cancel()


async def test_a_second_node_with_the_same_id_runs_without_a_socket(
        caplog: pytest.LogCaptureFixture) -> None:
    node_id = f"ctl-{os.getpid()}-{secrets.token_hex(3)}"
    async with trio.open_nursery() as nursery:
        first = await nursery.start(control.serve_control, node_id, {})
        second = await nursery.start(control.serve_control, node_id, {})
        assert first == control.address(node_id) and second is None
        nursery.cancel_scope.cancel()
    assert any("control socket" in r.getMessage() and "not opened" in r.getMessage()
               for r in caplog.records)


def test_no_node_is_a_control_error() -> None:
    with pytest.raises(control.ControlError, match="runs in this network namespace"):
        control.request(f"absent-{secrets.token_hex(4)}", "sas")


async def test_another_user_is_refused(setup: Setup) -> None:
    import subprocess
    import sys

    if os.geteuid() != 0:  # as the other root-only tests: never silently skipped in CI
        message = "acting as another user needs root"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)

    async with trio.open_nursery() as nursery:
        node, node_id = await _start(nursery, setup.node_config)
        code = ("import socket,sys;s=socket.socket(socket.AF_UNIX);"
                f"s.connect({control.address(node_id)!r});"
                "s.sendall(b'{\"command\": \"sas\"}\\n');sys.stdout.write(s.recv(4096).decode())")
        result = await trio.to_thread.run_sync(lambda: subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=20,
            user=65534))
        assert result.stdout == '{"ok": false, "error": "permission denied"}\n', result
        node.shutdown()
        nursery.cancel_scope.cancel()


async def test_the_cli_hands_its_timeout_to_the_node() -> None:
    """`--timeout` is how long the node may take (terminate, rekey): it must reach the
    node as a field, not only limit the wait for the answer."""
    node_id = f"ctl-{os.getpid()}-{secrets.token_hex(3)}"
    seen: list[object] = []

    async def echo(request: control.Request) -> control.Answer:
        seen.append(request.get("timeout"))
        return {}

    async with trio.open_nursery() as nursery:
        await nursery.start(control.serve_control, node_id, {"echo": echo})
        answer = await trio.to_thread.run_sync(lambda: ops._ask(node_id, "echo", timeout=2.5))
        nursery.cancel_scope.cancel()
    assert answer == {"ok": True} and seen == [2.5]


async def test_terminate_with_child_deletes_the_child_sas_and_keeps_the_ike_sa(
    setup: Setup
) -> None:
    """`terminate --child net` (swanctl --terminate --child): the peer gets a Delete for
    the Child SA, the IKE SA stays listed without it."""
    async with trio.open_nursery() as nursery:
        node, node_id = await _start(nursery, setup.node_config)
        peer = await open_peer(setup, "127.0.0.1")
        try:
            sa = await peer.establish()
            (row,) = (await _ask(node_id, "sas"))["sas"]
            (child,) = row["children"]
            none = await _ask(node_id, "terminate", id="client.example.test", child="other")
            assert none == {"ok": True, "terminated": [], "left": []}
            answers: list[control.Answer] = []

            async def terminate() -> None:
                answers.append(await _ask(node_id, "terminate", id="client.example.test",
                                          child="net"))

            nursery.start_soon(terminate)
            await peer.run_until(lambda e: isinstance(e, ChildSaDeleted))  # answers it
            await wait_for(lambda: bool(answers))
            assert answers == [{"ok": True, "left": [], "terminated": [
                f"CHILD SA net {child['spi_in']} (in) of IKE SA {sa.spi_i.hex()}_i/"
                f"{sa.spi_r.hex()}_r"]}]
            (row,) = (await _ask(node_id, "sas"))["sas"]
            assert (row["spi_r"], row["children"]) == (sa.spi_r.hex(), [])
        finally:
            peer.close()
        node.shutdown()
        nursery.cancel_scope.cancel()
