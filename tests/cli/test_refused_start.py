"""A start that is refused leaves the store as it was, byte for byte: everything it may be
refused on (the key sources, whether the key opens the store, a replaced store) is
checked before the store is opened for writing, which migrates and writes it."""

from __future__ import annotations

import base64
import os
import sqlite3

import anyio
from conftest import cli_env, run_cli
from postgres import psql
from sealed import open_sealed

from stigmer.broker.config import Paths
from stigmer.broker.store.crypto import new_key

Files = dict[str, bytes | None]


def store_files(paths: Paths) -> Files:
    """The store's bytes and its WAL and shared-memory files' (None: absent)."""
    out: Files = {}
    for suffix in ("", "-wal", "-shm"):
        path = paths.store.with_name(paths.store.name + suffix)
        out[path.name] = path.read_bytes() if path.exists() else None
    return out


def make_store(paths: Paths) -> Files:
    """A store with a secret in it and its key in the key file, closed as a stop leaves it."""
    async def fill() -> None:
        paths.home.mkdir(mode=0o700, exist_ok=True)
        sealed = await open_sealed(paths.store, key_file=paths.key_file)
        try:
            from stigmer.broker.protocol import Variable

            await sealed.environments().put("prod", {"API_KEY": Variable(
                value="s3cr3t", is_secret=True)})
        finally:
            await sealed.close()

    anyio.run(fill)
    files = store_files(paths)
    assert files["local.db"] and files["local.db-wal"] is None  # a clean stop's state
    return files


def refused_serve(paths: Paths, message: str, **env: str) -> None:
    result = run_cli(paths, "serve", env=cli_env(paths, **env), timeout=60)
    assert result.returncode == 1, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr


def other_key() -> str:
    return base64.b64encode(new_key()).decode()


def test_a_key_file_others_can_read_refuses_the_start_before_the_store_is_touched(
        paths: Paths) -> None:
    before = make_store(paths)
    os.chmod(paths.key_file, 0o644)
    refused_serve(paths, "mode 0644 lets others read it")
    assert store_files(paths) == before


def test_a_wrong_key_refuses_the_start_before_the_store_is_touched(paths: Paths) -> None:
    before = make_store(paths)
    paths.key_file.unlink()
    refused_serve(paths, "does not open the store", STIGMER_ENCRYPTION_KEY=other_key())
    assert store_files(paths) == before


def test_an_old_store_is_not_migrated_for_a_wrong_key(paths: Paths) -> None:
    make_store(paths)
    with sqlite3.connect(paths.store) as db:  # back to schema 3, as an older broker left it
        db.execute("ALTER TABLE tokens DROP COLUMN runners")
        db.execute("PRAGMA user_version = 3")
    db.close()
    before = store_files(paths)
    paths.key_file.unlink()
    refused_serve(paths, "does not open the store", STIGMER_ENCRYPTION_KEY=other_key())
    assert store_files(paths) == before
    with sqlite3.connect(paths.store) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 3
    db.close()


def test_a_data_key_that_does_not_open_refuses_the_start_before_the_store_is_touched(
        paths: Paths) -> None:
    """The key's id is the store's, but its data key was replaced: refused on the unwrap,
    not only on the key check value."""
    make_store(paths)
    with sqlite3.connect(paths.store) as db:
        db.execute("UPDATE data_keys SET wrapped = zeroblob(60)")
    db.close()
    before = store_files(paths)
    refused_serve(paths, "tampered with or damaged")
    assert store_files(paths) == before


def test_an_older_store_in_place_of_a_newer_one_is_refused_unmigrated(paths: Paths) -> None:
    make_store(paths)
    paths.audit_anchor.write_text("{}")  # a newer broker ran on this home
    with sqlite3.connect(paths.store) as db:  # the store from before row MACs (schema 2)
        for table in ("environments", "variables", "contexts", "tokens"):
            db.execute(f"ALTER TABLE {table} DROP COLUMN mac")
        db.execute("ALTER TABLE tokens DROP COLUMN runners")
        db.execute("DROP INDEX audit_checkpoints")
        db.execute("PRAGMA user_version = 2")
    db.close()
    before = store_files(paths)
    refused_serve(paths, "replaced by an older file")
    assert store_files(paths) == before


def test_a_refused_start_creates_no_table_in_a_new_fleet_store(
        paths: Paths, store_url: str) -> None:
    paths.home.mkdir(mode=0o700)
    paths.key_file.write_text(other_key() + "\n")
    os.chmod(paths.key_file, 0o644)
    refused_serve(paths, "mode 0644 lets others read it", STIGMER_STORE_URL=store_url)
    assert psql(store_url, "SELECT count(*) FROM pg_tables WHERE schemaname = "
                           "current_schema()") == "0"
