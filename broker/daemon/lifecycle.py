"""The daemon's lifecycle: harden the process, bind, prove the key, open the store, serve, stop.

:func:`serve` is the whole daemon as one coroutine, easy to run inside a test's
event loop: it calls ``task_status.started()`` once the socket answers, and
stops when ``shutdown_trigger`` returns (:func:`run` makes that SIGTERM/SIGINT)
or a client sends Shutdown, then shuts down in order: stop accepting, let in-flight
requests finish within the grace period, close the store, remove the socket.
:func:`run` is the process entry point the CLI calls.
"""

from __future__ import annotations

import contextlib
import functools
import grp
import logging
import os
import pwd
import resource
import signal
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import anyio.abc
import anyio.to_thread

from ..config import Config, Limits
from ..dispatch import Counters
from ..metrics import NULL_RECORDER
from ..protocol.errors import StartupError
from ..store.backend import open_store, peek_store
from ..store.backup import backup_is_tracked, no_backup_line
from ..store.keys import find_master_key, key_sources, new_master_key
from ..store.vault import Vault
from .attest import exe_grants_limit
from .fleet import follow_fleet
from .hardening import harden_process, raise_open_file_limit
from .homelock import lock_home, prepare_home
from .listen import BoundSocket, adopt_socket, bind_unix_socket
from .server import Server
from .startup import compose, refuse_replaced_store
from .systemd import Notifier, keep_alive

if TYPE_CHECKING:
    from .metrics import PrometheusMetrics
    from .scrape import ScrapeEndpoint

__all__ = ["run", "serve"]

log = logging.getLogger("stigmer.broker")


def _group_gid(name: str | None) -> int | None:
    """The gid of ``--allow-group``; the broker's user must be in it to give it the socket."""
    if name is None:
        return None
    try:
        gid = grp.getgrnam(name).gr_gid
    except KeyError:
        if not name.isdigit():
            raise StartupError(f"--allow-group {name}: no such group") from None
        gid = int(name)
    if os.geteuid() != 0 and gid != os.getegid() and gid not in os.getgroups():
        user = pwd.getpwuid(os.geteuid()).pw_name if _has_passwd_entry() else str(os.geteuid())
        raise StartupError(
            f"--allow-group {name}: user {user} is not a member, so it cannot give the socket "
            f"to that group; add it (sudo usermod -aG {name} {user}, then log in again) or "
            "choose a group it is in")
    return gid


#: open files kept for the store, the log, the listener and the like
_RESERVED_FILES = 64


#: files one connection holds: its socket, and the pinned peer's /proc directory and pidfd
_FILES_PER_CONNECTION = 3


def _fit_to_open_files(limits: Limits) -> Limits:
    """Lower ``max_connections`` so that every connection can have its files."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return limits
    room = max((int(soft) - _RESERVED_FILES) // _FILES_PER_CONNECTION, 8)
    if room >= limits.max_connections:
        return limits
    log.warning("serving at most %d connections: the open-file limit is %d", room, soft)
    return limits._replace(max_connections=room)


def _metrics(config: Config) -> tuple[ScrapeEndpoint, PrometheusMetrics] | None:
    """The bound metrics endpoint and the registry it will serve, when ``--metrics`` asks
    for them (prometheus_client is imported only then). Raises StartupError."""
    if config.metrics is None:
        return None
    from .metrics import PrometheusMetrics
    from .scrape import ScrapeEndpoint

    return ScrapeEndpoint.bind(config.metrics), PrometheusMetrics()


def _has_passwd_entry() -> bool:
    try:
        pwd.getpwuid(os.geteuid())
    except KeyError:
        return False
    return True


async def serve(config: Config, *, shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
                listen_socket: socket.socket | None = None,
                task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
    """Run the broker until shutdown. Raises a StartupError when it cannot start.

    ``listen_socket`` is a socket inherited from the service manager; without
    one the broker binds ``config.paths.socket`` itself. Both behave the same.
    """
    prepare_home(config.paths.home)
    gid = _group_gid(config.allow_group)
    notifier = Notifier(config.notify_socket)
    name = listen_socket.getsockname() if listen_socket is not None else None
    where = Path(name) if isinstance(name, str) and name else config.paths.socket
    home_lock = lock_home(config.paths.home, where)  # one daemon per store, whatever socket
    bound: BoundSocket
    try:
        if listen_socket is not None:
            bound = adopt_socket(listen_socket, group_gid=gid)
        else:
            bound = bind_unix_socket(config.paths.socket, group_gid=gid)
    except BaseException:
        home_lock.release()
        raise
    metrics: tuple[ScrapeEndpoint, PrometheusMetrics] | None = None
    try:
        metrics = _metrics(config)
        recorder = NULL_RECORDER if metrics is None else metrics[1]
        # Everything a start may be refused on is checked before the store is opened,
        # which migrates and writes it: a refused start leaves it as it was.
        peek = await peek_store(config.store_url, config.paths.store)
        refuse_replaced_store(config, peek)
        sources = await key_sources(env_key=config.env_key, key_file=config.paths.key_file,
                                    use_keychain=config.use_keyring,
                                    env_key_origin=config.env_key_origin,
                                    key_command=config.key_command)
        master = await find_master_key(sources, store=peek)
        store = await open_store(config.store_url, config.paths.store,
                                 stale_after=config.stale_after_s, recorder=recorder)
        try:
            vault = await Vault.unlock(store, master or await new_master_key(sources))
            counters = Counters()
            stop = anyio.Event()
            broker = await compose(config, store, vault, counters, socket_path=bound.path,
                                   attest_limit=exe_grants_limit(), request_shutdown=stop.set)
            server = Server(bound.sock, broker.dispatcher, _fit_to_open_files(config.limits),
                            counters, group_gid=gid, recorder=recorder)

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
                     store.describe(), vault.key_source(), os.getpid(), config.started_by)
            if (broker.status.key_backed_up_at() is None
                    and backup_is_tracked(vault.key_source())):
                log.warning("%s", no_backup_line(vault.key_source()))
            async with anyio.create_task_group() as background:
                background.start_soon(broker.maintenance.run)
                background.start_soon(functools.partial(follow_fleet, store, vault,
                                                        broker.contexts, recorder=recorder))
                if metrics is not None:
                    endpoint, prometheus = metrics
                    await background.start(functools.partial(
                        prometheus.sample_forever, broker.contexts, broker.dispatcher.audit,
                        store, stale_after=config.stale_after_s,
                        backed_up_at=broker.status.key_backed_up_at,
                        key_made_at=lambda: vault.key_made_at))
                    endpoint.start(prometheus.registry)
                if config.watchdog_s is not None:  # systemd arms it once READY=1 is sent
                    background.start_soon(keep_alive, notifier, config.watchdog_s)
                await server.serve(shutdown, task_status=_Started(task_status, notifier,
                                                                  bound.path))
                background.cancel_scope.cancel()
            with anyio.CancelScope(shield=True):
                await broker.maintenance.close()
            log.info("stopped")
        finally:
            with anyio.CancelScope(shield=True):
                await store.close()
    finally:
        if metrics is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(metrics[0].close)
        bound.remove()
        home_lock.release()


def run(config: Config, *, ready_fd: int | None = None,
        listen_socket: socket.socket | None = None) -> None:
    """Serve in this process until SIGTERM/SIGINT (the CLI's ``serve``).

    With ``ready_fd``, writes ``ready\n`` to that file descriptor (and closes
    it) once the socket answers, so ``stigmer-broker start`` need not poll.
    """
    os.umask(0o077)
    harden_process()
    raise_open_file_limit()
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
