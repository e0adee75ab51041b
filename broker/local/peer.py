"""Who is on the other end of a Unix socket, and whether a directory is private enough.

Shared by the daemon and the clients (stdlib only): the kernel's report of the
peer (:func:`peer_credentials`), the daemon's view of a peer it serves
(:class:`Peer`), and whether a socket's directory is private enough to trust
(:func:`check_private_dir`).
"""

from __future__ import annotations

import os
import socket
import stat
import struct
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple, Protocol

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["Attestation", "Attestor", "Binary", "Peer", "PeerCredentials",
           "check_private_dir", "describe_mode", "peer_credentials", "refused_socket"]


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


def describe_mode(mode: int) -> str:
    """Return a mode as ``0700``."""
    return f"{stat.S_IMODE(mode):04o}"


def check_private_dir(path: Path | str, *, allowed_group_bits: int = 0,
                      owner: int | None = None) -> str | None:
    """Return why directory ``path`` cannot be trusted, or None when it can.

    Trusted means: it exists and is a real directory (not a symlink), owned by
    ``owner`` (default: us), with no permission bits for group or others beyond
    ``allowed_group_bits`` (e.g. 0o050 when a runner group may reach the socket).
    """
    expected_owner = os.getuid() if owner is None else owner
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "does not exist"
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != expected_owner:
        return f"is owned by uid {st.st_uid}, not by uid {expected_owner}"
    loose = stat.S_IMODE(st.st_mode) & 0o077 & ~allowed_group_bits
    if loose:
        return (f"has mode {describe_mode(st.st_mode)}: group/other permissions "
                f"{loose:04o} must be removed (chmod 700)")
    return None


def refused_socket(path: str) -> str:
    """Why a broker would refuse the socket at ``path`` ("" when it would not): one that
    others may connect to is refused when it is handed over (a systemd socket unit with
    SocketMode=0644, say), so nothing answers, and "not running" would mislead."""
    try:
        st = os.lstat(path)
    except OSError:
        return ""
    if not stat.S_ISSOCK(st.st_mode) or not stat.S_IMODE(st.st_mode) & 0o007:
        return ""
    return (f"the broker refuses its socket, whose mode {stat.S_IMODE(st.st_mode):04o} lets "
            "any user connect; make it 0600 (SocketMode= in the socket unit, 0660 with "
            "--allow-group) and see the broker's log for the refusal (journalctl --user -u "
            "stigmer-broker, or HOME/broker.log)")
