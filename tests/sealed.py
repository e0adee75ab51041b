"""The store layer opened as the daemon opens it, for tests that work below the socket."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from stigmer.broker.environments import Environments
from stigmer.broker.store.keys import find_master_key, key_sources, new_master_key
from stigmer.broker.store.sqlite import SqliteStore, peek
from stigmer.broker.store.vault import RotationResult, Vault


@dataclasses.dataclass(slots=True)
class Sealed:
    """An open store and its unlocked vault."""

    store: SqliteStore
    vault: Vault

    def environments(self) -> Environments:
        return Environments(self.store, self.vault)

    async def rotate(self) -> RotationResult:
        return await self.vault.rotate()

    async def close(self) -> None:
        await self.store.close()


async def open_sealed(db: Path, *, env_key: str | None = None,
                      key_file: Path | None = None) -> Sealed:
    """Open the store at ``db`` and unlock it (key file beside it unless ``key_file``)."""
    sources = await key_sources(env_key=env_key, key_file=key_file or db.parent / "master.key",
                                use_keychain=False)
    master = await find_master_key(sources, store=peek(db))
    store = await SqliteStore.open(db)
    try:
        return Sealed(store, await Vault.unlock(store, master or await new_master_key(sources)))
    except BaseException:
        await store.close()
        raise
