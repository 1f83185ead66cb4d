"""The control socket of a running node: `ike-cluster sas`, `terminate` and `reload`.

A single node (`ike-cluster run`) keeps its SAs in memory, where the store-reading
commands cannot see them; a cluster responder reloads its own file. Both therefore listen
on a Unix stream socket in the abstract namespace, `@ike-cluster/NODE_ID`: it belongs to
the network namespace (the commands run where the node runs), leaves no file behind, and
is on unless `[node] control = false`. Only root and the node's own user may talk to it
(SO_PEERCRED); others are refused and counted.

One request per connection: a JSON object on one line, `{"command": NAME, ...}`; the
answer is one JSON object on one line, `{"ok": true, ...}` or `{"ok": false, "error":
TEXT}`. Answers carry what `ike-cluster sas` shows, never key material.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import trio

logger = logging.getLogger(__name__)

MAX_REQUEST = 4096  # bytes of one request line
MAX_ANSWER = 64 * 1024 * 1024  # bytes of one answer a client reads
IO_TIMEOUT = 5.0  # seconds a client has to send its request
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

Request = dict[str, Any]
Answer = dict[str, Any]
Handler = Callable[[Request], Awaitable[Answer]]


def address(node_id: str) -> bytes:
    """The socket's abstract name (the leading NUL keeps it out of the filesystem)."""
    return b"\0ike-cluster/" + node_id.encode()


class ControlError(Exception):
    """The node did not answer (not running, control off) or refused the request."""


async def serve_control(node_id: str, handlers: Mapping[str, Handler], *,
                        task_status: trio.TaskStatus[bytes | None] = trio.TASK_STATUS_IGNORED
                        ) -> None:
    """Listen on `address(node_id)` and answer with `handlers` until cancelled. Starts
    with None (and logs why) when the name is taken: another node with this id runs in
    this network namespace, and the commands reach that one."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    name = address(node_id)
    try:
        await sock.bind(name)
    except OSError as exc:
        sock.close()
        logger.warning("control socket @%s not opened: %s; `ike-cluster sas`, "
                       "`terminate` and `reload` cannot reach this node", name[1:].decode(),
                       exc.strerror or exc)
        task_status.started(None)
        return
    with sock:
        sock.listen(16)
        logger.info("control socket @%s", name[1:].decode())
        task_status.started(name)
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await sock.accept()
                nursery.start_soon(_answer, conn, handlers)


async def _answer(conn: trio.socket.SocketType, handlers: Mapping[str, Handler]) -> None:
    with conn:
        try:
            line = None
            with trio.move_on_after(IO_TIMEOUT):
                line = await _read_line(conn, MAX_REQUEST)
            if not _allowed(conn):  # (after the read: the client hears the refusal)
                await _send(conn, {"ok": False, "error": "permission denied"})
                return
            request = _parse(line) if line is not None else None
            if request is None:
                await _send(conn, {"ok": False, "error": "not a request"})
                return
            handler = handlers.get(request["command"])
            if handler is None:
                await _send(conn, {"ok": False, "error": f"unknown command "
                                                         f"{request['command'][:40]!r}"})
                return
            answer = await handler(request)
            await _send(conn, {"ok": True, **answer})
        except OSError:  # the client went away
            return
        except Exception:
            # a command's failure must not take the node down; the client hears of it
            logger.exception("control command failed")
            with contextlib.suppress(OSError):
                await _send(conn, {"ok": False, "error": "the command failed (see the log)"})


def _allowed(conn: trio.socket.SocketType) -> bool:
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    _, uid, _ = _UCRED.unpack(raw)
    return uid in (0, os.getuid())


def _parse(line: bytes) -> Request | None:
    try:
        request = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(request, dict) or not isinstance(request.get("command"), str):
        return None
    return request


async def _read_line(conn: trio.socket.SocketType, limit: int) -> bytes | None:
    data = b""
    while b"\n" not in data:
        chunk = await conn.recv(65536)
        if not chunk:
            return data or None
        data += chunk
        if len(data) > limit:
            return None
    return data.partition(b"\n")[0]


async def _send(conn: trio.socket.SocketType, answer: Answer) -> None:
    data = json.dumps(answer).encode() + b"\n"
    while data:
        sent = await conn.send(data)
        data = data[sent:]


def request(node_id: str, command: str, *, answer_within: float = 30.0,
            **fields: Any) -> Answer:
    """Send one request to the node (blocking, for the CLI); its answer, or ControlError
    when none came within `answer_within` seconds."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(answer_within)
        try:
            sock.connect(address(node_id))
            sock.sendall(json.dumps({"command": command, **fields}).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
                if len(data) > MAX_ANSWER:
                    raise ControlError("the answer is too long")
        except FileNotFoundError:
            raise ControlError("no such socket") from None
        except ConnectionRefusedError:
            raise ControlError(f"no node {node_id!r} runs in this network namespace (or its "
                               "control socket is off)") from None
        except OSError as exc:
            raise ControlError(str(exc.strerror or exc)) from None
    try:
        answer = json.loads(data)
    except ValueError:
        raise ControlError("the node's answer is not JSON") from None
    if not isinstance(answer, dict):
        raise ControlError("the node's answer is not a JSON object")
    if not answer.get("ok"):
        raise ControlError(str(answer.get("error", "refused")))
    return answer
