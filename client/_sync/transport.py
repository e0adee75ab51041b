"""The blocking client's socket: a plain socket with a timeout, no event loop, no thread.

The async twin is ``client/_async/transport.py``, with the same methods.
"""

from __future__ import annotations

import errno
import socket
import struct
import threading
import time

from .._common import Backoff

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
        """Connect within the backoff's timeout (raise TimeoutError past it).

        While the listen backlog is full (a burst, or a peer flooding it) the connect
        waits in the kernel, which lets the waiters in one by one as the broker accepts,
        in turn: no retries, and no place lost to a peer that hammers the socket. (A
        socket with a Python timeout would say EAGAIN at once instead of waiting; the
        kernel's wait is bounded by SO_SNDTIMEO.)
        """
        timeout = backoff.left()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            while True:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                                _timeval(backoff.left()))
                try:
                    sock.connect(path)
                    sock.getpeername()  # a wait cut short by a signal returns as if done
                    break
                except (BlockingIOError, InterruptedError):  # the wait ran out, or a signal
                    pass
                except OSError as exc:
                    if exc.errno != errno.ENOTCONN:
                        raise
                if backoff.spent():
                    raise TimeoutError("connect timed out")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(0))
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


def _timeval(seconds: float) -> bytes:
    """``seconds`` as the struct timeval of SO_SNDTIMEO (0: no limit)."""
    whole = int(seconds)
    return struct.pack("@ll", whole, int((seconds - whole) * 1_000_000))
