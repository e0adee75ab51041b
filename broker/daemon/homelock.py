"""The broker's home: created private and checked (:func:`prepare_home`), and held by one
daemon: an exclusive ``flock`` on ``HOME/broker.lock`` for the daemon's whole life, that
also says who holds it.

The socket path depends on the caller's environment (``$XDG_RUNTIME_DIR`` differs
between a desktop shell, cron, ssh and sudo), so a lock beside the socket cannot
stop two daemons from opening the same store. This one sits beside the store.
The holder writes its pid and socket into the file, so a second daemon can say
where the first one listens, and ``status`` can find it from the home alone.
The kernel drops the lock when the process dies, however it dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import NamedTuple

from ..local.trust import check_private_dir
from ..protocol.errors import StartupError

__all__ = ["HomeLock", "Holder", "holder", "lock_home", "lock_idle_home", "prepare_home"]

LOCK_NAME = "broker.lock"


def prepare_home(home: Path) -> None:
    """Create ``home`` (0700) if it is missing; raise StartupError unless it is private."""
    if not os.path.lexists(home):
        try:
            home.parent.mkdir(parents=True, exist_ok=True)
            os.mkdir(home, 0o700)
        except OSError as exc:
            raise StartupError(f"cannot create broker home {home}: {exc.strerror}") from None
    problem = check_private_dir(home)
    if problem:
        raise StartupError(f"refusing broker home {home}: it {problem}")


class Holder(NamedTuple):
    """The daemon that holds a home's lock."""

    pid: int
    socket: str


class HomeLock:
    """The held lock; :meth:`release` (or process exit) lets it go."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd: int | None = fd
        self.path = path

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None


def _open(home: Path) -> tuple[int, Path]:
    path = home / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StartupError(f"cannot open lock file {path}: {exc.strerror}") from None
    return fd, path


def _read(fd: int) -> Holder | None:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        pid_text, socket, *_ = [*text.split("\n"), "", ""]
        return Holder(int(pid_text), socket) if pid_text.isdigit() else None
    except (OSError, ValueError):
        return None


def lock_home(home: Path, socket: Path) -> HomeLock:
    """Take the home's lock and record our pid and socket in it.

    Raises AlreadyRunning (from :mod:`.listen`) naming the holder's pid and socket
    when another daemon serves this home.
    """
    from .listen import AlreadyRunning

    fd, path = _open(home)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        held = _read(fd)
        os.close(fd)
        if held is None:
            raise AlreadyRunning(f"another broker is starting on home {home}; run "
                                 "`stigmer-broker status` to see it") from None
        raise AlreadyRunning(
            f"already running (pid {held.pid}) for home {home}, listening on {held.socket}; "
            f"reach it with STIGMER_BROKER_SOCKET={held.socket}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n{socket}\n".encode(), 0)
    return HomeLock(fd, path)


def lock_idle_home(home: Path) -> HomeLock | None:
    """Take ``home``'s lock for a command that works on the store without a daemon
    (``backup``, ``restore``), so that none starts meanwhile; None when a daemon holds it.

    Nothing is written into the file (no daemon listens): one that tries to start
    meanwhile says the home is busy, and ``status`` says no broker runs.
    """
    fd, path = _open(home)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return _Held(fd, path)


class _Held(HomeLock):
    """The lock as :func:`lock_idle_home` holds it: the file is left as it was."""

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def holder(home: Path) -> Holder | None:
    """Return the daemon holding ``home``'s lock, None when no daemon does."""
    path = home / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read(fd)  # held: a daemon is alive
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
