"""The blocking client's socket: a plain socket with a timeout, no event loop, no thread.

The async twin is ``client/_async/transport.py``, with the same methods.
"""

from __future__ import annotations

import socket
import threading
import time

from .._common import Backoff, connect_in_turn

__all__ = ["SyncLock", "SyncSocket"]

#: serialises the requests of one client (one request in flight per connection)
SyncLock = threading.Lock


class SyncSocket:
    """A connected Unix stream socket."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.raw = sock
        self._timeout = timeout

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
            sock.settimeout(timeout)
        except BaseException:
            sock.close()
            raise
        return cls(sock, timeout)

    @staticmethod
    def pause(backoff: Backoff) -> None:
        """Wait the backoff's next pause; raise TimeoutError when its time is up."""
        pause = backoff.pause()
        if pause is None:
            raise TimeoutError("connect timed out")
        time.sleep(pause)

    def send_all(self, data: bytes, timeout: float) -> None:
        self._set_timeout(timeout)
        self.raw.sendall(data)

    def receive(self, timeout: float) -> bytes:
        """Return the next bytes, or b"" once the broker has closed the connection."""
        self._set_timeout(timeout)
        return self.raw.recv(65536)

    def _set_timeout(self, timeout: float) -> None:
        if timeout != self._timeout:  # a syscall: only when the client's timeout changed
            self.raw.settimeout(timeout)
            self._timeout = timeout

    def close(self) -> None:
        self.raw.close()

