"""The store with its key: environments at rest, tampering, interrupted rotations."""

from __future__ import annotations

import os
import random
import sqlite3
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sealed import Sealed, open_sealed

from stigmer.broker.protocol import EnvironmentSpec, Variable
from stigmer.broker.protocol.errors import Internal, NotFound, StartupError
from stigmer.broker.store import vault as vault_module
from stigmer.broker.store.keys import KeyFile

pytestmark = pytest.mark.anyio
SENTINEL = "SENTINEL-7f3a9c-secret"


async def open_vault(home: Path, env_key: str | None = None) -> Sealed:
    return await open_sealed(home / "local.db", env_key=env_key)


@pytest.fixture
async def vault(short_dir: Path) -> AsyncIterator[Sealed]:
    v = await open_vault(short_dir)
    yield v
    await v.close()


def secret(value: str) -> Variable:
    return Variable(value=value, is_secret=True)


async def test_round_trip_and_restart(short_dir: Path) -> None:
    v = await open_vault(short_dir)
    envs = v.environments()
    await envs.put("dev", {"A": Variable(value="1"), "S": secret(SENTINEL)})
    await v.close()
    v = await open_vault(short_dir)
    try:
        got = await v.environments().get("dev", reveal=True)
        assert got.data["S"].value == SENTINEL
        assert got.data["A"].value == "1"
        masked = await v.environments().get("dev", reveal=False)
        assert masked.data["S"].value is None
    finally:
        await v.close()


async def test_files_are_private_under_umask_000(short_dir: Path) -> None:
    old = os.umask(0)
    try:
        v = await open_vault(short_dir / "h")
        await v.environments().put("e", {"S": secret("x")})
        names = sorted(p.name for p in (short_dir / "h").iterdir())
        modes = {p.name: stat.S_IMODE(os.stat(p).st_mode) for p in (short_dir / "h").iterdir()}
        await v.close()
    finally:
        os.umask(old)
    assert "local.db-wal" in names
    assert all(mode == 0o600 for mode in modes.values()), modes


async def test_no_plaintext_secret_on_disk(short_dir: Path, vault: Sealed) -> None:
    envs = vault.environments()
    await envs.put("dev", {"S": secret(SENTINEL)})
    await envs.put("dev", {"T": secret(SENTINEL + "-2")})
    for path in short_dir.iterdir():
        assert SENTINEL.encode() not in path.read_bytes(), path


async def test_deleted_secret_leaves_the_files_after_checkpoint(short_dir: Path) -> None:
    vault = await open_vault(short_dir)
    envs = vault.environments()
    await envs.put("dev", {"S": Variable(value="PLAIN-SENTINEL-VALUE")})
    await envs.delete("dev")
    await vault.close()  # closing checkpoints the WAL into the database file
    for path in short_dir.iterdir():
        assert b"PLAIN-SENTINEL-VALUE" not in path.read_bytes(), path


def _db(short_dir: Path) -> sqlite3.Connection:
    return sqlite3.connect(short_dir / "local.db", isolation_level=None)


@pytest.mark.parametrize("attack", ["swap_variables", "swap_environments", "flip", "truncate"])
async def test_tampered_rows_fail_alone(short_dir: Path, attack: str) -> None:
    v = await open_vault(short_dir)
    envs = v.environments()
    await envs.put("a", {"S1": secret("a-one"), "S2": secret("a-two")})
    await envs.put("b", {"S1": secret("b-one")})
    await envs.put("c", {"S1": secret("c-one")})
    await v.close()
    with _db(short_dir) as db:
        rows = {(e, n): s for e, n, s in db.execute(
            "SELECT e.name, v.name, v.sealed FROM variables v JOIN environments e "
            "ON e.id = v.env_id")}
        def put(env: str, var: str, blob: bytes) -> None:
            db.execute("UPDATE variables SET sealed = ? WHERE name = ? AND env_id = "
                       "(SELECT id FROM environments WHERE name = ?)", (blob, var, env))
        if attack == "swap_variables":
            put("a", "S1", rows[("a", "S2")])
        elif attack == "swap_environments":
            put("a", "S1", rows[("b", "S1")])
        elif attack == "flip":
            blob = bytearray(rows[("a", "S1")])
            blob[-5] ^= 1
            put("a", "S1", bytes(blob))
        else:
            put("a", "S1", rows[("a", "S1")][:10])
    v = await open_vault(short_dir)
    try:
        envs = v.environments()
        # the envelope is covered by the variable's MAC, so the row is refused before it
        # is opened, named, and without its value
        with pytest.raises(Internal, match="S1 of environment 'a' failed its integrity") as e:
            await envs.get("a", reveal=True)
        assert "a-one" not in str(e.value)
        assert "b-one" not in str(e.value)
        with pytest.raises(Internal, match="S1 of environment 'a' failed its integrity"):
            await envs.get("a", reveal=False)
        assert (await envs.get("b", reveal=True)).data["S1"].value == "b-one"
        assert (await envs.get("c", reveal=True)).data["S1"].value == "c-one"
    finally:
        await v.close()


async def test_tampered_data_key_refuses_start(short_dir: Path) -> None:
    v = await open_vault(short_dir)
    await v.close()
    with _db(short_dir) as db:
        db.execute("UPDATE data_keys SET wrapped = substr(wrapped, 1, 20)")
    with pytest.raises(StartupError, match="tampered with or damaged"):
        await open_vault(short_dir)


async def test_apply_is_all_or_nothing_and_replaces(vault: Sealed) -> None:
    envs = vault.environments()
    await envs.put("x", {"OLD": Variable(value="1")})
    await envs.apply([EnvironmentSpec(name="x", data={"NEW": secret("n")}),
                      EnvironmentSpec(name="y", data={})])
    assert set((await envs.get("x", reveal=False)).data) == {"NEW"}
    assert [e.name for e in (await envs.list())[0]] == ["x", "y"]


async def test_unset_missing_key_changes_nothing(vault: Sealed) -> None:
    envs = vault.environments()
    await envs.put("x", {"A": Variable(value="1"), "B": Variable(value="2")})
    with pytest.raises(NotFound, match="C"):
        await envs.unset("x", ["A", "C"])
    assert set((await envs.get("x", reveal=False)).data) == {"A", "B"}


async def test_wrong_key_refused_before_rows(short_dir: Path) -> None:
    v = await open_vault(short_dir)
    await v.environments().put("e", {"S": secret("x")})
    await v.close()
    (short_dir / "master.key").unlink()
    KeyFile(short_dir / "master.key").write_now(os.urandom(32))
    with pytest.raises(StartupError, match="does not open the store"):
        await open_vault(short_dir)


async def test_rotation_round_trip(short_dir: Path) -> None:
    v = await open_vault(short_dir)
    await v.environments().put("e", {"S": secret("keep-me")})
    old_id = v.vault.key_id
    result = await v.rotate()
    assert result.key_id != old_id
    assert result.rewrapped == 1
    await v.close()
    v = await open_vault(short_dir)
    try:
        assert v.vault.key_id == result.key_id
        assert (await v.environments().get("e", reveal=True)).data["S"].value == "keep-me"
    finally:
        await v.close()


async def test_the_key_says_when_it_was_made_and_a_rotation_renews_it(
        short_dir: Path) -> None:
    """status and the metrics show the key's age: set when a store (and its key) is made
    and when a rotation completes; unknown for a store whose broker did not record it."""
    before = time.time()
    v = await open_vault(short_dir)
    made = v.vault.key_made_at
    assert made is not None and before - 1 <= made <= time.time()
    await v.close()
    v = await open_vault(short_dir)
    assert v.vault.key_made_at == pytest.approx(made, abs=0.01)  # kept in the store
    await v.rotate()
    assert v.vault.key_made_at is not None and v.vault.key_made_at >= made
    await v.close()
    with sqlite3.connect(short_dir / "local.db") as db:  # as a broker before it wrote it
        db.execute("DELETE FROM meta WHERE key = 'master_key_made_at'")
    v = await open_vault(short_dir)
    try:
        assert v.vault.key_made_at is None
    finally:
        await v.close()


async def test_rotation_names_each_sealed_row_that_does_not_open(
        short_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Before the new key is stored, every envelope is opened with it: one that did not
    open before either is named (table, row, name) and does not stop the rotation."""
    v = await open_vault(short_dir)
    await v.environments().put("e", {"S": secret("keep-me")})
    await v.environments().put("d", {"T": secret("damaged")})
    await v.close()
    with _db(short_dir) as db:
        db.execute("UPDATE variables SET sealed = X'00' WHERE name = 'T'")
        db.execute("INSERT INTO contexts(execution_id, sealed, keys, created_at, expires_at) "
                   "VALUES ('exec-1', X'00', '', 0, 0)")
        env_id, context_id = db.execute(
            "SELECT (SELECT id FROM environments WHERE name = 'd'), (SELECT id FROM contexts)"
        ).fetchone()
    v = await open_vault(short_dir)
    try:
        await v.rotate()
        assert (await v.environments().get("e", reveal=True)).data["S"].value == "keep-me"
    finally:
        await v.close()
    warned = [r.getMessage() for r in caplog.records if "does not open" in r.getMessage()]
    assert sorted(warned) == [
        f"a sealed contexts row does not open ({context_id}, exec-1); it was unreadable "
        "before the rotation too",
        f"a sealed variables row does not open ({env_id}, T); it was unreadable before the "
        "rotation too"]


class Boom(Exception):
    pass


@pytest.mark.parametrize("step", ["before_store", "after_store"])
async def test_rotation_interrupted_then_rerun(short_dir: Path, step: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    v = await open_vault(short_dir)
    await v.environments().put("e", {"S": secret("keep-me")})
    if step == "before_store":
        async def fail_store(*args: object) -> None:
            raise Boom()
        monkeypatch.setattr(KeyFile, "write", fail_store)
    else:
        async def fail_finish(*args: object) -> None:
            raise Boom()
        monkeypatch.setattr(vault_module, "_finish_rotation", fail_finish)
    with pytest.raises(Boom):
        await v.rotate()
    await v.close()
    monkeypatch.undo()
    v = await open_vault(short_dir)  # reopens with whichever key the file now holds
    try:
        assert (await v.environments().get("e", reveal=True)).data["S"].value == "keep-me"
        assert await v.store.meta("pending_master_key_id") is None
        await v.rotate()
        assert (await v.environments().get("e", reveal=True)).data["S"].value == "keep-me"
    finally:
        await v.close()


async def test_env_key_rotation_explains_what_to_do(short_dir: Path) -> None:
    import base64

    from stigmer.broker.protocol.errors import FailedPrecondition

    v = await open_vault(short_dir, base64.b64encode(os.urandom(32)).decode())
    try:
        with pytest.raises(FailedPrecondition, match="To rotate"):
            await v.rotate()
    finally:
        await v.close()


async def test_concurrent_rotations_are_refused_not_interleaved(short_dir: Path) -> None:
    import anyio

    from stigmer.broker.protocol.errors import FailedPrecondition

    v = await open_vault(short_dir)
    await v.environments().put("e", {"S": secret("keep-me")})
    outcomes: list[str] = []

    async def rotate() -> None:
        try:
            await v.rotate()
            outcomes.append("rotated")
        except FailedPrecondition:
            outcomes.append("refused")

    async with anyio.create_task_group() as tg:
        tg.start_soon(rotate)
        tg.start_soon(rotate)
    await v.close()
    assert sorted(outcomes) == ["refused", "rotated"]
    v = await open_vault(short_dir)
    try:
        assert (await v.environments().get("e", reveal=True)).data["S"].value == "keep-me"
    finally:
        await v.close()


async def test_an_environment_too_big_for_a_reply_is_refused_whole(vault: Sealed) -> None:
    from stigmer.broker.environments import MAX_ENVIRONMENT_BYTES
    from stigmer.broker.protocol.errors import ResourceExhausted

    envs = vault.environments()
    chunk = {f"K{i}": Variable(value="x" * 100_000) for i in range(4)}
    await envs.put("big", chunk)
    more = {f"M{i}": secret("y" * 100_000) for i in range(2)}
    with pytest.raises(ResourceExhausted, match=str(MAX_ENVIRONMENT_BYTES)):
        await envs.put("big", more)
    assert set((await envs.get("big", reveal=False)).data) == set(chunk)  # nothing changed


async def test_a_failed_start_writes_no_key_id(short_dir: Path) -> None:
    import base64
    import sqlite3

    v = await open_vault(short_dir)
    await v.environments().put("e", {"S": secret("x")})
    await v.close()
    with sqlite3.connect(short_dir / "local.db") as db:  # the key check value is lost
        db.execute("DELETE FROM meta WHERE key = 'master_key_id'")
    key_file = short_dir / "master.key"
    right = key_file.read_bytes()
    key_file.unlink()  # the wrong key is the only one offered
    wrong = base64.b64encode(os.urandom(32)).decode()
    with pytest.raises(StartupError):
        await open_vault(short_dir, env_key=wrong)
    key_file.write_bytes(right)
    key_file.chmod(0o600)
    with sqlite3.connect(short_dir / "local.db") as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'master_key_id'").fetchall() == []
    v = await open_vault(short_dir)  # the right key still opens it, and is recorded
    try:
        assert (await v.environments().get("e", reveal=True)).data["S"].value == "x"
        assert await v.store.meta("master_key_id") == v.vault.key_id
    finally:
        await v.close()


async def test_a_damaged_store_file_is_one_clear_error(short_dir: Path) -> None:
    """Bytes flipped anywhere in the file: the store opens (the rows' MACs catch damage to
    values) or refuses with a StoreError, never another exception, e.g. the
    UnicodeDecodeError that a quick_check report in damaged text used to raise."""
    from stigmer.broker.store.backend import StoreError
    from stigmer.broker.store.sqlite import SqliteStore

    v = await open_vault(short_dir)
    await v.environments().apply([EnvironmentSpec(name=f"env-{i}-ü", data={
        "K": Variable(value=f"välue-{i}")}) for i in range(200)])
    await v.close()
    pristine = (short_dir / "local.db").read_bytes()
    damaged = short_dir / "damaged.db"
    refused, messages = 0, []
    for seed in range(120):
        rng = random.Random(seed)
        data = bytearray(pristine)
        for _ in range(rng.choice((1, 5, 20))):
            data[rng.randrange(100, len(data))] = rng.choice((0xFF, 0xFE, 0xC3,
                                                              rng.randrange(256)))
        damaged.write_bytes(bytes(data))
        try:
            store = await SqliteStore.open(damaged)
        except StoreError as exc:
            refused += 1
            messages.append(str(exc))
        else:
            await store.close()
        for suffix in ("-wal", "-shm"):
            damaged.with_name(damaged.name + suffix).unlink(missing_ok=True)
    assert refused > 10
    assert not [m for m in messages if "\n" in m]
