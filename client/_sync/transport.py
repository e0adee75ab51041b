"""The blocking client's socket: a plain socket with a timeout, no event loop, no thread.

The async twin is ``client/_async/transport.py``, with the same methods.
"""

from __future__ import annotations

import socket
import threading
import time

__all__ = ["SyncLock", "SyncSocket"]

#: serialises the requests of one client (one request in flight per connection)
SyncLock = threading.Lock


class SyncSocket:
    """A connected Unix stream socket."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.raw = sock
        self._timeout = timeout

    @classmethod
    def connect(cls, path: str, timeout: float) -> SyncSocket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    sock.connect(path)
                    break
                except BlockingIOError:
                    # A full listen backlog (a burst of connections): a Unix socket with
                    # a timeout says EAGAIN at once instead of waiting. Wait, briefly.
                    if time.monotonic() >= deadline:
                        raise TimeoutError("connect timed out") from None
                    time.sleep(0.005)
        except BaseException:
            sock.close()
            raise
        return cls(sock, timeout)

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
