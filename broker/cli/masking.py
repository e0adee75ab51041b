"""Secret values replaced in a byte stream, also when one arrives split across writes.

A :class:`Masker` holds back the end of what it was fed only when that end is
the start of a secret (whose rest has not arrived yet), and replaces every
secret in the rest. Everything else goes out at once, so a prompt or a line
shorter than a secret is never delayed. Holding back exactly the longest such
end also decides every match: one that starts earlier cannot grow with later
bytes, so a shorter secret never wins over a longer one sharing its start. The
common case, a chunk with no secret in it, costs one C-speed substring search
per secret.

Finding that end stays linear however the output looks: the places tried are
those where a secret's first bytes (up to :data:`_ANCHOR` of them) occur, found
by a C-speed search, and each is compared in place (no copy), so output full of
a secret's first byte (``-`` before a PEM key) costs no more than other output.

Terminal escape sequences (CSI: colours, cursor moves) inside a secret do not
hide it: when the stream holds an ESC, secrets are looked for in the text with
those sequences taken out, and a secret found there is replaced, its escapes
kept after the mask (so the colours stay as the command set them). An escape
that has not ended yet waits, as the start of a secret does. Such a buffer
costs one regex search (each secret's anchor with escapes allowed between its
bytes) and the stripping of its tail; the text is mapped back to the buffer
only when a secret may be in it.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable

__all__ = ["MASK", "Masker", "terminal_forms"]

MASK = b"<concealed by stigmer>"
#: a secret's first bytes searched for as one string when finding what to hold back
_ANCHOR = 64
#: a CSI escape sequence (ECMA-48): ESC [, parameter bytes, intermediate bytes, final byte
_CSI = re.compile(rb"\x1b\[[0-?]*[ -/]*[@-~]")
#: the start of a CSI sequence whose end has not arrived
_CSI_OPEN = re.compile(rb"\x1b(?:\[[0-?]*[ -/]*)?\Z")
#: longer than this, an unfinished sequence is not one: it goes out as it is
_CSI_LONGEST = 64


def terminal_forms(secrets: Iterable[str]) -> set[str]:
    """The secrets and, for those with line breaks, the form a terminal shows: a pty's
    ONLCR turns each ``\\n`` the command writes into ``\\r\\n`` before we read it."""
    out = set(secrets)
    out.update(s.replace("\n", "\r\n") for s in list(out) if "\n" in s)
    return out


class Masker:
    """Feed bytes in, get them back with every secret replaced by :data:`MASK`."""

    __slots__ = ("_anchors", "_buffer", "_escaped_anchors", "_keep", "_pattern")

    def __init__(self, secrets: Iterable[str]) -> None:
        values = sorted({s.encode() for s in secrets if s}, key=len, reverse=True)
        self._anchors = [(value[:_ANCHOR], value) for value in values]
        self._keep = len(values[0]) - 1 if values else 0
        # Both regexes are compiled when first needed: a command whose output holds no
        # secret never needs the first, and one that writes no ESC never the second,
        # which takes a tenth of a second to compile for ten secrets in all their forms
        # (`run` starts two maskers, before the command it runs).
        self._pattern: re.Pattern[bytes] | None = None
        self._escaped_anchors: re.Pattern[bytes] | None = None
        self._buffer = b""

    def _secrets(self) -> re.Pattern[bytes]:
        """Any secret (the longest first, where they share a start)."""
        if self._pattern is None:
            self._pattern = re.compile(b"|".join(re.escape(s) for _, s in self._anchors))
        return self._pattern

    def _escaped(self) -> re.Pattern[bytes]:
        """Any secret's anchor, with any CSI sequences between its bytes."""
        if self._escaped_anchors is None:
            between = b"(?:" + _CSI.pattern + b")*"
            self._escaped_anchors = re.compile(b"|".join(
                between.join(re.escape(anchor[i:i + 1]) for i in range(len(anchor)))
                for anchor, _ in self._anchors))
        return self._escaped_anchors

    def feed(self, data: bytes) -> bytes:
        """Return what can be written now (the rest waits for more, or :meth:`flush`)."""
        if not self._anchors:
            return data
        buffer = self._buffer + data if self._buffer else data
        if b"\x1b" in buffer:
            return self._feed_with_escapes(buffer)
        safe = len(buffer) - self._held_back(buffer)
        # the fast, common case (the anchor first: a long secret's own search is slower)
        if not any(a in buffer and s in buffer for a, s in self._anchors):
            self._buffer = buffer[safe:]
            return buffer[:safe]
        return self._replace(buffer, safe)

    def flush(self) -> bytes:
        """Return what is held back (the stream ended)."""
        buffer, self._buffer = self._buffer, b""
        if not self._anchors or not buffer:
            return buffer
        if b"\x1b" in buffer:
            return self._feed_with_escapes(buffer, final=True)
        return self._replace(buffer, len(buffer))

    def _held_back(self, buffer: bytes) -> int:
        """The length of the longest end of ``buffer`` that a secret starts with (and
        is longer than): those bytes wait to see whether the secret follows."""
        tail = buffer[-self._keep:] if self._keep else b""
        view = memoryview(tail)
        longest = 0
        for anchor, secret in self._anchors:
            # where all of the anchor occurs: a C-speed search, then one compare in place
            at = tail.find(anchor)
            while at != -1 and len(tail) - at > longest:
                if len(secret) > len(tail) - at and secret.startswith(view[at:]):
                    longest = len(tail) - at  # the earliest start is the longest end
                    break
                at = tail.find(anchor, at + 1)
            # an end shorter than the anchor is only part of it: at most _ANCHOR tries
            for at in range(max(len(tail) - len(anchor) + 1, 0), len(tail) - longest):
                if secret.startswith(view[at:]):
                    longest = len(tail) - at
                    break
        return longest

    def _replace(self, buffer: bytes, safe: int) -> bytes:
        out = []
        pos = 0
        for match in self._secrets().finditer(buffer):
            if match.start() >= safe:
                break
            out.append(buffer[pos:match.start()])
            out.append(MASK)
            pos = match.end()
        cut = max(pos, safe)
        out.append(buffer[pos:cut])
        self._buffer = buffer[cut:]
        return b"".join(out)

    def _text_of_tail(self, buffer: bytes, work: int) -> bytes:
        """The last ``_keep`` bytes (or all, if fewer) of ``buffer[:work]``'s text, the
        CSI sequences taken out: all that :meth:`_held_back` looks at."""
        span = self._keep
        while True:
            start = max(0, work - span)
            escape = buffer.rfind(b"\x1b", max(0, start - _CSI_LONGEST), start)
            if escape != -1 and (seq := _CSI.match(buffer, escape)) and seq.end() > start:
                start = escape  # not from inside a sequence
            text = _CSI.sub(b"", buffer[start:work])
            if len(text) >= self._keep or start == 0:
                return text
            span *= 2

    def _feed_with_escapes(self, buffer: bytes, *, final: bool = False) -> bytes:
        """:meth:`feed` for a buffer holding an ESC: secrets are looked for in its text
        with the CSI sequences taken out, and replaced in the buffer itself."""
        work = len(buffer)
        opened = _CSI_OPEN.search(buffer, max(0, len(buffer) - _CSI_LONGEST))
        if opened and not final and len(buffer) - opened.start() <= _CSI_LONGEST:
            work = opened.start()  # wait for the sequence's end
        # No secret's anchor, escapes or not, and no secret's start at the end: all of
        # it goes, for the cost of one regex search and of stripping the tail alone.
        if not self._escaped().search(buffer, 0, work) and (
                final or not self._held_back(self._text_of_tail(buffer, work))):
            self._buffer = buffer[work:]
            return buffer[:work]
        # the text between sequences: (its offset in the text, in the buffer, its length)
        pieces: list[tuple[int, int, int]] = []
        text = []
        start = length = 0
        for seq in _CSI.finditer(buffer, 0, work):
            if seq.start() > start:
                pieces.append((length, start, seq.start() - start))
                text.append(buffer[start:seq.start()])
                length += seq.start() - start
            start = seq.end()
        if work > start:
            pieces.append((length, start, work - start))
            text.append(buffer[start:work])
        stripped = b"".join(text)
        offsets = [p[0] for p in pieces]

        def raw(index: int) -> int:
            """Where the text's byte ``index`` is in the buffer."""
            at, raw_at, _ = pieces[bisect.bisect_right(offsets, index) - 1]
            return raw_at + index - at

        held = 0 if final else self._held_back(stripped)
        safe = raw(len(stripped) - held) if held else work
        out = []
        pos = 0
        for match in self._secrets().finditer(stripped):
            begin, end = raw(match.start()), raw(match.end() - 1) + 1
            if begin >= safe:
                break
            out.append(buffer[pos:begin])
            out.append(MASK)
            out.extend(_CSI.findall(buffer, begin, end))  # the colours it set, kept
            pos = end
        cut = max(pos, safe)
        out.append(buffer[pos:cut])
        self._buffer = buffer[cut:]
        return b"".join(out)
