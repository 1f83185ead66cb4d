"""A bounded single-consumer mailbox, cheaper to create than a Trio memory channel.

Thousands of actors each own one, so creation and wake-up cost matter: a deque
and the one parked consumer task, woken with Trio's low-level reschedule,
instead of a channel pair with its state objects. Producers never block:
`put_nowait` answers False when the mailbox is full or closed.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

import trio

T = TypeVar("T")


class Mailbox(Generic[T]):
    __slots__ = ("_closed", "_items", "_size", "_waiter")

    def __init__(self, size: int) -> None:
        self._items: deque[T] = deque()
        self._waiter: trio.lowlevel.Task | None = None
        self._size = size
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    def put_nowait(self, item: T) -> bool:
        if self._closed or len(self._items) >= self._size:
            return False
        self._items.append(item)
        self._wake()
        return True

    async def get(self) -> T:
        """The next item; parks while empty. Raises trio.EndOfChannel once closed."""
        while not self._items:
            if self._closed:
                raise trio.EndOfChannel
            if self._waiter is not None:
                raise RuntimeError("a Mailbox has one consumer")
            self._waiter = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(self._abort)
        return self._items.popleft()

    def close(self) -> None:
        self._closed = True
        self._items.clear()
        self._wake()

    def _wake(self) -> None:
        task = self._waiter
        if task is not None:
            self._waiter = None
            trio.lowlevel.reschedule(task)

    def _abort(self, _: object) -> trio.lowlevel.Abort:
        self._waiter = None
        return trio.lowlevel.Abort.SUCCEEDED
