"""The append-only, hash-chained audit log.

Each record's hash is SHA-256 over the previous record's hash and the record's
own fields, so changing, removing or reordering any record breaks the chain
from there on; ``verify`` names the first record that does not fit.

Records are buffered in memory and written in one transaction by :meth:`flush`
(the daemon flushes every fraction of a second and right after each admin
change), so the fetch hot path never waits for the disk. Fetches are counted,
not written one by one: within a flush interval, the fetches of one token by
one process with one outcome become one record whose detail says how many
(``count=N``), so a runner hammering the socket costs a row per interval rather
than a row per request. Other events close the open counts first, so the log
stays in order. Use counters of tokens ride in the same transaction. Records
never hold a value or a token: only execution ids, token ids, peer uid/pid,
event and outcome.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable

import anyio
import msgspec

from .protocol import AuditRecord
from .protocol.errors import BrokerError
from .store.sqlite import Store

__all__ = ["GENESIS", "Audit", "record_hash"]

log = logging.getLogger("stigmer.broker")

GENESIS = "0" * 64
_ENC = msgspec.msgpack.Encoder()


def record_hash(prev: str, r: AuditRecord) -> str:
    """Return the chain hash of ``r`` following ``prev``."""
    body = _ENC.encode((prev, r.seq, r.at, r.event, r.outcome, r.execution_id, r.token_id,
                        r.peer_uid, r.peer_pid, r.detail))
    return hashlib.sha256(body).hexdigest()


# (at, event, outcome, execution_id, token_id, peer_uid, peer_pid, detail): a plain tuple,
# since a record is made on every fetch
_Pending = tuple[float, str, str, str, str, int | None, int | None, str]


class Audit:
    """Buffers audit records and writes them, chained, to the store."""

    def __init__(self, store: Store, *, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock
        self._pending: list[_Pending] = []
        self._counted: dict[tuple[str, str, str, int | None, int | None], list[float]] = {}
        self._uses: dict[str, int] = {}
        # One flush at a time: each numbers its records from where the last one ended,
        # so two interleaved flushes would give two records the same sequence number.
        self._flushing = anyio.Lock()

    def record(self, event: str, outcome: str, *, execution_id: str = "", token_id: str = "",
               peer_uid: int | None = None, peer_pid: int | None = None,
               detail: str = "") -> None:
        """Buffer one record (written by the next flush)."""
        self._close_counts()
        self._pending.append((self._clock(), event, outcome, execution_id, token_id, peer_uid,
                              peer_pid, detail))

    def count_fetch(self, outcome: str, execution_id: str, token_id: str,
                    peer_uid: int | None, peer_pid: int | None) -> None:
        """Count one fetch; equal ones within a flush interval share a record."""
        key = (outcome, execution_id, token_id, peer_uid, peer_pid)
        seen = self._counted.get(key)
        if seen is None:
            self._counted[key] = [self._clock(), 1]
        else:
            seen[1] += 1

    def _close_counts(self) -> None:
        if not self._counted:
            return
        for (outcome, execution_id, token_id, uid, pid), (at, count) in self._counted.items():
            self._pending.append((at, "fetch", outcome, execution_id, token_id, uid, pid,
                                  f"count={int(count)}" if count > 1 else ""))
        self._counted.clear()

    def count_use(self, token_id: str, uses: int) -> None:
        """Remember an unbounded token's use count for the next flush."""
        self._uses[token_id] = uses

    @property
    def pending(self) -> int:
        return len(self._pending) + len(self._counted) + len(self._uses)

    async def flush(self) -> None:
        """Write every buffered record and use count in one transaction.

        On failure the records stay buffered, in order, for the next flush.
        """
        async with self._flushing:
            await self._flush()

    async def flush_after_write(self) -> None:
        """Flush after a write that has committed: a failure here is logged and retried
        by the next flush, never reported to the client whose write succeeded."""
        try:
            await self.flush()
        except BrokerError as exc:
            log.warning("audit records stay buffered (%d): %s", self.pending, exc.message)

    async def _flush(self) -> None:
        self._close_counts()
        if not self._pending and not self._uses:
            return
        pending, self._pending = self._pending, []
        uses, self._uses = self._uses, {}
        try:
            async with self._store.write() as db:
                # numbered inside the transaction that writes them, from the chain's
                # last committed record
                last = await db.fetchall("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
                seq, prev = (int(last[0][0]), str(last[0][1])) if last else (0, GENESIS)
                rows = []
                for at, event, outcome, execution_id, token_id, peer_uid, peer_pid, detail \
                        in pending:
                    seq += 1
                    rec = AuditRecord(seq=seq, at=at, event=event, outcome=outcome,
                                      execution_id=execution_id, token_id=token_id,
                                      peer_uid=peer_uid, peer_pid=peer_pid, detail=detail)
                    prev = record_hash(prev, rec)
                    rows.append((rec.seq, rec.at, rec.event, rec.outcome, rec.execution_id,
                                 rec.token_id, rec.peer_uid, rec.peer_pid, rec.detail, prev))
                await db.executemany(
                    "INSERT INTO audit(seq, at, event, outcome, execution_id, token_id, "
                    "peer_uid, peer_pid, detail, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    rows)
                await db.executemany("UPDATE tokens SET uses = ? WHERE id = ?",
                                     [(n, tid) for tid, n in uses.items()])
        except BaseException:
            self._pending[:0] = pending  # keep them for the next try, in order
            for tid, n in uses.items():
                self._uses.setdefault(tid, n)
            raise

    async def list(self, execution_id: str | None, limit: int) -> list[AuditRecord]:
        """Return the newest ``limit`` records (of one execution), oldest first."""
        await self.flush()
        where, params = ("WHERE execution_id = ?", (execution_id,)) if execution_id else ("", ())
        rows = await self._store.read(
            "SELECT seq, at, event, outcome, execution_id, token_id, peer_uid, peer_pid, "
            f"detail, hash FROM audit {where} ORDER BY seq DESC LIMIT ?", (*params, limit))
        return [AuditRecord(seq=r[0], at=r[1], event=r[2], outcome=r[3], execution_id=r[4],
                            token_id=r[5], peer_uid=r[6], peer_pid=r[7], detail=r[8],
                            hash=r[9]) for r in reversed(rows)]

    async def verify(self) -> tuple[int, int | None, str]:
        """Return (records checked, seq of the first broken record or None, reason)."""
        await self.flush()
        rows = await self._store.read(
            "SELECT seq, at, event, outcome, execution_id, token_id, peer_uid, peer_pid, "
            "detail, hash FROM audit ORDER BY seq")
        prev, expected_seq = GENESIS, 1
        for n, r in enumerate(rows):
            rec = AuditRecord(seq=r[0], at=r[1], event=r[2], outcome=r[3], execution_id=r[4],
                              token_id=r[5], peer_uid=r[6], peer_pid=r[7], detail=r[8])
            if rec.seq != expected_seq:
                return n, expected_seq, f"record {expected_seq} is missing"
            digest = record_hash(prev, rec)
            if digest != r[9]:
                return n, rec.seq, f"record {rec.seq} does not match its hash"
            prev, expected_seq = digest, expected_seq + 1
        return len(rows), None, ""
