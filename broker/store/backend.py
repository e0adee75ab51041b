"""The one interface both storage backends implement, and the choice between them.

Domain code talks to a :class:`Store` and the :class:`Tx` of one of its write
transactions, in the SQL both backends accept (``?`` placeholders, ``INSERT
... RETURNING id``, ``ON CONFLICT ... DO UPDATE``). It never learns which
backend it has, except through :attr:`Store.shared`: when several brokers work
on one store (a PostgreSQL fleet), what a broker holds in memory is only a
cache of it, and the store's :meth:`Store.watch` tells what changed elsewhere.

:func:`open_store` picks the backend from the store location (``--store`` or
``STIGMER_STORE_URL``): a ``postgresql://`` URL is the fleet backend, anything
else the embedded SQLite file. Opening migrates and writes, so what a start may
refuse on is read first, without writing, by :func:`peek_store`: the key check
values and wrapped data keys (is this the store's key?) and the schema's age.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Protocol

from ..metrics import NULL_RECORDER, Recorder
from ..protocol.errors import StartupError
from .notices import Notice

__all__ = ["KEY_MADE_AT", "MASTER_KEY_ID", "PEEK_DATA_KEYS", "PEEK_META", "PENDING_KEY_ID",
           "STORE_DEADLINE", "ReadInWrite", "Store", "StoreError", "StorePeek", "Tx",
           "check_not_writing", "open_store", "peek_store", "set_meta", "writing"]

#: meta keys: the key check value of the master key, and of one a rotation is moving to
MASTER_KEY_ID = "master_key_id"
PENDING_KEY_ID = "pending_master_key_id"
#: when the current master key was made or rotated in (Unix seconds): a health figure
#: (the age a key may reach without a backup), read and shown, never decided on
KEY_MADE_AT = "master_key_made_at"

#: what :func:`peek_store` reads, in SQL both backends accept (every schema version has it)
PEEK_META = "SELECT key, value FROM meta WHERE key IN (?, ?)"
PEEK_DATA_KEYS = "SELECT id, wrapped, wrapped_next FROM data_keys ORDER BY id"
#: seconds one read or write of a shared store may take before it answers ``unavailable``
#: (a database that hangs rather than refuses): well under the client's 30 s timeout, so
#: a runner hears why, and over what a sweep or a retention cut of a large log needs
STORE_DEADLINE = 10.0


class StoreError(StartupError):
    """The store cannot be opened; the message names it and the fix."""


class ReadInWrite(RuntimeError):
    """A bug: :meth:`Store.read` (or what calls it) inside an open :meth:`Store.write` of
    the same store, in the writing task or one it started. Refused on every backend: on
    SQLite the read would wait for the write it is part of (a deadlock), on PostgreSQL it
    would run on another connection and not see what the write has done."""


#: the stores the current task (and the tasks it starts) has a write open on
_WRITING: contextvars.ContextVar[tuple[object, ...]] = contextvars.ContextVar(
    "stigmer_store_writing", default=())


@contextlib.contextmanager
def writing(store: object) -> Iterator[None]:
    """Mark the body of a write of ``store`` (its backend's :meth:`Store.write` wraps the
    caller's block in it), for :func:`check_not_writing`."""
    token = _WRITING.set((*_WRITING.get(), store))
    try:
        yield
    finally:
        _WRITING.reset(token)


def check_not_writing(store: object) -> None:
    """Raise :class:`ReadInWrite` inside a write of ``store``."""
    if any(open_ is store for open_ in _WRITING.get()):
        raise ReadInWrite("a store read inside a write of the same store: read through "
                          "the write's Tx (fetchall), or read before the write begins")


@dataclasses.dataclass(frozen=True, slots=True)
class StorePeek:
    """What a store holds that a start may refuse on, read before it is opened for
    writing (:func:`peek_store`). All empty for a store not made yet."""

    #: where the store is, for people (never a password)
    where: str
    #: rows written before rows carried MACs may be present: an old schema, migrated (and
    #: its rows authenticated) by the start that opens it
    legacy_rows: bool = False
    master_id: str | None = None
    pending_id: str | None = None
    #: (data key id, wrapped under the master key, wrapped under the pending key or None)
    data_keys: tuple[tuple[str, bytes, bytes | None], ...] = ()

    @classmethod
    def from_rows(cls, where: str, meta: Iterable[Sequence[Any]],
                  data_keys: Iterable[Sequence[Any]], *, legacy_rows: bool = False
                  ) -> StorePeek:
        """Build it from the rows of :data:`PEEK_META` and :data:`PEEK_DATA_KEYS`."""
        ids = {str(key): str(value) for key, value in meta}
        return cls(where, legacy_rows, ids.get(MASTER_KEY_ID), ids.get(PENDING_KEY_ID),
                   tuple((str(kid), bytes(wrapped), None if wrapped_next is None
                          else bytes(wrapped_next)) for kid, wrapped, wrapped_next in data_keys))

    @property
    def key_ids(self) -> frozenset[str]:
        """The master key ids the store accepts (its key check values); empty when new."""
        return frozenset(i for i in (self.master_id, self.pending_id) if i)


class Tx(Protocol):
    """The statements of one write transaction."""

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None: ...

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...

    async def insert(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run an ``INSERT ... RETURNING id`` and return the new row's id."""
        ...

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Any]: ...

    async def lock(self, name: str) -> None:
        """Hold the store-wide lock ``name`` until this transaction ends (other brokers'
        transactions that take it wait)."""
        ...

    async def try_lock(self, name: str) -> bool:
        """Take the store-wide lock ``name`` until this transaction ends if no one holds
        it; return whether it was taken. (A store that runs one write at a time, SQLite,
        always takes it: no other write can hold it meanwhile.)"""
        ...

    def notify(self, notice: Notice) -> None:
        """Tell every other broker on this store ``notice`` once this transaction
        commits (nothing, if it rolls back)."""
        ...


class Store(Protocol):
    """A broker's persistence: reads, serialized write transactions, and for a shared
    store, what other brokers change."""

    #: other brokers write this store too: memory is a cache of it
    shared: bool
    #: the schema version found when this process opened it (0: a new store)
    migrated_from: int

    def describe(self) -> str:
        """Where the store is, for people and logs (never a password)."""
        ...

    @property
    def legacy_rows(self) -> bool:
        """Whether rows written before rows carried MACs may be present (this start
        migrated such a store)."""
        ...

    def problem(self) -> str:
        """What is wrong with the store right now (an outage), for status; empty when
        nothing is."""
        ...

    def fresh_until(self) -> float:
        """The ``time.monotonic()`` until which what a broker cached from this store may
        still be served: infinite for a store no one else writes."""
        ...

    async def watch(self, changed: Callable[[Notice], None],
                    resync: Callable[[], Awaitable[None]]) -> None:
        """Run until cancelled, calling ``changed`` with each notice another broker
        :meth:`Tx.notify`-ed, and ``resync`` whenever notices may have been lost (a
        dropped connection) once the store is reachable again. Returns at once for a
        store no one else writes."""
        ...

    def write(self) -> AbstractAsyncContextManager[Tx]:
        """One write, all or nothing and durable once the block exits, errors translated
        to BrokerErrors (a shared store's answers ``unavailable`` after
        :data:`STORE_DEADLINE` when the database does not answer). (SQLite may commit
        writes that queue up together in one transaction, each in a savepoint: still all
        or nothing, each.) Rows are plain tuples, here and from :meth:`read`. Inside
        the block, read through the Tx: :meth:`read` raises :class:`ReadInWrite`."""
        ...

    async def read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Run one query and return all rows (tuples), errors translated (bounded as
        :meth:`write` is). Raises :class:`ReadInWrite` inside a :meth:`write` of this
        store."""
        ...

    async def read_one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Return the first column of the first row, or None."""
        ...

    async def meta(self, key: str) -> str | None: ...

    async def can_write(self) -> bool:
        """Whether this broker's credentials may change the store (not only fetch)."""
        ...

    async def reclaim(self, *, min_free_pages: int = 256) -> int:
        """Give free space back after large deletions; return how much was free."""
        ...

    async def close(self) -> None: ...


async def set_meta(db: Tx, items: Iterable[tuple[str, str | None]]) -> None:
    """Set (or, with None, remove) meta keys inside ``db``."""
    for key, value in items:
        if value is None:
            await db.execute("DELETE FROM meta WHERE key = ?", (key,))
        else:
            await db.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) "
                             "DO UPDATE SET value = excluded.value", (key, value))


async def open_store(location: str | None, default: Path, *, stale_after: float = 30.0,
                     recorder: Recorder = NULL_RECORDER) -> Store:
    """Open and migrate the store at ``location`` (a PostgreSQL URL), or the SQLite file
    ``default`` when it is None. ``stale_after`` is a shared store's staleness window:
    how long a broker that lost it keeps serving what it cached; its writes and commits
    are timed into ``recorder``. Raises StoreError."""
    if location is not None:
        from .postgres import PostgresStore

        return await PostgresStore.open(location, stale_after=stale_after, recorder=recorder)
    from .sqlite import SqliteStore

    return await SqliteStore.open(default, recorder=recorder)


async def peek_store(location: str | None, default: Path) -> StorePeek:
    """Read what the store at ``location`` (a PostgreSQL URL), or the SQLite file
    ``default`` when it is None, holds of its master key and its age, creating, migrating
    and writing nothing: a start refused on it (or a `key import` checking a key) leaves
    the store byte for byte as it was. Raises StoreError."""
    if location is not None:
        from .postgres import peek

        return await peek(location)
    import anyio.to_thread

    from .sqlite import peek as peek_file

    return await anyio.to_thread.run_sync(peek_file, default)
