"""The daemon's lifecycle: harden the process, bind, open the vault, serve, shut down.

:func:`serve` is the whole daemon as one coroutine, easy to run inside a test's
event loop: it calls ``task_status.started()`` once the socket answers, and
stops when ``shutdown_trigger`` returns (:func:`run` makes that SIGTERM/SIGINT)
or a client sends Shutdown, then shuts down in order: stop accepting, let in-flight
requests finish within the grace period, close the store, remove the socket.
:func:`run` is the process entry point the CLI calls.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import grp
import logging
import os
import resource
import signal
import socket
import sys
from collections.abc import Awaitable, Callable

import anyio
import anyio.abc

from .config import Config
from .listen import BoundSocket, StartupError, adopt_socket, bind_unix_socket
from .peer import check_private_dir
from .server import Server
from .service import Counters, Service
from .systemd import Notifier
from .vault import Vault, VaultError

__all__ = ["harden_process", "run", "serve"]

log = logging.getLogger("stigmer.broker")

_PR_SET_DUMPABLE = 4


def harden_process() -> None:
    """No core dumps, and (Linux) not dumpable: no ptrace, no /proc/PID/mem or environ.

    SIGXFSZ is ignored so that a file-size limit fails a write (reported to the
    client as resource_exhausted) instead of killing the daemon.
    """
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            raise StartupError(f"prctl(PR_SET_DUMPABLE) failed: errno {ctypes.get_errno()}")


def _prepare_home(config: Config) -> None:
    home = config.paths.home
    if not os.path.lexists(home):
        try:
            home.parent.mkdir(parents=True, exist_ok=True)
            os.mkdir(home, 0o700)
        except OSError as exc:
            raise StartupError(f"cannot create broker home {home}: {exc.strerror}") from None
    problem = check_private_dir(home)
    if problem:
        raise StartupError(f"refusing broker home {home}: it {problem}")


def _group_gid(name: str | None) -> int | None:
    if name is None:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        if name.isdigit():
            return int(name)
        raise StartupError(f"--allow-group {name}: no such group") from None


async def serve(config: Config, *, shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
                listen_socket: socket.socket | None = None,
                task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
    """Run the broker until shutdown. Raises StartupError when it cannot start.

    ``listen_socket`` is a socket inherited from the service manager; without
    one the broker binds ``config.paths.socket`` itself. Both behave the same.
    """
    _prepare_home(config)
    gid = _group_gid(config.allow_group)
    notifier = Notifier(config.notify_socket)
    bound: BoundSocket
    if listen_socket is not None:
        bound = adopt_socket(listen_socket, group_gid=gid)
    else:
        bound = bind_unix_socket(config.paths.socket, group_gid=gid)
    try:
        try:
            vault = await Vault.open(config.paths.store, env_key=config.env_key,
                                     key_file=config.paths.key_file,
                                     use_keychain=config.use_keyring)
        except VaultError as exc:
            raise StartupError(str(exc)) from None
        try:
            listener = await anyio.abc.SocketListener.from_socket(bound.sock)
            counters = Counters()
            stop = anyio.Event()
            service = Service(config, vault, counters, request_shutdown=stop.set)
            service.socket_path = bound.path
            await service.start()
            server = Server(listener, service, config.limits, counters, group_gid=gid)

            async def shutdown() -> None:
                async with anyio.create_task_group() as tg:
                    async def fire(waiter: Callable[[], Awaitable[object]]) -> None:
                        await waiter()
                        stop.set()
                    if shutdown_trigger is not None:
                        tg.start_soon(fire, shutdown_trigger)
                    await stop.wait()
                    notifier.notify("STOPPING=1", "STATUS=stopping")
                    tg.cancel_scope.cancel()

            log.info("serving on %s (store %s, key %s, pid %d, started %s)", bound.path,
                     config.paths.store, vault.master.describe(), os.getpid(), config.started_by)
            async with anyio.create_task_group() as background:
                background.start_soon(service.maintain)
                await server.serve(shutdown, task_status=_Started(task_status, notifier,
                                                                  bound.path))
                background.cancel_scope.cancel()
            with anyio.CancelScope(shield=True):
                await service.close()
            log.info("stopped")
        finally:
            with anyio.CancelScope(shield=True):
                await vault.close()
    finally:
        bound.remove()




def run(config: Config, *, ready_fd: int | None = None,
        listen_socket: socket.socket | None = None) -> None:
    """Serve in this process until SIGTERM/SIGINT (the CLI's ``serve``).

    With ``ready_fd``, writes ``ready\n`` to that file descriptor (and closes
    it) once the socket answers, so ``stigmer-broker start`` need not poll.
    """
    os.umask(0o077)
    harden_process()
    options: dict[str, object] = {}
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: F401

        options["use_uvloop"] = True
    anyio.run(_serve_until_signalled, config, ready_fd, listen_socket, backend="asyncio",
              backend_options=options)


class _Started(anyio.abc.TaskStatus[None]):
    """Passes "the socket answers" on to the caller and to the service manager."""

    def __init__(self, inner: anyio.abc.TaskStatus[None], notifier: Notifier,
                 path: object) -> None:
        self._inner = inner
        self._notifier = notifier
        self._path = path

    def started(self, value: None = None) -> None:
        self._notifier.notify("READY=1", f"STATUS=serving on {self._path}")
        self._inner.started()


class _ReadySignal(anyio.abc.TaskStatus[None]):
    """Tells whoever started us (``--ready-fd``) that the socket answers."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    def started(self, value: None = None) -> None:
        log.info("ready")
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.write(self._fd, b"ready\n")
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


async def _serve_until_signalled(config: Config, ready_fd: int | None,
                                 listen_socket: socket.socket | None) -> None:
    # Handlers go in before the socket exists, so no SIGTERM finds us unprepared.
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async def signalled() -> None:
            async for signum in signals:
                log.info("received %s", signal.Signals(signum).name)
                return

        await serve(config, shutdown_trigger=signalled, listen_socket=listen_socket,
                    task_status=_ReadySignal(ready_fd))
