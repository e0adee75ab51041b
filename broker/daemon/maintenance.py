"""The broker's housekeeping, on a schedule of its own: flush the audit buffer, sweep
expired contexts, apply the audit and environment history retentions, give free pages
back."""

from __future__ import annotations

import logging
import time

import anyio

from ..audit import Audit
from ..contexts import Contexts
from ..environments import Environments
from ..protocol.errors import BrokerError
from ..store.backend import Store

__all__ = ["Maintenance"]

log = logging.getLogger("stigmer.broker")


class Maintenance:
    """Runs until cancelled (:meth:`run`); :meth:`close` writes what is still buffered."""

    def __init__(self, store: Store, audit: Audit, contexts: Contexts,
                 environments: Environments, *, retention_s: float | None) -> None:
        self._store = store
        self._audit = audit
        self._contexts = contexts
        self._environments = environments
        self._retention_s = retention_s

    async def run(self, *, flush_interval: float = 0.2, sweep_interval: float = 10.0,
                  retention_interval: float = 3600.0) -> None:
        """Run forever: flush every ``flush_interval``, sweep every ``sweep_interval``,
        cut the audit every ``retention_interval`` (the first cut soon after start)."""
        next_sweep = time.monotonic() + sweep_interval
        next_retention = time.monotonic()  # the first cut runs soon, not in start-up
        while True:
            await anyio.sleep(flush_interval)
            try:
                await self._audit.flush()
                await self._contexts.flush_uses()
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + sweep_interval
                    if await self._contexts.sweep():
                        await self._audit.flush()
                        await self._store.reclaim()
                if time.monotonic() >= next_retention:
                    next_retention = time.monotonic() + retention_interval
                    await self.retain()
            except BrokerError as exc:  # disk full and the like: keep buffering, retry
                log.warning("background write failed: %s", exc.message)
            except Exception:  # a bug here must not take the daemon down with it
                log.exception("background maintenance failed; retrying")

    async def retain(self) -> None:
        """Cut the audit records older than the retention (when one is set), and the
        environment versions older than theirs (when it is a duration)."""
        retention = self._retention_s
        pruned = retention is not None and await self._audit.prune(time.time() - retention)
        if await self._environments.prune_history() or pruned:
            await self._store.reclaim()

    async def close(self) -> None:
        """Write what is still buffered."""
        try:
            await self._audit.flush()
        except BrokerError as exc:
            log.error("could not write %d buffered audit records: %s", self._audit.pending,
                      exc.message)
        try:
            await self._contexts.flush_uses()
        except BrokerError as exc:
            log.error("could not write the use counts of %d tokens: %s",
                      len(self._contexts.index.uses), exc.message)
