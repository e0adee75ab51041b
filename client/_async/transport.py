"""The async client's socket: anyio's Unix stream, every wait bounded by the timeout.

The blocking twin is ``client/_sync/transport.py``: the same methods, so the
generated client drives either. Both raise only ``OSError`` (``TimeoutError``
when a wait runs out); the client turns those into BrokerUnavailable.
"""

from __future__ import annotations

import socket

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

__all__ = ["AsyncLock", "AsyncSocket"]

#: serialises the requests of one client (one request in flight per connection)
AsyncLock = anyio.Lock


class AsyncSocket:
    """A connected Unix stream socket."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self._stream = stream
        self.raw: socket.socket = stream.extra(SocketAttribute.raw_socket)

    @classmethod
    async def connect(cls, path: str, timeout: float) -> AsyncSocket:
        with anyio.fail_after(timeout):
            stream = await anyio.connect_unix(path)
        return cls(stream)

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
