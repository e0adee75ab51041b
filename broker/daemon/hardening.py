"""Process hardening, applied once before the daemon touches a key."""

from __future__ import annotations

import ctypes
import resource
import signal
import sys

from ..protocol.errors import StartupError

__all__ = ["harden_process", "make_undumpable", "raise_open_file_limit"]

_PR_SET_DUMPABLE = 4


def harden_process() -> None:
    """No core dumps, and (Linux) not dumpable: no ptrace, no /proc/PID/mem or environ.

    SIGXFSZ is ignored so that a file-size limit fails a write (reported to the
    client as resource_exhausted) instead of killing the daemon. Raises
    StartupError when the kernel refuses.
    """
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    make_undumpable()


def make_undumpable() -> None:
    """(Linux) Make this process not dumpable: its /proc/PID/environ, mem and the like
    are then owned by root and closed to its own uid, and it cannot be ptraced, as
    ssh-agent does. An exec resets it, so the commands `run` starts are unaffected.
    Elsewhere a no-op. Raises StartupError when the kernel refuses."""
    if sys.platform.startswith("linux"):
        # libc's symbols, from the process itself: find_library("c") would run
        # `ldconfig -p` in a subprocess, 4 ms of every `run`
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            raise StartupError(f"prctl(PR_SET_DUMPABLE) failed: errno {ctypes.get_errno()}")


def raise_open_file_limit() -> int:
    """Raise the soft limit on open files to the hard one (each connection holds one);
    return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20  # what Linux allows at most (fs.nr_open's default)
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass  # keep what we have; the connection limit is sized from it
    return int(soft)
