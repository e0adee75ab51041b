"""`run`'s own process, closed to the command it starts.

While the command runs, `run` stays alive as its parent (to mask its output, or
to empty a ``--mount`` when it exits), and the command runs as the same uid. Two
things would hand it what `run` was given for itself: ``/proc/$PPID/environ``
(the token, and the master key a fleet operator exported in that shell) and
``/proc/$PPID/mem``. So `run` first makes itself not dumpable (the daemon's own
hardening: its /proc files then belong to root), then forgets its own copies of
the broker's variables.

Forgetting has two halves. ``os.environ`` is a copy Python made at start-up, and
``/proc/PID/environ`` shows the process's initial environment block, which
Python never writes: on Linux the values in that block are overwritten in place
(its bounds are in ``/proc/self/stat``, as ``setproctitle`` finds ``argv``).
Not dumpable is what guards the rest of `run`'s memory (the fetched context);
root, or a process holding CAP_SYS_PTRACE, can still read it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterable

from ..daemon.hardening import make_undumpable

__all__ = ["guard_run_process"]

#: fields 50 and 51 of /proc/PID/stat (Linux >= 3.5), the initial environment's bounds,
#: counted in what follows the command name (field 2)
_ENV_START, _ENV_END = 50 - 3, 51 - 3


def guard_run_process(names: Iterable[str]) -> None:
    """Make this process not dumpable and forget the variables ``names`` (os.environ and,
    on Linux, the initial environment block). Raises StartupError when the kernel refuses
    to make it not dumpable."""
    make_undumpable()
    names = set(names)
    for name in names:
        os.environ.pop(name, None)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, ValueError, IndexError):  # no such stat field
            _blank_initial_environment(names)


def _blank_initial_environment(names: set[str]) -> None:
    """Overwrite with NULs, in this process's memory, the values of ``names`` in the
    environment block the kernel shows as /proc/self/environ."""
    with open("/proc/self/stat", "rb") as f:  # world-readable, dumpable or not
        fields = f.read().rpartition(b")")[2].split()
    start, end = int(fields[_ENV_START]), int(fields[_ENV_END])
    # read in place: once the process is not dumpable, /proc/self/environ is root's
    block = ctypes.string_at(start, end - start)
    offset = 0
    for entry in block.split(b"\0"):
        name, sep, value = entry.partition(b"=")
        if sep and value and name.decode(errors="replace") in names:
            ctypes.memset(start + offset + len(name) + 1, 0, len(value))
        offset += len(entry) + 1
