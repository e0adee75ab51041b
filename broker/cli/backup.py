"""The store's backup commands: ``backup --out FILE`` and ``restore FILE [--replace]``.

Both work on the SQLite file directly (the file-level work is in
:mod:`..store.snapshot`), not through the daemon: a daemon under the systemd
unit may write only inside its home (``ProtectSystem=strict``), so it could not
create ``--out`` where the user asks, and SQLite already gives a reader a
consistent snapshot while the daemon writes (WAL mode). So ``backup`` takes the
same path with or without a daemon; without one it holds the home's lock while
it copies, so none starts meanwhile.

``restore`` checks everything on a copy staged in the home before it touches the
store: the copy opens with this home's master key, and its audit chain verifies
up to the anchor the backup carries. Only then, holding the home's lock, does
it move the old store aside and rename the copy into place.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from ..protocol.errors import FailedPrecondition
from .common import EXIT_OK, UsageError
from .render import print_json

if TYPE_CHECKING:
    import argparse

    from ..config import Paths
    from ..daemon.homelock import HomeLock
    from ..store.anchor import Head

__all__ = ["cmd_backup", "cmd_restore"]

_FLEET = ("the store is a fleet's PostgreSQL database: {what} it with pg_dump/pg_restore "
          "(README, \"A fleet\"), not with stigmer-broker")


def cmd_backup(args: argparse.Namespace, paths: Paths) -> int:
    """Copy the store, consistently, to a new 0600 file with the audit head anchor."""
    from ..store.anchor import HeadAnchor
    from ..store.snapshot import SnapshotError, take

    _refuse_fleet("back up")
    out = Path(args.out)
    if os.path.lexists(out):  # as `key export`; take() refuses it again, atomically
        raise UsageError(f"--out {out}: the file exists; choose a new name (nothing is "
                         "overwritten)")
    with _idle_home_or_serving(paths):
        try:  # before the snapshot: an anchor read first never names a record it lacks
            anchor = HeadAnchor(paths.audit_anchor).read()
        except ValueError as exc:
            raise SnapshotError(f"{exc}; `stigmer-broker audit verify` says more") from None
        taken = take(paths.store, anchor, out)
    size = out.stat().st_size
    if args.json:
        print_json({"file": str(out), "store": str(paths.store), "bytes": size,
                    "audit_head": taken.head,
                    "anchored": None if taken.anchor is None else taken.anchor.seq})
        return EXIT_OK
    print(f"backed up {paths.store} to {out} ({size} bytes, audit records through "
          f"{taken.head}); `stigmer-broker restore {out}` puts it back")
    return EXIT_OK


def cmd_restore(args: argparse.Namespace, paths: Paths) -> int:
    """Check a backup on a staged copy, then install it in place of the store."""
    import anyio

    from ..daemon.homelock import holder, lock_idle_home, prepare_home
    from ..store.snapshot import install, side_files

    _refuse_fleet("restore")
    backup = Path(args.file)
    if not backup.is_file():
        raise UsageError(f"{backup}: no such backup file")
    if holder(paths.home) is not None:
        raise _serving(paths)
    _refuse_existing(paths, args.replace)
    prepare_home(paths.home)
    # the store's own log lines would add a second line (or a traceback) to the one we print
    import logging  # here: the parser imports this module for every command

    logging.getLogger("stigmer.broker").addHandler(logging.NullHandler())
    staged = paths.home / f".restore-{os.getpid()}.db"
    staged_anchor = paths.home / f".restore-{os.getpid()}.head"
    try:
        checked = anyio.run(_stage, backup, staged, staged_anchor, paths)
        lock = lock_idle_home(paths.home)
        if lock is None:
            raise _serving(paths, meanwhile=True)
        try:
            _refuse_existing(paths, args.replace)  # a broker may have come and gone
            replaced = install(staged, paths.store,
                               staged_anchor if checked.anchor is not None else None,
                               paths.audit_anchor)
        finally:
            lock.release()
    finally:
        for leftover in (staged, *side_files(staged), staged_anchor,
                         staged_anchor.with_name(staged_anchor.name + ".tmp")):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
    if args.json:
        print_json({"file": str(backup), "store": str(paths.store), "key_id": checked.key_id,
                    "audit_records": checked.records,
                    "moved_aside": [p for p in replaced if p] or None})
        return EXIT_OK
    kept = " and ".join(p for p in replaced if p)
    print(f"restored {backup} into {paths.store}: master key {checked.key_id}, audit chain "
          f"intact ({checked.records} records)" + (f"; the old files are kept as {kept}"
                                                   if kept else ""))
    return EXIT_OK


class _Checked(NamedTuple):
    key_id: str
    records: int
    anchor: Head | None


async def _stage(backup: Path, staged: Path, staged_anchor: Path, paths: Paths) -> _Checked:
    """Copy ``backup`` to ``staged`` and check it as the daemon would open it: the key
    (any write unlocking makes, finishing a rotation, lands on the copy) and the chain."""
    from ..audit import Audit
    from ..store.anchor import HeadAnchor
    from ..store.backend import peek_store
    from ..store.keys import KeySourceError, find_master_key
    from ..store.snapshot import SnapshotError, unpack
    from ..store.sqlite import SqliteStore
    from ..store.vault import Vault
    from .keys import home_key_sources

    anchor = unpack(backup, staged)
    peek = await peek_store(None, staged)
    accepted = peek.key_ids
    if not accepted:  # and a start would make a key for it: refuse before
        raise SnapshotError(f"{backup} holds a store no broker has opened (no master key "
                            "id); there is nothing to restore")
    if anchor is not None:
        HeadAnchor(staged_anchor).save(anchor)
    sources = await home_key_sources(paths)
    if peek.legacy_rows:
        raise SnapshotError(f"{backup} holds a store of an old schema; start a broker on it "
                            "once, then back it up again")
    try:
        master = await find_master_key(sources, store=peek)  # the key opens it, or refuse
    except KeySourceError:
        held = set()
        for source in sources:
            with contextlib.suppress(KeySourceError):
                if (key := await source.read()) is not None:
                    held.add(_key_id(key))
        if held & accepted:
            raise  # the key is there; the message says what else is wrong
        where = ", ".join(s.describe() for s in sources)
        raise FailedPrecondition(
            f"{backup} needs master key {sorted(accepted)[0]}, which this home's key "
            f"sources ({where}) do not hold: restore that key from its backup with "
            "`stigmer-broker key import KEY_BACKUP`, then run restore again; nothing was "
            "changed") from None
    assert master is not None  # the store has key ids: no key would have raised
    store = await SqliteStore.open(staged)  # the copy: what opening writes lands there
    try:
        vault = await Vault.unlock(store, master)
        verified = await Audit(store, vault, anchor=HeadAnchor(staged_anchor)
                               if anchor is not None else None).verify()
        if not verified.ok:
            reason = verified.reason.replace(f"head anchor {staged_anchor}",
                                             "head anchor in the backup")
            raise SnapshotError(f"{backup}: the audit chain does not verify ({reason}); the "
                                "backup was changed or damaged, nothing was changed")
        return _Checked(vault.key_id, verified.records, anchor)
    finally:
        await store.close()


def _key_id(key: bytes) -> str:
    from ..store.crypto import key_id_of

    return key_id_of(key)


def _refuse_fleet(what: str) -> None:
    from ..local.paths import resolve_store

    try:
        url = resolve_store(os.environ, None)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if url is not None:
        raise FailedPrecondition(_FLEET.format(what=what))


def _serving(paths: Paths, *, meanwhile: bool = False) -> FailedPrecondition:
    when = " started meanwhile and" if meanwhile else ""
    return FailedPrecondition(f"a broker{when} serves {paths.home}: stop it first "
                              "(`stigmer-broker stop`), then run restore again; nothing was "
                              "changed")


def _refuse_existing(paths: Paths, replace: bool) -> None:
    from ..store.snapshot import side_files

    if replace:
        return
    if any(os.path.lexists(p) for p in (paths.store, *side_files(paths.store))):
        raise FailedPrecondition(f"{paths.home} already has a store ({paths.store}); "
                                 "`restore --replace` moves it aside (never deletes it) and "
                                 "restores in its place; nothing was changed")


@contextlib.contextmanager
def _idle_home_or_serving(paths: Paths) -> Iterator[HomeLock | None]:
    """Hold the home's lock while no daemon serves it (None when one does: SQLite's read
    transaction keeps the copy consistent while it writes)."""
    from ..daemon.homelock import lock_idle_home

    lock = lock_idle_home(paths.home) if paths.home.is_dir() else None
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
