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
    EnvironmentChange,
    EnvironmentSpec,
    EnvironmentSummary,
    Variable,
    VariableView,
)
from ..protocol.errors import Internal, InvalidArgument, NotFound, ResourceExhausted
from ..store.backend import Store, Tx
from ..store.crypto import Place, Row, SealError
from ..store.vault import Vault, tampered
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



def check_values(data: Mapping[str, Variable], where: str = "") -> None:
    """Refuse a value that holds a NUL byte, naming its key: no process environment, shell
    or .env file can carry one, so `run` and `export` would refuse it later. Raises
    InvalidArgument."""
    refused = sorted(key for key, variable in data.items() if "\0" in variable.value)
    if refused:
        raise InvalidArgument(f"{where}{', '.join(refused)}: a value cannot contain a NUL "
                              "byte (no environment or shell can carry one); nothing was "
                              "changed")

class Environments:
    """Create, read, change and delete environments; secrets sealed through the vault."""

    def __init__(self, store: Store, vault: Vault) -> None:
        self._store = store
        self._vault = vault
        self._rows = EnvironmentRows(store)

    async def count(self) -> int:
        return await self._rows.count()

    async def put(self, name: str, data: Mapping[str, Variable]) -> None:
        """Create ``name`` if needed and set the given keys (others are kept)."""
        check_values(data)
        async with self._store.write() as db:
            env_id = await self._upsert(db, name, check=True)
            await self._write_variables(db, env_id, data.items())
            await self._finish(db, env_id, name)

    async def apply(self, specs: Iterable[EnvironmentSpec], *,
                    dry_run: bool = False) -> list[EnvironmentChange]:
        """Set each environment to exactly its data, all in one transaction; return what
        changed (with ``dry_run``, what would, writing nothing)."""
        specs = list(specs)
        for spec in specs:
            check_values(spec.data, f"environment {spec.name!r}: ")
        changes = []
        async with self._store.write() as db:
            for spec in specs:
                changes.append(await self._change(db, spec))
                if dry_run:
                    continue
                env_id = await self._upsert(db, spec.name, check=False)  # replaced whole
                await self._rows.remove_variables(db, env_id)
                await self._write_variables(db, env_id, spec.data.items())
                await self._finish(db, env_id, spec.name)
        return changes

    async def _change(self, db: Tx, spec: EnvironmentSpec) -> EnvironmentChange:
        """Compare an environment with what ``spec`` would make it (key names only). A
        value that does not open (damaged or tampered) counts as changed."""
        found = await self._rows.find(db, spec.name)
        if found is None:
            return EnvironmentChange(name=spec.name, created=True, added=sorted(spec.data),
                                     changed=[], removed=[])
        env_id = found[0]
        old: dict[str, Variable | None] = {}
        for key, is_secret, value, sealed, _ in await self._rows.variables(db, env_id):
            try:
                value = self._open(sealed, env_id, spec.name, key) if is_secret else value
                old[key] = Variable(value=value, is_secret=bool(is_secret))
            except Internal:
                old[key] = None
        return EnvironmentChange(
            name=spec.name, created=False,
            added=sorted(spec.data.keys() - old.keys()),
            changed=sorted(k for k in spec.data.keys() & old.keys() if spec.data[k] != old[k]),
            removed=sorted(old.keys() - spec.data.keys()))

    async def unset(self, name: str, keys: Iterable[str]) -> None:
        """Remove keys; raises NotFound (changing nothing) if any is not set."""
        wanted = sorted(set(keys))
        async with self._store.write() as db:
            env_id = await self._checked_id(db, name)
            present = await self._rows.present(db, env_id, wanted)
            missing = [k for k in wanted if k not in present]
            if missing:
                raise NotFound(f"environment {name!r} has no variable {', '.join(missing)}; "
                               "nothing was removed")
            await self._rows.remove_variables(db, env_id, wanted)
            await self._finish(db, env_id, name)

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
        env_id, created_at, updated_at, variables = await self._read(name)
        if variables is None:
            raise NotFound(f"environment {name!r} does not exist; `stigmer-broker env list` "
                           "shows the ones that do")
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

    async def resolve(self, name: str) -> dict[str, Variable]:
        """Return every variable of ``name`` with secrets opened (for contexts)."""
        env_id, _, _, variables = await self._read(name)
        if variables is None:
            raise NotFound(f"environment {name!r} does not exist")
        return {key: Variable(value=self._open(sealed, env_id, name, key) if is_secret
                              else value, is_secret=bool(is_secret))
                for key, is_secret, value, sealed, _ in variables}

    async def _read(self, name: str) -> tuple[int, float, float, list[Any] | None]:
        """Return an environment's row and its variable rows, checked, read in one query
        (two reads could straddle a change and look like tampering); None when missing."""
        rows = await self._rows.read(name)
        if not rows:
            return 0, 0.0, 0.0, None
        env_id, created_at, updated_at, mac = rows[0][:4]
        variables = [row[4:] for row in rows if row[4] is not None]
        self._check(env_id, name, mac, variables)
        return env_id, created_at, updated_at, variables

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
