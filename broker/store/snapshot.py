"""The SQLite store's backup file: a consistent copy taken while a broker writes, and
its installation into a home.

Taking (:func:`take`): SQLite's backup API copies every page in one step
(``pages=-1``), which is one read transaction on the source: in WAL mode a
reader sees the database as of the last commit before it started, whatever the
broker commits meanwhile, and the WAL's frames are read through it. A plain
file copy misses the WAL, which holds every commit since the last checkpoint.
The source is opened read-only, so taking a backup never writes to the store.

The backup also holds the audit head anchor (``HOME/audit.head``), in a table of
its own, :data:`TABLE`. The caller reads the anchor *before* the snapshot: the
broker writes the anchor after each commit, so an anchor read first names a
record the snapshot holds (the chain may go further, which verifies), whereas
one read after could name a record the copy lacks (which does not).

Installing (:func:`unpack`, :func:`install`): the backup is copied to a file in
the home (the backup itself is never opened for writing), the anchor table is
taken out, and once the caller has checked the copy opens and verifies, it
replaces the store by a rename. What it replaces is moved aside, never deleted.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from ..protocol.errors import FailedPrecondition
from .anchor import Head
from .files import fsync_path

__all__ = ["FORMAT", "TABLE", "Replaced", "SnapshotError", "Taken", "install", "side_files",
           "take", "unpack"]

#: the table inside a backup that holds what is not part of the store
TABLE = "stigmer_backup"
FORMAT = "stigmer-broker store backup"
_VERSION = 1
#: the files beside a SQLite database that belong to it (WAL mode; the rollback journal)
_SIDE = ("-wal", "-shm", "-journal")


class SnapshotError(FailedPrecondition):
    """A backup cannot be taken, read or installed; the message says why and what to do."""


class Taken(NamedTuple):
    """What :func:`take` copied."""

    pages: int
    #: the newest audit record in the copy (0: none)
    head: int
    anchor: Head | None


def take(store: Path, anchor: Head | None, out: Path) -> Taken:
    """Copy ``store`` into the new file ``out`` (0600, never an existing one), with
    ``anchor``, read by the caller before this call; durable on return."""
    if not store.exists():
        raise SnapshotError(f"there is no store at {store}: nothing to back up")
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except FileExistsError:
        raise SnapshotError(f"--out {out}: the file exists; choose a new name (nothing is "
                            "overwritten)") from None
    except OSError as exc:
        raise SnapshotError(f"--out {out}: cannot be created ({exc.strerror})") from None
    os.close(fd)
    try:
        with _connect(store, read_only=True) as source, _connect(out) as copy:
            source.backup(copy, pages=-1)  # one step: one read transaction, a snapshot
            pages = int(copy.execute("PRAGMA page_count").fetchone()[0])
            head = int(copy.execute("SELECT coalesce(max(seq), 0) FROM audit").fetchone()[0])
            # one self-contained file: no WAL beside it
            copy.execute("PRAGMA journal_mode = DELETE")
            copy.execute("PRAGMA synchronous = FULL")
            copy.execute(f"CREATE TABLE {TABLE} (format TEXT NOT NULL, version INTEGER NOT "
                         "NULL, taken_at REAL NOT NULL, anchor_seq INTEGER, anchor_link TEXT)")
            copy.execute(f"INSERT INTO {TABLE} VALUES (?, ?, ?, ?, ?)",
                         (FORMAT, _VERSION, time.time(), *(anchor or (None, None))))
            _check(copy, out)
        fsync_path(out)
        fsync_path(out.parent)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(out)  # ours (O_EXCL above): no half backup is left behind
        if isinstance(exc, sqlite3.Error):
            raise SnapshotError(f"cannot back up {store}: {_reason(exc)}") from None
        raise
    return Taken(pages, head, anchor)


def unpack(backup: Path, dest: Path) -> Head | None:
    """Copy the backup file into the new file ``dest`` as a plain store and return the
    anchor it holds. Raises SnapshotError when ``backup`` is not one."""
    not_one = SnapshotError(f"{backup} is not a stigmer-broker store backup (or it is "
                            "damaged); make one with `stigmer-broker backup --out FILE`")
    try:
        with _connect(backup, read_only=True) as source:
            row = source.execute(f"SELECT format, version, anchor_seq, anchor_link FROM {TABLE}"
                                 ).fetchone()
            if row is None or row[0] != FORMAT:
                raise not_one
            if row[1] != _VERSION:
                raise SnapshotError(f"{backup} is a backup of version {row[1]!r}, which this "
                                    "stigmer-broker does not read; use a newer one")
            anchor = None if row[2] is None else Head(int(row[2]), str(row[3]))
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
            os.close(fd)
            with _connect(dest) as copy:
                source.backup(copy, pages=-1)
                copy.execute(f"DROP TABLE {TABLE}")
                _check(copy, backup)
    except sqlite3.Error:
        raise not_one from None
    except OSError as exc:
        raise SnapshotError(f"cannot restore {backup} into {dest.parent}: {exc.strerror}"
                            ) from None
    return anchor


class Replaced(NamedTuple):
    """Where :func:`install` moved what it replaced ("" when nothing was there)."""

    store: str
    anchor: str


def install(staged: Path, store: Path, staged_anchor: Path | None, anchor: Path) -> Replaced:
    """Put the checked copy ``staged`` in place of ``store``, and ``staged_anchor`` (or no
    anchor) in place of ``anchor``; move what was there aside under a new name."""
    if any(os.path.lexists(side) for side in side_files(staged)):  # its WAL is not in it
        raise SnapshotError(f"{staged} was not closed cleanly; nothing was changed")
    suffix = time.strftime(".before-restore-%Y%m%dT%H%M%S", time.gmtime())
    aside = Replaced(_move_aside(store, suffix, _SIDE), _move_aside(anchor, suffix, ()))
    fsync_path(staged)
    os.replace(staged, store)  # the store is in place: the point of no return
    if staged_anchor is not None:
        fsync_path(staged_anchor)
        os.replace(staged_anchor, anchor)
    fsync_path(store.parent)
    return aside


def side_files(path: Path) -> list[Path]:
    """The files SQLite keeps beside ``path`` (present or not)."""
    return [path.with_name(path.name + side) for side in _SIDE]


def _move_aside(path: Path, suffix: str, sides: tuple[str, ...]) -> str:
    """Rename ``path`` (and its side files, with it) to a name not in use; return it."""
    if not os.path.lexists(path) and not any(os.path.lexists(f"{path}{s}") for s in sides):
        return ""
    n, name = 1, path.name + suffix
    while any(os.path.lexists(path.with_name(name + s)) for s in ("", *sides)):
        n += 1
        name = f"{path.name}{suffix}-{n}"
    for side in sides:  # a WAL left beside the new store would be replayed into it
        with contextlib.suppress(FileNotFoundError):
            os.rename(f"{path}{side}", path.with_name(name + side))
    with contextlib.suppress(FileNotFoundError):
        os.rename(path, path.with_name(name))
    return str(path.with_name(name))


@contextlib.contextmanager
def _connect(path: Path, *, read_only: bool = False) -> Iterator[sqlite3.Connection]:
    uri = "file:" + urllib.parse.quote(str(path)) + ("?mode=ro" if read_only else "?mode=rw")
    db = sqlite3.connect(uri, uri=True, timeout=10, isolation_level=None)
    try:
        yield db
    finally:
        db.close()


def _check(db: sqlite3.Connection, what: Path) -> None:
    result = [str(r[0]) for r in db.execute("PRAGMA quick_check").fetchall()]
    if result != ["ok"]:
        raise SnapshotError(f"{what} failed its integrity check ({result[0][:200]!r})")


def _reason(exc: sqlite3.Error) -> str:
    return " ".join(str(exc).split())[:200]
