"""The store contract's fixture: one opened store per backend, through the interface only."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from stigmer.broker.store.backend import Store, open_store


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, short_dir: Path) -> AsyncIterator[Store]:
    """An opened, migrated store: an SQLite file in a temporary directory, or PostgreSQL in
    a fresh schema of the run's database (tests/conftest.py's ``store_url``)."""
    url: str | None = None
    if request.param == "postgresql":
        url = request.getfixturevalue("store_url")
    opened = await open_store(url, short_dir / "store.db")
    try:
        yield opened
    finally:
        await opened.close()
