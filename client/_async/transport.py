"""The async client's socket: anyio's Unix stream, every wait bounded by the timeout.

The blocking twin is ``client/_sync/transport.py``: the same methods, so the
generated client drives either. Both raise only ``OSError`` (``TimeoutError``
when a wait runs out); the client turns those into BrokerUnavailable.
"""

from __future__ import annotations

import socket

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread
from anyio.abc import SocketAttribute

from .._common import Backoff, connect_in_turn

__all__ = ["AsyncLock", "AsyncSocket"]

#: serialises the requests of one client (one request in flight per connection)
AsyncLock = anyio.Lock
#: how long one wait for a place in a full listen backlog lasts in the worker thread
_WAIT_SLICE = 0.1


class AsyncSocket:
    """A connected Unix stream socket."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self._stream = stream
        self.raw: socket.socket = stream.extra(SocketAttribute.raw_socket)

    @classmethod
    async def connect(cls, path: str, backoff: Backoff) -> AsyncSocket:
        """Connect within the backoff's timeout (raise TimeoutError past it)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await anyio.lowlevel.checkpoint()
            try:
                sock.connect(path)
            except BlockingIOError:
                # The listen backlog is full (a burst, or a peer flooding it): wait for a
                # place in the kernel, in turn, as the blocking client does, in a worker
                # thread, a slice at a time so that a cancellation waits one slice at most.
                # (Not anyio.connect_unix: it waits for the socket to be writable, which
                # an unconnected Unix socket is at once, so it retries without a pause.)
                sock.setblocking(True)
                while not await anyio.to_thread.run_sync(
                        connect_in_turn, sock, path, min(backoff.left(), _WAIT_SLICE)):
                    if backoff.spent():
                        raise TimeoutError("connect timed out") from None
                sock.setblocking(False)
            stream = await anyio.abc.UNIXSocketStream.from_socket(sock)
        except BaseException:
            sock.close()
            raise
        return cls(stream)

    @staticmethod
    async def pause(backoff: Backoff) -> None:
        """Wait the backoff's next pause; raise TimeoutError when its time is up."""
        pause = backoff.pause()
        if pause is None:
            raise TimeoutError("connect timed out")
        await anyio.sleep(pause)

    async def send_all(self, data: bytes, timeout: float) -> None:
        try:
            with anyio.fail_after(timeout):
                await self._stream.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            raise ConnectionResetError(f"connection lost ({type(exc).__name__})") from None

    async def receive(self, timeout: float) -> bytes:
        """Return the next bytes, or b"" once the broker has closed the connection."""
        try:
            with anyio.fail_after(timeout):
                return await self._stream.receive(65536)
        except anyio.EndOfStream:
            return b""
        except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            raise ConnectionResetError(f"connection lost ({type(exc).__name__})") from None

    async def aclose(self) -> None:
        await self._stream.aclose()
