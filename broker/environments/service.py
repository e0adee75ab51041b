"""Environments: named sets of variables, secret values sealed, kept in the store (their
rows through :mod:`.rows`).

A secret's envelope is sealed at its :meth:`Place.variable` (environment id and
variable name), and environment ids are never reused (AUTOINCREMENT), so a
ciphertext moved to another variable or environment does not open. The rows
around it are authenticated (:class:`Row`): an environment's MAC covers its id,
its name and the names of its variables, and each variable's MAC covers its
flag and value or envelope. Every read checks them, and a change refuses to
build on an environment that fails (``apply`` and ``delete`` replace it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..protocol import (
    MAX_VALUE_LENGTH,
    EnvironmentChange,
    EnvironmentSpec,
    EnvironmentSummary,
    EnvironmentVersionInfo,
    KeyDiff,
    SpecEntry,
    Variable,
    VariableView,
)
from ..protocol.errors import Internal, InvalidArgument, NotFound, ResourceExhausted
from ..store.backend import Store, Tx
from ..store.crypto import Place, Row, SealError
from ..store.vault import Vault, tampered
from .history import History, Retention, State, changes_between
from .rows import EnvironmentRows

__all__ = ["MAX_ENVIRONMENT_BYTES", "EnvironmentRecord", "Environments", "check_values"]

#: an environment (and a merged context) must fit in one reply frame with room to spare
MAX_ENVIRONMENT_BYTES = 512 * 1024

log = logging.getLogger("stigmer.broker")


class EnvironmentRecord:
    """An environment read back from the store."""

    __slots__ = ("created_at", "data", "name", "updated_at")

    def __init__(self, name: str, data: dict[str, VariableView], created_at: float,
                 updated_at: float) -> None:
        self.name = name
        self.data = data
        self.created_at = created_at
        self.updated_at = updated_at



def check_values(data: Mapping[str, Variable | SpecEntry], where: str = "") -> None:
    """Refuse a value over MAX_VALUE_LENGTH bytes in UTF-8 (the wire type bounds only its
    characters, which take up to four bytes each), or one that holds a NUL byte (no
    process environment, shell or .env file can carry one, so `run` and `export` would
    refuse it later), naming its key. Raises InvalidArgument."""
    values = [(key, entry.value) for key, entry in data.items() if entry.value is not None]
    large = sorted(key for key, value in values if len(value) > MAX_VALUE_LENGTH // 4
                   and len(value.encode("utf-8", "surrogatepass")) > MAX_VALUE_LENGTH)
    if large:
        raise InvalidArgument(f"{where}{', '.join(large)}: a value may be at most "
                              f"{MAX_VALUE_LENGTH} bytes in UTF-8; keep large files "
                              "elsewhere and pass their path; nothing was changed")
    refused = sorted(key for key, value in values if "\0" in value)
    if refused:
        raise InvalidArgument(f"{where}{', '.join(refused)}: a value cannot contain a NUL "
                              "byte (no environment or shell can carry one); nothing was "
                              "changed")

class Environments:
    """Create, read, change and delete environments; secrets sealed through the vault."""

    def __init__(self, store: Store, vault: Vault, retention: Retention | None = None) -> None:
        self._store = store
        self._vault = vault
        self._rows = EnvironmentRows(store)
        self._history = History(self._rows, vault, retention or Retention())

    async def count(self) -> int:
        return await self._rows.count()

    async def put(self, name: str, data: Mapping[str, Variable], *,
                  actor_uid: int | None = None) -> None:
        """Create ``name`` if needed and set the given keys (others are kept), as a new
        version made by ``actor_uid``."""
        check_values(data)
        async with self._store.write() as db:
            existed = await self._rows.find(db, name) is not None
            env_id = await self._upsert(db, name, check=True)
            before = await self._state(db, env_id, name) if existed else None
            await self._write_variables(db, env_id, data.items())
            await self._finish(db, env_id, name)
            await self._history.record(db, env_id, name, before,
                                       await self._opened(db, env_id, name),
                                       actor_uid=actor_uid)

    async def apply(self, specs: Iterable[EnvironmentSpec], *, dry_run: bool = False,
                    actor_uid: int | None = None) -> list[EnvironmentChange]:
        """Set each environment to exactly its data, all in one transaction, each changed
        one as a new version; return what changed (with ``dry_run``, what would, writing
        nothing). A value that does not open (damaged or tampered) counts as changed."""
        specs = list(specs)
        for spec in specs:
            check_values(spec.data, f"environment {spec.name!r}: ")
        changes = []
        async with self._store.write() as db:
            for spec in specs:
                found = await self._rows.find(db, spec.name)
                before = await self._state(db, found[0], spec.name) if found else None
                diff = changes_between(before or {}, spec.data)
                changes.append(EnvironmentChange(name=spec.name, created=before is None,
                                                 added=diff.added, changed=diff.changed,
                                                 removed=diff.removed))
                if dry_run:
                    continue
                env_id = await self._upsert(db, spec.name, check=False)  # replaced whole
                await self._replace(db, env_id, spec.name, spec.data)
                await self._history.record(db, env_id, spec.name, before, spec.data,
                                           actor_uid=actor_uid)
        return changes

    async def unset(self, name: str, keys: Iterable[str], *,
                    actor_uid: int | None = None) -> None:
        """Remove keys, as a new version; raises NotFound (changing nothing) if any is not
        set."""
        wanted = sorted(set(keys))
        async with self._store.write() as db:
            env_id = await self._checked_id(db, name)
            present = await self._rows.present(db, env_id, wanted)
            missing = [k for k in wanted if k not in present]
            if missing:
                raise NotFound(f"environment {name!r} has no variable {', '.join(missing)}; "
                               "nothing was removed")
            before = await self._state(db, env_id, name)
            await self._rows.remove_variables(db, env_id, wanted)
            await self._finish(db, env_id, name)
            await self._history.record(db, env_id, name, before,
                                       await self._opened(db, env_id, name),
                                       actor_uid=actor_uid)

    async def rollback(self, name: str, to_version: int, *,
                       actor_uid: int | None = None) -> EnvironmentVersionInfo:
        """Set ``name`` back to the variables of ``to_version``, as a new version; return
        it. The current rows need not check (a rollback replaces them whole, a way out of
        tampering). Raises NotFound, or Internal when that version's row does not check."""
        async with self._store.write() as db:
            env_id = await self._id(db, name)
            _, variables = await self._history.read(env_id, name, to_version, db)
            before = await self._state(db, env_id, name)
            await self._replace(db, env_id, name, variables)
            info = await self._history.record(db, env_id, name, before, variables,
                                              actor_uid=actor_uid, restored_from=to_version)
        assert info is not None  # a rollback is always recorded
        return info

    async def history(self, name: str, *, before: int | None = None, limit: int = 1000
                      ) -> tuple[int, list[EnvironmentVersionInfo], bool]:
        """``name``'s current version, then up to ``limit`` of its versions newest first
        (older than ``before``), and whether more follow: names only. Raises NotFound, or
        Internal naming the row that does not check."""
        env_id, _, _, current, _ = await self._existing(name)
        versions, more = await self._history.list(env_id, name, before=before, limit=limit)
        return current, versions, more

    async def version(self, name: str, version: int, *, reveal: bool
                      ) -> tuple[EnvironmentVersionInfo, dict[str, VariableView]]:
        """One version of ``name``; secret values are None unless ``reveal``. Raises
        NotFound, or Internal naming the row that does not check."""
        env_id = (await self._existing(name))[0]
        info, variables = await self._history.read(env_id, name, version)
        return info, {key: _view(var, reveal=reveal or not var.is_secret)
                      for key, var in variables.items()}

    async def diff(self, name: str, from_version: int, to_version: int, *,
                   reveal: bool) -> list[KeyDiff]:
        """The keys that differ from one version of ``name`` to another, by name; values
        only with ``reveal``."""
        env_id = (await self._existing(name))[0]
        _, old = await self._history.read(env_id, name, from_version)
        _, new = await self._history.read(env_id, name, to_version)
        changes = changes_between(old, new)
        out = [KeyDiff(key=k, change="added", after=_view(new[k], reveal=reveal))
               for k in changes.added]
        out += [KeyDiff(key=k, change="changed", before=_view(old[k], reveal=reveal),
                        after=_view(new[k], reveal=reveal)) for k in changes.changed]
        out += [KeyDiff(key=k, change="removed", before=_view(old[k], reveal=reveal))
                for k in changes.removed]
        return sorted(out, key=lambda d: d.key)

    async def prune_history(self) -> int:
        """Delete the versions older than the retention's duration (when it has one), but
        never an environment's current version; return how many. Versions over the count
        are pruned as each change is written."""
        seconds = self._history.retention.seconds
        if seconds is None:
            return 0
        return await self._rows.prune_versions_before(time.time() - seconds)

    async def delete(self, name: str) -> None:
        """Delete an environment and its variables (also one that fails its integrity
        check: that is the way out); raises NotFound."""
        async with self._store.write() as db:
            await self._rows.delete(db, await self._id(db, name))

    async def get(self, name: str, *, reveal: bool) -> EnvironmentRecord:
        """Return an environment; secret values are None unless ``reveal``.

        Raises NotFound, or Internal naming the environment or variable when a row
        fails its integrity check or a sealed value does not open (tampered or
        damaged): other environments are unaffected.
        """
        env_id, created_at, updated_at, _, variables = await self._existing(name)
        out: dict[str, VariableView] = {}
        for key, is_secret, value, sealed, _ in variables:
            if not is_secret:
                out[key] = VariableView(is_secret=False, value=value)
            elif not reveal:
                out[key] = VariableView(is_secret=True)
            else:
                out[key] = VariableView(is_secret=True,
                                        value=self._open(sealed, env_id, name, key))
        return EnvironmentRecord(name, out, created_at, updated_at)

    async def resolve(self, name: str) -> tuple[dict[str, Variable], int]:
        """Return every variable of ``name`` with secrets opened (for contexts), and the
        version they are (1 for an environment not changed since history was kept: its
        first change records what it holds now as version 1)."""
        env_id, _, _, version, variables = await self._existing(name)
        return {key: Variable(value=self._open(sealed, env_id, name, key) if is_secret
                              else value, is_secret=bool(is_secret))
                for key, is_secret, value, sealed, _ in variables}, version

    async def _existing(self, name: str) -> tuple[int, float, float, int, list[Any]]:
        """Return an environment's id, times, current version (see :meth:`resolve`) and
        variable rows, checked, read in one query (two reads could straddle a change and
        look like tampering). Raises NotFound."""
        rows = await self._rows.read(name)
        if not rows:
            raise NotFound(f"environment {name!r} does not exist; `stigmer-broker env list` "
                           "shows the ones that do")
        env_id, created_at, updated_at, mac, version = rows[0][:5]
        variables = [row[5:] for row in rows if row[5] is not None]
        self._check(env_id, name, mac, variables)
        return env_id, created_at, updated_at, int(version or 1), variables

    async def list(self, *, after: str = "",
                   limit: int = 1000) -> tuple[list[EnvironmentSummary], bool]:
        """Up to ``limit`` environments by name, from the first after ``after``, and whether
        more follow. One whose name does not check is logged and left out (reading it
        names the problem)."""
        rows = await self._rows.page(after, limit + 1)  # one query: two could straddle a change
        grouped: dict[str, tuple[int, bytes | None, float, list[tuple[str, int]]]] = {}
        for env_id, name, mac, updated_at, key, is_secret in rows:
            entry = grouped.setdefault(name, (env_id, mac, updated_at, []))
            if key is not None:
                entry[3].append((key, is_secret))
        more = len(grouped) > limit
        out = []
        for name, (env_id, mac, updated_at, variables) in list(grouped.items())[:limit]:
            if self._vault.check(Row.environment(env_id, name, (k for k, _ in variables)), mac):
                out.append(EnvironmentSummary(name=name, variables=len(variables),
                                              secrets=sum(1 for _, s in variables if s),
                                              updated_at=updated_at))
            else:
                log.error("environment %r failed its integrity check and is left out of the "
                          "list", name)
        return out, more

    async def authenticate_unchecked(self) -> int:
        """Authenticate every row that has no MAC yet; return how many. Only for the start
        that migrates a store written before rows carried MACs."""
        async with self._store.write() as db:
            envs, variables = await self._rows.unauthenticated(db)
            for env_id, key, is_secret, value, sealed, _ in variables:
                await self._rows.set_variable_mac(db, env_id, key, self._vault.mac(
                    Row.variable(env_id, key, is_secret, value, sealed)))
            for env_id, name in envs:
                await self._authenticate(db, env_id, name)
        return len(envs) + len(variables)

    # ------------------------------------------------------------------ helpers

    def _check(self, env_id: int, name: str, mac: bytes | None, variables: Sequence[Any]) -> None:
        """Raise (and log) unless the environment row and each variable row check."""
        vault = self._vault
        if not vault.check(Row.environment(env_id, name, (v[0] for v in variables)), mac):
            raise tampered(f"environment {name!r}",
                           "set it again with `stigmer-broker apply`, or delete it")
        for key, is_secret, value, sealed, var_mac in variables:
            if not vault.check(Row.variable(env_id, key, is_secret, value, sealed), var_mac):
                raise tampered(f"variable {key} of environment {name!r}",
                               "set it again with `stigmer-broker env set`")

    def _open(self, sealed: bytes, env_id: int, env_name: str, key: str) -> str:
        try:
            return self._vault.open(sealed, Place.variable(env_id, key)).decode()
        except (SealError, UnicodeDecodeError):
            raise Internal(
                f"secret {key} of environment {env_name!r} cannot be opened: the store was "
                "tampered with or damaged; set it again with `stigmer-broker env set`"
            ) from None

    async def _state(self, db: Tx, env_id: int, name: str) -> State:
        """An environment's variables, opened; None where a value does not open."""
        state: dict[str, Variable | None] = {}
        for key, is_secret, value, sealed, _ in await self._rows.variables(db, env_id):
            try:
                value = self._open(sealed, env_id, name, key) if is_secret else value
                state[key] = Variable(value=value, is_secret=bool(is_secret))
            except Internal:
                state[key] = None
        return state

    async def _opened(self, db: Tx, env_id: int, name: str) -> dict[str, Variable]:
        """An environment's variables, opened; raises Internal if one does not open."""
        return {key: Variable(value=self._open(sealed, env_id, name, key) if is_secret
                              else value, is_secret=bool(is_secret))
                for key, is_secret, value, sealed, _ in await self._rows.variables(db, env_id)}

    async def _replace(self, db: Tx, env_id: int, name: str,
                       data: Mapping[str, Variable]) -> None:
        """Set an environment's variables to exactly ``data``."""
        await self._rows.remove_variables(db, env_id)
        await self._write_variables(db, env_id, data.items())
        await self._finish(db, env_id, name)

    async def _check_size(self, db: Tx, env_id: int, name: str) -> None:
        size = sum(len(key) + (len(value.encode()) if value is not None else 0)
                   + (len(sealed) if sealed is not None else 0)
                   for key, _, value, sealed, _ in await self._rows.variables(db, env_id))
        if size > MAX_ENVIRONMENT_BYTES:
            raise ResourceExhausted(
                f"environment {name!r} would hold {size} bytes, over the limit of "
                f"{MAX_ENVIRONMENT_BYTES}; nothing was changed. Split it into several "
                "environments")

    async def _upsert(self, db: Tx, name: str, *, check: bool) -> int:
        """Return the id of ``name``, created if missing; with ``check``, an existing one
        must pass its integrity check first (a change must not re-authenticate it)."""
        if check and await self._rows.find(db, name) is not None:
            return await self._checked_id(db, name)
        return await self._rows.upsert(db, name, time.time())

    async def _checked_id(self, db: Tx, name: str) -> int:
        env_id, mac = await self._found(db, name)
        self._check(env_id, name, mac, await self._rows.variables(db, env_id))
        return env_id

    async def _finish(self, db: Tx, env_id: int, name: str) -> None:
        """After a change: check the size, note the time, re-authenticate the row."""
        await self._check_size(db, env_id, name)
        await self._rows.touch(db, env_id, time.time())
        await self._authenticate(db, env_id, name)

    async def _authenticate(self, db: Tx, env_id: int, name: str) -> None:
        """Store the MAC of the environment row over its current variables."""
        names = [row[0] for row in await self._rows.variables(db, env_id)]
        await self._rows.set_mac(db, env_id,
                                 self._vault.mac(Row.environment(env_id, name, names)))

    async def _id(self, db: Tx, name: str) -> int:
        return (await self._found(db, name))[0]

    async def _found(self, db: Tx, name: str) -> tuple[int, bytes | None]:
        """The id and MAC of ``name``; raises NotFound."""
        found = await self._rows.find(db, name)
        if found is None:
            raise NotFound(f"environment {name!r} does not exist; `stigmer-broker env list` "
                           "shows the ones that do")
        return found

    async def _write_variables(self, db: Tx, env_id: int,
                               items: Iterable[tuple[str, Variable]]) -> None:
        for key, var in items:
            value: str | None = None
            sealed: bytes | None = None
            if var.is_secret:
                sealed = self._vault.seal(var.value.encode(), Place.variable(env_id, key))
            else:
                value = var.value
            mac = self._vault.mac(Row.variable(env_id, key, var.is_secret, value, sealed))
            await self._rows.write_variable(db, env_id, key, var.is_secret, value, sealed, mac)


def _view(variable: Variable, *, reveal: bool) -> VariableView:
    """A variable as read back: its value only when revealed."""
    return VariableView(is_secret=variable.is_secret, value=variable.value if reveal else None)
