"""A connection's lifecycle without a socket: the table, the deadlines, eviction and the
cut after refusals (the server's session only feeds it what happened)."""

from __future__ import annotations

import math

import pytest

from stigmer.broker.config import Limits
from stigmer.broker.daemon.connstate import ConnectionState, Input, Phase

LIMITS = Limits(handshake_timeout=5.0, frame_timeout=10.0, idle_timeout=300.0,
                max_auth_failures=3)


def greeted(now: float = 0.0) -> ConnectionState:
    state = ConnectionState(LIMITS, now, turn=1)
    state.move(Input.REQUEST, now)  # the Hello
    state.greet()
    state.move(Input.WAIT, now)
    return state


def test_a_new_connection_has_the_handshake_deadline_until_it_is_greeted() -> None:
    state = ConnectionState(LIMITS, 100.0, turn=1)
    assert (state.phase, state.deadline, state.reading) == (Phase.GREETING, 105.0, True)
    state.move(Input.PARTIAL, 101.0)  # a frame begun: its own deadline, the handshake's first
    assert (state.phase, state.deadline) == (Phase.RECEIVING, 105.0)
    state.move(Input.WAIT, 102.0)  # nothing else came: still not greeted
    assert (state.phase, state.deadline) == (Phase.GREETING, 105.0)
    state.move(Input.REQUEST, 103.0)
    state.greet()
    state.move(Input.WAIT, 103.0)
    assert (state.phase, state.deadline) == (Phase.IDLE, 403.0)


def test_a_frame_keeps_the_deadline_of_its_first_byte() -> None:
    """A slow sender does not renew its deadline with each byte it trickles."""
    state = greeted()
    for now in (1.0, 4.0, 9.0):
        state.move(Input.PARTIAL, now)
        assert (state.phase, state.deadline) == (Phase.RECEIVING, 11.0)
    state.move(Input.REQUEST, 10.0)  # the frame is whole; the next one starts afresh
    state.move(Input.PARTIAL, 12.0)
    assert state.deadline == 22.0


def test_a_request_in_a_task_stops_reading_and_has_no_deadline() -> None:
    state = greeted()
    state.move(Input.REQUEST, 1.0)
    state.move(Input.DEFER, 1.0)
    assert (state.phase, state.reading, state.busy, state.deadline) == (
        Phase.ANSWERING, False, True, math.inf)
    assert not state.evictable(turn=2)  # not with a request in flight
    state.move(Input.ANSWERED, 2.0)
    state.move(Input.WAIT, 2.0)
    assert (state.phase, state.reading, state.deadline) == (Phase.IDLE, True, 302.0)


def test_a_peer_that_does_not_read_has_the_frame_timeout() -> None:
    state = greeted()
    state.move(Input.WRITE_PAUSED, 50.0)
    assert (state.phase, state.reading, state.deadline) == (Phase.BLOCKED, False, 60.0)
    state.move(Input.WRITE_PAUSED, 55.0)
    assert state.deadline == 65.0
    state.move(Input.WRITE_RESUMED, 56.0)
    assert (state.phase, state.reading) == (Phase.IDLE, True)


def test_closing_and_the_end() -> None:
    state = greeted()
    state.move(Input.CLOSE, 7.0)
    assert (state.phase, state.ended, state.reading, state.deadline) == (
        Phase.CLOSING, True, False, 17.0)
    state.move(Input.WRITE_RESUMED, 8.0)  # the transport's late calls change nothing
    state.move(Input.LOST, 9.0)
    assert (state.phase, state.deadline) == (Phase.DONE, math.inf)
    state.move(Input.ABORT, 9.0)
    assert state.phase is Phase.DONE


@pytest.mark.parametrize(("phase_inputs", "event"), [
    ((Input.REQUEST, Input.DEFER), Input.DEFER),  # one request in flight at a time
    ((Input.REQUEST, Input.DEFER), Input.REQUEST),  # nothing is read meanwhile
    ((), Input.ANSWERED),  # no task to answer
    ((Input.CLOSE,), Input.REQUEST),  # nothing is read once closing
    ((Input.LOST,), Input.PARTIAL),
])
def test_an_input_the_phase_does_not_list_is_a_bug(phase_inputs: tuple[Input, ...],
                                                    event: Input) -> None:
    state = greeted()
    for each in phase_inputs:
        state.move(each, 1.0)
    with pytest.raises(AssertionError, match=f"cannot {event.value}"):
        state.move(event, 2.0)


def test_overdue_is_reported_once() -> None:
    state = ConnectionState(LIMITS, 0.0, turn=1)
    assert not state.overdue(5.0)
    assert state.overdue(5.1)
    assert state.ended_by == "timed out"
    assert not state.overdue(6.0)  # the watchdog aborts it once


def test_eviction_spares_this_turns_and_takes_the_ungreeted_then_the_idlest() -> None:
    new = ConnectionState(LIMITS, 10.0, turn=3)
    assert not new.evictable(turn=3)  # it had no chance to speak yet
    assert new.evictable(turn=4)
    old_greeted, recent_greeted = greeted(1.0), greeted(2.0)
    recent_greeted.answered(8.0, refused=False)
    ungreeted = ConnectionState(LIMITS, 9.0, turn=2)
    order = sorted([recent_greeted, old_greeted, ungreeted],
                   key=ConnectionState.eviction_order)
    assert order == [ungreeted, old_greeted, recent_greeted]


def test_refusals_cut_the_connection_at_the_limit() -> None:
    state = greeted()
    assert not state.answered(1.0, refused=True)
    assert not state.answered(2.0, refused=False)  # the count is not reset by a success
    assert not state.answered(3.0, refused=True)
    assert state.answered(4.0, refused=True)
