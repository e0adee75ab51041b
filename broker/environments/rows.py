"""The rows of environments, their variables and their versions: every statement on them.

Nothing here seals, opens or decides: :mod:`.service` does, and hands this module
the rows and MACs to write. Reads that must agree with one another (an
environment and its variables) are one query, since two could straddle a change
and look like tampering.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..store.backend import Store, Tx

__all__ = ["EnvironmentRows", "VARIABLE_COLUMNS", "VERSION_COLUMNS"]

#: the columns of a variable row, in the order every read here returns them
VARIABLE_COLUMNS = "name, is_secret, value, sealed, mac"
#: the columns of a version row, in the order every read here returns them
VERSION_COLUMNS = "version, created_at, actor_uid, changes, restored_from, sealed, mac"


class EnvironmentRows:
    """The environment and variable rows of one store."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def count(self) -> int:
        return int(await self._store.read_one("SELECT count(*) FROM environments") or 0)

    async def read(self, name: str) -> list[Any]:
        """``name``'s row joined with its variable rows, by variable name: (id, created_at,
        updated_at, mac, current version, *VARIABLE_COLUMNS), the version NULL before one
        was kept and the variable columns NULL when it has none; no rows when it does not
        exist."""
        return await self._store.read(
            "SELECT e.id, e.created_at, e.updated_at, e.mac, (SELECT max(h.version) FROM "
            "environment_versions h WHERE h.env_id = e.id), v.name, v.is_secret, v.value, "
            "v.sealed, v.mac FROM environments e LEFT JOIN variables v ON v.env_id = e.id "
            "WHERE e.name = ? ORDER BY v.name", (name,))

    async def versions(self, env_id: int, before: int | None, limit: int) -> list[Any]:
        """Up to ``limit`` versions of an environment, newest first, older than ``before``
        (all without): :data:`VERSION_COLUMNS`."""
        return await self._store.read(
            f"SELECT {VERSION_COLUMNS} FROM environment_versions WHERE env_id = ? AND "
            "version < ? ORDER BY version DESC LIMIT ?",
            (env_id, before if before is not None else 2**63 - 1, limit))

    async def version(self, env_id: int, version: int) -> list[Any]:
        """One version of an environment (:data:`VERSION_COLUMNS`); no rows without it."""
        return await self._store.read(
            f"SELECT {VERSION_COLUMNS} FROM environment_versions WHERE env_id = ? AND "
            "version = ?", (env_id, version))

    async def prune_versions_before(self, cutoff: float) -> int:
        """Delete every version made before ``cutoff`` that is not its environment's
        current one; return how many."""
        async with self._store.write() as db:
            gone = await db.fetchall(
                "DELETE FROM environment_versions WHERE created_at < ? AND version < (SELECT "
                "max(h.version) FROM environment_versions h WHERE h.env_id = "
                "environment_versions.env_id) RETURNING version", (cutoff,))
        return len(gone)

    async def page(self, after: str, limit: int) -> list[Any]:
        """Up to ``limit`` environments named after ``after``, in name order, each joined
        with its variables' names and flags: (id, name, mac, updated_at, key, is_secret)."""
        return await self._store.read(
            "SELECT e.id, e.name, e.mac, e.updated_at, v.name, v.is_secret FROM (SELECT id, "
            "name, mac, updated_at FROM environments WHERE name > ? ORDER BY name LIMIT ?) e "
            "LEFT JOIN variables v ON v.env_id = e.id ORDER BY e.name", (after, limit))

    # ------------------------------------------------------------ inside a write

    @staticmethod
    async def find(db: Tx, name: str) -> tuple[int, bytes | None] | None:
        """The id and MAC of ``name``; None when it does not exist."""
        rows = await db.fetchall("SELECT id, mac FROM environments WHERE name = ?", (name,))
        return (int(rows[0][0]), rows[0][1]) if rows else None

    @staticmethod
    async def upsert(db: Tx, name: str, now: float) -> int:
        """The id of ``name``, its row created if missing (else its time updated)."""
        await db.execute(
            "INSERT INTO environments(name, created_at, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT(name) DO UPDATE SET updated_at = excluded.updated_at", (name, now, now))
        rows = await db.fetchall("SELECT id FROM environments WHERE name = ?", (name,))
        return int(rows[0][0])

    @staticmethod
    async def variables(db: Tx, env_id: int) -> list[Any]:
        """The variable rows of an environment (:data:`VARIABLE_COLUMNS`)."""
        return await db.fetchall(
            f"SELECT {VARIABLE_COLUMNS} FROM variables WHERE env_id = ?", (env_id,))

    @staticmethod
    async def present(db: Tx, env_id: int, keys: list[str]) -> set[str]:
        """Which of ``keys`` the environment has."""
        marks = ",".join("?" * len(keys))
        return {row[0] for row in await db.fetchall(
            f"SELECT name FROM variables WHERE env_id = ? AND name IN ({marks})",
            (env_id, *keys))}

    @staticmethod
    async def write_variable(db: Tx, env_id: int, key: str, is_secret: bool,
                             value: str | None, sealed: bytes | None, mac: bytes) -> None:
        await db.execute(
            "INSERT INTO variables(env_id, name, is_secret, value, sealed, mac) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(env_id, name) DO UPDATE SET "
            "is_secret = excluded.is_secret, value = excluded.value, "
            "sealed = excluded.sealed, mac = excluded.mac",
            (env_id, key, int(is_secret), value, sealed, mac))

    @staticmethod
    async def remove_variables(db: Tx, env_id: int, keys: Iterable[str] | None = None) -> None:
        """Delete the named variables of an environment (all of them without ``keys``)."""
        if keys is None:
            await db.execute("DELETE FROM variables WHERE env_id = ?", (env_id,))
            return
        wanted = list(keys)
        marks = ",".join("?" * len(wanted))
        await db.execute(f"DELETE FROM variables WHERE env_id = ? AND name IN ({marks})",
                         (env_id, *wanted))

    @staticmethod
    async def delete(db: Tx, env_id: int) -> None:
        """Delete an environment, its variables and its versions."""
        await db.execute("DELETE FROM environment_versions WHERE env_id = ?", (env_id,))
        await db.execute("DELETE FROM variables WHERE env_id = ?", (env_id,))
        await db.execute("DELETE FROM environments WHERE id = ?", (env_id,))

    @staticmethod
    async def latest_version(db: Tx, env_id: int) -> int | None:
        """The number of an environment's current version; None before one was kept."""
        rows = await db.fetchall(
            "SELECT max(version) FROM environment_versions WHERE env_id = ?", (env_id,))
        return int(rows[0][0]) if rows and rows[0][0] is not None else None

    @staticmethod
    async def version_in(db: Tx, env_id: int, version: int) -> list[Any]:
        """One version of an environment (:data:`VERSION_COLUMNS`), inside a write."""
        return await db.fetchall(
            f"SELECT {VERSION_COLUMNS} FROM environment_versions WHERE env_id = ? AND "
            "version = ?", (env_id, version))

    @staticmethod
    async def insert_version(db: Tx, env_id: int, version: int, created_at: float,
                             actor_uid: int | None, changes: str, restored_from: int | None,
                             sealed: bytes, mac: bytes) -> None:
        await db.execute(
            "INSERT INTO environment_versions(env_id, version, created_at, actor_uid, "
            "changes, restored_from, sealed, mac) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (env_id, version, created_at, actor_uid, changes, restored_from, sealed, mac))

    @staticmethod
    async def prune_versions(db: Tx, env_id: int, *, through: int | None,
                             made_before: float | None, current: int) -> None:
        """Delete an environment's versions numbered up to ``through`` or made before
        ``made_before``; never the ``current`` one."""
        if through is not None:
            await db.execute("DELETE FROM environment_versions WHERE env_id = ? AND "
                             "version <= ? AND version < ?", (env_id, through, current))
        if made_before is not None:
            await db.execute("DELETE FROM environment_versions WHERE env_id = ? AND "
                             "created_at < ? AND version < ?", (env_id, made_before, current))

    @staticmethod
    async def touch(db: Tx, env_id: int, now: float) -> None:
        await db.execute("UPDATE environments SET updated_at = ? WHERE id = ?", (now, env_id))

    @staticmethod
    async def set_mac(db: Tx, env_id: int, mac: bytes) -> None:
        await db.execute("UPDATE environments SET mac = ? WHERE id = ?", (mac, env_id))

    @staticmethod
    async def set_variable_mac(db: Tx, env_id: int, key: str, mac: bytes) -> None:
        await db.execute("UPDATE variables SET mac = ? WHERE env_id = ? AND name = ?",
                         (mac, env_id, key))

    @staticmethod
    async def unauthenticated(db: Tx) -> tuple[list[Any], list[Any]]:
        """The environment rows (id, name) and variable rows (env_id, *VARIABLE_COLUMNS)
        without a MAC: those of a store from before rows carried MACs."""
        envs = await db.fetchall("SELECT id, name FROM environments WHERE mac IS NULL")
        variables = await db.fetchall(
            f"SELECT env_id, {VARIABLE_COLUMNS} FROM variables WHERE mac IS NULL")
        return envs, variables
