"""Composing the broker over an unlocked store, and what a start does to the store first.

:func:`refuse_replaced_store` runs on what was read before the store was opened
(so a refused store is not migrated); :func:`compose` builds the domain
objects, the dispatcher, its status report and the housekeeping, once, and
brings the store's rows up to date: rows of a store from before row MACs are
authenticated (only on the start that migrates it), and the live contexts are
loaded.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from pathlib import Path

from ..audit import Audit
from ..config import Config
from ..contexts import Contexts
from ..dispatch import Counters, Dispatcher
from ..environments import Environments, Retention
from ..store.anchor import HeadAnchor
from ..store.backend import Store, StoreError, StorePeek
from ..store.vault import Vault
from .maintenance import Maintenance
from .status import StatusReport

__all__ = ["Composed", "compose", "refuse_replaced_store"]

log = logging.getLogger("stigmer.broker")


def refuse_replaced_store(config: Config, store: StorePeek) -> None:
    """Refuse a store with an old schema on a home where a newer broker already ran (its
    audit head anchor exists): the store was replaced by an older file. Raises
    StoreError."""
    anchor = HeadAnchor(config.paths.audit_anchor)
    if store.legacy_rows and anchor.exists():
        raise StoreError(
            f"store {store.where} has an old schema, but a newer broker already ran on this "
            f"home ({anchor.path} exists): the store was replaced by an older file. If you "
            f"restored a backup on purpose, remove {anchor.path} and start again")


@dataclasses.dataclass(frozen=True, slots=True)
class Composed:
    """The broker's parts over one store, ready to serve."""

    dispatcher: Dispatcher
    status: StatusReport
    maintenance: Maintenance
    contexts: Contexts


async def compose(config: Config, store: Store, vault: Vault, counters: Counters, *,
                  socket_path: Path, attest_limit: str = "",
                  request_shutdown: Callable[[], None]) -> Composed:
    """Build the broker over ``store`` and bring its rows up to date."""
    anchor = HeadAnchor(config.paths.audit_anchor, journal=bool(config.unit))
    environments = Environments(store, vault, Retention(
        versions=config.env_history_versions, seconds=config.env_history_s))
    audit = Audit(store, vault, anchor=anchor)
    contexts = Contexts(store, vault, environments, audit)
    if store.legacy_rows:
        rows = (await environments.authenticate_unchecked()
                + await contexts.authenticate_unchecked())
        log.info("authenticated %d rows of a store written before rows carried MACs", rows)
    elif store.migrated_from == 0 and anchor.exists():
        kept = anchor.path.with_name(anchor.path.name + ".replaced")
        os.replace(anchor.path, kept)
        log.warning("a new store was created where an audit head anchor existed; the old "
                    "anchor is kept as %s", kept)
    await contexts.load()
    await audit.anchor()
    status = StatusReport(config, store, vault, counters, environments, contexts, audit,
                          socket_path=socket_path, attest_limit=attest_limit)
    dispatcher = Dispatcher(environments, audit, contexts, vault, counters, status=status,
                            request_shutdown=request_shutdown,
                            largest_reply=config.limits.max_frame_size - 1024)
    return Composed(dispatcher, status,
                    Maintenance(store, audit, contexts, environments,
                                retention_s=config.audit_retention_s),
                    contexts)
