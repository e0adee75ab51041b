"""Creating the broker's listening socket safely, and removing it afterwards.

The socket lives in a directory that only we can enter (0700, or 0750 when a
runner group is allowed), checked with ``lstat`` so a symlink or a directory
planted by someone else is refused rather than followed or chmod-ed. The socket
is bound under a umask that makes it 0600 (0660) from the moment it exists. A
lock file beside it makes two daemons starting at once agree on one winner.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import socket
import stat
from pathlib import Path

from ..local.paths import MAX_SOCKET_PATH
from ..local.peer import peer_credentials
from ..local.trust import check_private_dir
from ..protocol.errors import StartupError

__all__ = ["LISTEN_BACKLOG", "AlreadyRunning", "BoundSocket", "adopt_socket",
           "bind_unix_socket", "live_pid"]

#: The listen backlog: connections the kernel holds until the broker accepts them.
#: A connection waits behind every one queued before it, so the backlog bounds how
#: long a runner queues while another uid floods the socket. The server takes all of
#: it in each accepting turn (server._ACCEPT_BATCH), refusing a flooding uid's excess
#: for a few microseconds each, so 128 is at most one turn of a few milliseconds. The
#: kernel's default (somaxconn, 4096 here), with every connection admitted, queued a
#: runner behind thousands of a churning peer's: seconds. A burst of more than 128
#: connecting at once is not refused for it: the clients' connects wait in the kernel
#: for a place (client/_common.py, connect_in_turn).
LISTEN_BACKLOG = 128


class AlreadyRunning(StartupError):
    """A live broker already answers on the socket path."""


@dataclasses.dataclass(slots=True)
class BoundSocket:
    """A listening socket we created, and what we need to remove it cleanly."""

    sock: socket.socket
    path: Path
    inode: int
    lock_fd: int | None  # None for a socket the service manager owns

    def remove(self) -> None:
        """Close the socket; unlink it if we created it and it is still ours."""
        self.sock.close()
        if self.lock_fd is None:
            return  # systemd's socket: it stays for the next activation
        with contextlib.suppress(OSError):
            if os.lstat(self.path).st_ino == self.inode:
                os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.close(self.lock_fd)


def adopt_socket(sock: socket.socket, *, group_gid: int | None = None) -> BoundSocket:
    """Take over a listening socket from the service manager, after the same checks.

    Raises StartupError when it has no path or its directory is not private.
    """
    name = sock.getsockname()
    if not isinstance(name, str) or not name or name.startswith("\0"):
        sock.close()
        raise StartupError("the inherited socket has no path in the file system; use "
                           "ListenStream=%t/stigmer/broker.sock")
    path = Path(name)
    allowed = 0o050 if group_gid is not None else 0
    problem = check_private_dir(path.parent, allowed_group_bits=allowed)
    if problem:
        sock.close()
        raise StartupError(f"refusing inherited socket {path}: its directory {problem} "
                           "(DirectoryMode=0700)")
    st = os.lstat(path)
    if stat.S_IMODE(st.st_mode) & 0o007 or (group_gid is None and stat.S_IMODE(st.st_mode) & 0o070):
        sock.close()
        raise StartupError(f"refusing inherited socket {path}: mode "
                           f"{stat.S_IMODE(st.st_mode):04o} (SocketMode=0600)")
    return BoundSocket(sock=sock, path=path, inode=st.st_ino, lock_fd=None)


def bind_unix_socket(path: Path, *, group_gid: int | None = None) -> BoundSocket:
    """Bind and listen on ``path``; raise StartupError naming what is wrong.

    With ``group_gid`` the directory becomes 0750 and the socket 0660, both of
    that group, so its members can connect (what they may do is the daemon's
    decision). Raises AlreadyRunning when a live broker answers on ``path``.
    """
    encoded = os.fsencode(path)
    if len(encoded) > MAX_SOCKET_PATH:
        raise StartupError(
            f"socket path {path} is {len(encoded)} bytes, over the {MAX_SOCKET_PATH}-byte "
            "limit of Unix sockets; pass a shorter --socket or STIGMER_BROKER_SOCKET")
    directory = path.parent
    dir_mode = 0o750 if group_gid is not None else 0o700
    _ensure_private_dir(directory, dir_mode, group_gid)
    lock_fd = _take_lock(path)
    try:
        _clear_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock_mode = 0o660 if group_gid is not None else 0o600
        old_umask = os.umask(0o777 & ~sock_mode)
        try:
            sock.bind(str(path))
        except OSError as exc:
            sock.close()
            raise StartupError(f"cannot bind socket {path}: {exc.strerror}") from None
        finally:
            os.umask(old_umask)
        if group_gid is not None:
            _chgrp(path, group_gid)
        os.chmod(path, sock_mode)
        sock.listen(LISTEN_BACKLOG)
        return BoundSocket(sock=sock, path=path, inode=os.lstat(path).st_ino,
                           lock_fd=lock_fd)
    except BaseException:
        os.close(lock_fd)
        raise


def _ensure_private_dir(directory: Path, mode: int, group_gid: int | None) -> None:
    if not os.path.lexists(directory):
        try:
            directory.parent.mkdir(parents=True, exist_ok=True)
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass  # created meanwhile: checked below like any existing one
        except OSError as exc:
            raise StartupError(
                f"cannot create socket directory {directory}: {exc.strerror}") from None
        else:
            if group_gid is not None:
                _chgrp(directory, group_gid)
            os.chmod(directory, mode)
    allowed = 0o050 if group_gid is not None else 0
    problem = check_private_dir(directory, allowed_group_bits=allowed)
    if problem:
        raise StartupError(f"refusing socket directory {directory}: it {problem}")
    if group_gid is not None:
        st = os.lstat(directory)
        if st.st_gid != group_gid or stat.S_IMODE(st.st_mode) != mode:
            _chgrp(directory, group_gid)
            os.chmod(directory, mode)


def _chgrp(path: Path, gid: int) -> None:
    try:
        os.chown(path, -1, gid)
    except OSError as exc:
        raise StartupError(f"--allow-group: cannot give {path} to group {gid}: {exc.strerror} "
                           "(the broker's user must be a member of the group)") from None


def _take_lock(path: Path) -> int:
    lock_path = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StartupError(f"cannot open lock file {lock_path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid = live_pid(path)
        if pid is not None:
            raise AlreadyRunning(f"already running (pid {pid or 'unknown'}) on {path}") from None
        raise AlreadyRunning(
            f"another broker is starting on {path}; "
            "run `stigmer-broker status` to see it") from None
    return fd


def live_pid(path: Path) -> int | None:
    """Return the pid of the broker answering on ``path`` (0 if unknown), None if none."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(2.0)
        probe.connect(str(path))
        try:
            return peer_credentials(probe).pid or 0
        except OSError:
            return 0
    except OSError:
        return None
    finally:
        probe.close()


def _clear_stale(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise StartupError(f"refusing socket path {path}: it is a symbolic link; remove it")
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(
            f"refusing socket path {path}: a file that is not a socket is there; "
            "remove it or pass another --socket")
    if st.st_uid != os.getuid():
        raise StartupError(
            f"refusing socket path {path}: the socket belongs to uid {st.st_uid}")
    pid = live_pid(path)
    if pid is not None:
        raise AlreadyRunning(f"already running (pid {pid or 'unknown'}) on {path}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # stale: ours, a socket, and nobody listens (we hold the lock)
