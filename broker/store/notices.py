"""What one broker of a fleet tells the others through a shared store.

A write transaction queues a :data:`Notice` (:meth:`~.backend.Tx.notify`); once it
commits, every other broker on the store hears it (:meth:`~.backend.Store.watch`).
This module is the one place a notice becomes text (:func:`encode`, for
``pg_notify``) and text becomes a notice again (:class:`Hearing`).

The channel is not ours alone: any login to the database may ``NOTIFY`` on it. So
a payload that is not a notice is dropped and logged (at most once a minute, with
a count), never raised into the listener, which must keep listening. And since it
may have been a revocation in a form this broker does not read (a broker of another
version), the listener resynchronises, as after a lost connection: it drops its
cache at the next heartbeat (:meth:`Hearing.missed`). A stream of garbage costs
cache misses, never a revoked context served.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Annotated

import msgspec
from msgspec import Meta

__all__ = ["ContextEnded", "Hearing", "MasterKeyRotated", "Notice", "encode"]

log = logging.getLogger(__name__)

#: how long, at least, between two log lines about malformed notices
QUIET_FOR = 60.0


class ContextEnded(msgspec.Struct, frozen=True, tag="ctx"):
    """A context row was deleted (completed, expired, or refused and cleared): forget
    any cached copy of it and its tokens."""

    row_id: Annotated[int, Meta(ge=1)]
    execution_id: str


class MasterKeyRotated(msgspec.Struct, frozen=True, tag="key"):
    """The store's master key was rotated; ``key_id`` is the new key's public id."""

    key_id: str


Notice = ContextEnded | MasterKeyRotated

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Notice)


def encode(notice: Notice) -> str:
    """The payload that carries ``notice``."""
    return _encoder.encode(notice).decode()


class Hearing:
    """Decode each payload heard on the channel and pass the notice to ``changed``;
    drop (and log, rate-limited) what is not a notice."""

    def __init__(self, changed: Callable[[Notice], None], *, quiet_for: float = QUIET_FOR,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._changed = changed
        self._quiet_for = quiet_for
        self._clock = clock
        self._logged_at: float | None = None
        self._dropped = 0  # since the last log line
        self._missed = False  # since the listener last asked

    def __call__(self, payload: str) -> None:
        try:
            notice = _decoder.decode(payload)
        except msgspec.DecodeError:
            self._drop()
            return
        self._changed(notice)

    def missed(self) -> bool:
        """Whether a payload was dropped since the last call: what it said is unknown,
        so the caller must drop what it cached."""
        missed, self._missed = self._missed, False
        return missed

    def _drop(self) -> None:
        self._missed = True
        self._dropped += 1
        now = self._clock()
        if self._logged_at is not None and now - self._logged_at < self._quiet_for:
            return
        # not the payload, nor msgspec's reason (which quotes it): whoever wrote it may
        # have put anything there
        log.warning("ignored %d malformed notification(s) on the fleet's channel, and "
                    "dropped the cache: something other than a broker of this version is "
                    "notifying on it", self._dropped)
        self._logged_at = now
        self._dropped = 0
