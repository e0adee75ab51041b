"""Environment history over each backend: versions written, pruned and read back through
the domain's Environments, and a store from the previous schema version migrated."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable

import pytest

from stigmer.broker.environments import Environments, Retention
from stigmer.broker.protocol import EnvironmentSpec, Variable
from stigmer.broker.protocol.errors import NotFound
from stigmer.broker.store.backend import Store
from stigmer.broker.store.keys import EnvKey, MasterKey, encode_key
from stigmer.broker.store.postgres import MIGRATIONS as PG_MIGRATIONS
from stigmer.broker.store.sqlite import MIGRATIONS as SQLITE_MIGRATIONS
from stigmer.broker.store.vault import Vault

pytestmark = pytest.mark.anyio

#: the schema version before environment history, on each backend
_BEFORE_HISTORY = {"sqlite": len(SQLITE_MIGRATIONS) - 1, "postgresql": len(PG_MIGRATIONS) - 1}


async def _environments(store: Store, retention: Retention | None = None) -> Environments:
    key = os.urandom(32)
    vault = await Vault.unlock(store, MasterKey(key, EnvKey(encode_key(key))))
    return Environments(store, vault, retention)


def _values(data: dict[str, Variable]) -> dict[str, str]:
    return {key: var.value for key, var in data.items()}


@pytest.fixture
async def environments(store: Store) -> Environments:
    return await _environments(store, Retention(versions=3))


async def test_each_change_is_a_version_and_a_rollback_a_new_one(
        environments: Environments) -> None:
    await environments.put("app", {"A": Variable(value="1"),
                                   "S": Variable(value="first", is_secret=True)}, actor_uid=7)
    await environments.put("app", {"S": Variable(value="second", is_secret=True)},
                           actor_uid=8)
    await environments.put("app", {"S": Variable(value="second", is_secret=True)})  # no-op
    await environments.unset("app", ["A"], actor_uid=9)
    current, versions, more = await environments.history("app")
    assert (current, more) == (3, False)
    assert [(v.version, v.actor_uid, v.added, v.changed, v.removed) for v in versions] == [
        (3, 9, [], [], ["A"]), (2, 8, [], ["S"], []), (1, 7, ["A", "S"], [], [])]
    info = await environments.rollback("app", 1, actor_uid=10)
    assert (info.version, info.restored_from, info.added, info.changed) == (4, 1, ["A"], ["S"])
    assert _values((await environments.resolve("app"))[0]) == {"A": "1", "S": "first"}
    assert (await environments.resolve("app"))[1] == 4
    _, views = await environments.version("app", 2, reveal=False)
    assert views["S"].value is None and views["A"].value == "1"
    diff = await environments.diff("app", 2, 3, reveal=True)
    assert [(d.key, d.change, d.before and d.before.value) for d in diff] == [
        ("A", "removed", "1")]


async def test_the_count_retention_prunes_but_keeps_the_current_version(
        environments: Environments) -> None:
    for n in range(6):
        await environments.put("app", {"N": Variable(value=str(n))})
    current, versions, _ = await environments.history("app")
    assert current == 6
    assert [v.version for v in versions] == [6, 5, 4]
    with pytest.raises(NotFound, match="no version 3"):
        await environments.version("app", 3, reveal=True)
    await environments.apply([EnvironmentSpec(name="app", data={"N": Variable(value="x")})])
    assert [v.version for v in (await environments.history("app"))[1]] == [7, 6, 5]


async def test_a_duration_retention_keeps_the_current_version(store: Store) -> None:
    environments = await _environments(store, Retention(versions=None, seconds=3600.0))
    for n in range(3):
        await environments.put("app", {"N": Variable(value=str(n))})
    async with store.write() as db:  # made two hours ago, as far as the store knows
        await db.execute("UPDATE environment_versions SET created_at = created_at - 7200")
    # (the rows no longer check; pruning reads none of them, it deletes by age)
    assert await environments.prune_history() == 2
    rows = await store.read("SELECT version FROM environment_versions")
    assert rows == [(3,)]


async def test_deleting_an_environment_deletes_its_versions(
        environments: Environments, store: Store) -> None:
    await environments.put("app", {"A": Variable(value="1")})
    await environments.delete("app")
    assert await store.read("SELECT count(*) FROM environment_versions") == [(0,)]


async def test_a_store_from_before_history_migrates_and_starts_it_at_the_next_change(
        backend: str, older_store: Callable[[int], Awaitable[Store]]) -> None:
    store = await older_store(_BEFORE_HISTORY[backend])
    environments = await _environments(store)
    await environments.authenticate_unchecked()  # the fixture's row carries no MAC
    assert (await environments.resolve("old"))[1] == 1  # what it holds is version 1
    assert (await environments.history("old"))[1] == []
    await environments.put("old", {"A": Variable(value="1")}, actor_uid=5)
    current, versions, _ = await environments.history("old")
    assert current == 2
    assert [(v.version, v.actor_uid, v.added) for v in versions] == [(2, 5, ["A"]),
                                                                     (1, None, [])]
    assert await store.read("SELECT environments FROM contexts") == []
