"""The store contract: the same cases against SQLite and PostgreSQL, through
:class:`~broker.store.backend.Store` and :class:`~broker.store.backend.Tx` only (as
Vault's physical/testing.go and keyring's testing/backend.py test every backend).

What a case here pins down, domain code may rely on whichever backend it runs on."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import pytest

from stigmer.broker.protocol.errors import AlreadyExists, Internal
from stigmer.broker.store.backend import ReadInWrite, Store, Tx

pytestmark = pytest.mark.anyio

#: a row both schemas have since their first version
_ENV = "INSERT INTO environments(name, created_at, updated_at) VALUES (?, 0, 0) RETURNING id"


async def _insert_env(db: Tx, name: str) -> int:
    return await db.insert(_ENV, (name,))


# ------------------------------------------------------------------ row shape


async def test_rows_are_tuples(store: Store) -> None:
    """Domain code unpacks and indexes rows positionally (contexts, environments, audit):
    every backend hands back plain tuples, from a read and inside a write."""
    async with store.write() as db:
        await _insert_env(db, "a")
        inside = await db.fetchall("SELECT name, created_at FROM environments")
    rows = await store.read("SELECT name, created_at FROM environments")
    for got in (rows, inside):
        assert got == [("a", 0)]
        assert all(type(row) is tuple for row in got)
    assert await store.read_one("SELECT name FROM environments") == "a"
    assert await store.read_one("SELECT name FROM environments WHERE name = ?", ("b",)) is None


async def test_insert_returns_the_new_id(store: Store) -> None:
    async with store.write() as db:
        first = await _insert_env(db, "a")
        second = await _insert_env(db, "b")
    assert isinstance(first, int) and isinstance(second, int) and second > first
    assert await store.read("SELECT id, name FROM environments ORDER BY id") == [
        (first, "a"), (second, "b")]


# --------------------------------------------------------------- transactions


async def test_a_write_that_raises_rolls_back(store: Store) -> None:
    class Boom(Exception):
        pass

    async def fails() -> None:
        async with store.write() as db:
            await _insert_env(db, "gone")
            raise Boom

    with pytest.raises(Boom):
        await fails()
    assert await store.read("SELECT name FROM environments") == []
    async with store.write() as db:  # the store is usable after it
        await _insert_env(db, "kept")
    assert await store.read("SELECT name FROM environments") == [("kept",)]


async def test_a_committed_write_is_read_back(store: Store) -> None:
    async with store.write() as db:
        await db.executemany("INSERT INTO meta(key, value) VALUES (?, ?)",
                             [("k1", "v1"), ("k2", "v2")])
        await db.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", [])
    assert await store.meta("k2") == "v2"
    assert await store.meta("none") is None


async def test_try_lock_is_held_for_the_transaction(store: Store) -> None:
    """``try_lock`` in a write succeeds unless another write that runs at the same moment
    holds the lock; taken again in the same write it succeeds; it ends with the write.
    SQLite runs one write at a time, so there it always succeeds."""
    async with store.write() as db:
        assert await db.try_lock("x")
        assert await db.try_lock("x")
        await db.lock("x")
    async with store.write() as db:  # released by the end of the transaction
        assert await db.try_lock("x")


async def test_locked_writes_never_overlap(store: Store) -> None:
    """Two writes that take the same lock (``lock``, or a ``try_lock`` that succeeded)
    never run their locked parts at the same time, on either backend."""
    inside: list[str] = []
    overlapped: list[str] = []
    skipped: list[str] = []

    async def one(name: str, blocking: bool) -> None:
        async with store.write() as db:
            if blocking:
                await db.lock("shared")
            elif not await db.try_lock("shared"):
                skipped.append(name)
                return
            if inside:
                overlapped.append(name)
            inside.append(name)
            await anyio.sleep(0.05)
            inside.remove(name)

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            for number in range(4):
                tg.start_soon(one, f"w{number}", number % 2 == 0)
    assert overlapped == []
    assert not {"w0", "w2"} & set(skipped)  # lock waits, it never skips


# ------------------------------------------------------------- errors translated


async def test_a_unique_key_clash_is_already_exists(store: Store) -> None:
    async with store.write() as db:
        await _insert_env(db, "same")
    with pytest.raises(AlreadyExists):
        async with store.write() as db:
            await _insert_env(db, "same")
    with pytest.raises(AlreadyExists):  # a primary key too
        async with store.write() as db:
            await db.execute("INSERT INTO meta(key, value) VALUES ('k', 'v'), ('k', 'w')")
    assert await store.read("SELECT name FROM environments") == [("same",)]
    assert await store.read("SELECT key FROM meta") == []


async def test_bad_sql_is_internal(store: Store) -> None:
    """A missing table, a syntax error, a broken constraint other than a unique key: a bug
    or a damaged store, Internal on both (never a backend's own exception)."""
    for sql in ("SELECT * FROM no_such_table", "SELEKT 1",
                "INSERT INTO environments(name) VALUES ('no times')"):
        with pytest.raises(Internal):
            await store.read(sql)
        with pytest.raises(Internal):
            async with store.write() as db:
                await db.execute(sql)
    async with store.write() as db:
        await _insert_env(db, "after")  # the store still works


# ------------------------------------------------------------ reads inside writes


async def test_a_read_inside_a_write_is_refused(store: Store) -> None:
    """``Store.read`` inside an open write of the same store (in the writing task or one it
    starts) raises ReadInWrite on both, at once: on SQLite it used to wait for the write it
    was part of, for ever; on PostgreSQL it read past the write's own changes. Reading
    through the Tx sees them."""

    async def in_a_task(db: Tx) -> None:
        refused: list[ReadInWrite] = []

        async def child() -> None:
            try:
                await store.read("SELECT 1")
            except ReadInWrite as exc:
                refused.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(child)
        if refused:
            raise refused[0]

    for read in (lambda db: store.read("SELECT name FROM environments"),
                 lambda db: store.read_one("SELECT 1"), lambda db: store.meta("k"),
                 in_a_task):
        with anyio.fail_after(5):
            async with store.write() as db:
                await _insert_env(db, "mine")
                with pytest.raises(ReadInWrite):
                    await read(db)
                assert await db.fetchall("SELECT name FROM environments") == [("mine",)]
                await db.execute("DELETE FROM environments")
    assert await store.read("SELECT name FROM environments") == []  # and after it, reads work


# ------------------------------------------------------------------ migrations

#: the tables, their columns, the indexes and triggers of the store's schema, per backend
_SCHEMA = {
    False: """SELECT m.type, m.name, coalesce(p.name, '') FROM sqlite_master m
              LEFT JOIN pragma_table_info(m.name) p ON m.type = 'table'
              WHERE m.name NOT LIKE 'sqlite_%' ORDER BY 1, 2, 3""",
    True: """SELECT 'table', table_name::text, column_name::text FROM information_schema.columns
             WHERE table_schema = current_schema()
             UNION ALL SELECT 'index', indexname::text, '' FROM pg_indexes
             WHERE schemaname = current_schema()
             UNION ALL SELECT 'trigger', trigger_name::text, event_manipulation::text
             FROM information_schema.triggers WHERE trigger_schema = current_schema()
             ORDER BY 1, 2, 3""",
}


async def test_every_older_schema_migrates_to_the_current_one(
        store: Store, older_store: Callable[[int], Awaitable[Store]],
        migrations: tuple[str, ...]) -> None:
    """A store left at any older schema version (SQLite 1..5, PostgreSQL 1) opens, says
    which version it was found at, and ends with the same schema as a new store, its rows
    kept, usable."""
    assert store.migrated_from == 0
    current = await store.read(_SCHEMA[store.shared])
    assert current
    for version in range(1, len(migrations)):
        old = await older_store(version)
        assert old.migrated_from == version
        assert await old.read(_SCHEMA[old.shared]) == current, version
        async with old.write() as db:
            await _insert_env(db, "after")
        assert await old.read("SELECT name FROM environments ORDER BY name") == [
            ("after",), ("old",)], version


async def test_a_number_too_large_is_internal_not_an_outage(store: Store) -> None:
    """A Python int over 2**63 - 1 fits no column of either backend: Internal, nothing
    changed, and the store is not reported down (it answered)."""
    too_large = 2**63

    async def fails() -> None:
        async with store.write() as db:
            await _insert_env(db, "gone")
            await db.execute("UPDATE environments SET created_at = ? WHERE id = ?",
                             (0, too_large))

    with pytest.raises(Internal):
        await fails()
    with pytest.raises(Internal):
        await store.read("SELECT name FROM environments WHERE id = ?", (too_large,))
    assert store.problem() == ""
    assert await store.read("SELECT name FROM environments") == []
