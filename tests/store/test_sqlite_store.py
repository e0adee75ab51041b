"""The SQLite store's writes: group commit, and what one failed write does to the others."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import anyio
import pytest

from stigmer.broker.metrics import Recorder
from stigmer.broker.protocol.errors import BrokerError
from stigmer.broker.store.sqlite import SqliteStore

pytestmark = pytest.mark.anyio


class CountedCommits:
    """The store's real connection, counting the COMMITs it is asked for."""

    def __init__(self, store: SqliteStore) -> None:
        self.commits = 0
        self._db = store._db
        self._execute = self._db.execute

        async def execute(sql: str, *args: Any) -> Any:
            if sql == "COMMIT":
                self.commits += 1
            return await self._execute(sql, *args)

        self._db.execute = execute  # type: ignore[method-assign,assignment]


async def _put(store: SqliteStore, key: str, *, fail: bool = False) -> None:
    async with store.write() as db:
        await db.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, "v"))
        await anyio.sleep(0.02)  # the others queue up meanwhile
        if fail:
            raise ValueError("this write fails")


class Commits(Recorder):
    """What the store reports of its writes and commits."""

    def __init__(self) -> None:
        self.written: list[float] = []
        self.committed: list[tuple[float, int]] = []

    def store_written(self, seconds: float) -> None:
        self.written.append(seconds)

    def store_committed(self, seconds: float, writes: int) -> None:
        self.committed.append((seconds, writes))


async def test_each_write_and_each_group_commit_is_reported(short_dir: Path) -> None:
    reported = Commits()
    store = await SqliteStore.open(short_dir / "s.db", recorder=reported)
    async with anyio.create_task_group() as tg:
        for i in range(8):
            tg.start_soon(_put, store, f"k{i}")
    await store.close()
    assert len(reported.written) == 8
    assert sum(writes for _, writes in reported.committed) == 8  # every write, once
    assert max(writes for _, writes in reported.committed) > 1  # a group shared a commit
    assert all(seconds >= 0 for seconds, _ in reported.committed)


async def test_writes_that_queue_share_one_commit(short_dir: Path) -> None:
    """... and none returns before that commit has run (a write acknowledged to a client
    must survive a SIGKILL)."""
    store = await SqliteStore.open(short_dir / "s.db")
    counted = CountedCommits(store)
    seen_at_return: list[int] = []

    async def put(key: str) -> None:
        await _put(store, key)
        seen_at_return.append(counted.commits)

    async with anyio.create_task_group() as tg:
        for i in range(8):
            tg.start_soon(put, f"k{i}")
    assert counted.commits < 8  # without groups: 8
    assert min(seen_at_return) >= 1
    assert len(await store.read("SELECT key FROM meta WHERE key LIKE 'k%'")) == 8
    await store.close()
    with sqlite3.connect(short_dir / "s.db") as db:  # on disk, from another connection
        assert db.execute("SELECT count(*) FROM meta WHERE key LIKE 'k%'").fetchone()[0] == 8


async def test_a_failed_write_in_a_group_rolls_back_alone(short_dir: Path) -> None:
    store = await SqliteStore.open(short_dir / "s.db")
    failed: list[str] = []

    async def put(key: str, fail: bool) -> None:
        try:
            await _put(store, key, fail=fail)
        except ValueError:
            failed.append(key)

    async with anyio.create_task_group() as tg:
        for i in range(5):
            tg.start_soon(put, f"k{i}", i in (0, 2, 4))  # the first, a middle and the last
    assert sorted(failed) == ["k0", "k2", "k4"]
    keys = [r[0] for r in await store.read("SELECT key FROM meta WHERE key LIKE 'k%'")]
    assert sorted(keys) == ["k1", "k3"]
    await store.close()


async def test_a_failed_commit_fails_every_write_of_the_group(short_dir: Path) -> None:
    """No write of a group is acknowledged unless the group's COMMIT succeeds. (The
    broker's schema has no deferred constraint: its COMMITs fail only as a disk does, and
    that fails every write anyway; here one is made, to fail a COMMIT on purpose.)"""
    store = await SqliteStore.open(short_dir / "s.db")
    async with store.write() as db:
        await db.execute("CREATE TABLE child (id INTEGER PRIMARY KEY, parent TEXT "
                         "REFERENCES meta(key) DEFERRABLE INITIALLY DEFERRED)")
    results: list[str] = []

    async def write(sql: str, params: tuple[str, ...]) -> None:
        try:
            async with store.write() as db:
                await db.execute(sql, params)
                await anyio.sleep(0.02)
            results.append("ok")
        except BrokerError:
            results.append("failed")

    async with anyio.create_task_group() as tg:
        tg.start_soon(write, "INSERT INTO child (parent) VALUES (?)", ("nobody",))
        await anyio.sleep(0.005)  # the orphan's write holds the lock; these queue
        for i in range(3):
            tg.start_soon(write, "INSERT INTO meta (key, value) VALUES (?, 'v')", (f"g{i}",))
    assert results == ["failed"] * 4
    assert await store.read("SELECT key FROM meta WHERE key LIKE 'g%'") == []
    async with store.write() as db:  # the store goes on working
        await db.execute("INSERT INTO meta (key, value) VALUES ('after', 'v')")
    assert await store.read_one("SELECT value FROM meta WHERE key = 'after'") == "v"
    await store.close()
