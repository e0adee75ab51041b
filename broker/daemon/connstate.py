"""One connection's lifecycle as a table: its phases, what moves it between them, and
by when each phase's wait must end. No sockets, no clock of its own.

The server's session (:mod:`.server`) feeds it what happened (:class:`Input`) with
the time; the table says where that leads, an input a phase does not list is a bug
(``AssertionError`` naming both), and :attr:`ConnectionState.deadline` says when the
current wait is overdue, which the server's watchdog enforces. Whether the server
reads from the socket, whether the connection may be evicted and in which order,
and when repeated refusals close it are decided here too, so they are tested
without a socket (``tests/daemon/test_connstate.py``), as hypercorn tests its
protocol layer.

Phases, and the deadline of each:

========== ============================================ ===============================
phase      the connection is ...                         its wait ends by
========== ============================================ ===============================
GREETING   accepted, nothing buffered, no Hello yet      the handshake deadline
                                                         (``idle_timeout`` if sooner)
IDLE       greeted, nothing buffered                     ``idle_timeout`` from then
RECEIVING  part of a frame in                            ``frame_timeout`` from its
                                                         first byte (and the handshake
                                                         deadline, before the handshake)
ANSWERING  waiting for a request answered in a task      none (the store's deadline
                                                         and the grace period bound it)
BLOCKED    writing to a peer that does not read         ``frame_timeout`` from then
CLOSING    closing once what was written is out          ``frame_timeout`` from then
DONE       aborted or lost                               none
========== ============================================ ===============================
"""

from __future__ import annotations

import enum
import math
from typing import Final

from ..config import Limits

__all__ = ["ConnectionState", "Input", "Phase"]


class Phase(enum.Enum):
    GREETING = "greeting"
    IDLE = "idle"
    RECEIVING = "receiving"
    ANSWERING = "answering"
    BLOCKED = "blocked"
    CLOSING = "closing"
    DONE = "done"


class Input(enum.Enum):
    REQUEST = "take a whole request"  # read from the buffer: its frame is complete
    WAIT = "wait for a request"  # nothing buffered
    PARTIAL = "wait for the rest of a frame"  # part of one buffered
    DEFER = "answer in a task"  # the request must wait: reading stops
    ANSWERED = "have the task's answer"
    WRITE_PAUSED = "stop writing"  # the peer does not read what we wrote
    WRITE_RESUMED = "write again"
    CLOSE = "close after what was written"
    ABORT = "abort"  # evicted, overdue, a bug of ours, the server going
    LOST = "lose the connection"


_P, _I = Phase, Input
#: phases that read requests from the socket
_READING: Final = frozenset({_P.GREETING, _P.IDLE, _P.RECEIVING})
#: phases a connection may be in before it ends
_OPEN: Final = (*_READING, _P.ANSWERING, _P.BLOCKED)
_TRANSITIONS: Final[dict[tuple[Phase, Input], Phase]] = {
    # reading: IDLE stands for GREETING too until the handshake is done (see move)
    **{(p, _I.REQUEST): _P.IDLE for p in _READING},
    **{(p, _I.WAIT): _P.IDLE for p in _READING},
    **{(p, _I.PARTIAL): _P.RECEIVING for p in _READING},
    # a request that waits: no reading (one request in flight per connection)
    **{(p, _I.DEFER): _P.ANSWERING for p in _READING},
    (_P.ANSWERING, _I.ANSWERED): _P.IDLE,
    # the peer not reading what we write
    **{(p, _I.WRITE_PAUSED): _P.BLOCKED for p in (*_READING, _P.BLOCKED)},
    (_P.BLOCKED, _I.WRITE_RESUMED): _P.IDLE,
    # the end (the transport's late calls change nothing)
    **{(p, _I.CLOSE): _P.CLOSING for p in (*_OPEN, _P.CLOSING)},
    **{(p, i): _P.CLOSING for p in (_P.CLOSING,)
       for i in (_I.WRITE_PAUSED, _I.WRITE_RESUMED)},
    **{(p, i): _P.DONE for p in (*_OPEN, _P.CLOSING, _P.DONE)
       for i in (_I.ABORT, _I.LOST)},
    **{(_P.DONE, i): _P.DONE for i in (_I.WRITE_PAUSED, _I.WRITE_RESUMED, _I.CLOSE)},
}
class ConnectionState:
    """One connection's phase, deadline and standing (see the module's table)."""

    __slots__ = ("_frame_deadline", "_handshake_deadline", "_limits", "deadline", "ended_by",
                 "greeted", "phase", "refusals", "since", "turn")

    def __init__(self, limits: Limits, now: float, turn: int) -> None:
        self._limits = limits
        self.phase = Phase.GREETING
        self.turn = turn  # the accepting turn it came in
        self.since = now  # of the accept, then of the last request answered
        self.greeted = False  # a Hello was answered
        self.refusals = 0  # tokens and grants refused on this connection
        self.ended_by = ""  # "evicted" or "timed out", when that is how it ended
        self._handshake_deadline = now + limits.handshake_timeout
        self._frame_deadline = math.inf
        self.deadline = self._handshake_deadline  # by which the current wait must end

    def __repr__(self) -> str:
        return f"<ConnectionState {self.phase.value}, deadline {self.deadline:.3f}>"

    # ------------------------------------------------------------------ moving

    def move(self, event: Input, now: float) -> Phase:
        """Apply ``event`` at ``now``; return the new phase."""
        try:
            phase = _TRANSITIONS[self.phase, event]
        except KeyError:
            raise AssertionError(f"a connection {self.phase.value} cannot "
                                 f"{event.value}") from None
        if event is Input.PARTIAL:
            if self._frame_deadline == math.inf:  # the frame's first bytes
                self._frame_deadline = now + self._limits.frame_timeout
        elif event is Input.REQUEST or event is Input.WAIT:
            self._frame_deadline = math.inf
        if phase is Phase.IDLE and not self.greeted:
            phase = Phase.GREETING
        self.phase = phase
        self.deadline = self._deadline(now)
        return phase

    def greet(self) -> None:
        """The handshake is done: the handshake deadline no longer applies."""
        self.greeted = True

    def answered(self, now: float, *, refused: bool) -> bool:
        """A reply was written (``refused``: a token or grant was refused). Return whether
        the connection has been refused too often and must close: else one connection
        could probe tokens or execution ids without end."""
        self.since = now
        if refused:
            self.refusals += 1
        return self.refusals >= self._limits.max_auth_failures

    def _deadline(self, now: float) -> float:
        limits, phase = self._limits, self.phase
        if phase is Phase.GREETING:
            return min(self._handshake_deadline, now + limits.idle_timeout)
        if phase is Phase.IDLE:
            return now + limits.idle_timeout
        if phase is Phase.RECEIVING:
            return self._frame_deadline if self.greeted else min(
                self._frame_deadline, self._handshake_deadline)
        if phase in (Phase.BLOCKED, Phase.CLOSING):
            return now + limits.frame_timeout
        return math.inf  # ANSWERING, DONE

    # --------------------------------------------------------------- standing

    @property
    def reading(self) -> bool:
        """Whether the server should read from the socket now."""
        return self.phase in _READING

    @property
    def busy(self) -> bool:
        """A request is being answered in a task."""
        return self.phase is Phase.ANSWERING

    @property
    def ended(self) -> bool:
        """Closing or closed: nothing more is read or answered."""
        return self.phase in (Phase.CLOSING, Phase.DONE)

    def overdue(self, now: float) -> bool:
        """Past its deadline (and not already ended for it): the watchdog aborts it."""
        if self.deadline < now and not self.ended_by:
            self.ended_by = "timed out"
            return True
        return False

    def evictable(self, turn: int) -> bool:
        """Whether it may be evicted to make room during accepting turn ``turn``: not
        with a request in flight, and not one accepted in this turn (it has had no chance
        to speak yet)."""
        return self.phase is not Phase.ANSWERING and self.turn != turn

    def eviction_order(self) -> tuple[bool, float]:
        """Sorts first the connection to evict first: not greeted, then the oldest or
        idlest."""
        return self.greeted, self.since
