"""The blocking client's socket: a plain blocking socket, no event loop, no thread.

Each wait is bounded in the kernel (``SO_RCVTIMEO``/``SO_SNDTIMEO``), not by a Python
socket timeout: with one, CPython polls the socket before every send and receive, two
system calls more per request. A wait that runs out fails with ``EAGAIN``, told here
as ``TimeoutError``, as a Python timeout would be.

The async twin is ``client/_async/transport.py``, with the same methods.
"""

from __future__ import annotations

import socket
import threading
import time

from .._common import Backoff, connect_in_turn, timeval

__all__ = ["SyncLock", "SyncSocket"]

#: serialises the requests of one client (one request in flight per connection)
SyncLock = threading.Lock


class SyncSocket:
    """A connected Unix stream socket."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.raw = sock
        self._timeout = -1.0  # none set yet
        self._set_timeout(timeout)

    @classmethod
    def connect(cls, path: str, backoff: Backoff) -> SyncSocket:
        """Connect within the backoff's timeout (raise TimeoutError past it); a full
        listen backlog is waited out in the kernel, in turn (``connect_in_turn``)."""
        timeout = backoff.left()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            while not connect_in_turn(sock, path, backoff.left()):
                if backoff.spent():
                    raise TimeoutError("connect timed out")
            return cls(sock, timeout)
        except BaseException:
            sock.close()
            raise

    @staticmethod
    def pause(backoff: Backoff) -> None:
        """Wait the backoff's next pause; raise TimeoutError when its time is up."""
        pause = backoff.pause()
        if pause is None:
            raise TimeoutError("connect timed out")
        time.sleep(pause)

    def send_all(self, data: bytes, timeout: float) -> None:
        if timeout != self._timeout:
            self._set_timeout(timeout)
        try:
            self.raw.sendall(data)
        except BlockingIOError:
            raise TimeoutError("send timed out") from None

    def receive(self, timeout: float) -> bytes:
        """Return the next bytes, or b"" once the broker has closed the connection."""
        if timeout != self._timeout:
            self._set_timeout(timeout)
        try:
            return self.raw.recv(65536)
        except BlockingIOError:
            raise TimeoutError("receive timed out") from None

    def _set_timeout(self, timeout: float) -> None:
        """Bound every later wait by ``timeout`` seconds (two system calls: only when the
        client's timeout has changed)."""
        limit = timeval(timeout)
        self.raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
        self.raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
        self._timeout = timeout

    def close(self) -> None:
        self.raw.close()
