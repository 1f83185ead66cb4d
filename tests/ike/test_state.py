"""The IKE SA state table, asserted directly (h11 style)."""

from __future__ import annotations

import pytest

from cluster.ike.sa import IkeSa
from cluster.ike.state import TRANSITIONS, InvalidTransition, State, Trigger, next_state
from tests.ike.sessions import CLIENT, GW, psk_policy


def exits(state: State) -> dict[Trigger, State]:
    return {t: s for (f, t), s in TRANSITIONS.items() if f is state}


def entries(state: State) -> set[tuple[State, Trigger]]:
    return {key for key, s in TRANSITIONS.items() if s is state}


def test_closed_has_no_exits() -> None:
    assert exits(State.CLOSED) == {}


def test_every_other_state_can_fail_and_time_out_to_closed() -> None:
    for state in State:
        if state is State.CLOSED:
            continue
        assert TRANSITIONS[(state, Trigger.FAIL)] is State.CLOSED
        assert TRANSITIONS[(state, Trigger.TIMEOUT)] is State.CLOSED


def test_ike_auth_request_only_from_half_open() -> None:
    assert {f for (f, t) in TRANSITIONS if t is Trigger.RECV_AUTH_REQUEST} == {State.HALF_OPEN}
    assert TRANSITIONS[(State.HALF_OPEN, Trigger.RECV_AUTH_REQUEST)] is State.ESTABLISHED


def test_ike_auth_response_only_from_auth_sent() -> None:
    assert {f for (f, t) in TRANSITIONS if t is Trigger.RECV_AUTH_RESPONSE} == {State.AUTH_SENT}


def test_half_open_only_authenticates_or_dies() -> None:
    assert exits(State.HALF_OPEN) == {
        Trigger.RECV_AUTH_REQUEST: State.ESTABLISHED,
        Trigger.FAIL: State.CLOSED,
        Trigger.TIMEOUT: State.CLOSED,
    }


def test_init_request_only_in_initial() -> None:
    assert {f for (f, t) in TRANSITIONS if t is Trigger.RECV_INIT_REQUEST} == {State.INITIAL}
    assert {f for (f, t) in TRANSITIONS if t is Trigger.SEND_INIT} == {State.INITIAL}


def test_initiator_path() -> None:
    path = [Trigger.SEND_INIT, Trigger.RECV_INIT_RETRY, Trigger.RECV_INIT_RESPONSE,
            Trigger.RECV_AUTH_RESPONSE, Trigger.RECV_INFORMATIONAL, Trigger.SEND_DELETE_IKE,
            Trigger.RECV_INFORMATIONAL, Trigger.RECV_DELETE_RESPONSE]
    states = [State.INITIAL]
    for trigger in path:
        states.append(next_state(states[-1], trigger))
    assert states == [State.INITIAL, State.INIT_SENT, State.INIT_SENT, State.AUTH_SENT,
                      State.ESTABLISHED, State.ESTABLISHED, State.DELETING, State.DELETING,
                      State.CLOSED]


def test_responder_path() -> None:
    state = next_state(State.INITIAL, Trigger.RECV_INIT_REQUEST)
    assert state is State.HALF_OPEN
    state = next_state(state, Trigger.RECV_AUTH_REQUEST)
    assert state is State.ESTABLISHED
    assert next_state(state, Trigger.RECV_DELETE_IKE) is State.CLOSED


def test_simultaneous_delete_closes() -> None:
    assert next_state(State.DELETING, Trigger.RECV_DELETE_IKE) is State.CLOSED


def test_established_is_only_entered_by_authentication() -> None:
    assert entries(State.ESTABLISHED) == {
        (State.HALF_OPEN, Trigger.RECV_AUTH_REQUEST),
        (State.AUTH_SENT, Trigger.RECV_AUTH_RESPONSE),
        (State.ESTABLISHED, Trigger.RECV_INFORMATIONAL),
        (State.ESTABLISHED, Trigger.RECV_CREATE_CHILD),
    }


def test_a_rekeyed_ike_sa_only_waits_for_its_delete() -> None:
    assert exits(State.REKEYED) == {
        Trigger.RECV_INFORMATIONAL: State.REKEYED,
        Trigger.RECV_DELETE_IKE: State.CLOSED,
        Trigger.SEND_DELETE_IKE: State.DELETING,
        Trigger.FAIL: State.CLOSED,
        Trigger.TIMEOUT: State.CLOSED,
    }
    assert entries(State.REKEYED) == {(State.ESTABLISHED, Trigger.REKEYED),
                                      (State.REKEYED, Trigger.RECV_INFORMATIONAL)}


def test_informational_only_once_established() -> None:
    assert {f for (f, t) in TRANSITIONS if t is Trigger.RECV_INFORMATIONAL} == {
        State.ESTABLISHED, State.REKEYED, State.DELETING}


def test_delete_only_from_established_or_rekeyed() -> None:
    assert {f for (f, t) in TRANSITIONS if t is Trigger.SEND_DELETE_IKE} == {
        State.ESTABLISHED, State.REKEYED}
    assert {f for (f, t) in TRANSITIONS if t is Trigger.RECV_DELETE_IKE} == {
        State.ESTABLISHED, State.REKEYED, State.DELETING}


def test_every_state_is_reachable_from_initial() -> None:
    seen, frontier = {State.INITIAL}, [State.INITIAL]
    while frontier:
        for target in exits(frontier.pop()).values():
            if target not in seen:
                seen.add(target)
                frontier.append(target)
    assert seen == set(State)


def test_every_trigger_is_used() -> None:
    assert {t for (_, t) in TRANSITIONS} == set(Trigger)


MISSING = [(s, t) for s in State for t in Trigger if (s, t) not in TRANSITIONS]


@pytest.mark.parametrize(("state", "trigger"), MISSING,
                         ids=[f"{s.name}-{t.name}" for s, t in MISSING])
def test_next_state_raises_for_every_missing_key(state: State, trigger: Trigger) -> None:
    with pytest.raises(InvalidTransition) as info:
        next_state(state, trigger)
    assert trigger.name in str(info.value) and state.name in str(info.value)


def test_there_are_missing_keys_to_test() -> None:
    assert (State.INITIAL, Trigger.RECV_AUTH_REQUEST) in MISSING
    assert (State.CLOSED, Trigger.FAIL) in MISSING
    assert (State.ESTABLISHED, Trigger.RECV_INIT_REQUEST) in MISSING


def test_a_refused_transition_leaves_the_sa_unchanged() -> None:
    sa = IkeSa(psk_policy(), False, bytes(8), b"r" * 8, GW, CLIENT)
    with pytest.raises(InvalidTransition):
        sa.transition(Trigger.RECV_AUTH_REQUEST)
    assert sa.state is State.INITIAL
    sa.transition(Trigger.RECV_INIT_REQUEST)
    assert sa.state.name == "HALF_OPEN"
