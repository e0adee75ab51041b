"""Secret values replaced in a byte stream, also when one arrives split across writes.

A :class:`Masker` holds back the end of what it was fed only when that end is
the start of a secret (whose rest has not arrived yet), and replaces every
secret in the rest. Everything else goes out at once, so a prompt or a line
shorter than a secret is never delayed. Holding back exactly the longest such
end also decides every match: one that starts earlier cannot grow with later
bytes, so a shorter secret never wins over a longer one sharing its start. The
common case, a chunk with no secret in it, costs one C-speed substring search
per secret.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["MASK", "Masker"]

MASK = b"<concealed by stigmer>"


class Masker:
    """Feed bytes in, get them back with every secret replaced by :data:`MASK`."""

    __slots__ = ("_buffer", "_by_first", "_keep", "_pattern", "_secrets")

    def __init__(self, secrets: Iterable[str]) -> None:
        values = sorted({s.encode() for s in secrets if s}, key=len, reverse=True)
        self._secrets = values
        self._by_first: dict[bytes, list[bytes]] = {}
        for value in values:
            self._by_first.setdefault(value[:1], []).append(value)
        self._keep = len(values[0]) - 1 if values else 0
        self._pattern = re.compile(b"|".join(map(re.escape, values))) if values else None
        self._buffer = b""

    def feed(self, data: bytes) -> bytes:
        """Return what can be written now (the rest waits for more, or :meth:`flush`)."""
        if self._pattern is None:
            return data
        buffer = self._buffer + data if self._buffer else data
        safe = len(buffer) - self._held_back(buffer)
        if not any(s in buffer for s in self._secrets):  # the fast, common case
            self._buffer = buffer[safe:]
            return buffer[:safe]
        return self._replace(buffer, safe)

    def _held_back(self, buffer: bytes) -> int:
        """The length of the longest end of ``buffer`` that a secret starts with (and
        is longer than): those bytes wait to see whether the secret follows. Only the
        places where a secret's first byte occurs are tried."""
        tail = buffer[-self._keep:] if self._keep else b""
        longest = 0
        for first, candidates in self._by_first.items():
            at = tail.find(first)
            while at != -1 and len(tail) - at > longest:
                end = tail[at:]
                if any(len(s) > len(end) and s.startswith(end) for s in candidates):
                    longest = len(end)  # the earliest start is the longest end
                    break
                at = tail.find(first, at + 1)
        return longest

    def flush(self) -> bytes:
        """Return what is held back (the stream ended)."""
        buffer, self._buffer = self._buffer, b""
        if self._pattern is None or not buffer:
            return buffer
        return self._replace(buffer, len(buffer))

    def _replace(self, buffer: bytes, safe: int) -> bytes:
        assert self._pattern is not None
        out = []
        pos = 0
        for match in self._pattern.finditer(buffer):
            if match.start() >= safe:
                break
            out.append(buffer[pos:match.start()])
            out.append(MASK)
            pos = match.end()
        cut = max(pos, safe)
        out.append(buffer[pos:cut])
        self._buffer = buffer[cut:]
        return b"".join(out)
