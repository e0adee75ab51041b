"""Serving connections: accept, check the peer, read frames, answer, shut down in order.

Theory of operation: each connection is an :class:`asyncio.Protocol` (uvloop's
where the daemon runs on it) driving a sans-IO
:class:`~stigmer.broker.protocol.Connection`. Bytes arrive in ``data_received``;
a request that can be answered from memory (a fetch the cache can open, the
handshake) is answered right there, synchronously: parse, look up, open,
encode, ``transport.write``, with no task switch. Any other request goes to a
task of the server's task group; until it is answered the connection stops
reading, so requests are answered in order, one at a time, and a client that
pipelines cannot make the broker buffer more than one read of its bytes.
When a reply fills the transport's write buffer, reading stops likewise until
the client takes it.

Accepting is the server's own loop on the listening socket (not the event
loop's server), because what a connection costs is decided there: each
accepted socket's peer credentials are read at once (one ``getsockopt``), and a
uid that may not connect, or that is over its cap, is closed right there,
before a transport, a task or a protocol object exists for it. One readiness
of the listening socket accepts at most ``_ACCEPT_BATCH`` sockets, so a flood
cannot hold the loop away from the connections it has admitted; the batch is
the whole listen backlog (:data:`~.listen.LISTEN_BACKLOG`), so a connection
waits in the kernel for at most one turn. A runner uid gets at most
``_ADMISSIONS_PER_UID`` admissions a turn; the rest of its connections in that
turn are refused. Together they keep one uid that connects and hangs up in a
loop from starving the others: it costs a few admissions a turn, and the
runner's connection is accepted in the next turn, whatever the churner does
(tests/test_attacks.py measures it).

Before any byte is read the peer's uid is checked (our own, root, or a member
of the runner group when one is allowed). Each wait has a deadline: the
handshake must finish within ``handshake_timeout``, a frame that has started
must finish within ``frame_timeout``, a greeted connection may stay idle
``idle_timeout``, and a reply must be taken within ``frame_timeout``. Deadlines
are plain numbers on the connection, enforced by one watchdog task that aborts
overdue connections. Whatever a client does costs at most its own connection.

Room: at ``max_connections``, a new connection evicts first the oldest one
that has not finished its Hello, then the one idle longest; only when every
connection has a request in flight is it refused. No uid but the broker's
owner and root may hold more than ``max_connections_per_uid``: beyond that a
new one evicts that uid's own idle one, or is refused when all of that uid's
connections are busy or were accepted in the same turn (a uid flooding the
backlog gets one batch of admissions per turn, not one per connection). So
peers that connect and stall cannot lock out the owner's ``status``/``stop``
or the runners. A refused connection gets a ``resource_exhausted`` Error frame
and is closed.

Shutdown, once the trigger fires: stop accepting, close idle connections, let
requests in flight finish within ``shutdown_grace``, then cancel the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol, cast

import anyio
import anyio.abc

from ..config import Limits
from ..dispatch import Later
from ..local.peer import Peer, PeerCredentials, peer_credentials
from ..metrics import NULL_RECORDER, Recorder
from ..protocol import (
    CLOSED,
    NEED_DATA,
    Connection,
    Error,
    Request,
    Response,
    Role,
    error_reply,
)
from ..protocol.errors import BrokerError, ErrorCode, ProtocolError, ResourceExhausted
from .attest import ProcessPin
from .connstate import ConnectionState, Input
from .listen import LISTEN_BACKLOG

__all__ = ["Counters", "Handler", "Server"]

log = logging.getLogger("stigmer.broker")

#: sockets accepted per readiness of the listening socket: all the backlog holds, so
#: none waits more than a turn, and a bound on how long a turn spends accepting (a
#: refusal costs a few microseconds, an admission some tens)
_ACCEPT_BATCH = LISTEN_BACKLOG
#: admissions one runner uid may have per accepting turn: the rest of its connections
#: in that turn are refused (resource_exhausted; the clients back off and retry), so a
#: uid flooding the backlog costs a few admissions a turn, not one per connection
_ADMISSIONS_PER_UID = 8
#: how long accepting pauses when the process is out of file descriptors or memory
_ACCEPT_RETRY_DELAY = 0.1
#: how long a runner-group membership read from the group database is trusted
_MEMBERSHIP_TTL = 1.0


class Handler(Protocol):
    """What the server needs of the dispatcher: answer one request for one peer."""

    def handle(self, request: Request, peer: Peer) -> Response | Later:
        """The response when it can be had without waiting (nothing here blocks), else
        the :class:`Later` that gives it; raises to refuse."""
        ...


class Counters(Protocol):
    """Where the server reports its live figures."""

    requests: int
    connections: int


class Server:
    """Accepts connections on one listening socket and answers them with one Handler."""

    def __init__(self, sock: socket.socket, handler: Handler, limits: Limits,
                 counters: Counters, *, group_gid: int | None = None,
                 recorder: Recorder = NULL_RECORDER) -> None:
        self._sock = sock
        self._handler = handler
        self._limits = limits
        self._group_gid = group_gid
        self._uid = os.getuid()
        self._conns: set[_Session] = set()  # those that count against the limits
        self._tasks: anyio.abc.TaskGroup | None = None
        self._stopping = False  # no more accepting
        self._closing = False  # and connections end after their current request
        self._drained = anyio.Event()
        self._counters = counters
        self.recorder = recorder
        self._refused = 0
        self._refusal_logged = -math.inf
        self._evicted = 0
        self._eviction_logged = -math.inf
        self._turn = 0  # counts the listening socket's readinesses
        self._admitted: dict[int, int] = {}  # uid -> admissions in this turn (runner uids)
        self._accept_paused = False
        self._members: dict[tuple[int, int], tuple[float, bool]] = {}  # (uid, gid) -> when, in

    async def serve(self, shutdown: Callable[[], Awaitable[object]], *,
                    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until ``shutdown()`` returns, then shut down in order."""
        loop = asyncio.get_running_loop()
        async with anyio.create_task_group() as tg:
            self._tasks = tg
            # a socket from the service manager has its unit's Backlog=: ours applies here too
            self._sock.listen(LISTEN_BACKLOG)
            self._sock.setblocking(False)
            loop.add_reader(self._sock.fileno(), self._accept)
            tg.start_soon(self._watchdog)
            task_status.started()
            try:
                await shutdown()
                log.info("stopping: no new connections, %d open", len(self._conns))
                self._stop_accepting(loop)
                self._closing = True
                for session in list(self._conns):
                    if not session.state.busy:
                        session.close()
                if self._conns:
                    with anyio.move_on_after(self._limits.shutdown_grace):
                        await self._drained.wait()
            finally:  # cancelled from outside, too: nothing stays open
                self._stop_accepting(loop)
                for session in list(self._conns):
                    session.abort()
                tg.cancel_scope.cancel()

    def _stop_accepting(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._stopping:
            self._stopping = True
            if not self._accept_paused:
                loop.remove_reader(self._sock.fileno())
            self._sock.close()  # open connections stay

    # ---------------------------------------------------------------- accepting

    def _accept(self) -> None:
        """Accept what the backlog holds, up to a batch; admit or refuse each at once."""
        self._turn += 1
        self._admitted.clear()
        for _ in range(_ACCEPT_BATCH):
            if self._stopping:
                return
            try:
                sock, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS, ENOMEM: nothing to retry now
                self._pause_accepting(exc)
                return
            try:
                self._admit(sock)
            except Exception:  # a bug of ours met by one connection: it costs that one
                log.exception("accepting a connection failed")
                sock.close()

    def _pause_accepting(self, exc: OSError) -> None:
        """Out of descriptors or memory (or any error accept should not give): the
        backlog waits a moment while closing connections free some (evictions and
        timeouts go on); retrying at once would only spin."""
        log.warning("cannot accept connections for now (%s); %d open", exc.strerror,
                    len(self._conns))
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._sock.fileno())
        self._accept_paused = True

        def resume() -> None:
            self._accept_paused = False
            if not self._stopping:
                loop.add_reader(self._sock.fileno(), self._accept)

        loop.call_later(_ACCEPT_RETRY_DELAY, resume)

    def _admit(self, sock: socket.socket) -> None:
        """Check the peer of a socket just accepted; hand it a session or close it."""
        try:
            creds = peer_credentials(sock)
        except OSError:  # no peer left to ask: it hung up already
            log.warning("connection refused: peer credentials unavailable")
            sock.close()
            return
        uid = creds.uid
        admin = uid in (self._uid, 0)
        if not admin:
            if not self._may_connect(creds):
                self.recorder.denied("uid")
                log.warning("connection refused: uid %d (pid %s) is not allowed", uid,
                            creds.pid)
                sock.close()
                return
            admitted = self._admitted.get(uid, 0)
            if admitted >= _ADMISSIONS_PER_UID:
                self._refuse(sock)
                return
            self._admitted[uid] = admitted + 1
        if not self._make_room(uid):
            self._refuse(sock)
            return
        session = _Session(self, Peer(credentials=creds, admin=admin,
                                      process=ProcessPin(sock, creds)), self._turn)
        self._conns.add(session)
        self._counters.connections = len(self._conns)
        self.recorder.connection_opened(self._kind(session))
        assert self._tasks is not None
        self._tasks.start_soon(session.attach, sock)

    def _may_connect(self, creds: PeerCredentials) -> bool:
        """Whether a uid other than ours and root's is in the runner group (the group
        database read at most once a ``_MEMBERSHIP_TTL`` per uid: a flood of one uid's
        connections must not read /etc/group each time)."""
        if self._group_gid is None:
            return False
        if creds.gid == self._group_gid:
            return True
        key, now = (creds.uid, creds.gid), time.monotonic()
        known = self._members.get(key)
        if known is None or now - known[0] > _MEMBERSHIP_TTL:
            if len(self._members) > 4096:  # uids come and go; never an unbounded map
                self._members.clear()
            known = self._members[key] = (now, _in_group(creds, self._group_gid))
        return known[1]

    # ------------------------------------------------------------ the sessions' calls

    def spawn(self, session: _Session, request: Request, later: Later, started: float) -> None:
        """Answer ``request`` in a task (it must wait for the store or a worker thread)."""
        assert self._tasks is not None
        self._tasks.start_soon(session.answer_later, request, later, started)

    def answer_now(self, request: Request, peer: Peer) -> Response | Later:
        try:
            return self._handler.handle(request, peer)
        except Exception as exc:
            return _refusal(request, exc)

    async def answer(self, request: Request, later: Later) -> Response:
        try:
            return await later.answer()
        except Exception as exc:
            return _refusal(request, exc)

    def answered(self, request: Request, reply: Response, peer: Peer, started: float,
                 waited: bool) -> None:
        self._counters.requests += 1
        self.recorder.answered(request, reply, peer, started, waited=waited)

    def lost(self, session: _Session) -> None:
        if session.state.ended_by == "timed out":
            log.info("closed a connection that timed out (slow, silent or not reading)")
        self.recorder.connection_closed(self._kind(session))
        self._conns.discard(session)
        self._counters.connections = len(self._conns)
        if self._closing and not self._conns:
            self._drained.set()

    def _kind(self, session: _Session) -> str:
        """Who a connection is from, as the metrics say it (a fixed enumeration)."""
        if session.peer.uid == self._uid:
            return "owner"
        return "other" if session.peer.admin else "runner_group"

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def limits(self) -> Limits:
        return self._limits

    # --------------------------------------------------------------------- room

    def _make_room(self, uid: int) -> bool:
        """Evict a connection if one more from ``uid`` would pass a limit; return whether
        there is room (False: every candidate has a request in flight)."""
        limits = self._limits
        if uid not in (self._uid, 0):
            mine = [c for c in self._conns if c.peer.uid == uid]
            if len(mine) >= limits.max_connections_per_uid and not self._evict(mine):
                return False
        if len(self._conns) >= limits.max_connections:
            return self._evict(self._conns)
        return True

    def _evict(self, candidates: Iterable[_Session]) -> bool:
        # not one accepted in this turn: it has had no chance to speak yet
        idle = [c for c in candidates if c.state.evictable(self._turn)]
        if not idle:
            return False
        victim = min(idle, key=lambda c: c.state.eviction_order())
        self.recorder.evicted()
        victim.state.ended_by = "evicted"
        victim.abort()
        self._conns.discard(victim)  # its room is free now
        now = time.monotonic()
        self._evicted += 1
        if now - self._eviction_logged >= 1.0:
            log.warning("evicted %d idle or unfinished connection(s) to make room (%d open)",
                        self._evicted, len(self._conns))
            self._eviction_logged, self._evicted = now, 0
        return True

    def _refuse(self, sock: socket.socket) -> None:
        self.recorder.refused()
        now = time.monotonic()
        self._refused += 1
        if now - self._refusal_logged >= 1.0:  # a flood gets a line a second, not a line each
            log.warning("refused %d connection(s): the limit of all connections or of "
                        "one uid's was reached, and none could be evicted (%d open)",
                        self._refused, len(self._conns))
            self._refusal_logged, self._refused = now, 0
        with contextlib.suppress(OSError):  # a few bytes: the socket's buffer takes them
            sock.send(_refusal_frame(self._limits), socket.MSG_DONTWAIT)
        sock.close()

    async def _watchdog(self) -> None:
        """Abort every connection whose current wait is past its deadline."""
        limits = self._limits
        tick = min(max(min(limits.handshake_timeout, limits.frame_timeout) / 4, 0.02), 1.0)
        while True:
            await anyio.sleep(tick)
            now = time.monotonic()
            for session in list(self._conns):
                if session.state.overdue(now):
                    session.abort()


class _Session(asyncio.Protocol):
    """One connection: its protocol state, its peer, and its lifecycle (:attr:`state`,
    the table in :mod:`.connstate`), which it feeds what happens and follows.

    It exists from the accept on (it counts against the limits from then); its
    transport comes a moment later, in :meth:`attach`."""

    def __init__(self, server: Server, peer: Peer, turn: int) -> None:
        self._server = server
        limits = server.limits
        self._proto = Connection(Role.SERVER, max_frame_size=limits.max_frame_size)
        self.transport: asyncio.Transport | None = None
        self.peer = peer
        self.state = ConnectionState(limits, time.monotonic(), turn)
        self._reading = True  # whether the transport reads (it follows state.reading)

    @property
    def _live(self) -> asyncio.Transport:
        """The transport, in the calls that come only once it is made."""
        assert self.transport is not None
        return self.transport

    def _move(self, event: Input) -> None:
        """Feed the lifecycle an input; make the transport read or not, as it says."""
        state = self.state
        state.move(event, time.monotonic())
        if state.reading != self._reading and self.transport is not None \
                and not state.ended:
            self._reading = state.reading
            if self._reading:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    # ----------------------------------------------------------- asyncio's calls

    async def attach(self, sock: socket.socket) -> None:
        """Give the accepted socket its transport (this session its protocol)."""
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: self, sock)
        except OSError:
            pass  # the peer hung up already: nothing to serve
        except Exception:  # a bug here must cost one connection, never the server
            log.exception("could not start serving a connection (peer uid %s)",
                          self.peer.uid)
        finally:
            if self.transport is None:  # never made: that, or the server is stopping
                sock.close()
                self.connection_lost(None)

    def abort(self) -> None:
        """Drop the connection now (evicted, overdue, or the server is going)."""
        self._move(Input.ABORT)
        if self.transport is not None:
            self.transport.abort()  # else connection_made aborts it

    def close(self) -> None:
        """Close an idle connection (the server is stopping)."""
        if self.transport is not None:
            self._close()
        else:
            self.abort()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        if self.state.ended:  # aborted while it waited for its transport
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.state.ended:
            return
        try:
            self._proto.receive_data(data)
        except ProtocolError as exc:
            self._fail(exc)
            return
        self._pump()

    def eof_received(self) -> bool:
        if not self.state.ended:
            self._proto.receive_data(b"")
            if not self.state.busy:
                self._pump()
        return True  # we close when the last answer is out

    def pause_writing(self) -> None:
        self._move(Input.WRITE_PAUSED)

    def resume_writing(self) -> None:
        self._move(Input.WRITE_RESUMED)
        if not self.state.ended:
            self._pump()

    def connection_lost(self, exc: Exception | None) -> None:
        self._move(Input.LOST)
        assert isinstance(self.peer.process, ProcessPin)
        self.peer.process.close()
        self._server.lost(self)

    # -------------------------------------------------------------------- the work

    def _pump(self) -> None:
        """Answer what is buffered, as far as it can be answered now; then wait to read."""
        try:
            self._answer_buffered()
        except Exception:
            self._crashed()

    def _crashed(self) -> None:
        """A bug of ours met by one connection: it costs that connection, not the daemon."""
        log.exception("connection handler failed")
        self.abort()

    def _answer_buffered(self) -> None:
        proto, peer, server, state = self._proto, self.peer, self._server, self.state
        while state.reading:
            try:
                event = proto.next_event()
            except ProtocolError as exc:
                self._fail(exc)
                return
            except BrokerError as exc:  # handshake refusals: connection stays usable
                self._write(proto.send(error_reply(exc.request_id, exc)))
                continue
            if event is NEED_DATA:
                self._move(Input.PARTIAL if proto.buffered else Input.WAIT)
                return
            if event is CLOSED:
                self._close()
                return
            assert isinstance(event, Request)
            self._move(Input.REQUEST)
            if proto.version is not None and not state.greeted:
                state.greet()
            started = time.perf_counter()
            reply = server.answer_now(event, peer)
            if type(reply) is Later:
                self._move(Input.DEFER)
                server.spawn(self, event, reply, started)
                return
            self._reply(event, cast(Response, reply), started)

    async def answer_later(self, request: Request, later: Later, started: float) -> None:
        reply = await self._server.answer(request, later)
        if self.state.ended:
            return  # the client went away or was cut off; nothing of ours is lost
        try:
            self._move(Input.ANSWERED)
            self._reply(request, reply, started, waited=True)
        except Exception:  # raised out of this task, it would end the server's task group
            self._crashed()
            return
        self._pump()

    def _reply(self, request: Request, reply: Response, started: float, *,
               waited: bool = False) -> None:
        try:
            data = self._proto.send(reply)
        except BrokerError as exc:  # a reply the client could not take, or not encodable
            reply = error_reply(request.id, exc)
            data = self._proto.send(reply)
        self._write(data)
        self._server.answered(request, reply, self.peer, started, waited)
        # A refused grant counts as a bad token does: else one connection could probe
        # execution ids without end.
        refused = isinstance(reply, Error) and reply.code in (ErrorCode.UNAUTHENTICATED,
                                                              ErrorCode.PERMISSION_DENIED)
        if self.state.answered(time.monotonic(), refused=refused):
            self._server.recorder.denied("auth_failures")
            log.warning("closing connection of pid %s: %d refused tokens or grants",
                        self.peer.pid, self.state.refusals)
            self._close()
            return
        if self._server.closing:
            self._close()

    def _fail(self, exc: ProtocolError) -> None:
        log.info("protocol error from pid %s: %s", self.peer.pid, exc.message)
        self._write(self._proto.send(error_reply(exc.request_id, exc)))
        self._close()

    def _write(self, data: bytes) -> None:
        if not self._live.is_closing():
            self._live.write(data)

    def _close(self) -> None:
        """Close once what was written is out (the watchdog bounds how long that takes)."""
        self._move(Input.CLOSE)
        self._live.close()


def _refusal(request: Request, exc: Exception) -> Response:
    """The error frame for a request the handler raised on: a BrokerError says what it
    is; anything else is a bug of ours, logged, and the client learns only that."""
    if isinstance(exc, BrokerError):
        return error_reply(request.id, exc)
    log.error("request %s failed", type(request).__name__, exc_info=exc)
    return error_reply(request.id, RuntimeError())


@functools.cache
def _refusal_frame(limits: Limits) -> bytes:
    """The Error frame a connection turned away for want of room gets, before its close."""
    return Connection(Role.SERVER).send(error_reply(0, ResourceExhausted(
        f"the broker has no room for this connection now (at most "
        f"{limits.max_connections} in all, {limits.max_connections_per_uid} for a runner "
        f"uid, at most {_ADMISSIONS_PER_UID} new ones of a runner uid at once); retry "
        "later")))


def _in_group(creds: PeerCredentials, gid: int) -> bool:
    """Return whether the peer's primary or supplementary groups include ``gid``."""
    if creds.gid == gid:
        return True
    import pwd

    try:
        name = pwd.getpwuid(creds.uid).pw_name
    except KeyError:
        return False
    return gid in os.getgrouplist(name, creds.gid)
