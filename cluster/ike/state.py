"""The IKE SA state table, h11-style: every transition is one entry here.

A missing key raises before anything changes; tests assert on the table directly.
"""

from __future__ import annotations

from enum import Enum, auto


class State(Enum):
    INITIAL = auto()
    INIT_SENT = auto()  # initiator: IKE_SA_INIT request out
    HALF_OPEN = auto()  # responder: IKE_SA_INIT answered, waiting for IKE_AUTH
    AUTH_SENT = auto()  # initiator: IKE_AUTH request out
    ESTABLISHED = auto()
    REKEYED = auto()  # replaced by a rekey (RFC 7296 2.18), waiting for its Delete
    DELETING = auto()  # we sent a Delete of the IKE SA
    CLOSED = auto()


class Trigger(Enum):
    SEND_INIT = auto()
    RECV_INIT_REQUEST = auto()
    RECV_INIT_RETRY = auto()  # INVALID_KE_PAYLOAD or COOKIE: resend IKE_SA_INIT
    RECV_INIT_RESPONSE = auto()
    RECV_AUTH_REQUEST = auto()
    RECV_AUTH_RESPONSE = auto()
    RECV_INFORMATIONAL = auto()
    RECV_CREATE_CHILD = auto()
    REKEYED = auto()  # a successor IKE SA took over
    RECV_DELETE_IKE = auto()
    SEND_DELETE_IKE = auto()
    RECV_DELETE_RESPONSE = auto()
    FAIL = auto()
    TIMEOUT = auto()


class InvalidTransition(Exception):
    pass


TRANSITIONS: dict[tuple[State, Trigger], State] = {
    (State.INITIAL, Trigger.SEND_INIT): State.INIT_SENT,
    (State.INITIAL, Trigger.RECV_INIT_REQUEST): State.HALF_OPEN,
    (State.INIT_SENT, Trigger.RECV_INIT_RETRY): State.INIT_SENT,
    (State.INIT_SENT, Trigger.RECV_INIT_RESPONSE): State.AUTH_SENT,
    (State.HALF_OPEN, Trigger.RECV_AUTH_REQUEST): State.ESTABLISHED,
    (State.AUTH_SENT, Trigger.RECV_AUTH_RESPONSE): State.ESTABLISHED,
    (State.ESTABLISHED, Trigger.RECV_INFORMATIONAL): State.ESTABLISHED,
    (State.ESTABLISHED, Trigger.RECV_CREATE_CHILD): State.ESTABLISHED,
    (State.ESTABLISHED, Trigger.REKEYED): State.REKEYED,
    (State.REKEYED, Trigger.RECV_INFORMATIONAL): State.REKEYED,
    (State.REKEYED, Trigger.RECV_DELETE_IKE): State.CLOSED,
    (State.REKEYED, Trigger.SEND_DELETE_IKE): State.DELETING,
    (State.ESTABLISHED, Trigger.RECV_DELETE_IKE): State.CLOSED,
    (State.DELETING, Trigger.RECV_DELETE_IKE): State.CLOSED,  # simultaneous delete
    (State.ESTABLISHED, Trigger.SEND_DELETE_IKE): State.DELETING,
    (State.DELETING, Trigger.RECV_DELETE_RESPONSE): State.CLOSED,
    (State.DELETING, Trigger.RECV_INFORMATIONAL): State.DELETING,
}
# any state but CLOSED may fail or time out
for _state in State:
    if _state is not State.CLOSED:
        TRANSITIONS[(_state, Trigger.FAIL)] = State.CLOSED
        TRANSITIONS[(_state, Trigger.TIMEOUT)] = State.CLOSED


def next_state(state: State, trigger: Trigger) -> State:
    try:
        return TRANSITIONS[(state, trigger)]
    except KeyError:
        raise InvalidTransition(f"{trigger.name} is not allowed in {state.name}") from None
