"""The Status reply, assembled from where its facts live: the config, the store, the
vault, the server's counters, the socket on disk and the domain's counts."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

from .. import __version__
from ..audit import Audit
from ..config import Config
from ..contexts import Contexts
from ..dispatch import Counters
from ..environments import Environments
from ..protocol import Status
from ..protocol.errors import BrokerError
from ..store.backend import MASTER_KEY_ID, Store
from ..store.backup import backed_up_at
from ..store.vault import Vault

__all__ = ["StatusReport"]


class StatusReport:
    """Answers GetStatus (:meth:`__call__`)."""

    def __init__(self, config: Config, store: Store, vault: Vault, counters: Counters,
                 environments: Environments, contexts: Contexts, audit: Audit, *,
                 socket_path: Path, attest_limit: str) -> None:
        self._config = config
        self._audit = audit
        self._store = store
        self._vault = vault
        self._counters = counters
        self._environments = environments
        self._contexts = contexts
        self._socket_path = socket_path
        self._attest_limit = attest_limit  # runner grants it cannot check
        self._started = time.monotonic()

    async def __call__(self, rid: int) -> Status:
        try:  # figures from a shared store: none while it is out (store_problem says so)
            contexts, tokens = await self._contexts.live_counts()
            environments = await self._environments.count()
        except BrokerError:
            if not self._store.shared:
                raise
            contexts = tokens = environments = 0
        try:
            mode = f"{stat.S_IMODE(os.lstat(self._socket_path).st_mode):04o}"
        except OSError:
            mode = "missing"
        counters = self._counters
        return Status(
            id=rid, version=__version__, pid=os.getpid(),
            uptime_s=round(time.monotonic() - self._started, 3),
            socket=str(self._socket_path), socket_mode=mode, store=self._store.describe(),
            store_problem=await self._store_problem(),
            audit_problem=self._audit.problem, key_made_at=self._vault.key_made_at,
            key_source=self._vault.key_source(), started_by=self._config.started_by,
            unit=self._config.unit, activity=counters.activity,
            environments=environments, contexts=contexts, tokens=tokens,
            requests=counters.requests, connections=counters.connections,
            key_backed_up_at=self.key_backed_up_at(), attest_limit=self._attest_limit,
        )

    async def _store_problem(self) -> str:
        problem = self._store.problem()
        if problem or not self._store.shared:
            return problem
        try:
            fleet_key = await self._store.meta(MASTER_KEY_ID)
        except BrokerError as exc:
            return exc.message
        if fleet_key is not None and fleet_key != self._vault.key_id:
            return (f"another broker rotated the fleet's master key (now key id {fleet_key}); "
                    f"this one holds key id {self._vault.key_id}: install the new key here "
                    "before it restarts")
        return ""

    def key_backed_up_at(self) -> float | None:
        """When the current master key was exported, or None (never, or before a
        rotation)."""
        return backed_up_at(self._config.paths.key_backup_record, self._vault.key_id)
