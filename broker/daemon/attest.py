"""Which process is on a connection: pinned when it connects, read from /proc when asked.

The kernel reports the connecting process's pid (SO_PEERCRED), but a pid is
only a number: the process may exit and another take its pid before the
broker looks at ``/proc/PID``. So, the moment a connection is accepted, the
broker pins the process, as SPIRE's peertracker does: it opens the process's
``/proc/PID`` directory and notes its start time, and takes a pidfd
(SO_PEERPIDFD) where the kernel has one. Everything is then read through that
directory handle, which fails once the original process is gone, and after
reading, the start time is checked again and the pidfd must still name a live
process.

``user:`` and ``group:`` terms need nothing but what the connection carries: the
uid and gid (SO_PEERCRED) and the supplementary groups (SO_PEERGROUPS, or the
world-readable ``/proc/PID/status`` where the kernel lacks it). Only an ``exe:``
term reads the binary, and that needs ptrace-read access to the process: a broker
that is neither root (CAP_SYS_PTRACE) nor of the runner's uid cannot check an
``exe:`` term for another uid, and says so in the audit and in ``status``.

An ``exe:`` term trusts the binary only when it is the one the process ran when it
connected (so a process cannot connect, then exec the granted binary under a
tracer, stopped before its first instruction, while a forked half reads the
reply), when no tracer is attached, and when it is the very file (device and
inode) at the granted path as the broker sees it; without a digest, the process
must also share the broker's mount namespace. What this does not stop, a process
of the same uid attaching with ptrace after the check, is in the README's threat
model.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import signal
import socket
import struct
import threading
from collections.abc import Iterator

from ..local.peer import Attestation, Binary, PeerCredentials

__all__ = ["EXE_NEEDS_ROOT", "ProcessPin", "exe_grants_limit"]

_SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # Linux 6.5+
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13+
_CAP_SYS_PTRACE = 19
_DIGESTS: dict[tuple[int, int, int, int, int], str] = {}  # exe file identity -> sha256

#: what the audit and ``status`` say when the broker cannot read other uids' binaries
EXE_NEEDS_ROOT = "exe: grants for other uids need a broker running as root"


def exe_grants_limit() -> str:
    """What this broker cannot attest, for ``status``: "" when it may read any process's
    binary (CAP_SYS_PTRACE), else :data:`EXE_NEEDS_ROOT`."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"CapEff:"):
                    if int(line.split()[1], 16) >> _CAP_SYS_PTRACE & 1:
                        return ""
                    break
    except (OSError, ValueError, IndexError):
        pass
    return EXE_NEEDS_ROOT


class ProcessPin:
    """The process that opened one connection; :meth:`attest` describes it now."""

    __slots__ = ("_at_connect", "_closed", "_creds", "_groups", "_lock", "_pidfd", "_procfd",
                 "_start", "_users")

    def __init__(self, sock: socket.socket, creds: PeerCredentials) -> None:
        self._creds = creds
        self._lock = threading.Lock()
        self._users = 0  # worker threads reading through the handles (held())
        self._closed = False
        self._pidfd = -1
        self._procfd = -1
        self._start = b""
        self._groups = _peer_groups(sock)
        self._at_connect: tuple[int, int] | None = None  # the binary it ran (device, inode)
        if creds.pid is None:
            return
        with contextlib.suppress(OSError):
            raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERPIDFD, 4)
            self._pidfd = struct.unpack("i", raw)[0]
        try:
            self._procfd = os.open(f"/proc/{creds.pid}", os.O_RDONLY | os.O_DIRECTORY
                                   | os.O_CLOEXEC)
            if self._pidfd < 0:  # with a pidfd the start time is never compared
                self._start = _start_time(self._procfd)
        except OSError:
            self._release()  # gone already, or no /proc: attest() refuses
            return
        with contextlib.suppress(OSError):  # not ours to read: no exe: term can match anyway
            st = os.stat("exe", dir_fd=self._procfd)
            self._at_connect = (st.st_dev, st.st_ino)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Keep the handles open while a worker thread attests through them: a close
        meanwhile (the connection went away) waits for it to finish, so the numbers
        cannot be reused for another process's files under it."""
        with self._lock:
            closed = self._closed
            if not closed:
                self._users += 1
        if closed:
            raise LookupError("the connection closed")
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                last = self._closed and not self._users
            if last:
                self._release()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._users:
                return  # the last holder releases
        self._release()

    def _release(self) -> None:
        for fd in (self._pidfd, self._procfd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._pidfd = self._procfd = -1

    def connection(self) -> Attestation | None:
        """The process as its connection described it: uid and gid (SO_PEERCRED) and
        groups (SO_PEERGROUPS), all read when it connected. No system call, so the
        server may match ``user:``/``group:`` terms inside ``data_received``; a process
        that has exited since does not matter to them (whoever holds the connection is
        who connected, as far as these terms go)."""
        creds, groups = self._creds, self._groups
        if groups is None or creds.pid is None:
            return None
        return Attestation(uid=creds.uid, gid=creds.gid, groups=groups, pid=creds.pid,
                           binary=_no_binary)

    def attest(self) -> Attestation:
        """Describe the process as it is now; raise LookupError when it cannot be
        described with certainty (exited, replaced, or /proc unreadable). Its binary is
        read later, and only if a term asks (:meth:`_binary`)."""
        procfd = self._procfd
        if procfd < 0:
            raise LookupError("the peer process was not pinned when it connected")
        groups = self._groups
        try:
            if groups is None:
                groups = _status_groups(_read_status(procfd))
            self._check_alive(procfd)
        except OSError as exc:
            raise LookupError(f"the peer process cannot be read ({exc.strerror})") from None
        creds = self._creds
        assert creds.pid is not None
        # read at most once per attestation, however many exe: terms ask
        return Attestation(uid=creds.uid, gid=creds.gid, groups=groups, pid=creds.pid,
                           binary=functools.cache(self._binary))

    def _binary(self) -> Binary:
        """The binary the process runs now; raise LookupError saying why it cannot be
        trusted (unreadable, not the one it connected with, or traced)."""
        procfd = self._procfd
        try:
            st = os.stat("exe", dir_fd=procfd)  # the running binary's inode (exec changes it)
        except PermissionError:
            if self._creds.uid != os.geteuid():
                raise LookupError(f"the binary of uid {self._creds.uid} cannot be read: "
                                  f"{EXE_NEEDS_ROOT}") from None
            raise LookupError("the peer's binary cannot be read (not dumpable)") from None
        except OSError as exc:
            raise LookupError(f"the peer process cannot be read ({exc.strerror})") from None
        try:
            identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            if self._at_connect is None:
                raise LookupError("the peer's binary could not be read when it connected")
            if identity[:2] != self._at_connect:
                raise LookupError("the process runs another binary than when it connected")
            status = _read_status(procfd)
            if _status_field(status, b"TracerPid:") != b"0":
                raise LookupError("the process is being traced")
            # Stopped (SIGSTOP, or a tracer's stop): a process that exec'd the granted
            # binary after the broker accepted it can be held before its first
            # instruction while a forked half, holding the connection, reads the reply.
            # A process asking for its own context is running, not stopped.
            if _status_field(status, b"State:")[:1] in (b"T", b"t"):
                raise LookupError("the process is stopped")
            path = os.readlink("exe", dir_fd=procfd)
            own_mounts = os.readlink("ns/mnt", dir_fd=procfd) == _own_mount_namespace()
            self._check_alive(procfd)
        except OSError as exc:
            raise LookupError(f"the peer process cannot be read ({exc.strerror})") from None

        def sha256() -> str:
            """The binary's digest, or "" (which matches no digest) when it cannot be read."""
            digest = _DIGESTS.get(identity)
            if digest is None:
                try:
                    digest = _hash_exe(procfd, identity)
                except OSError:
                    return ""
            return digest

        return Binary(path=path, is_at=functools.partial(_is_at, identity[:2]),
                      own_mounts=own_mounts, sha256=sha256)

    def _check_alive(self, procfd: int) -> None:
        """What was read belongs to the pinned process only if it is still alive: a live
        process keeps its pid, and its /proc directory handle keeps working. A pidfd
        says so in one call; without one, the start time must not have changed."""
        if self._pidfd >= 0:
            try:
                signal.pidfd_send_signal(self._pidfd, 0)
            except ProcessLookupError:
                raise OSError(0, "the process exited") from None
            except PermissionError:
                pass  # alive, and of another uid
        elif _start_time(procfd) != self._start:
            raise OSError(0, "the process was replaced")


def _no_binary() -> Binary:
    raise LookupError("an exe: term needs the process attested, not only its connection")


def _peer_groups(sock: socket.socket) -> frozenset[int] | None:
    """The supplementary groups the peer had when it connected (the kernel's record,
    like SO_PEERCRED), or None when the kernel cannot say (then /proc is read)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 1024)  # CPython's most
    except OSError:  # an old kernel, or more than 256 groups (ERANGE)
        return None
    return frozenset(struct.unpack(f"{len(raw) // 4}I", raw))


def _read_status(procfd: int) -> bytes:
    """/proc/PID/status: world-readable, unlike exe and environ."""
    with open(os.open("status", os.O_RDONLY | os.O_CLOEXEC, dir_fd=procfd), "rb") as f:
        return f.read()


def _status_field(status: bytes, name: bytes) -> bytes:
    for line in status.splitlines():
        if line.startswith(name):
            return line[len(name):].strip()
    raise OSError(0, f"no {name.decode()} in /proc/PID/status")


def _status_groups(status: bytes) -> frozenset[int]:
    return frozenset(int(g) for g in _status_field(status, b"Groups:").split())


@functools.cache
def _own_mount_namespace() -> str:
    return os.readlink("/proc/self/ns/mnt")


def _is_at(file_id: tuple[int, int], path: str) -> bool:
    """Whether ``path``, resolved in the broker's own mount namespace, is that file."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == file_id


def _start_time(procfd: int) -> bytes:
    """Field 22 of /proc/PID/stat (after the parenthesised command name)."""
    with open(os.open("stat", os.O_RDONLY | os.O_CLOEXEC, dir_fd=procfd), "rb") as f:
        stat = f.read()
    return stat[stat.rindex(b")") + 2:].split()[19]


def _hash_exe(procfd: int, identity: tuple[int, int, int, int, int]) -> str:
    """The SHA-256 of the binary the process runs (opened through /proc/PID/exe, so a
    file replaced at the same path since is not what is hashed)."""
    digest = hashlib.sha256()
    with open(os.open("exe", os.O_RDONLY | os.O_CLOEXEC, dir_fd=procfd), "rb") as f:
        if os.fstat(f.fileno())[1] != identity[1]:
            raise OSError(0, "the binary changed while it was read")
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    if len(_DIGESTS) > 256:
        _DIGESTS.clear()
    _DIGESTS[identity] = result = digest.hexdigest()
    return result
