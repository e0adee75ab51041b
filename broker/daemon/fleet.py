"""Following what the other brokers of a fleet change in the shared store."""

from __future__ import annotations

import logging

from ..contexts import Contexts
from ..metrics import NULL_RECORDER, Recorder
from ..store.backend import Store
from ..store.notices import MasterKeyRotated, Notice
from ..store.vault import Vault

__all__ = ["follow_fleet"]

log = logging.getLogger("stigmer.broker")


async def follow_fleet(store: Store, vault: Vault, contexts: Contexts, *,
                       recorder: Recorder = NULL_RECORDER) -> None:
    """Run forever: drop from the cache what another broker revoked, and all of it when
    the store may have missed saying so (a single-host store returns at once)."""

    def heard(notice: Notice) -> None:
        recorder.notice_heard()
        if isinstance(notice, MasterKeyRotated) and notice.key_id != vault.key_id:
            # not our own rotation
            log.warning("another broker of the fleet rotated the master key (now key id %s); "
                        "this one keeps serving, but needs the new key before it next "
                        "starts", notice.key_id)
        contexts.heard(notice)

    await store.watch(heard, contexts.resync)
