"""Output for people and scripts: error lines, JSON, times, durations, safe values."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from typing import Any, TextIO, cast

from .common import PROG

__all__ = ["OutputFailed", "duration", "error", "guard_stdout", "key_json", "plural",
           "print_json", "print_json_array", "printable", "warn", "when"]


class OutputFailed(Exception):
    """Standard output cannot be written (a full disk, a closed descriptor)."""


class _GuardedStdout:
    """``sys.stdout`` for the CLI: a failed write or flush raises :class:`OutputFailed`,
    which the entry point reports in one line, and a closed stdout fails at the first
    write instead of swallowing the output. A broken pipe stays a BrokenPipeError: a
    reader that stopped reading (``| head``) is not an error."""

    def __init__(self, stream: TextIO | None) -> None:
        self._stream = stream

    def _target(self) -> TextIO:
        if self._stream is None:
            raise OutputFailed("it is closed")
        return self._stream

    def write(self, text: str) -> int:
        try:
            return self._target().write(text)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise OutputFailed(exc.strerror or str(exc)) from None

    def flush(self) -> None:
        if self._stream is None:
            return  # nothing was written, or write() said so already
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise OutputFailed(exc.strerror or str(exc)) from None

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, buffer, encoding
        return getattr(self._target(), name)


def guard_stdout() -> None:
    """Route every write to standard output through :class:`_GuardedStdout`."""
    if not isinstance(sys.stdout, _GuardedStdout):
        sys.stdout = cast("TextIO", _GuardedStdout(sys.stdout))


def error(message: str) -> None:
    """Print the one line a failed command leaves on stderr."""
    print(f"{PROG}: error: {message}", file=sys.stderr)


def warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def print_json(data: object) -> None:
    import json

    print(json.dumps(data, indent=2, sort_keys=True))


def print_json_array(items: Iterable[object]) -> None:
    """Print a JSON array one element at a time, as a listing's pages arrive (the same
    text ``print_json`` gives the whole list)."""
    import json

    first = True
    for item in items:
        text = json.dumps(item, indent=2, sort_keys=True).replace("\n", "\n  ")
        print(("[\n  " if first else ",\n  ") + text, end="")
        first = False
    print("[]" if first else "\n]")


def printable(value: str) -> str:
    """A value as it can be shown on a terminal: control characters escaped, quoted."""
    if value.isprintable():
        return value
    import json

    return json.dumps(value, ensure_ascii=False)


def key_json(key: Any) -> dict[str, Any]:
    return {"key": key.key, "is_secret": key.is_secret, "source": key.source}


def plural(n: int, noun: str) -> str:
    """``1 variable``, ``2 variables``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))

