"""What the strongSwan suite talks to: our node, or strongSwan for checking the tests.

IKC_INTEROP_RESPONDER=charon runs the suite against a strongSwan responder; tests
that look at our node's own behaviour skip themselves in that mode.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol

from tests.interop.charon import Charon


class Responder(Protocol):
    def log_text(self) -> str: ...

    def running(self) -> bool: ...


# The start_responder fixture: start_responder(conns, addresses=...) -> Responder.
StartResponder = Callable[..., Responder]


class CharonResponder:
    """A strongSwan responder standing in for our node."""

    def __init__(self, charon: Charon) -> None:
        self.charon = charon

    def log_text(self) -> str:
        return self.charon.log_text()

    def running(self) -> bool:
        return self.charon.proc is not None and self.charon.proc.poll() is None


def responder_kind() -> str:
    kind = os.environ.get("IKC_INTEROP_RESPONDER", "node")
    if kind not in ("node", "charon"):
        raise ValueError(f"IKC_INTEROP_RESPONDER is 'node' or 'charon', not {kind!r}")
    return kind
