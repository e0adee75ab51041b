"""What the generators share: write a generated file, or (--check) say it is stale."""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["write_or_check"]


def write_or_check(target: Path, expected: str, argv: list[str], *, remake: str) -> int:
    """With ``--check`` in ``argv``, return 1 (saying ``remake`` makes it again) when
    ``target`` is not ``expected``; otherwise write ``expected`` to it. Returns the exit
    status."""
    if "--check" in argv:
        if not target.exists() or target.read_text() != expected:
            print(f"{target.name} is stale: run `{remake}`", file=sys.stderr)
            return 1
        return 0
    target.write_text(expected)
    return 0
