"""Master-key sources and every refusal, with an in-memory keychain."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from pathlib import Path

import keyring
import pytest
from memkeyring import BrokenKeyring, MemoryKeyring, PlaintextKeyring

from stigmer.broker.store.backend import StorePeek
from stigmer.broker.store.crypto import new_key
from stigmer.broker.store.keys import (
    KEYRING_SERVICE,
    KEYRING_USERNAME,
    KeyFile,
    KeySourceError,
    KeySourceKind,
    MasterKey,
    find_master_key,
    key_sources,
    new_master_key,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def memory_keychain() -> Iterator[MemoryKeyring]:
    previous = keyring.get_keyring()
    backend = MemoryKeyring()
    keyring.set_keyring(backend)
    yield backend
    keyring.set_keyring(previous)


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


async def load(home: Path, env_key: str | None = None, *, keychain: bool = False,
               ids: frozenset[str] = frozenset()) -> MasterKey:
    """The key as a start finds it (a new one for a new store) for a store with ``ids``."""
    sources = await key_sources(env_key=env_key, key_file=home / "master.key",
                                use_keychain=keychain)
    store = StorePeek("test store", master_id=min(ids, default=None))
    return await find_master_key(sources, store=store) or await new_master_key(sources)


async def test_generates_key_file_when_no_keychain(short_dir: Path) -> None:
    master = await load(short_dir)
    assert master.source.kind is KeySourceKind.FILE
    path = short_dir / "master.key"
    assert (os.stat(path).st_mode & 0o777) == 0o600
    assert KeyFile(path).read_now() == master.key
    again = await load(short_dir, ids=frozenset({master.id}))
    assert again.key == master.key


async def test_key_file_private_under_umask_000(short_dir: Path) -> None:
    old = os.umask(0)
    try:
        await load(short_dir)
    finally:
        os.umask(old)
    assert (os.stat(short_dir / "master.key").st_mode & 0o777) == 0o600


async def test_generates_into_real_keychain(short_dir: Path,
                                            memory_keychain: MemoryKeyring) -> None:
    master = await load(short_dir, keychain=True)
    assert master.source.kind is KeySourceKind.KEYCHAIN
    assert (KEYRING_SERVICE, KEYRING_USERNAME) in memory_keychain.entries
    assert not (short_dir / "master.key").exists()


async def test_plaintext_keyring_is_not_a_keychain(short_dir: Path) -> None:
    previous = keyring.get_keyring()
    keyring.set_keyring(PlaintextKeyring())
    try:
        master = await load(short_dir, keychain=True)
    finally:
        keyring.set_keyring(previous)
    assert master.source.kind is KeySourceKind.FILE


async def test_broken_keychain_is_a_clear_error(short_dir: Path) -> None:
    previous = keyring.get_keyring()
    keyring.set_keyring(BrokenKeyring())
    try:
        with pytest.raises(KeySourceError, match="could not be read"):
            await load(short_dir, keychain=True)
    finally:
        keyring.set_keyring(previous)


async def test_env_key_wins_and_is_checked(short_dir: Path) -> None:
    key = new_key()
    master = await load(short_dir, b64(key))
    assert master.source.kind is KeySourceKind.ENV
    assert master.key == key
    assert not (short_dir / "master.key").exists()


@pytest.mark.parametrize(("value", "message"), [
    ("not base64!!", "not valid base64"),
    (base64.b64encode(b"short").decode(), "must be exactly 32"),
    (base64.b64encode(b"x" * 33).decode(), "must be exactly 32"),
])
async def test_bad_env_keys(short_dir: Path, value: str, message: str) -> None:
    with pytest.raises(KeySourceError, match=message) as info:
        await load(short_dir, value)
    assert value not in str(info.value)


async def test_sources_that_disagree_are_refused(short_dir: Path,
                                                 memory_keychain: MemoryKeyring) -> None:
    KeyFile(short_dir / "master.key").write_now(new_key())
    with pytest.raises(KeySourceError, match="disagree"):
        await load(short_dir, b64(new_key()))
    memory_keychain.set_password(KEYRING_SERVICE, KEYRING_USERNAME, b64(new_key()))
    with pytest.raises(KeySourceError, match="disagree"):
        await load(short_dir, keychain=True)


async def test_agreeing_sources_are_fine(short_dir: Path) -> None:
    key = new_key()
    KeyFile(short_dir / "master.key").write_now(key)
    assert (await load(short_dir, b64(key))).source.kind is KeySourceKind.ENV


@pytest.mark.parametrize("problem", ["mode", "symlink", "owner", "size"])
async def test_key_file_refusals(short_dir: Path, problem: str) -> None:
    path = short_dir / "master.key"
    KeyFile(path).write_now(new_key())
    if problem == "mode":
        os.chmod(path, 0o640)
        match = "chmod 600"
    elif problem == "symlink":
        real = short_dir / "real.key"
        path.rename(real)
        path.symlink_to(real)
        match = "symbolic link"
    elif problem == "owner":
        if os.getuid() != 0:
            pytest.skip("changing a file's owner needs root")
        os.chown(path, 65534, -1)
        match = "owned by uid 65534"
    else:
        path.write_text(b64(b"y" * 16) + "\n")
        os.chmod(path, 0o600)
        match = "exactly 32"
    with pytest.raises(KeySourceError, match=match):
        await load(short_dir)


async def test_wrong_key_for_existing_store(short_dir: Path) -> None:
    with pytest.raises(KeySourceError, match="does not open the store"):
        await load(short_dir, b64(new_key()), ids=frozenset({"0123456789abcdef"}))


async def test_no_key_for_existing_store_is_not_regenerated(short_dir: Path) -> None:
    with pytest.raises(KeySourceError, match="no master key found"):
        await load(short_dir, ids=frozenset({"0123456789abcdef"}))
    assert not (short_dir / "master.key").exists()
