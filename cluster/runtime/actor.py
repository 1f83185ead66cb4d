"""One task per IKE SA: feeds its sans-IO session from a bounded mailbox.

The loop waits for the next datagram until the session's timer comes due,
steps the session, then sends what it produced and drains its events. The
supervisor ends an actor still half-open at its deadline by closing the
mailbox. The clock is `trio.current_time()`, so tests can run the loop under
`autojump_clock`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

from ..ike.events import Event
from ..ike.pending import Pending
from ..ike.session import Address, Datagram
from .mailbox import Mailbox

# (data, local, remote, time received)
Datagram_ = tuple[bytes, Address, Address, float]
# a command from the supervisor, run against the session in the actor's task
Command = Callable[[Any, float], None]
MailboxItem = Datagram_ | Command


class Session(Protocol):
    """What the actor needs of `cluster.ike.session.IkeSession`."""

    @property
    def spi_i(self) -> bytes: ...
    @property
    def spi_r(self) -> bytes: ...
    @property
    def closed(self) -> bool: ...

    def receive_datagram_untrusted(
        self, data: bytes, local: Address, remote: Address, now: float
    ) -> None: ...
    def datagrams_to_send(self) -> list[Datagram]: ...
    def get_timer(self) -> float | None: ...
    def handle_timer(self, now: float) -> None: ...
    def next_event(self) -> Event | None: ...
    def end_here(self) -> None: ...
    @property
    def pending(self) -> Pending | None: ...
    def resume(self, now: float) -> None: ...


class Relinquished(Exception):
    """This node no longer acts for the SA (another owns its lease, or it was handed over):
    the actor ends without a word to the peer or the data plane."""


# The cluster's persistence: called after a step with its events, before anything the step
# produced is sent; False withholds the datagrams (they go out again on retransmission).
Persist = Callable[["SaActor", list[Event]], Awaitable[bool]]


class SessionTimerStuck(RuntimeError):
    """The session's timer stayed in the past after handling it: stepping again would spin."""


class SaActor:
    """The mailbox, session and routing keys of one IKE SA."""

    __slots__ = (
        "established",
        "expired",
        "half_open_deadline",
        "half_open_key",
        "mailbox",
        "persisted",
        "session",
        "spi_i",
        "spi_r",
    )

    def __init__(
        self,
        session: Session,
        spi_i: bytes,
        spi_r: bytes,
        half_open_key: tuple[bytes, Address],
        half_open_deadline: float,
        mailbox_size: int,
    ) -> None:
        self.session = session
        self.spi_i = spi_i
        self.spi_r = spi_r
        self.half_open_key = half_open_key
        self.half_open_deadline = half_open_deadline
        self.established = False
        self.expired = False
        self.mailbox: Mailbox[MailboxItem] = Mailbox(mailbox_size)
        self.persisted: object = None  # the persistence layer's record of this SA

    @property
    def label(self) -> str:
        return f"{self.spi_i.hex()}_i/{self.spi_r.hex()}_r"

    def close_mailbox(self) -> None:
        # Synchronous close: nothing can be delivered to a retired actor.
        self.mailbox.close()

    def expire(self) -> None:
        """Called by the supervisor when the half-open deadline passed: the loop ends."""
        self.expired = True
        self.mailbox.close()

    async def run(
        self,
        send: Callable[[Datagram], None],
        on_event: Callable[[SaActor, Event], None],
        persist: Persist | None = None,
    ) -> bool:
        """Step the session until it closes. Returns False if it expired half-open.

        With `persist` (the cluster), the state a step produced is stored before its
        datagrams leave, so another node can answer a retransmission byte for byte.
        """
        session = self.session
        mailbox = self.mailbox
        while not session.closed:
            item: MailboxItem | None = None
            timer = session.get_timer()
            try:
                if timer is None:  # the common case for a responder: no cancel scope
                    item = await mailbox.get()
                else:
                    with trio.CancelScope(deadline=timer):
                        item = await mailbox.get()
            except trio.EndOfChannel:
                return not self.expired
            if item is None:
                now = trio.current_time()
                timer = session.get_timer()
                if timer is not None and now >= timer:
                    session.handle_timer(now)
                    after = session.get_timer()
                    if after is not None and after <= now:
                        raise SessionTimerStuck(f"timer {after} not after now {now}")
            elif callable(item):
                item(session, trio.current_time())
            else:
                data, local, remote, received = item
                session.receive_datagram_untrusted(data, local, remote, received)
            while (pending := session.pending) is not None:
                # an address from the store, a CRL from its URI: the exchange waits for it
                await pending.fetch()
                session.resume(trio.current_time())
            if persist is not None:
                await self._persisted_step(send, on_event, persist)
                continue
            for datagram in session.datagrams_to_send():
                send(datagram)
            event = session.next_event()
            while event is not None:
                on_event(self, event)
                event = session.next_event()
        return True

    async def _persisted_step(self, send: Callable[[Datagram], None],
                              on_event: Callable[[SaActor, Event], None],
                              persist: Persist) -> None:
        session = self.session
        datagrams = session.datagrams_to_send()
        events: list[Event] = []
        event = session.next_event()
        while event is not None:
            events.append(event)
            event = session.next_event()
        if (datagrams or events) and await persist(self, events):
            for datagram in datagrams:
                send(datagram)
        for event in events:
            on_event(self, event)
