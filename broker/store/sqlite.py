"""The SQLite backend: one connection, transactions, migrations, errors translated.

Theory of operation: one aiosqlite connection, owned by the daemon, in WAL mode
with ``synchronous=FULL`` (a write acknowledged to a client survives a power
cut) and ``secure_delete`` (deleted rows are overwritten, not left in free
pages). Every write runs in :meth:`SqliteStore.write`, in a savepoint of an explicit
``BEGIN IMMEDIATE`` transaction: writes that queue while one commits share the next
transaction and its fsync (group commit), and none returns before that COMMIT has
run. Every sqlite error is translated there or in :meth:`SqliteStore.read`
(disk full becomes ResourceExhausted, a unique key taken AlreadyExists, anything
else Internal), and so is a
number too large for the file's integers (``OverflowError``, which the sqlite3
module raises outside its own tree), so no "database is locked" or sqlite
traceback reaches a client, nor a caller that treats store errors as broker
errors (a write that has committed, then fails to flush its audit records). This module is the
only one that imports sqlite; the domain modules hand it their SQL.

The store holds only what is safe on disk: non-secret values as they are,
secret values as envelopes sealed through :mod:`.vault`, data keys wrapped by
the master key, and the master key's public id as a key check value. Schema
versions are ``PRAGMA user_version``; :data:`MIGRATIONS` only moves forward, to the
tables :mod:`.schema` declares.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sqlite3
import stat
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import aiosqlite
import anyio

from ..metrics import NULL_RECORDER, Recorder
from ..protocol.errors import AlreadyExists, Internal, ResourceExhausted
from .backend import (
    MASTER_KEY_ID,
    PEEK_DATA_KEYS,
    PEEK_META,
    PENDING_KEY_ID,
    StoreError,
    StorePeek,
    check_not_writing,
    writing,
)
from .notices import Notice

__all__ = ["MIGRATIONS", "ROW_MACS_SINCE", "SqliteStore", "SqliteTx", "peek"]

log = logging.getLogger("stigmer.broker")

#: what the sqlite3 module raises for a statement: its errors, and a Python int that does
#: not fit a 64-bit integer column
_STORE_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error, OverflowError)
#: the extended codes of a unique key or primary key already taken
_UNIQUE_CLASHES = frozenset({sqlite3.SQLITE_CONSTRAINT_UNIQUE,
                             sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY})

MIGRATIONS: tuple[str, ...] = (
    # 1: key check values, data keys, environments
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE data_keys (
        id TEXT PRIMARY KEY,
        wrapped BLOB NOT NULL,
        master_key_id TEXT NOT NULL,
        wrapped_next BLOB,
        created_at REAL NOT NULL,
        active INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE environments (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL UNIQUE,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE variables (
        env_id INTEGER NOT NULL REFERENCES environments(id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        is_secret INTEGER NOT NULL,
        value TEXT,
        sealed BLOB,
        PRIMARY KEY (env_id, name),
        CHECK ((is_secret = 0 AND value IS NOT NULL AND sealed IS NULL)
            OR (is_secret = 1 AND value IS NULL AND sealed IS NOT NULL))
    );
    """,
    # 2: execution contexts, their tokens (hashes only), the audit chain
    """
    CREATE TABLE contexts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        execution_id TEXT NOT NULL UNIQUE,
        sealed BLOB NOT NULL,
        keys TEXT NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL
    );
    CREATE TABLE tokens (
        id TEXT PRIMARY KEY,
        hash BLOB NOT NULL UNIQUE,
        context_id INTEGER NOT NULL REFERENCES contexts(id) ON DELETE CASCADE,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        max_uses INTEGER,
        uses INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX tokens_by_context ON tokens(context_id);
    CREATE TABLE audit (
        seq INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        event TEXT NOT NULL,
        outcome TEXT NOT NULL,
        execution_id TEXT NOT NULL,
        token_id TEXT NOT NULL,
        peer_uid INTEGER,
        peer_pid INTEGER,
        detail TEXT NOT NULL,
        hash TEXT NOT NULL
    );
    CREATE INDEX audit_by_execution ON audit(execution_id, seq);
    CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    """,
    # 3: a MAC on every row that decides what a name or a token reaches (rows of older
    # stores are authenticated once, by the start that migrates them); audit records
    # leave only behind a later checkpoint record (retention)
    """
    ALTER TABLE environments ADD COLUMN mac BLOB;
    ALTER TABLE variables ADD COLUMN mac BLOB;
    ALTER TABLE contexts ADD COLUMN mac BLOB;
    ALTER TABLE tokens ADD COLUMN mac BLOB;
    CREATE INDEX audit_checkpoints ON audit(event, seq);
    DROP TRIGGER audit_no_delete;
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
        WHEN NOT EXISTS (SELECT 1 FROM audit WHERE event = 'audit.checkpoint' AND seq > old.seq)
        BEGIN SELECT RAISE(ABORT, 'audit records are removed only behind a checkpoint'); END;
    """,
    # 4: runner grants: a token row that no token opens, holding the selectors (JSON) of
    # the processes that may open its context by execution id
    """
    ALTER TABLE tokens ADD COLUMN runners TEXT;
    """,
    # 5: what the broker assumes, enforced by the database against a client that writes
    # through SQLite (one who edits the file itself can drop these triggers too: against
    # that, the row MACs and the audit anchor stand): an audit record takes the number
    # after the last one; a use count never goes
    # down (writing back a saved count and MAC would reset a bound); a completed context
    # leaves a tombstone, kept until the context would have expired, so its saved rows
    # written back are not served again; a bad audit record is moved aside (quarantined,
    # kept as evidence) only by the operator's command, which the chain records
    """
    CREATE TRIGGER audit_seq_follows BEFORE INSERT ON audit
        WHEN new.seq IS NOT (SELECT coalesce(max(seq), 0) + 1 FROM audit)
        BEGIN SELECT RAISE(ABORT, 'an audit record takes the number after the last one'); END;
    CREATE TABLE audit_quarantine (
        seq INTEGER PRIMARY KEY,
        at REAL,
        event TEXT,
        outcome TEXT,
        execution_id TEXT,
        token_id TEXT,
        peer_uid INTEGER,
        peer_pid INTEGER,
        detail TEXT,
        hash TEXT NOT NULL
    );
    CREATE TRIGGER audit_quarantine_kept BEFORE UPDATE ON audit_quarantine
        BEGIN SELECT RAISE(ABORT, 'quarantined audit records are kept as they are'); END;
    CREATE TRIGGER audit_quarantine_no_delete BEFORE DELETE ON audit_quarantine
        BEGIN SELECT RAISE(ABORT, 'quarantined audit records are kept as they are'); END;
    DROP TRIGGER audit_no_delete;
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
        WHEN NOT EXISTS (SELECT 1 FROM audit WHERE event = 'audit.checkpoint' AND seq > old.seq)
            AND NOT EXISTS (SELECT 1 FROM audit_quarantine q
                            WHERE q.seq = old.seq AND q.hash = old.hash)
        BEGIN SELECT RAISE(ABORT, 'audit records are removed only behind a checkpoint'); END;
    CREATE TRIGGER tokens_uses_never_down BEFORE UPDATE OF uses ON tokens
        WHEN new.uses < old.uses
        BEGIN SELECT RAISE(ABORT, 'a token''s use count never goes down'); END;
    CREATE TABLE tombstones (
        context_id INTEGER NOT NULL,
        execution_id TEXT NOT NULL,
        expires_at REAL NOT NULL,
        mac BLOB NOT NULL
    );
    CREATE INDEX tombstones_by_context ON tombstones(context_id);
    CREATE INDEX tombstones_by_expiry ON tombstones(expires_at);
    CREATE TRIGGER tombstones_kept BEFORE UPDATE ON tombstones
        BEGIN SELECT RAISE(ABORT, 'tombstones are never changed'); END;
    CREATE TRIGGER tombstones_outlive_their_context BEFORE DELETE ON tombstones
        WHEN old.expires_at > (julianday('now') - 2440587.5) * 86400.0
        BEGIN SELECT RAISE(IGNORE); END;
    """,
    # 6: the expiry sweep finds what has expired through an index, as on PostgreSQL (whose
    # first version has these): without them each sweep read every context and token
    """
    CREATE INDEX contexts_by_expiry ON contexts(expires_at);
    CREATE INDEX tokens_by_expiry ON tokens(expires_at);
    """,
    # 7: environment history: every version of an environment, sealed as one envelope
    # and MAC'd; a context names the version of each environment it merged
    """
    CREATE TABLE environment_versions (
        env_id INTEGER NOT NULL REFERENCES environments(id) ON DELETE CASCADE,
        version INTEGER NOT NULL,
        created_at REAL NOT NULL,
        actor_uid INTEGER,
        changes TEXT NOT NULL,
        restored_from INTEGER,
        sealed BLOB NOT NULL,
        mac BLOB NOT NULL,
        PRIMARY KEY (env_id, version)
    );
    CREATE INDEX environment_versions_by_time ON environment_versions(created_at);
    ALTER TABLE contexts ADD COLUMN environments TEXT;
    """,
)

#: the first schema version whose rows carry MACs
ROW_MACS_SINCE = 3


def _private(path: Path) -> None:
    """Create ``path`` empty and 0600 if it is missing; make it 0600 if it is not."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        os.close(fd)
    except FileExistsError:
        st = os.lstat(path)  # checked below: refuse anything that is not our regular file
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
            raise StoreError(f"refusing store file {path}: it is not a regular file") from None
        if st.st_uid != os.getuid():
            raise StoreError(
                f"refusing store file {path}: it is owned by uid {st.st_uid}") from None
        if stat.S_IMODE(st.st_mode) != 0o600:
            os.chmod(path, 0o600)


class SqliteTx:
    """The statements of one write transaction (a :class:`~.backend.Tx`).

    Each statement runs to its end even when the task that issued it is cancelled
    (aiosqlite cannot take back work handed to its thread, and a cancelled wait
    there would leave the transaction open); the cancellation lands after it.
    """

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        with anyio.CancelScope(shield=True):
            await self._db.execute(sql, params)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        with anyio.CancelScope(shield=True):
            await self._db.executemany(sql, rows)

    async def insert(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run an INSERT and return the new row's id."""
        with anyio.CancelScope(shield=True):
            row = await self._db.execute_insert(sql, params)
        return int(row[0]) if row else 0

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with anyio.CancelScope(shield=True):
            rows = await self._db.execute_fetchall(sql, params)
        return list(rows)

    async def lock(self, name: str) -> None:
        """Nothing to do: ``BEGIN IMMEDIATE`` already excludes every other writer."""

    async def try_lock(self, name: str) -> bool:
        """Always taken: no other write runs while this one does (``BEGIN IMMEDIATE`` and
        the store's lock), so no one else can hold it."""
        return True

    def notify(self, notice: Notice) -> None:
        """Nothing to do: no other broker opens this file (the home lock)."""


class _Batch:
    """The writes of one group-committed transaction: done once its COMMIT has run."""

    __slots__ = ("done", "error", "writes")

    def __init__(self) -> None:
        self.done = False
        self.error: Exception | None = None
        self.writes = 0

    def finish(self, error: Exception | None) -> None:
        self.done, self.error = True, error


class SqliteStore:
    """The embedded store (a :class:`~.backend.Store`). Use ``await SqliteStore.open(path)``."""

    shared = False

    def __init__(self, db: aiosqlite.Connection, path: Path, *,
                 recorder: Recorder = NULL_RECORDER) -> None:
        self._db = db
        self.path = path
        self._recorder = recorder
        #: the schema version found on disk when this process opened it (0: a new store)
        self.migrated_from = len(MIGRATIONS)
        # One connection serves every task: a lock keeps one task's transaction from
        # interleaving with another's statements (and readers from seeing it half done).
        self._lock = anyio.Lock()
        self._queued = 0  # writes waiting for the lock
        self._batch: _Batch | None = None  # the transaction writes are joining

    def describe(self) -> str:
        return str(self.path)

    @property
    def legacy_rows(self) -> bool:
        return 0 < self.migrated_from < ROW_MACS_SINCE

    def problem(self) -> str:
        return ""

    def fresh_until(self) -> float:
        return math.inf

    async def watch(self, changed: Callable[[Notice], None],
                    resync: Callable[[], Awaitable[None]]) -> None:
        """Nothing to watch: this broker is the store's only writer."""

    async def can_write(self) -> bool:
        return True

    @classmethod
    async def open(cls, path: Path, *, recorder: Recorder = NULL_RECORDER) -> SqliteStore:
        """Open (creating if needed) and migrate the store; its writes and commits are
        timed into ``recorder``. Raises StoreError."""
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _private(path)
        for suffix in ("-wal", "-shm"):
            side = path.with_name(path.name + suffix)
            if os.path.lexists(side):  # noqa: ASYNC240 - once, at start-up
                _private(side)
        try:
            db = await aiosqlite.connect(path, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open store {path}: {exc}") from None
        store = cls(db, path, recorder=recorder)
        try:
            await store._setup()
        except BaseException:
            await db.close()
            raise
        return store

    async def _setup(self) -> None:
        db = self._db
        try:
            await db.execute("PRAGMA busy_timeout = 10000")
            # before the first table exists (a new store); older stores convert below
            await db.execute("PRAGMA auto_vacuum = INCREMENTAL")
            row = await (await db.execute("PRAGMA journal_mode = WAL")).fetchone()
            if row is None or str(row[0]).lower() != "wal":
                raise StoreError(f"cannot put store {self.path} in WAL mode")
            await db.execute("PRAGMA synchronous = FULL")
            await db.execute("PRAGMA secure_delete = ON")
            await db.execute("PRAGMA foreign_keys = ON")
            # As bytes: a damaged page can put any bytes into the report.
            check = [bytes(r[0]).decode("utf-8", "backslashreplace") for r in await (
                await db.execute("SELECT CAST(quick_check AS BLOB) FROM pragma_quick_check")
            ).fetchall()]
            if check != ["ok"]:
                raise StoreError(
                    f"store {self.path} failed its integrity check ({check[0][:200]!r}); "
                    "restore it from a backup")
            await self._migrate()
            row = await (await db.execute("PRAGMA auto_vacuum")).fetchone()
            if row is not None and int(row[0]) != 2:  # once: a store made before version 3
                await db.execute("VACUUM")
        except sqlite3.DatabaseError as exc:
            reason = " ".join(str(exc).split())[:200]  # sqlite may quote damaged SQL
            raise StoreError(f"cannot open store {self.path}: {reason}; is it a stigmer "
                             "store? Restore it from a backup") from None
        except UnicodeDecodeError:  # text sqlite hands back from a damaged schema or page
            raise StoreError(f"cannot open store {self.path}: it is damaged (text that is not "
                             "UTF-8); restore it from a backup") from None
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.chmod(self.path.with_name(self.path.name + suffix), 0o600)

    async def _migrate(self) -> None:
        row = await (await self._db.execute("PRAGMA user_version")).fetchone()
        version = int(row[0]) if row else 0
        self.migrated_from = version
        if version > len(MIGRATIONS):
            raise StoreError(
                f"store {self.path} has schema version {version}, newer than this broker "
                f"knows ({len(MIGRATIONS)}); upgrade stigmer-broker")
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            try:
                await self._db.executescript(
                    f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version = {number};\nCOMMIT;")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    await self._db.execute("ROLLBACK")
                raise

    async def close(self) -> None:
        """Checkpoint the WAL into the database file and close."""
        with contextlib.suppress(sqlite3.Error):
            await self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        await self._db.close()

    # ----------------------------------------------------------- the two boundaries

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[SqliteTx]:
        """One write, durable when the block exits, errors translated.

        Writes that queue up while another commits share the next transaction and
        its fsync (group commit): each runs in a savepoint of it, so one that fails
        rolls back alone, and none returns before the shared COMMIT has finished (a
        failed COMMIT fails them all). Writes are serialized: :meth:`read` inside one
        would wait for it, so it raises ReadInWrite (use the :class:`SqliteTx` it yields).
        """
        db = self._db
        asked = time.perf_counter()
        self._queued += 1
        try:
            await self._lock.acquire()
        finally:
            self._queued -= 1
        batch: _Batch | None = None
        try:
            batch = await self._join_batch()
            try:
                with anyio.CancelScope(shield=True):
                    await db.execute("SAVEPOINT write")
                with writing(self):
                    yield SqliteTx(db)
                with anyio.CancelScope(shield=True):
                    await db.execute("RELEASE write")
            except BaseException as exc:
                await self._undo(batch)
                if isinstance(exc, _STORE_ERRORS):
                    raise _translate(exc) from None
                raise
        except _STORE_ERRORS as exc:
            raise _translate(exc) from None
        finally:
            if self._queued == 0:  # the last write queued commits the group, failed or not
                await self._commit_open()
            self._lock.release()
        if not batch.done:  # the writes queued behind this one join it; the last commits
            # shielded: a write whose block has ended is as good as committed, as it was
            # before groups (its caller goes on to apply it)
            with anyio.CancelScope(shield=True):
                async with self._lock:
                    if not batch.done:  # they were cancelled before their turn
                        await self._commit(batch)
        self._recorder.store_written(time.perf_counter() - asked)
        if batch.error is not None:
            raise batch.error

    async def _join_batch(self) -> _Batch:
        if self._batch is None:
            with anyio.CancelScope(shield=True):
                await self._db.execute("BEGIN IMMEDIATE")
            self._batch = _Batch()
        self._batch.writes += 1
        return self._batch

    async def _undo(self, batch: _Batch) -> None:
        """Roll back the failed write of ``batch``; when sqlite has rolled back the whole
        transaction (a full disk can), the batch has failed."""
        with anyio.CancelScope(shield=True), contextlib.suppress(sqlite3.Error):
            await self._db.execute("ROLLBACK TO write")
            await self._db.execute("RELEASE write")
        if not self._db.in_transaction and not batch.done:
            batch.finish(Internal("the store rolled back a transaction; retry"))
            self._batch = None

    async def _commit_open(self) -> None:
        """COMMIT the group writes are joining, if one is open (the caller holds the
        lock): before a read, so nothing reads what may not commit, and by the last
        write of a group."""
        if self._batch is not None:
            await self._commit(self._batch)

    async def _commit(self, batch: _Batch) -> None:
        """COMMIT the open batch (the caller holds the lock)."""
        error: Exception | None = None
        started = time.perf_counter()
        with anyio.CancelScope(shield=True):
            try:
                await self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                error = _translate(exc)
                with contextlib.suppress(sqlite3.Error):
                    await self._db.execute("ROLLBACK")
        self._batch = None
        batch.finish(error)
        self._recorder.store_committed(time.perf_counter() - started, batch.writes)

    async def read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Run one query and return all rows, errors translated."""
        check_not_writing(self)  # it would wait for the lock its own write holds
        try:
            async with self._lock:
                await self._commit_open()
                with anyio.CancelScope(shield=True):  # see Tx
                    rows = await self._db.execute_fetchall(sql, params)
        except _STORE_ERRORS as exc:
            raise _translate(exc) from None
        return list(rows)

    async def read_one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Return the first column of the first row, or None."""
        rows = await self.read(sql, params)
        return rows[0][0] if rows else None

    async def reclaim(self, *, min_free_pages: int = 256) -> int:
        """Give free pages back to the file system once there are many (after a large
        sweep or a retention cut); return how many pages were free."""
        check_not_writing(self)
        async with self._lock:
            await self._commit_open()
            with anyio.CancelScope(shield=True):
                try:
                    row = await (await self._db.execute("PRAGMA freelist_count")).fetchone()
                    free = int(row[0]) if row else 0
                    if free >= min_free_pages:  # a page per step: a script steps it out
                        await self._db.executescript("PRAGMA incremental_vacuum;")
                except sqlite3.Error as exc:
                    raise _translate(exc) from None
        return free

    # ------------------------------------------------------------------------ meta

    async def meta(self, key: str) -> str | None:
        value = await self.read_one("SELECT value FROM meta WHERE key = ?", (key,))
        return None if value is None else str(value)


def _translate(exc: Exception) -> Exception:
    log.error("store error: %s: %s", type(exc).__name__, exc)
    if isinstance(exc, OverflowError):
        return Internal("a number is too large for the store (over 2**63 - 1); nothing was "
                        "changed")
    code = getattr(exc, "sqlite_errorcode", None)
    if code == sqlite3.SQLITE_FULL or "disk is full" in str(exc) or \
            getattr(exc, "sqlite_errorname", "") == "SQLITE_IOERR_WRITE":
        return ResourceExhausted(
            "the disk holding the broker's store is full; nothing was changed. Free some "
            "space and retry")
    if code == sqlite3.SQLITE_BUSY:
        return Internal("the store is busy; retry")
    if code in _UNIQUE_CLASHES:  # as PostgreSQL's backend says it (the store contract)
        return AlreadyExists("a row with the same unique key exists; nothing was changed")
    return Internal(f"the store failed ({type(exc).__name__}); see the broker's log")


def peek(path: Path) -> StorePeek:
    """What the store at ``path`` holds of its key and its age (see
    :func:`.backend.peek_store`), read without writing a byte; empty without a store.

    Without a WAL file the database file is complete, and is opened ``immutable`` (a
    read-only open of a WAL store would create the -wal and -shm files); with one (the
    daemon runs, or one was killed) read-only, so the WAL's commits count.
    """
    if not path.exists():
        return StorePeek(str(path))
    mode = "mode=ro" if os.path.lexists(path.with_name(path.name + "-wal")) else "immutable=1"
    uri = "file:" + urllib.parse.quote(str(path)) + "?" + mode
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as db:
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            if version == 0:  # nothing made yet (migration 1 sets the version with the tables)
                return StorePeek(str(path))
            meta = db.execute(PEEK_META, (MASTER_KEY_ID, PENDING_KEY_ID)).fetchall()
            data_keys = db.execute(PEEK_DATA_KEYS).fetchall()
    except (sqlite3.Error, UnicodeDecodeError, ValueError, TypeError) as exc:
        reason = " ".join(str(exc).split())[:200]  # sqlite may quote damaged SQL
        raise StoreError(f"cannot read store {path}: {reason}; is it a stigmer store? "
                         "Restore it from a backup") from None
    return StorePeek.from_rows(str(path), meta, data_keys,
                               legacy_rows=0 < version < ROW_MACS_SINCE)
