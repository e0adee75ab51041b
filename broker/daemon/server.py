"""Serving connections: accept, check the peer, read frames, answer, shut down in order.

Theory of operation: one task per connection drives a sans-IO
:class:`~stigmer.broker.protocol.Connection`. Before any byte is read the
peer's uid is checked (our own, root, or a member of the runner group when one
is allowed). Each wait has a deadline: the handshake must finish within
``handshake_timeout``, a frame that has started must finish within
``frame_timeout``, a greeted connection may stay idle ``idle_timeout``, and a
reply must be taken within ``frame_timeout``. Deadlines are plain numbers on
the connection, enforced by one watchdog task that shuts the sockets of overdue
connections down (their waits then end as if the peer had gone), so the request
path pays for no cancel scope of its own.
Whatever a client does costs at most its own connection.

Room: at ``max_connections``, a new connection evicts first the oldest one
that has not finished its Hello, then the one idle longest; only when every
connection has a request in flight is it refused. No uid but the broker's
owner and root may hold more than ``max_connections_per_uid``: beyond that a
new one evicts that uid's own. So peers that connect and stall cannot lock
out the owner's ``status``/``stop`` or the runners.

Shutdown, once the trigger fires: stop accepting, close idle connections, let
requests in flight finish within ``shutdown_grace``, then cancel the rest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import math
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

from ..config import Limits
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
from ..protocol.peer import Peer, PeerCredentials, peer_credentials
from .attest import ProcessPin

__all__ = ["Counters", "Handler", "Server"]

log = logging.getLogger("stigmer.broker")

_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class Handler(Protocol):
    """What the server needs of the dispatcher: answer one request for one peer."""

    async def handle(self, request: Request, peer: Peer) -> Response: ...


class Counters(Protocol):
    """Where the server reports its live figures."""

    requests: int
    connections: int


@dataclasses.dataclass(eq=False, slots=True)
class _Conn:
    sock: socket.socket
    uid: int
    since: float  # time.monotonic() of the accept, then of the last request answered
    greeted: bool = False
    busy: bool = False
    deadline: float = math.inf  # time.monotonic() by which the current wait must end
    timed_out: bool = False
    evicted: bool = False

    def end(self) -> None:
        """End an idle or overdue connection: shut its socket down, so that the receive
        or send it waits in returns (end of stream, broken pipe) and its task finishes
        as if the peer had gone. Not a cancellation: cancelling a wait on a raw socket
        races the loop's readiness callback in anyio, which then sets the result of a
        cancelled future (InvalidStateError, once per connection, in the loop)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def eviction_order(self) -> tuple[bool, float]:
        """Sorts first the connection to evict first: not greeted, then the oldest/idlest."""
        return self.greeted, self.since


class Server:
    """Accepts connections on one listener and answers them with one Handler."""

    def __init__(self, listener: anyio.abc.SocketListener, handler: Handler, limits: Limits,
                 counters: Counters, *, group_gid: int | None = None) -> None:
        self._listener = listener
        self._handler = handler
        self._limits = limits
        self._group_gid = group_gid
        self._uid = os.getuid()
        self._conns: set[_Conn] = set()
        self._stopping = False  # no more accepting
        self._closing = False  # and connections end after their current request
        self._drained = anyio.Event()
        self._counters = counters
        self._refused = 0
        self._refusal_logged = -math.inf
        self._evicted = 0
        self._eviction_logged = -math.inf

    async def serve(self, shutdown: Callable[[], Awaitable[object]], *,
                    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until ``shutdown()`` returns, then shut down in order."""
        async with anyio.create_task_group() as tg:
            accept_scope = anyio.CancelScope()
            tg.start_soon(self._accept_loop, tg, accept_scope)
            tg.start_soon(self._watchdog)
            task_status.started()
            await shutdown()
            log.info("stopping: no new connections, %d open", len(self._conns))
            self._stopping = True
            accept_scope.cancel()
            await self._listener.aclose()
            self._closing = True
            for conn in list(self._conns):
                if not conn.busy:
                    conn.end()
            if self._conns:
                with anyio.move_on_after(self._limits.shutdown_grace):
                    await self._drained.wait()
            tg.cancel_scope.cancel()

    async def _accept_loop(self, tg: anyio.abc.TaskGroup, scope: anyio.CancelScope) -> None:
        starved = False
        with scope:
            while True:
                try:
                    stream = await self._listener.accept()
                except anyio.ClosedResourceError:
                    return  # closed by shutdown before its cancellation reached us
                except (OSError, anyio.BrokenResourceError) as exc:
                    if self._stopping:
                        return
                    # anyio reports accept()'s OSError as BrokenResourceError from it. No
                    # error of one connection (aborted, out of fds) may stop the daemon:
                    # log once per episode and try again.
                    cause = exc if isinstance(exc, OSError) else exc.__cause__
                    if not starved:
                        reason = getattr(cause, "strerror", None) or type(cause).__name__
                        if isinstance(cause, OSError) and cause.errno in _OUT_OF_RESOURCES:
                            log.warning("accept failed (%s); backing off", reason)
                        else:
                            log.error("accept failed (%s); retrying", reason)
                    starved = True
                    await anyio.sleep(0.1)
                    continue
                if starved:
                    log.info("accepting connections again")
                    starved = False
                creds = _credentials(stream)  # read once: the limits and the peer check
                uid = creds.uid if creds is not None else -1
                if not self._make_room(uid):
                    tg.start_soon(self._refuse, stream)
                    continue
                conn = _Conn(sock=stream.extra(SocketAttribute.raw_socket), uid=uid,
                                 since=time.monotonic())
                self._conns.add(conn)
                self._counters.connections = len(self._conns)
                tg.start_soon(self._run_connection, stream, conn, creds)

    def _make_room(self, uid: int) -> bool:
        """Evict a connection if one more from ``uid`` would pass a limit; return whether
        there is room (False: every candidate has a request in flight)."""
        limits = self._limits
        if uid not in (self._uid, 0):
            mine = [c for c in self._conns if c.uid == uid]
            if len(mine) >= limits.max_connections_per_uid and not self._evict(mine):
                return False
        if len(self._conns) >= limits.max_connections:
            return self._evict(self._conns)
        return True

    def _evict(self, candidates: Iterable[_Conn]) -> bool:
        idle = [c for c in candidates if not c.busy]
        if not idle:
            return False
        victim = min(idle, key=_Conn.eviction_order)
        victim.evicted = True
        victim.end()
        self._conns.discard(victim)  # its room is free now; its task ends on its own
        now = time.monotonic()
        self._evicted += 1
        if now - self._eviction_logged >= 1.0:
            log.warning("evicted %d idle or unfinished connection(s) to make room (%d open)",
                        self._evicted, len(self._conns))
            self._eviction_logged, self._evicted = now, 0
        return True

    async def _watchdog(self) -> None:
        """Cancel every connection whose current wait is past its deadline."""
        limits = self._limits
        tick = min(max(min(limits.handshake_timeout, limits.frame_timeout) / 4, 0.02), 1.0)
        while True:
            await anyio.sleep(tick)
            now = time.monotonic()
            for conn in self._conns:
                if conn.deadline < now and not conn.timed_out:
                    conn.timed_out = True
                    conn.end()

    async def _refuse(self, stream: anyio.abc.SocketStream) -> None:
        now = time.monotonic()
        self._refused += 1
        if now - self._refusal_logged >= 1.0:  # a flood gets a line a second, not a line each
            log.warning("refused %d connection(s): %d open (the limit)", self._refused,
                        len(self._conns))
            self._refusal_logged, self._refused = now, 0
        reply = Connection(Role.SERVER).send(error_reply(0, ResourceExhausted(
            f"the broker has {self._limits.max_connections} connections open; retry later")))
        with anyio.move_on_after(1.0), contextlib.suppress(anyio.BrokenResourceError,
                                                           anyio.ClosedResourceError, OSError):
            await stream.send(reply)
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            await stream.aclose()

    async def _run_connection(self, stream: anyio.abc.SocketStream, conn: _Conn,
                              creds: PeerCredentials | None) -> None:
        try:
            async with stream:
                peer = self._check_peer(stream, creds)
                if peer is not None:
                    try:
                        await self._converse(stream, conn, peer)
                    finally:
                        assert isinstance(peer.process, ProcessPin)
                        peer.process.close()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream,
                ConnectionError):
            pass  # the client went away; nothing of ours is lost
        except Exception:
            log.exception("connection handler failed")
        finally:
            if conn.timed_out and not conn.evicted:
                log.info("closed a connection that timed out (slow, silent or not reading)")
            self._conns.discard(conn)
            self._counters.connections = len(self._conns)
            if self._closing and not self._conns:
                self._drained.set()

    def _check_peer(self, stream: anyio.abc.SocketStream,
                    creds: PeerCredentials | None) -> Peer | None:
        if creds is None:
            log.warning("connection refused: peer credentials unavailable")
            return None
        raw: socket.socket = stream.extra(SocketAttribute.raw_socket)
        if creds.uid in (self._uid, 0):
            return Peer(credentials=creds, admin=True, process=ProcessPin(raw, creds))
        if self._group_gid is not None and _in_group(creds, self._group_gid):
            return Peer(credentials=creds, admin=False, process=ProcessPin(raw, creds))
        log.warning("connection refused: uid %d (pid %s) is not allowed", creds.uid, creds.pid)
        return None

    async def _converse(self, stream: anyio.abc.SocketStream, conn: _Conn, peer: Peer) -> None:
        limits = self._limits
        proto = Connection(Role.SERVER, max_frame_size=limits.max_frame_size)
        handshake_deadline = time.monotonic() + limits.handshake_timeout
        frame_deadline: float | None = None
        auth_failures = 0
        while True:
            try:
                event = proto.next_event()
            except ProtocolError as exc:
                log.info("protocol error from pid %s: %s", peer.pid, exc.message)
                await self._send(stream, conn, proto.send(error_reply(exc.request_id, exc)))
                return
            except BrokerError as exc:  # handshake refusals: connection stays usable
                await self._send(stream, conn, proto.send(error_reply(exc.request_id, exc)))
                continue
            if event is CLOSED:
                return
            if event is NEED_DATA:
                now = time.monotonic()
                if proto.buffered:
                    frame_deadline = frame_deadline or now + limits.frame_timeout
                    deadline = frame_deadline
                else:
                    frame_deadline = None
                    deadline = now + limits.idle_timeout
                if proto.version is None:
                    deadline = min(deadline, handshake_deadline)
                conn.deadline = deadline
                try:
                    data = await stream.receive(65536)
                except anyio.EndOfStream:
                    data = b""
                conn.deadline = math.inf
                try:
                    proto.receive_data(data)
                except ProtocolError as exc:
                    log.info("protocol error from pid %s: %s", peer.pid, exc.message)
                    await self._send(stream, conn, proto.send(error_reply(0, exc)))
                    return
                continue
            assert isinstance(event, Request)
            frame_deadline = None
            conn.greeted = proto.version is not None
            conn.busy = True
            try:
                reply = await self._answer(event, peer)
                self._counters.requests += 1
                try:
                    data = proto.send(reply)
                except ResourceExhausted as exc:  # a reply the client could not take
                    reply = error_reply(event.id, exc)
                    data = proto.send(reply)
                await self._send(stream, conn, data)
            finally:
                conn.busy = False
                conn.since = time.monotonic()
            if isinstance(reply, Error) and reply.code == ErrorCode.UNAUTHENTICATED:
                auth_failures += 1
                if auth_failures >= limits.max_auth_failures:
                    log.warning("closing connection of pid %s: %d failed token checks",
                                peer.pid, auth_failures)
                    return
            if self._closing:
                return

    async def _answer(self, request: Request, peer: Peer) -> Response:
        try:
            return await self._handler.handle(request, peer)
        except BrokerError as exc:
            return error_reply(request.id, exc)
        except Exception:
            log.exception("request %s failed", type(request).__name__)
            return error_reply(request.id, RuntimeError())

    async def _send(self, stream: anyio.abc.SocketStream, conn: _Conn, data: bytes) -> None:
        conn.deadline = time.monotonic() + self._limits.frame_timeout
        await stream.send(data)
        conn.deadline = math.inf


def _credentials(stream: anyio.abc.SocketStream) -> PeerCredentials | None:
    """The peer as the kernel reports it, or None when it cannot say (such a connection
    counts as uid -1 for the limits and is refused by the peer check)."""
    try:
        return peer_credentials(stream.extra(SocketAttribute.raw_socket))
    except OSError:
        return None


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
