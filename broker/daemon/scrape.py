"""The metrics endpoint: a private Unix socket or a loopback TCP port, served by a thread.

prometheus_client's own ``MetricsHandler`` answers each scrape (the text or
OpenMetrics format, gzip when asked), under the stdlib's ``socketserver``: one
daemon thread accepts, and each scrape gets a short-lived thread of its own (at
most eight at once), which takes the registry's locks only to read it. Those
threads read the registry and nothing else; what the broker's
objects hold is copied into the registry on the event loop
(:mod:`.metrics`). The socket is bound here, before the store is opened, so
a start refused for it changes nothing; a Unix socket gets the checks and the
mode of the broker's own (:mod:`.listen`): 0600, in a directory only we may
enter.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import socketserver
import stat
import threading
from pathlib import Path

from prometheus_client import CollectorRegistry, MetricsHandler

from ..config import MetricsAddress
from ..local.trust import check_private_dir
from ..protocol.errors import StartupError
from .listen import live_pid

__all__ = ["ScrapeEndpoint"]

log = logging.getLogger("stigmer.broker")

#: seconds a scraper may take to send its request and read the answer
_SCRAPE_TIMEOUT = 5.0
#: how often the serving thread looks whether it is asked to stop
_POLL_INTERVAL = 0.2
#: scrapes served at once (each in a thread of its own)
_CONCURRENT = 8


class _Scrapes(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """socketserver's loop over a socket bound by :class:`ScrapeEndpoint` (TCP or Unix).

    Each scrape has a thread of its own, so a client that connects and says nothing
    delays no one else (one at a time, an idle local connection held every scrape up for
    its timeout); at most ``_CONCURRENT`` at once, past which a connection is closed
    unanswered."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, sock: socket.socket, handler: type[MetricsHandler]) -> None:
        socketserver.BaseServer.__init__(self, sock.getsockname(), handler)
        self.socket = sock
        self._slots = threading.BoundedSemaphore(_CONCURRENT)

    def process_request(self, request: socket.socket,  # type: ignore[override]
                        client_address: object) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # too many at once: turned away
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: socket.socket,  # type: ignore[override]
                               client_address: object) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: object, client_address: object) -> None:
        log.debug("a metrics scrape failed", exc_info=True)  # the scraper went away


class ScrapeEndpoint:
    """The bound metrics socket; :meth:`start` serves it, :meth:`close` takes it away."""

    def __init__(self, sock: socket.socket, address: MetricsAddress) -> None:
        self._sock = sock
        self.address = address
        self._inode = os.lstat(address.path).st_ino if address.path is not None else 0
        self._server: _Scrapes | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def bind(cls, address: MetricsAddress) -> ScrapeEndpoint:
        """Bind and listen on ``address``. Raises StartupError naming what is wrong."""
        if address.path is not None:
            return cls(_bind_unix(address.path), address)
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        try:
            sock = socket.create_server((address.host, address.port), family=family,
                                        backlog=16)
        except OSError as exc:
            fix = ("choose another port" if exc.errno == errno.EADDRINUSE else
                   "use a unix: socket (the systemd unit allows only AF_UNIX sockets) or "
                   "allow AF_INET" if exc.errno == errno.EAFNOSUPPORT else "see --metrics")
            reason = os.strerror(exc.errno) if exc.errno else "it failed"
            raise StartupError(f"cannot listen for metrics on {address}: {reason}; "
                               f"{fix}") from None
        return cls(sock, address)

    def start(self, registry: CollectorRegistry) -> None:
        """Serve ``registry`` in a daemon thread."""
        handler = type("ScrapeHandler", (MetricsHandler,),
                       {"registry": registry, "timeout": _SCRAPE_TIMEOUT})
        self._server = _Scrapes(self._sock, handler)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": _POLL_INTERVAL},
                                        name="stigmer-metrics", daemon=True)
        self._thread.start()
        log.info("serving metrics on %s", self.address)

    def close(self) -> None:
        """Stop serving (waits for a scrape in progress, at most its timeout), close the
        socket and remove a Unix socket that is still ours. Blocks: call it in a thread."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._sock.close()
        path = self.address.path
        if path is not None:
            with contextlib.suppress(OSError):
                if os.lstat(path).st_ino == self._inode:
                    os.unlink(path)


def _bind_unix(path: Path) -> socket.socket:
    """A listening Unix socket at ``path``, 0600 from the moment it exists, in a directory
    only we may enter (made 0700 when missing). Raises StartupError."""
    directory = path.parent
    try:
        directory.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"cannot create the metrics socket's directory {directory}: "
                           f"{exc.strerror}") from None
    problem = check_private_dir(directory)
    if problem:
        raise StartupError(f"refusing metrics socket directory {directory}: it {problem}")
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot bind the metrics socket {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(16)
    return sock


def _clear_stale(path: Path) -> None:
    """Remove a socket of ours at ``path`` that nothing listens on; refuse anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid():
        raise StartupError(f"refusing metrics socket path {path}: something that is not a "
                           "socket of ours is there; remove it or choose another path")
    if live_pid(path) is None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # stale: ours, a socket, and nobody listens
        return
    raise StartupError(f"the metrics socket {path} is in use by another process; choose "
                       "another --metrics path")
