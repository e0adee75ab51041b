"""The audit chain's head, anchored outside the database: a small 0600 file beside the key.

Anyone who can write the database file can delete its newest audit records; the
keyed chain cannot show that by itself, since what is left is still a valid
chain. The anchor can: after every flush the broker writes the head's sequence
number and link here (atomically: a temporary file, then a rename), so
``audit verify`` sees a head that went backwards. The file only ever lags the
database (it is written after the commit), never leads it.

On systemd the head is also logged at most once a second (``journal=True``), so
the journal holds a second witness that the database writer cannot reach.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import NamedTuple

import msgspec

__all__ = ["Head", "HeadAnchor"]

log = logging.getLogger("stigmer.broker")


class Head(NamedTuple):
    """The newest audit record: its sequence number and its chain link."""

    seq: int
    link: str


class _AnchorFile(msgspec.Struct, forbid_unknown_fields=True):
    version: int
    seq: int
    link: str


_DECODER = msgspec.json.Decoder(_AnchorFile)


class HeadAnchor:
    """Reads and writes the head anchor file at ``path``."""

    def __init__(self, path: Path, *, journal: bool = False) -> None:
        self.path = path
        self._journal = journal
        self._journaled_at = 0.0

    def exists(self) -> bool:
        return os.path.lexists(self.path)

    def read(self) -> Head | None:
        """Return the anchored head, None when there is no anchor yet; raises ValueError
        naming the file when it is unreadable."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ValueError(f"cannot read the audit head anchor {self.path}: "
                             f"{exc.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            raw = f.read(4096)
        try:
            anchor = _DECODER.decode(raw)
        except msgspec.DecodeError:
            raise ValueError(f"the audit head anchor {self.path} is damaged") from None
        return Head(anchor.seq, anchor.link)

    async def write(self, head: Head) -> None:
        """Anchor ``head``; a failure is logged (the records are committed all the same).

        Written in the event loop, without fsync: a small write and a rename cost
        microseconds, where a thread hop per flush cost more (and disturbed anyio's
        socket waits under load). After a power cut the anchor may lag the store (a
        weaker lower bound) or, rarely, be unreadable, which ``audit verify`` reports.
        """
        try:
            self._write(head)
        except OSError as exc:
            log.warning("could not update the audit head anchor %s: %s", self.path,
                        exc.strerror)
        if self._journal and time.monotonic() - self._journaled_at >= 1.0:
            self._journaled_at = time.monotonic()
            log.info("audit head seq=%d link=%s", head.seq, head.link)

    def save(self, head: Head) -> None:
        """Anchor ``head`` durably (``restore`` installs the file next). Raises OSError."""
        self._write(head, durable=True)

    def _write(self, head: Head, *, durable: bool = False) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        data = msgspec.json.encode(_AnchorFile(1, head.seq, head.link)) + b"\n"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            os.write(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
