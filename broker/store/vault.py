"""The sealed store opened with its master key: data keys, key checks and rotation.

Opening order (nothing is read from a row before the key is proven):

1. open the store and read the key ids it accepts (its key check values);
2. load the master key from its source and refuse it unless its id is one of them
   (a new store accepts any key and records its id);
3. unwrap the data keys, creating the first one for a new store;
4. finish a rotation that was interrupted after the new key was stored.

Rotation is crash-safe at every step: (a) wrap every data key under the new
master key *beside* the old wrap and record the new id as pending, commit;
(b) check every sealed row opens through the new wraps; (c) store the new key
in the key's source (an atomic file replace or one keychain write); (d) swap
the wraps and retire the old id, commit. Killed before (c), the old key still
opens everything and the pending wraps are dropped on start; killed after (c),
step (d) is redone on start with the new key. A second ``key rotate`` simply
runs again.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import anyio.lowlevel

from .crypto import (
    DataKeys,
    SealError,
    key_id_of,
    new_key,
    unwrap_data_key,
    wrap_data_key,
)
from .errors import FailedPrecondition, Internal
from .keys import (
    ENV_KEY_ROTATION_HELP,
    KeySourceError,
    MasterKey,
    load_master_key,
    store_master_key,
)
from .store import Store, StoreError

__all__ = ["Vault", "VaultError", "RotationResult"]

log = logging.getLogger("stigmer.broker")

_MASTER_ID = "master_key_id"
_PENDING_ID = "pending_master_key_id"


class VaultError(Exception):
    """The store and key cannot be opened together; the message says why and what to do."""


@dataclasses.dataclass(frozen=True, slots=True)
class RotationResult:
    key_id: str
    rewrapped: int
    key_source: str


class Vault:
    """Owns the store, the master key and the unwrapped data keys."""

    def __init__(self, store: Store, master: MasterKey, data_keys: DataKeys) -> None:
        self.store = store
        self.master = master
        self.data_keys = data_keys
        self._rotating = False

    @classmethod
    async def open(cls, store_path: Path, *, env_key: str | None, key_file: Path,
                   use_keychain: bool) -> Vault:
        """Open store and key together. Raises VaultError with the reason and the fix."""
        try:
            store = await Store.open(store_path)
        except StoreError as exc:
            raise VaultError(str(exc)) from None
        try:
            master_id = await store.meta(_MASTER_ID)
            pending_id = await store.meta(_PENDING_ID)
            accepted = frozenset(i for i in (master_id, pending_id) if i)
            try:
                master = await load_master_key(env_key=env_key, key_file=key_file,
                                               use_keychain=use_keychain,
                                               store_key_ids=accepted)
            except KeySourceError as exc:
                raise VaultError(str(exc)) from None
            if master_id is None:
                async with store.write() as db:
                    await Store.set_meta(db, [(_MASTER_ID, master.id)])
                master_id = master.id
            if pending_id is not None:
                await _finish_rotation(store, master, master_id, pending_id)
            data_keys = await _load_data_keys(store, master)
            return cls(store, master, data_keys)
        except BaseException:
            await store.close()
            raise

    async def close(self) -> None:
        await self.store.close()

    async def rotate(self, progress: Callable[[int, int], None] | None = None
                     ) -> RotationResult:
        """Replace the master key (see the module docstring). Raises FailedPrecondition."""
        if self.master.source == "env":
            raise FailedPrecondition(ENV_KEY_ROTATION_HELP)
        if self._rotating:  # two at once would each store a key the other's wraps miss
            raise FailedPrecondition("a key rotation is already running; wait for it to end")
        self._rotating = True
        try:
            return await self._rotate(progress)
        finally:
            self._rotating = False

    async def _rotate(self, progress: Callable[[int, int], None] | None) -> RotationResult:
        new = new_key()
        new_id = key_id_of(new)
        rows = await self.store.read("SELECT id, wrapped FROM data_keys ORDER BY id")
        old_id = self.master.id
        async with self.store.write() as db:
            for kid, wrapped in rows:
                key = unwrap_data_key(self.master.key, old_id, kid, wrapped)
                await db.execute("UPDATE data_keys SET wrapped_next = ? WHERE id = ?",
                                 (wrap_data_key(new, new_id, kid, key), kid))
            await Store.set_meta(db, [(_PENDING_ID, new_id)])
        await self._check_every_row(new, new_id, progress)
        key_file = Path(self.master.detail) if self.master.source == "file" else Path()
        try:
            self.master = await store_master_key(self.master, new, key_file)
        except KeySourceError as exc:
            raise Internal(f"the new master key could not be stored: {exc}") from None
        await _finish_rotation(self.store, self.master, old_id, new_id)
        log.info("master key rotated: %d data keys rewrapped, key id %s", len(rows), new_id)
        return RotationResult(key_id=new_id, rewrapped=len(rows),
                              key_source=self.master.describe())

    async def _check_every_row(self, new: bytes, new_id: str,
                               progress: Callable[[int, int], None] | None) -> None:
        rows = await self.store.read("SELECT id, wrapped_next FROM data_keys")
        keys = {kid: unwrap_data_key(new, new_id, kid, wrapped) for kid, wrapped in rows}
        candidate = DataKeys(keys, self.data_keys.active)
        sealed = await self.store.read(
            "SELECT 'variables', env_id, name, sealed FROM variables WHERE is_secret = 1 "
            "UNION ALL SELECT 'contexts', id, execution_id, sealed FROM contexts")
        for done, (table, row_id, name, envelope) in enumerate(sealed, start=1):
            try:
                candidate.open(envelope, (table, row_id, name))
            except SealError:
                log.warning("a sealed %s row does not open (%s, %s); it was unreadable "
                            "before the rotation too", table, row_id, name)
            if done % 500 == 0:
                if progress is not None:
                    progress(done, len(sealed))
                await anyio.lowlevel.checkpoint()  # a big store must not stall fetches meanwhile


async def _load_data_keys(store: Store, master: MasterKey) -> DataKeys:
    rows = await store.read(
        "SELECT id, wrapped, active FROM data_keys ORDER BY created_at, id")
    keys: dict[str, bytes] = {}
    active: str | None = None
    for kid, wrapped, is_active in rows:
        try:
            keys[kid] = unwrap_data_key(master.key, master.id, kid, wrapped)
        except SealError:
            raise VaultError(
                f"data key {kid} in {store.path} does not open under the master key; the "
                "store was tampered with or damaged: restore it from a backup") from None
        if is_active:
            active = kid
    if not keys:
        kid = "dk-" + secrets.token_hex(8)
        key = new_key()
        async with store.write() as db:
            await db.execute(
                "INSERT INTO data_keys(id, wrapped, master_key_id, created_at, active) "
                "VALUES (?, ?, ?, ?, 1)",
                (kid, wrap_data_key(master.key, master.id, kid, key), master.id, time.time()))
        keys[kid] = key
        active = kid
    return DataKeys(keys, active or next(iter(keys)))


async def _finish_rotation(store: Store, master: MasterKey, old_id: str, new_id: str) -> None:
    """Complete or abandon a rotation, depending on which key we now hold."""
    if master.id == new_id:
        rows = await store.read("SELECT id, wrapped_next FROM data_keys")
        for kid, wrapped in rows:
            if wrapped is None:
                raise VaultError(f"rotation state in {store.path} is inconsistent (data key "
                                 f"{kid} has no new wrap); restore the store from a backup")
            unwrap_data_key(master.key, new_id, kid, wrapped)  # proves it before retiring
        async with store.write() as db:
            await db.execute("UPDATE data_keys SET wrapped = wrapped_next, wrapped_next = NULL,"
                             " master_key_id = ?", (new_id,))
            await Store.set_meta(db, [(_MASTER_ID, new_id), (_PENDING_ID, None)])
        if old_id != new_id:
            log.info("finished master key rotation to key id %s", new_id)
    else:
        async with store.write() as db:
            await db.execute("UPDATE data_keys SET wrapped_next = NULL")
            await Store.set_meta(db, [(_PENDING_ID, None)])
        log.info("abandoned an unfinished master key rotation (the new key was never stored)")
