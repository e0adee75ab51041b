"""Which process is on a connection: pinned when it connects, read from /proc when asked.

The kernel reports the connecting process's pid (SO_PEERCRED), but a pid is
only a number: the process may exit and another take its pid before the
broker looks at ``/proc/PID``. So, the moment a connection is accepted, the
broker pins the process, as SPIRE's peertracker does: it opens the process's
``/proc/PID`` directory and notes its start time, and takes a pidfd
(SO_PEERPIDFD) where the kernel has one. Everything is then read through that
directory handle, which fails once the original process is gone, and after
reading, the start time is checked again and the pidfd must still name a live
process. A process that execs another binary after connecting is attested as
that new binary, never as the old one.

Reading ``/proc/PID/exe`` of another uid's process needs ptrace-read access:
a broker that is neither root nor of the runner's uid cannot check ``exe:``
selectors, and such a fetch is refused (logged once with the reason).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import struct

from ..protocol.peer import Attestation, PeerCredentials

__all__ = ["ProcessPin"]

_SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # Linux 6.5+
_DIGESTS: dict[tuple[int, int, int, int, int], str] = {}  # exe file identity -> sha256


class ProcessPin:
    """The process that opened one connection; :meth:`attest` describes it now."""

    __slots__ = ("_cached", "_creds", "_pidfd", "_procfd", "_start")

    def __init__(self, sock: socket.socket, creds: PeerCredentials) -> None:
        self._creds = creds
        self._pidfd = -1
        self._procfd = -1
        self._start = b""
        self._cached: tuple[tuple[int, ...], Attestation] | None = None
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
            self.close()  # gone already, or no /proc: attest() refuses

    def close(self) -> None:
        for fd in (self._pidfd, self._procfd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._pidfd = self._procfd = -1

    def attest(self) -> Attestation:
        """Describe the process as it is now; raise LookupError when it cannot be
        described with certainty (exited, replaced, or /proc unreadable)."""
        procfd = self._procfd
        if procfd < 0:
            raise LookupError("the peer process was not pinned when it connected")
        try:
            st = os.stat("exe", dir_fd=procfd)  # the running binary's inode (exec changes it)
            identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            cached = self._cached
            if cached is not None and cached[0] == identity:
                attestation = cached[1]
            else:
                attestation = self._read(procfd, identity)
                self._cached = (identity, attestation)
            self._check_alive(procfd)
        except OSError as exc:
            raise LookupError(f"the peer process cannot be read ({exc.strerror})") from None
        return attestation

    def _read(self, procfd: int, identity: tuple[int, int, int, int, int]) -> Attestation:
        exe = os.readlink("exe", dir_fd=procfd)
        with open(os.open("status", os.O_RDONLY | os.O_CLOEXEC, dir_fd=procfd), "rb") as f:
            status = f.read()
        groups: frozenset[int] = frozenset()
        for line in status.splitlines():
            if line.startswith(b"Groups:"):
                groups = frozenset(int(g) for g in line.split()[1:])
                break

        def sha256() -> str:
            """The binary's digest, or "" (which matches no digest) when it cannot be read."""
            digest = _DIGESTS.get(identity)
            if digest is None:
                try:
                    digest = _hash_exe(procfd, identity)
                except OSError:
                    return ""
            return digest

        creds = self._creds
        assert creds.pid is not None
        return Attestation(uid=creds.uid, gid=creds.gid, groups=groups, pid=creds.pid,
                           exe=exe, sha256=sha256)

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
