"""Environment history: every version of an environment, sealed, MAC'd and pruned.

Theory of operation: each change to an environment writes, in the same
transaction, a version row holding *all* its variables as they now are, sealed
as one envelope at :meth:`Place.environment_version` (environment id and version
number), so a version's ciphertext moved to another version or environment does
not open. Beside the envelope the row says, in the clear, when and by whom
(uid) the version was made and which keys it changed (names only), and a MAC
(:class:`Row`) covers every column: a version row edited, re-pointed or written
back without the key is refused by name. The current version is the newest one;
rolling back writes a new version with an old one's variables. An environment
from before history was kept has no version until its first change, which
records what it held then as version 1 (by no one) before the change itself.
Retention keeps the newest ``keep_versions`` and/or those younger than
``keep_seconds``, and never the current version away.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgspec

from ..protocol import EnvironmentVersionInfo, Variable
from ..protocol.errors import Internal, NotFound
from ..store.backend import Tx
from ..store.crypto import Place, Row, SealError
from ..store.vault import Vault, tampered
from .rows import EnvironmentRows

__all__ = ["History", "Retention", "State", "changes_between"]

#: an environment's variables as a version holds them; None where a value did not open
State = Mapping[str, Variable | None]

_VARS_ENCODER = msgspec.msgpack.Encoder()
_VARS_DECODER = msgspec.msgpack.Decoder(dict[str, Variable])


class _Changes(msgspec.Struct, frozen=True):
    added: list[str]
    changed: list[str]
    removed: list[str]


_CHANGES_DECODER = msgspec.json.Decoder(_Changes)


@dataclasses.dataclass(frozen=True, slots=True)
class Retention:
    """Which versions are kept: the newest ``versions``, and/or those younger than
    ``seconds`` (None: no bound of that kind); the current version always."""

    versions: int | None = 50
    seconds: float | None = None


def changes_between(before: State, after: State) -> _Changes:
    """The key names ``after`` adds, changes and removes from ``before``; a value that did
    not open (None) counts as changed."""
    return _Changes(
        added=sorted(after.keys() - before.keys()),
        changed=sorted(k for k in after.keys() & before.keys()
                       if before[k] is None or before[k] != after[k]),
        removed=sorted(before.keys() - after.keys()))


class History:
    """The versions of the environments of one store."""

    def __init__(self, rows: EnvironmentRows, vault: Vault, retention: Retention, *,
                 clock: Callable[[], float] = time.time) -> None:
        self._rows = rows
        self._vault = vault
        self.retention = retention
        self._clock = clock

    async def record(self, db: Tx, env_id: int, name: str, before: State | None,
                     after: Mapping[str, Variable], *, actor_uid: int | None,
                     restored_from: int | None = None) -> EnvironmentVersionInfo | None:
        """Write the version ``after`` (the environment as the change left it, ``before``
        what it was, None if new), then prune; return it, or None when nothing changed
        (a rollback is always recorded)."""
        changes = changes_between(before or {}, after)
        if (before is not None and restored_from is None
                and not (changes.added or changes.changed or changes.removed)):
            return None
        latest = await self._rows.latest_version(db, env_id)
        if latest is None and before is not None and all(v is not None for v in
                                                          before.values()):
            # history starts now: what the environment held until this change is version 1
            latest = 1
            opened = {k: v for k, v in before.items() if v is not None}
            await self._insert(db, env_id, 1, self._clock(), None,
                               changes_between({}, opened), None, opened)
        version = (latest or 0) + 1
        now = self._clock()
        await self._insert(db, env_id, version, now, actor_uid, changes, restored_from, after)
        keep = self.retention
        await self._rows.prune_versions(
            db, env_id, current=version,
            through=version - keep.versions if keep.versions is not None else None,
            made_before=now - keep.seconds if keep.seconds is not None else None)
        return _info(version, now, actor_uid, changes, restored_from)

    async def _insert(self, db: Tx, env_id: int, version: int, now: float,
                      actor_uid: int | None, changes: _Changes, restored_from: int | None,
                      variables: Mapping[str, Variable]) -> None:
        changes_json = msgspec.json.encode(changes).decode()
        sealed = self._vault.seal(_VARS_ENCODER.encode(dict(sorted(variables.items()))),
                                  Place.environment_version(env_id, version))
        mac = self._vault.mac(Row.environment_version(env_id, version, now, actor_uid,
                                                      changes_json, restored_from, sealed))
        await self._rows.insert_version(db, env_id, version, now, actor_uid, changes_json,
                                        restored_from, sealed, mac)

    async def list(self, env_id: int, name: str, *, before: int | None,
                   limit: int) -> tuple[list[EnvironmentVersionInfo], bool]:
        """Up to ``limit`` versions newest first, older than ``before``, and whether more
        follow. A version row that does not check is refused by name (Internal)."""
        rows = await self._rows.versions(env_id, before, limit + 1)
        return [self._checked(env_id, name, row) for row in rows[:limit]], len(rows) > limit

    async def read(self, env_id: int, name: str, version: int,
                   db: Tx | None = None) -> tuple[EnvironmentVersionInfo, dict[str, Variable]]:
        """One version and its variables, opened. Raises NotFound, or Internal when its row
        does not check or its envelope does not open."""
        rows = (await self._rows.version_in(db, env_id, version) if db is not None
                else await self._rows.version(env_id, version))
        if not rows:
            raise NotFound(f"environment {name!r} has no version {version}; "
                           f"`stigmer-broker env history {name}` lists the ones it keeps")
        info = self._checked(env_id, name, rows[0])
        try:
            variables = _VARS_DECODER.decode(self._vault.open(
                rows[0][5], Place.environment_version(env_id, version)))
        except (SealError, msgspec.DecodeError):
            raise Internal(f"version {version} of environment {name!r} cannot be opened: the "
                           "store was tampered with or damaged; roll back to another "
                           "version") from None
        return info, variables

    def _checked(self, env_id: int, name: str, row: Sequence[Any]) -> EnvironmentVersionInfo:
        """The version a row says, once its MAC checks; raises Internal (logged) if not."""
        version, created_at, actor_uid, changes_json, restored_from, sealed, mac = row
        if not self._vault.check(Row.environment_version(
                env_id, version, created_at, actor_uid, changes_json, restored_from, sealed),
                mac):
            raise tampered(f"version {version} of environment {name!r}",
                           "roll back to another version, or set the environment again")
        return _info(version, created_at, actor_uid, _CHANGES_DECODER.decode(changes_json),
                     restored_from)


def _info(version: int, created_at: float, actor_uid: int | None, changes: _Changes,
          restored_from: int | None) -> EnvironmentVersionInfo:
    return EnvironmentVersionInfo(version=version, created_at=created_at, actor_uid=actor_uid,
                                  added=changes.added, changed=changes.changed,
                                  removed=changes.removed, restored_from=restored_from)
