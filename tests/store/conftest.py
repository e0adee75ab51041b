"""The store contract's fixtures: stores of each backend, reached through the interface
only once made (an older schema is made the way that version's broker made it)."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest
from postgres import Server

from stigmer.broker.store.backend import Store, open_store
from stigmer.broker.store.postgres import MIGRATIONS as PG_MIGRATIONS
from stigmer.broker.store.sqlite import MIGRATIONS as SQLITE_MIGRATIONS

#: a row the older store holds when it is migrated (every version has the table)
_OLD_ROW = "INSERT INTO environments(name, created_at, updated_at) VALUES ('old', 0, 0)"

#: opens a store made at schema version ``n`` (see ``older_store``)
OlderStore = Callable[[int], Awaitable[Store]]


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
async def store(backend: str, request: pytest.FixtureRequest,
                short_dir: Path) -> AsyncIterator[Store]:
    """An opened, migrated store: an SQLite file in a temporary directory, or PostgreSQL in
    a fresh schema of the run's database (tests/conftest.py's ``store_url``)."""
    url = request.getfixturevalue("store_url") if backend == "postgresql" else None
    opened = await open_store(url, short_dir / "store.db")
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
def migrations(backend: str) -> tuple[str, ...]:
    """The backend's schema history."""
    return SQLITE_MIGRATIONS if backend == "sqlite" else PG_MIGRATIONS


@pytest.fixture
async def older_store(backend: str, request: pytest.FixtureRequest,
                      short_dir: Path) -> AsyncIterator[OlderStore]:
    """Make a store at schema version ``n`` (as that version's broker left it, holding one
    environment, ``old``), then open it with this broker's :func:`open_store`, which
    migrates it."""
    opened: list[Store] = []
    schemas: list[str] = []
    server: Server | None = request.getfixturevalue("postgres") \
        if backend == "postgresql" else None

    async def make(version: int) -> Store:
        path = short_dir / f"v{version}.db"
        url: str | None = None
        if server is None:
            with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
                for number, script in enumerate(SQLITE_MIGRATIONS[:version], start=1):
                    db.executescript(f"BEGIN;\n{script}\nPRAGMA user_version = {number};\n"
                                     "COMMIT;")
                db.execute(_OLD_ROW)
        else:
            schemas.append(server.new_schema())
            url = server.url(search_path=schemas[-1])
            conn = await asyncpg.connect(url)
            try:
                await conn.execute("CREATE TABLE stigmer_schema (version BIGINT PRIMARY KEY, "
                                   "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
                for number, script in enumerate(PG_MIGRATIONS[:version], start=1):
                    await conn.execute(script)
                    await conn.execute("INSERT INTO stigmer_schema(version) VALUES ($1)",
                                       number)
                await conn.execute(_OLD_ROW)
            finally:
                await conn.close()
        opened.append(await open_store(url, path))
        return opened[-1]

    try:
        yield make
    finally:
        for store in opened:
            await store.close()
        for schema in schemas:
            assert server is not None
            server.drop_schema(schema)
