"""Whether a directory or a socket is private enough to trust.

The daemon refuses to serve from a home or socket directory others could tamper
with (:func:`check_private_dir`); a client explains why a broker refuses its
socket (:func:`refused_socket`) instead of saying it is not running.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["check_private_dir", "describe_mode", "refused_socket"]


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
