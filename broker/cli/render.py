"""Output for people and scripts: error lines, JSON, times, durations, safe values."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from typing import Any

from .common import PROG

__all__ = ["duration", "error", "key_json", "print_json", "print_json_array", "printable",
           "warn", "when"]


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


def when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))

