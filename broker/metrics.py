"""What the broker reports as it works: the one recording interface, and its labels.

The server, the store and the fleet follower call a :class:`Recorder` at a few
points of their work (a request answered, a connection opened or closed, a write
committed). This class is the recorder of a broker without metrics: every method
does nothing, so the fast path pays one empty call, never an ``if``. The
daemon's Prometheus recorder (:mod:`.daemon.metrics`) overrides them.

A label only ever holds a value of a fixed enumeration named here, or a wire name
of this package (a request's class, an :class:`~.protocol.errors.ErrorCode`):
never an environment or variable name, an execution id, a uid or a value.
"""

from __future__ import annotations

from .local.peer import Peer
from .protocol import Request, Response

__all__ = ["CONNECTION_KINDS", "DENIALS", "NULL_RECORDER", "Recorder"]

#: who a connection is from: the broker's own user, a member of the runner group
#: (--allow-group), or another admitted uid (root)
CONNECTION_KINDS = ("owner", "runner_group", "other")

#: why a peer was refused: a token that is not valid (``token``), a fetch or release by
#: execution id its process is not granted (``grant``), an owner's request from a
#: runner-group member (``admin_only``), a uid that may not connect (``uid``), a
#: connection cut after too many of those (``auth_failures``)
DENIALS = ("token", "grant", "admin_only", "uid", "auth_failures")


class Recorder:
    """The recorder of a broker without metrics: each call does nothing.

    Every method is called on the event loop (the store's, from its tasks): an
    implementation may update what it keeps without locks of its own beyond what
    its readers need.
    """

    __slots__ = ()

    def answered(self, request: Request, reply: Response, peer: Peer, started: float, *,
                 waited: bool) -> None:
        """``reply`` (an Error, or the answer) went out for ``request`` of ``peer``;
        ``started`` is the ``time.perf_counter()`` of when it was read, ``waited`` whether
        it was answered in a task (the task path) rather than at once (the fast path)."""

    def connection_opened(self, kind: str) -> None:
        """A connection of ``kind`` (one of :data:`CONNECTION_KINDS`) was admitted."""

    def connection_closed(self, kind: str) -> None:
        """An admitted connection of ``kind`` ended (closed, cut, or evicted)."""

    def evicted(self) -> None:
        """An idle or unfinished connection was cut to make room for a new one."""

    def refused(self) -> None:
        """A connection was turned away for want of room (nothing could be evicted)."""

    def denied(self, cause: str) -> None:
        """A peer was refused, for ``cause`` (one of :data:`DENIALS`)."""

    def store_written(self, seconds: float) -> None:
        """One write of the store ended (committed or not), ``seconds`` after it was
        asked for: its wait for its turn, its statements and its commit."""

    def store_committed(self, seconds: float, writes: int) -> None:
        """One COMMIT took ``seconds``, for ``writes`` writes (more than one: a group
        commit shared by writes that queued while another committed)."""

    def notice_heard(self) -> None:
        """Another broker of the fleet said something through the shared store."""


NULL_RECORDER = Recorder()
