"""The daemon's log: one line per record, peer-controlled text escaped, floods capped.

A peer controls some of what the daemon logs (an op name inside a protocol
error, say). :class:`OneLineFormatter` escapes every control character in the
message, so a newline or a terminal escape sequence cannot forge a line or
repaint a terminal. :class:`PerCause` lets at most ``burst`` records of one
cause (its message template and level) through per ``window`` seconds, then
says once how many it held back, so one peer cannot grow the log without bound.
A daemon started with ``start`` writes ``HOME/broker.log`` through
:class:`PrivateRotatingLog`, which rotates it at a size cap.
"""

from __future__ import annotations

import errno
import io
import logging
import logging.handlers
import os
import sys
import time
from pathlib import Path

from ..protocol.connection import one_line
from ..protocol.errors import StartupError

__all__ = ["LOG_BACKUPS", "LOG_MAX_BYTES", "OneLineFormatter", "PerCause",
           "PrivateRotatingLog", "configure"]

#: broker.log rotates at this size, keeping this many old files (broker.log.1 ...)
LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 3

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class OneLineFormatter(logging.Formatter):
    """Formats the message on one line with control characters escaped (a traceback,
    added by :meth:`logging.Logger.exception`, still follows on its own lines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = one_line(record.message)
        return super().formatMessage(record)


class PerCause(logging.Filter):
    """At most ``burst`` records per cause per ``window`` seconds."""

    def __init__(self, burst: int = 20, window: float = 10.0) -> None:
        super().__init__()
        self._burst = burst
        self._window = window
        self._seen: dict[tuple[object, int], list[float]] = {}  # cause -> [start, count]

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        cause = (record.msg, record.levelno)
        seen = self._seen.get(cause)
        if seen is None or now - seen[0] >= self._window:
            held = int(seen[1]) - self._burst if seen is not None else 0
            if len(self._seen) > 10_000:  # causes are templates: few; but stay bounded
                self._seen.clear()
            self._seen[cause] = [now, 1]
            if held > 0:
                record.msg = f"{record.msg} [and {held} more like it in the last window]"
            return True
        seen[1] += 1
        return seen[1] <= self._burst


class PrivateRotatingLog(logging.handlers.RotatingFileHandler):
    """A size-capped log file, each file created 0600 and never through a symlink."""

    def _open(self) -> io.TextIOWrapper:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
                     | os.O_NOFOLLOW, 0o600)
        return open(fd, "a", encoding=self.encoding, errors=self.errors)


def configure(*, verbose: bool, log_file: Path | None = None,
              max_bytes: int = LOG_MAX_BYTES, backups: int = LOG_BACKUPS) -> None:
    """Send the daemon's log to stderr, or to ``log_file`` rotated at ``max_bytes``; one
    escaped line per record, floods capped."""
    handler: logging.Handler
    if log_file is None:
        handler = logging.StreamHandler(sys.stderr)
    else:
        try:
            handler = PrivateRotatingLog(log_file, maxBytes=max_bytes, backupCount=backups,
                                         encoding="utf-8", errors="backslashreplace")
        except OSError as exc:
            reason = "it is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
            raise StartupError(f"cannot open log file {log_file}: {reason}") from None
    handler.setFormatter(OneLineFormatter(_FORMAT))
    handler.addFilter(PerCause())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
