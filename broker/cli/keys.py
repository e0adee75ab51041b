"""The master-key commands: key rotate, key export, key import."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..protocol.errors import BrokerError, FailedPrecondition, InvalidArgument
from .common import (
    EXIT_OK,
    KEY_COMMAND_VARIABLE,
    KEY_VARIABLE,
    UsageError,
    connect,
    key_command_arg,
)
from .inputs import confirm, read_passphrase, read_text
from .render import plural, print_json

if TYPE_CHECKING:
    import argparse

    from ..config import Paths
    from ..protocol import KeyRotated
    from ..store.keys import KeySource

__all__ = ["cmd_key_export", "cmd_key_import", "cmd_key_rotate", "home_key_sources"]


def cmd_key_rotate(args: argparse.Namespace, paths: Paths) -> int:
    import threading

    confirm("replace the master key (the old one will no longer open the store; back the new "
            "one up with `key export`)?", yes=args.yes, command="key rotate")
    results: list[KeyRotated] = []
    failures: list[BrokerError] = []

    def rotate() -> None:
        try:
            with connect(paths) as client:
                client.timeout = max(client.timeout, 3600.0)
                results.append(client.rotate_key())
        except BrokerError as exc:
            failures.append(exc)

    worker = threading.Thread(target=rotate, daemon=True)
    worker.start()
    shown = ""
    with connect(paths) as watcher:  # a second connection reports progress meanwhile
        while worker.is_alive():
            worker.join(0.5)
            if worker.is_alive():
                activity = watcher.status().activity
                if activity and activity != shown:
                    if not shown:  # said once it runs: a refusal comes at once, alone
                        print("rotating the master key (rewrapping data keys, checking every "
                              "sealed value)...", file=sys.stderr)
                    print(f"  {activity}", file=sys.stderr)
                    shown = activity
    if failures:
        raise failures[0]
    result = results[0]
    if args.json:
        print_json({"key_id": result.key_id, "rewrapped": result.rewrapped,
                    "key_source": result.key_source})
        return EXIT_OK
    print(f"master key rotated: new key id {result.key_id}, {plural(result.rewrapped, 'data key')} "
          f"rewrapped, kept in {result.key_source}")
    return EXIT_OK



def cmd_key_export(args: argparse.Namespace, paths: Paths) -> int:
    """Write the master key, wrapped under a passphrase, to a new file."""
    import anyio

    from ..store.backup import MIN_PASSPHRASE, record_backup, write_backup
    from ..store.crypto import key_id_of

    out = Path(args.out)
    if os.path.lexists(out):
        raise UsageError(f"--out {out}: the file exists; choose a new name (nothing is "
                         "overwritten)")
    key = anyio.run(_current_key, paths)
    passphrase = read_passphrase(confirm=True, shortest=MIN_PASSPHRASE)
    text = write_backup(key, passphrase)
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except OSError as exc:
        raise InvalidArgument(f"--out {out}: cannot be created ({exc.strerror})") from None
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    record_backup(paths.key_backup_record, key_id_of(key), out.resolve())
    if args.json:
        print_json({"key_id": key_id_of(key), "file": str(out)})
        return EXIT_OK
    print(f"master key {key_id_of(key)} exported to {out}; keep the passphrase apart from "
          "the file")
    return EXIT_OK


def cmd_key_import(args: argparse.Namespace, paths: Paths) -> int:
    """Restore the master key from a backup into this home's key source."""
    import anyio

    from ..store.backend import peek_store
    from ..store.backup import parse_backup, read_backup, record_backup
    from ..store.keys import check_opens

    source = args.file
    text = read_text(source, "key import")
    header, _ = parse_backup(text, source)
    store = anyio.run(peek_store, _store_location(), paths.store)
    if store.key_ids and header["key_id"] not in store.key_ids:
        raise FailedPrecondition(
            f"{source} holds key {header['key_id']}, but the store {store.where} was made with "
            f"key {sorted(store.key_ids)[0]}; nothing was changed (import into a new home, or "
            "use the backup of this store's key)")
    key = read_backup(text, read_passphrase(confirm=False), source)
    check_opens(key, source, store)  # its data keys too, before the key is installed
    where, replaced = anyio.run(_install_key, paths, key)
    # the key came from a backup: one exists (status no longer says "no backup")
    record_backup(paths.key_backup_record, header["key_id"],
                  Path(source).resolve() if source != "-" else Path("(standard input)"))
    if args.json:
        print_json({"key_id": header["key_id"], "installed_in": where,
                    "moved_aside": replaced or None, "store_opens": bool(store.key_ids)})
        return EXIT_OK
    if replaced:
        print(f"the key file held another key; it is kept in {replaced}", file=sys.stderr)
    state = "opens the store in" if store.key_ids else "is the key of the new home"
    print(f"master key {header['key_id']} imported into {where}; it {state} {paths.home}")
    return EXIT_OK


def _store_location() -> str | None:
    """The shared store this host's broker serves (``STIGMER_STORE_URL``, as `serve` reads
    it), or None for the home's own SQLite file."""
    from ..local.paths import resolve_store

    try:
        return resolve_store(os.environ)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


async def home_key_sources(paths: Paths) -> list[KeySource]:
    """The key sources a broker of this home started from this shell would consult
    (``STIGMER_KEY_COMMAND`` included: a command that prints the key runs here too)."""
    from ..store.keys import key_sources

    return await key_sources(env_key=os.environ.get(KEY_VARIABLE), key_file=paths.key_file,
                             use_keychain=True,
                             key_command=key_command_arg(
                                 None, os.environ.get(KEY_COMMAND_VARIABLE)))


async def _current_key(paths: Paths) -> bytes:
    """The master key as the broker would load it for this home (all sources agree, and
    it opens the store)."""
    from ..store.backend import peek_store
    from ..store.keys import find_master_key

    sources = await home_key_sources(paths)
    master = await find_master_key(
        sources, store=await peek_store(_store_location(), paths.store))
    if master is None:
        raise FailedPrecondition(f"no master key for {paths.home} in "
                                 f"{', '.join(s.describe() for s in sources)}; nothing to "
                                 "export")
    return master.key


async def _install_key(paths: Paths, key: bytes) -> tuple[str, str]:
    """Put ``key`` where the broker will find it; return where, and the file a different
    key there was kept in ("" when none was)."""
    from ..store.keys import KeyFile, KeySourceKind

    sources = await home_key_sources(paths)
    held = {id(source): await source.read() for source in sources}  # each read once
    for source in sources:
        if held[id(source)] == key:
            return source.describe(), ""
        if held[id(source)] is not None and source.kind is KeySourceKind.ENV:
            raise FailedPrecondition(f"{KEY_VARIABLE} holds another key and would win over "
                                     "the imported one; unset it and import again")
        if source.kind is KeySourceKind.COMMAND:
            raise FailedPrecondition(f"{KEY_COMMAND_VARIABLE} gives another key and would win "
                                     "over the imported one; unset it and import again")
    target = next(s for s in sources
                  if s.kind not in (KeySourceKind.ENV, KeySourceKind.COMMAND))
    replaced = ""
    if (old := held[id(target)]) is not None:
        if not isinstance(target, KeyFile):  # the keychain entry is not ours to discard
            raise FailedPrecondition(f"{target.describe()} holds another key; remove it "
                                     "(after backing it up) and import again")
        replaced = str(target.keep_aside(old))
    await target.write(key)
    return target.describe(), replaced
