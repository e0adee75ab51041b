"""The sealing boundary: the master key, the data keys it unwraps, sealing and rotation.

Domain code seals and opens values at a :class:`~.crypto.Place` through
:class:`Vault` and never sees a key. Unlocking order (nothing is read from a
row before the key is proven, nothing written before the key opens the store):

1. before the store is opened for writing, read its key check values and wrapped
   data keys (:func:`.backend.peek_store`);
2. load the master key from its sources and refuse it unless its id is one of them
   and it unwraps every data key (:func:`.keys.find_master_key`);
3. open (and migrate) the store; make a key for a new store; :meth:`Vault.unlock`
   checks the id again, then unwraps the data keys, creating the first one for a
   new store (which records the key's id);
4. finish a rotation that was interrupted after the new key was stored.

Rotation is crash-safe at every step: (a) wrap every data key under the new
master key *beside* the old wrap and record the new id as pending, commit;
(b) check every sealed row opens through the new wraps; (c) store the new key
in the key's source (an atomic file replace or one keychain write); (d) swap
the wraps and retire the old id, commit. Killed before (c), the old key still
opens everything and the pending wraps are dropped on start; killed after (c),
step (d) is redone on start with the new key. A second ``key rotate`` simply
runs again. Row MACs and the audit chain are keyed by keys derived from the data
keys, so rewrapping the data keys carries them over unchanged.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from collections.abc import Callable

import anyio
import anyio.lowlevel

from ..protocol.errors import FailedPrecondition, Internal, StartupError
from .backend import KEY_MADE_AT, MASTER_KEY_ID, PENDING_KEY_ID, Store, set_meta
from .crypto import (
    DataKeys,
    Place,
    Row,
    SealError,
    binding,
    key_id_of,
    new_key,
    unwrap_data_key,
    wrap_data_key,
)
from .keys import (
    ENV_KEY_ROTATION_HELP,
    KeySourceError,
    KeySourceKind,
    MasterKey,
    check_key_id,
)
from .notices import MasterKeyRotated

__all__ = ["RotationResult", "Vault", "VaultError", "log_refused", "tampered"]

log = logging.getLogger("stigmer.broker")

_MASTER_ID = MASTER_KEY_ID
_PENDING_ID = PENDING_KEY_ID


class VaultError(StartupError):
    """The store and key cannot be opened together; the message says why and what to do."""


def log_refused(what: str) -> None:
    """Log that a row failed its MAC check and is refused (alone)."""
    log.error("%s failed its integrity check and is refused", what)


def tampered(what: str, fix: str) -> Internal:
    """Log and return the error for a row whose MAC does not check (refused alone)."""
    log_refused(what)
    return Internal(f"{what} failed its integrity check: the store was changed by someone "
                    f"without the key, or damaged; {fix}")


@dataclasses.dataclass(frozen=True, slots=True)
class RotationResult:
    key_id: str
    rewrapped: int
    key_source: str


class Vault:
    """Seals and opens values at their place; owns the master key and the data keys."""

    def __init__(self, store: Store, master: MasterKey, data_keys: DataKeys) -> None:
        self._store = store
        self._master = master
        self._data_keys = data_keys
        self._rotating = False
        #: when the master key was made or rotated in (None: before the store said)
        self.key_made_at: float | None = None

    @classmethod
    async def unlock(cls, store: Store, master: MasterKey) -> Vault:
        """Unwrap the data keys of ``store`` with ``master``, proven against the store
        before it was opened (:func:`.keys.find_master_key`) or new.

        Raises KeySourceError or VaultError (both StartupErrors) with the reason
        and the fix; the caller keeps ownership of ``store``.
        """
        master_id = await store.meta(_MASTER_ID)
        pending_id = await store.meta(_PENDING_ID)
        # again: another broker of a fleet may have rotated the key since the proof
        check_key_id(master.id, master.describe(),
                     frozenset(i for i in (master_id, pending_id) if i))
        if pending_id is not None:
            await _finish_rotation(store, master, master_id or master.id, pending_id)
        if master_id is None:  # a new store (maybe another broker of a fleet is making it)
            await _initialise(store, master)
        vault = cls(store, master, await _load_data_keys(store, master))
        vault.key_made_at = _made_at(await store.meta(KEY_MADE_AT))
        return vault

    @property
    def key_id(self) -> str:
        """The master key's public id (its key check value)."""
        return self._master.id

    def key_source(self) -> str:
        """Where the master key is kept, for people."""
        return self._master.describe()

    # ------------------------------------------------------------------ sealing

    def seal(self, plaintext: bytes, place: Place) -> bytes:
        """Return ``plaintext`` sealed under the active data key, bound to ``place``."""
        return self._data_keys.seal(plaintext, place)

    def open(self, envelope: bytes, place: Place) -> bytes:
        """Return the plaintext of an envelope sealed for ``place``. Raises SealError."""
        return self._data_keys.open(envelope, place)

    @staticmethod
    def bind(envelope: bytes, place: Place) -> bytes:
        """Return what :meth:`open_bound` needs to open ``envelope`` at ``place``, computed
        once (the fetch path keeps one per context). Raises SealError."""
        return binding(envelope, place)

    def open_bound(self, envelope: bytes, bound: bytes) -> bytes:
        """Open an envelope with its :meth:`bind` result. Raises SealError."""
        return self._data_keys.open_bound(envelope, bound)

    # ----------------------------------------------------------- authenticating

    def mac(self, row: Row) -> bytes:
        """Return the MAC that authenticates ``row`` (stored beside it)."""
        return self._data_keys.mac(row)

    def check(self, row: Row, mac: bytes | None) -> bool:
        """Return whether ``mac`` authenticates ``row``: False means the row was written by
        someone without the key (or damaged) and must not be served."""
        return self._data_keys.check(row, mac)

    def chain(self, prev: str, body: bytes) -> str:
        """Return the keyed audit chain link that follows ``prev`` for ``body``."""
        return self._data_keys.chain(prev, body)

    def chain_ok(self, prev: str, body: bytes, link: str) -> bool:
        """Return whether ``link`` is the keyed chain link after ``prev`` for ``body``."""
        return self._data_keys.chain_ok(prev, body, link)

    # ----------------------------------------------------------------- rotation

    async def rotate(self, progress: Callable[[int, int], None] | None = None
                     ) -> RotationResult:
        """Replace the master key (see the module docstring). Raises FailedPrecondition."""
        if self._master.source.kind is KeySourceKind.ENV:
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
        rows = await self._store.read("SELECT id, wrapped FROM data_keys ORDER BY id")
        old_id = self._master.id
        async with self._store.write() as db:
            await db.lock("keys")
            if await db.fetchall("SELECT 1 FROM meta WHERE key = ?", (_PENDING_ID,)):
                raise FailedPrecondition("another broker of the fleet is rotating the master "
                                         "key; wait for it to end")
            for kid, wrapped in rows:
                key = unwrap_data_key(self._master.key, old_id, kid, wrapped)
                await db.execute("UPDATE data_keys SET wrapped_next = ? WHERE id = ?",
                                 (wrap_data_key(new, new_id, kid, key), kid))
            await set_meta(db, [(_PENDING_ID, new_id)])
        await self._check_every_row(new, new_id, progress)
        try:
            await self._master.source.write(new)
        except KeySourceError as exc:
            raise Internal(f"the new master key could not be stored: {exc.message}") from None
        self._master = MasterKey(new, self._master.source)
        await _finish_rotation(self._store, self._master, old_id, new_id)
        self.key_made_at = _made_at(await self._store.meta(KEY_MADE_AT))
        log.info("master key rotated: %d data keys rewrapped, key id %s", len(rows), new_id)
        return RotationResult(key_id=new_id, rewrapped=len(rows),
                              key_source=self._master.describe())

    async def _check_every_row(self, new: bytes, new_id: str,
                               progress: Callable[[int, int], None] | None) -> None:
        rows = await self._store.read("SELECT id, wrapped_next FROM data_keys")
        keys = {kid: unwrap_data_key(new, new_id, kid, wrapped) for kid, wrapped in rows}
        candidate = DataKeys(keys, self._data_keys.active)
        sealed = await self._store.read(
            "SELECT 1, env_id, name, sealed FROM variables WHERE is_secret = 1 "
            "UNION ALL SELECT 0, id, execution_id, sealed FROM contexts "
            "UNION ALL SELECT 2, env_id, CAST(version AS TEXT), sealed "
            "FROM environment_versions")
        for done, (kind, row_id, name, envelope) in enumerate(sealed, start=1):
            place = (Place.variable(row_id, name) if kind == 1
                     else Place.context(row_id, name) if kind == 0
                     else Place.environment_version(row_id, int(name)))
            try:
                candidate.open(envelope, place)
            except SealError:
                log.warning("a sealed %s row does not open (%s, %s); it was unreadable "
                            "before the rotation too", place.table, row_id, name)
            if done % 500 == 0:
                if progress is not None:
                    progress(done, len(sealed))
                await anyio.lowlevel.checkpoint()  # a big store must not stall fetches meanwhile


async def _initialise(store: Store, master: MasterKey) -> None:
    """Record the master key's id and make the first data key, once: brokers of a fleet
    starting together on a new store take turns, and the later ones must hold the key
    the first one recorded."""
    async with store.write() as db:
        await db.lock("keys")
        recorded = await db.fetchall("SELECT value FROM meta WHERE key = ?", (_MASTER_ID,))
        if recorded:
            if str(recorded[0][0]) != master.id:
                raise VaultError(
                    f"the master key ({master.describe()}, id {master.id}) is not the key "
                    f"of the store {store.describe()} (id {recorded[0][0]}), which another "
                    "broker has just started with: every broker of a fleet needs the same "
                    "key")
            return
        rows = await db.fetchall("SELECT id, wrapped FROM data_keys")
        for kid, wrapped in rows:  # a wrong key fails here, before its id is recorded
            try:
                unwrap_data_key(master.key, master.id, kid, wrapped)
            except SealError:
                raise _unopenable(store, kid) from None
        made: list[tuple[str, str | None]] = []
        if not rows:  # a new store: the key is new too (else its age is not known)
            kid = "dk-" + secrets.token_hex(8)
            await db.execute(
                "INSERT INTO data_keys(id, wrapped, master_key_id, created_at, active) "
                "VALUES (?, ?, ?, ?, 1)",
                (kid, wrap_data_key(master.key, master.id, kid, new_key()), master.id,
                 time.time()))
            made = [(KEY_MADE_AT, f"{time.time():.3f}")]
        await set_meta(db, [(_MASTER_ID, master.id), *made])


def _made_at(recorded: str | None) -> float | None:
    """The stored time a key was made at; None when absent or not a number."""
    try:
        return float(recorded) if recorded is not None else None
    except ValueError:
        return None


def _unopenable(store: Store, kid: str) -> VaultError:
    return VaultError(f"data key {kid} in {store.describe()} does not open under the master "
                      "key; the store was tampered with or damaged: restore it from a backup")


async def _load_data_keys(store: Store, master: MasterKey) -> DataKeys:
    rows = await store.read(
        "SELECT id, wrapped, active FROM data_keys ORDER BY created_at, id")
    keys: dict[str, bytes] = {}
    active: str | None = None
    for kid, wrapped, is_active in rows:
        try:
            keys[kid] = unwrap_data_key(master.key, master.id, kid, wrapped)
        except SealError:
            raise _unopenable(store, kid) from None
        if is_active:
            active = kid
    if not keys:
        raise VaultError(f"the store {store.describe()} has a key check value but no data "
                         "key; it was tampered with or damaged: restore it from a backup")
    return DataKeys(keys, active or next(iter(keys)))


async def _finish_rotation(store: Store, master: MasterKey, old_id: str, new_id: str) -> None:
    """Complete or abandon a rotation, depending on which key we now hold."""
    if master.id == new_id:
        rows = await store.read("SELECT id, wrapped_next FROM data_keys")
        for kid, wrapped in rows:
            if wrapped is None:
                raise VaultError(f"rotation state in {store.describe()} is inconsistent (data key "
                                 f"{kid} has no new wrap); restore the store from a backup")
            unwrap_data_key(master.key, new_id, kid, wrapped)  # proves it before retiring
        async with store.write() as db:
            await db.execute("UPDATE data_keys SET wrapped = wrapped_next, wrapped_next = NULL,"
                             " master_key_id = ?", (new_id,))
            await set_meta(db, [(_MASTER_ID, new_id), (_PENDING_ID, None),
                                (KEY_MADE_AT, f"{time.time():.3f}")])
            db.notify(MasterKeyRotated(new_id))  # the other brokers of a fleet now hold an old key
        if old_id != new_id:
            log.info("finished master key rotation to key id %s", new_id)
    else:
        async with store.write() as db:
            await db.execute("UPDATE data_keys SET wrapped_next = NULL")
            await set_meta(db, [(_PENDING_ID, None)])
        log.info("abandoned an unfinished master key rotation (the new key was never stored)")
