"""Membership: each node renews a heartbeat key with a TTL and keeps a view of the others.

A node heartbeats every third of the TTL, so two lost rounds do not make it look dead.
The view is re-read after every heartbeat; while the store is unreachable the last view
stays (the nodes that were alive most likely still are, and dropping every responder
would stop the relay for SAs that need no store at all), and the failures are counted.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import trio

from .interface import Member, StateStore, StoreError

logger = logging.getLogger(__name__)


class Membership:
    def __init__(self, store: StateStore, node: str, role: str, ttl: float,
                 info: Mapping[str, Any] | None = None) -> None:
        self.store = store
        self.node = node
        self.role = role
        self.ttl = ttl
        self.info = dict(info or {})
        self.members: tuple[Member, ...] = ()
        self.errors = 0
        self.rounds = 0
        self.on_change: Callable[[Sequence[Member]], None] | None = None
        self._changed = trio.Event()

    def of_role(self, role: str) -> list[Member]:
        return [m for m in self.members if m.role == role]

    def find(self, node: str) -> Member | None:
        return next((m for m in self.members if m.node == node), None)

    async def wait_changed(self) -> None:
        await self._changed.wait()

    async def beat(self) -> bool:
        """One heartbeat and a fresh view; False (and the old view) if the store failed."""
        try:
            await self.store.heartbeat(self.node, self.role, self.ttl, self.info)
            members = tuple(await self.store.members())
        except StoreError as exc:
            self.errors += 1
            if self.errors == 1 or self.errors % 20 == 0:
                logger.warning("membership: store unreachable (%s); keeping the last view of "
                               "%d members", exc, len(self.members))
            return False
        self.rounds += 1
        before = {(m.node, m.role) for m in self.members}
        self.members = members
        if {(m.node, m.role) for m in members} != before:
            logger.info("members: %s", ", ".join(f"{m.node} ({m.role})" for m in members)
                        or "none")
            if self.on_change is not None:
                self.on_change(members)
            self._changed.set()
            self._changed = trio.Event()
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Heartbeat until cancelled; `started` once the first round is done (or failed)."""
        await self.beat()
        task_status.started()
        try:
            while True:
                await trio.sleep(self.ttl / 3)
                await self.beat()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1), \
                    contextlib.suppress(StoreError):  # the TTL removes us anyway
                await self.store.leave(self.node)
