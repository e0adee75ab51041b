"""Who is on the other end of a Unix socket.

The kernel's report of the peer (:func:`peer_credentials`), which the daemon and
the clients both read, and the daemon's view of a peer it serves: :class:`Peer`
(whether it may administer, or only fetch) and the :class:`Attestation` of its
process that grants are matched against.
"""

from __future__ import annotations

import socket
import struct
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import NamedTuple, Protocol

__all__ = ["Attestation", "Attestor", "Binary", "Peer", "PeerCredentials", "peer_credentials"]


class PeerCredentials(NamedTuple):
    """The process on the other end of a Unix socket, as the kernel reports it."""

    uid: int
    gid: int
    pid: int | None  # None where the platform does not say


class Binary(NamedTuple):
    """The executable a process runs, read through its pinned ``/proc`` entry."""

    path: str  # the path /proc/PID/exe names
    is_at: Callable[[str], bool]  # whether the file at this path, as the broker sees it, is it
    own_mounts: bool  # the process sees the broker's mounts (a path names the same file)
    sha256: Callable[[], str]  # its digest, computed on demand; "" when it cannot be read


class Attestation(NamedTuple):
    """The calling process as the daemon found it, pinned against pid reuse: its uid,
    primary and supplementary groups from the connection, and its binary on demand."""

    uid: int
    gid: int
    groups: frozenset[int]
    pid: int
    #: read only for ``exe:`` terms; raises LookupError saying why it cannot be trusted
    binary: Callable[[], Binary]


class Attestor(Protocol):
    """Describes the process on a connection, or raises LookupError when it cannot
    (it exited, its pid was reused, or /proc is not readable)."""

    def attest(self) -> Attestation: ...

    def connection(self) -> Attestation | None:
        """The process as its connection described it when it connected (uid, gid,
        supplementary groups), with no system call: enough for ``user:`` and ``group:``
        terms. None when the connection did not carry the groups. Its ``binary`` raises
        LookupError: an ``exe:`` term needs :meth:`attest`."""
        ...

    def held(self) -> AbstractContextManager[None]:
        """Keep what :meth:`attest` reads open while a worker thread reads it, even if
        the connection closes meanwhile; raises LookupError once it has closed."""
        ...


class Peer(NamedTuple):
    """Who sent a request, and what they may ask for."""

    credentials: PeerCredentials
    admin: bool  # False for runner-group members: fetch only
    process: Attestor | None = None  # set by the daemon for each connection

    @property
    def uid(self) -> int:
        return self.credentials.uid

    @property
    def pid(self) -> int | None:
        return self.credentials.pid


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """Return the peer's credentials (SO_PEERCRED on Linux, getpeereid elsewhere).

    Raises OSError when the kernel cannot tell (the caller must then refuse).
    """
    if hasattr(socket, "SO_PEERCRED"):
        fmt = "3i"
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize(fmt))
        pid, uid, gid = struct.unpack(fmt, raw)
        return PeerCredentials(uid=uid, gid=gid, pid=pid or None)
    if sys.platform == "darwin":  # pragma: no cover - exercised on macOS only
        local_peercred = 0x001  # LOCAL_PEERCRED, level SOL_LOCAL (0)
        raw = sock.getsockopt(0, local_peercred, struct.calcsize("iih16i"))
        _version, uid, ngroups, *groups = struct.unpack("iih16i", raw)
        local_peerpid = 0x002
        try:
            pid_raw = sock.getsockopt(0, local_peerpid, struct.calcsize("i"))
            pid: int | None = struct.unpack("i", pid_raw)[0]
        except OSError:
            pid = None
        return PeerCredentials(uid=uid, gid=groups[0] if ngroups else -1, pid=pid)
    raise OSError("this platform cannot report a Unix socket peer's credentials")
