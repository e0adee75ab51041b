"""The audit log: append-only, chained with a key, its head anchored outside the store.

Each record's link is an HMAC, under a key derived from the store's data key (so
only the master key reaches it), over the previous link and the record's own
fields: changing, removing or reordering a record breaks the chain from there
on, and someone who can write the database but has no key cannot rebuild it.
Removing the newest records leaves a valid chain, so after each flush the head
(sequence number and link) is written to an anchor file outside the database
(:mod:`.store.anchor`); ``verify`` names the first record that does not fit,
and a head that went backwards. Records from before the chain was keyed keep
their plain SHA-256 links and may only come first.

Records are buffered in memory and written in one transaction by :meth:`flush`
(the daemon flushes every fraction of a second and right after each admin
change), so the fetch hot path never waits for the disk. Fetches and every
denied request are counted, not written one by one: within a flush interval,
equal events (one token, one process, one outcome) become one record whose
detail says how many (``count=N``), so a peer hammering the socket costs a row
per interval rather than a row per request. Other events close the open counts
first, so the log stays in order. Use counters of tokens ride in the same
transaction. Records never hold a value or a token: only execution ids, token
ids, peer uid/pid, event and outcome.

Retention (:meth:`prune`) removes records older than a cut-off behind a
checkpoint record, chained like any other, that names the last removed record
and its link: the chain stays verifiable from there.

A record's number is the store's to give (the last one + 1, enforced there), so
a login that may append cannot put one out of reach. One that appends a record
without the key breaks the chain at that record; ``verify`` names it, and
:meth:`quarantine` (the operator's ``audit quarantine SEQ``) moves it aside into
``audit_quarantine``, behind a chained record that names it and its link.
Records after it were chained onto that link, so verification goes on past it,
and so does retention.

In a fleet (several brokers on one PostgreSQL store) there is still one chain:
each flush takes a store-wide lock before it reads the head and appends, so
the brokers' records interleave but never fork it. Each broker anchors the
head it last wrote in its own home; that is a lower bound the chain must still
reach, whoever appended after it. Only one broker at a time applies retention.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable, Sequence

import anyio
import anyio.lowlevel
import msgspec

from .protocol import AuditRecord
from .protocol.errors import BrokerError, FailedPrecondition, Internal, NotFound
from .store.anchor import Head, HeadAnchor
from .store.backend import Store, Tx
from .store.vault import Vault

__all__ = ["CHECKPOINT", "GENESIS", "QUARANTINE", "Audit", "Verified"]

log = logging.getLogger("stigmer.broker")

GENESIS = "0" * 64
CHECKPOINT = "audit.checkpoint"
_CHECKPOINT_DETAIL = re.compile(r"removed records through (\d+) \(link (\S+)\)")
QUARANTINE = "audit.quarantined"
_QUARANTINE_DETAIL = re.compile(r"quarantined record (\d+) \(link (.*)\)", re.DOTALL)
#: the largest sequence number a store holds (a signed 64-bit integer)
_LAST_SEQ = 2**63 - 1
_ENC = msgspec.msgpack.Encoder()
_COLUMNS = "seq, at, event, outcome, execution_id, token_id, peer_uid, peer_pid, detail, hash"


def _body(r: AuditRecord) -> bytes:
    return _ENC.encode((r.seq, r.at, r.event, r.outcome, r.execution_id, r.token_id,
                        r.peer_uid, r.peer_pid, r.detail))


def _legacy_link(prev: str, r: AuditRecord) -> str:
    """The plain SHA-256 link of records written before the chain was keyed."""
    body = _ENC.encode((prev, r.seq, r.at, r.event, r.outcome, r.execution_id, r.token_id,
                        r.peer_uid, r.peer_pid, r.detail))
    return hashlib.sha256(body).hexdigest()


class Verified(msgspec.Struct, frozen=True):
    """What :meth:`Audit.verify` found: ``reason`` is empty when all is well."""

    records: int
    first_broken: int | None = None
    reason: str = ""
    #: the seq the head anchor names (None: no anchor, removal at the tail is not checked)
    anchored: int | None = None
    #: records up to this seq were removed by retention, behind a checkpoint
    removed_through: int = 0

    @property
    def ok(self) -> bool:
        return not self.reason


# (at, event, outcome, execution_id, token_id, peer_uid, peer_pid, detail): a plain tuple,
# since a record is made on every fetch
_Pending = tuple[float, str, str, str, str, int | None, int | None, str]


class Audit:
    """Buffers audit records and writes them, chained, to the store."""

    def __init__(self, store: Store, vault: Vault, *, anchor: HeadAnchor | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._vault = vault
        self._anchor = anchor
        self._anchor_frozen = False
        self._problem = ""  # what was last found wrong with the chain
        self._head: Head | None = None  # the head this process last anchored
        self._clock = clock
        self._pending: list[_Pending] = []
        self._counted: dict[tuple[str, str, str, str, int | None, int | None, str],
                            list[float]] = {}
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

    def count(self, event: str, outcome: str, *, execution_id: str = "", token_id: str = "",
              peer_uid: int | None = None, peer_pid: int | None = None,
              detail: str = "") -> None:
        """Count one event (a fetch, a denied request); equal ones within a flush interval
        share a record."""
        key = (event, outcome, execution_id, token_id, peer_uid, peer_pid, detail)
        seen = self._counted.get(key)
        if seen is None:
            self._counted[key] = [self._clock(), 1]
        else:
            seen[1] += 1

    def _close_counts(self) -> None:
        if not self._counted:
            return
        for (event, outcome, execution_id, token_id, uid, pid, detail), (at, n) in \
                self._counted.items():
            shown = " ".join(part for part in (detail, f"count={int(n)}" if n > 1 else "")
                             if part)
            self._pending.append((at, event, outcome, execution_id, token_id, uid, pid, shown))
        self._counted.clear()

    @property
    def pending(self) -> int:
        return len(self._pending) + len(self._counted)

    @property
    def oldest_pending_at(self) -> float | None:
        """When the oldest record still buffered was made (this audit's clock), or None
        when none is."""
        return min((*(p[0] for p in self._pending), *(c[0] for c in self._counted.values())),
                   default=None)

    async def flush(self) -> None:
        """Write every buffered record in one transaction.

        On failure the records stay buffered, in order, for the next flush.
        """
        async with self._flushing:
            await self._flush()

    async def flush_after_write(self) -> None:
        """Flush after a write that has committed: a failure here is logged and retried
        by the next flush, never reported to the client whose write succeeded. (Also
        before reading the log: what cannot be written yet must not stop reading it.)"""
        try:
            await self.flush()
        except BrokerError as exc:
            log.warning("audit records stay buffered (%d): %s", self.pending, exc.message)

    async def _flush(self) -> None:
        self._close_counts()
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        try:
            async with self._store.write() as db:
                head = await self._append(db, pending)
        except BaseException:
            self._pending[:0] = pending  # keep them for the next try, in order
            raise
        await self._anchor_head(head)

    async def _append(self, db: Tx, pending: list[_Pending]) -> Head | None:
        """Chain and insert ``pending`` inside ``db``; return the new head. Records are
        numbered here, inside the transaction that writes them, from the last committed."""
        await db.lock("audit")  # one chain, whichever broker of a fleet appends to it
        last = await db.fetchall("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
        seq, link = (int(last[0][0]), str(last[0][1])) if last else (0, GENESIS)
        if seq + len(pending) > _LAST_SEQ:  # a record written before the store numbered them
            raise Internal(f"the audit log's newest record, {seq}, leaves no numbers for more: "
                           f"`stigmer-broker audit quarantine {seq}` moves it aside")
        if self._head is not None and self._head != (seq, link) and not self._anchor_frozen \
                and not self._store.shared:
            self._frozen(f"the audit log's newest record changed behind the broker's back "
                         f"(record {self._head.seq} was the head; now {seq} is)")
        rows = []
        for at, event, outcome, execution_id, token_id, peer_uid, peer_pid, detail in pending:
            seq += 1
            rec = AuditRecord(seq=seq, at=at, event=event, outcome=outcome,
                              execution_id=execution_id, token_id=token_id, peer_uid=peer_uid,
                              peer_pid=peer_pid, detail=detail)
            link = self._vault.chain(link, _body(rec))
            rows.append((seq, at, event, outcome, execution_id, token_id, peer_uid, peer_pid,
                         detail, link))
        await db.executemany(f"INSERT INTO audit({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)", rows)
        return Head(seq, link) if rows else None

    async def anchor(self) -> None:
        """At start: check the store's chain still reaches the anchored head, then anchor
        the current one. From then on the anchor file exists (and marks this home as one a
        broker with keyed chains has run on).

        When the chain does not reach the anchor (its newest records were removed or
        rewritten), the anchor is left as it is, so ``audit verify`` keeps saying so, and
        is not updated again until someone removes it.
        """
        if self._anchor is None:
            return
        last = await self._store.read("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
        current = Head(int(last[0][0]), str(last[0][1])) if last else Head(0, GENESIS)
        try:
            anchored = self._anchor.read()
        except ValueError as exc:
            self._frozen(str(exc))
            return
        if anchored is not None and anchored.seq > 0:
            link = await self._store.read_one(
                "SELECT hash FROM audit WHERE seq = ? UNION ALL "
                "SELECT hash FROM audit_quarantine WHERE seq = ?", (anchored.seq, anchored.seq))
            if link != anchored.link and not (link is None and current.seq >= anchored.seq):
                self._frozen(f"the audit log does not reach the head anchored in "
                             f"{self._anchor.path} (record {anchored.seq}): records were "
                             "removed or rewritten")
                return
        self._head = current
        await self._anchor.write(current)

    def _frozen(self, why: str) -> None:
        self._problem = why
        log.error("%s; `stigmer-broker audit verify` reports it, and the anchor is no longer "
                  "updated until it is removed", why)
        self._anchor_frozen = True

    async def _anchor_head(self, head: Head | None) -> None:
        if head is not None and self._anchor is not None and not self._anchor_frozen:
            self._head = head
            await self._anchor.write(head)

    async def prune(self, older_than: float) -> int:
        """Remove the records made before ``older_than`` (a time), behind a checkpoint
        record that names the last one removed and its link; return how many.

        Only a chain that verifies is cut: a checkpoint vouches for what it replaces, so
        cutting a tampered chain would launder the tampering.
        """
        verified = await self.verify()
        if not verified.ok:
            log.error("audit retention skipped: the chain does not verify (%s); the records "
                      "are kept as evidence", verified.reason)
            return 0
        async with self._flushing:
            await self._flush()
            async with self._store.write() as db:
                if not await db.try_lock("retention"):
                    return 0  # another broker of the fleet is cutting it right now
                rows = await db.fetchall(
                    "SELECT seq, hash FROM audit WHERE seq <= (SELECT max(seq) FROM audit "
                    "WHERE at < ?) ORDER BY seq DESC LIMIT 1", (older_than,))
                if not rows:
                    return 0
                through, link = int(rows[0][0]), str(rows[0][1])
                first = await db.fetchall("SELECT min(seq) FROM audit")
                head = await self._append(db, [(
                    self._clock(), CHECKPOINT, "ok", "", "", None, None,
                    f"removed records through {through} (link {link})")])
                await db.execute("DELETE FROM audit WHERE seq <= ?", (through,))
            await self._anchor_head(head)
        removed = through - int(first[0][0]) + 1
        log.info("audit retention removed %d records (through %d)", removed, through)
        return removed

    async def list(self, execution_id: str | None, limit: int, *,
                   before: int | None = None) -> tuple[list[AuditRecord], bool]:
        """Return the newest ``limit`` records (of one execution) older than ``before``,
        oldest first, and whether older ones follow."""
        await self.flush_after_write()
        clauses = ["seq < ?"]
        params: list[object] = [before if before is not None else 2**63 - 1]
        if execution_id:
            clauses.append("execution_id = ?")
            params.append(execution_id)
        rows = await self._store.read(
            f"SELECT {_COLUMNS} FROM audit WHERE {' AND '.join(clauses)} ORDER BY seq DESC "
            "LIMIT ?", (*params, limit + 1))
        return [AuditRecord(*r) for r in reversed(rows[:limit])], len(rows) > limit

    @property
    def problem(self) -> str:
        """What this broker last found wrong with the chain (at start, when the head moved
        behind its back, or in the last :meth:`verify`, which retention runs hourly);
        empty when nothing. Only :meth:`verify` checks every link."""
        return self._problem

    async def verify(self) -> Verified:
        """Check the chain from its first record (or its retention checkpoint) to the head,
        past the records quarantined, and the head against its anchor."""
        verified = await self._verify()
        self._problem = verified.reason
        return verified

    async def _verify(self) -> Verified:
        await self.flush_after_write()
        rows = await self._store.read(f"SELECT {_COLUMNS} FROM audit ORDER BY seq")
        records = [AuditRecord(*r) for r in rows]
        quarantined = _quarantined(records)
        first = records[0].seq if records else 1
        while first - 1 in quarantined:
            first -= 1
        removed = first - 1
        prev = GENESIS
        if removed:
            prev = _checkpointed(records, removed) or ""
            if not prev:
                return Verified(0, 1, f"records 1 to {removed} are missing and no checkpoint "
                                "covers their removal")
        keyed = False
        expected = removed + 1
        for n, rec in enumerate(records):
            while rec.seq != expected and expected in quarantined:
                prev = quarantined[expected]  # the records after it were chained onto it
                expected += 1
            if rec.seq != expected:
                if n == len(records) - 1 and rec.seq > expected:
                    return Verified(n, rec.seq, f"record {rec.seq} does not follow record "
                                    f"{expected - 1}: it was not numbered by the store")
                return Verified(n, expected, f"record {expected} is missing")
            if ":" in rec.hash:
                keyed = True
                ok = self._vault.chain_ok(prev, _body(rec), rec.hash)
            else:  # written before the chain was keyed: only ever before every keyed one
                ok = not keyed and _legacy_link(prev, rec) == rec.hash
            if not ok:
                return Verified(n, rec.seq, f"record {rec.seq} does not match its link")
            prev = rec.hash
            expected += 1
            if n % 2000 == 1999:
                await anyio.lowlevel.checkpoint()  # a long chain must not stall fetches
        return self._check_anchor(records, removed, quarantined)

    def _check_anchor(self, records: Sequence[AuditRecord], removed: int,
                      quarantined: dict[int, str]) -> Verified:
        n = len(records)
        if self._anchor is None:
            return Verified(n, removed_through=removed)
        try:
            head = self._anchor.read()
        except ValueError as exc:
            return Verified(n, None, str(exc), removed_through=removed)
        if head is None:
            return Verified(n, removed_through=removed)
        last = records[-1].seq if records else removed
        links = {r.seq: r.hash for r in records}
        link = links.get(head.seq, quarantined.get(head.seq))
        if head.seq > last and link is None:
            return Verified(n, last + 1, f"records {last + 1} to {head.seq} are missing: the "
                            f"head anchor {self._anchor.path} names record {head.seq}",
                            anchored=head.seq, removed_through=removed)
        if head.seq > removed and link != head.link:
            return Verified(n, head.seq, f"record {head.seq} differs from the head anchor "
                            f"{self._anchor.path}", anchored=head.seq, removed_through=removed)
        return Verified(n, anchored=head.seq, removed_through=removed)

    async def quarantine(self, seq: int, *, peer_uid: int | None = None,
                         peer_pid: int | None = None) -> None:
        """Move record ``seq``, the one :meth:`verify` names as bad, out of the chain into
        ``audit_quarantine``, behind a chained record that names it and its link (so the
        records after it, chained onto that link, still verify). Raises
        FailedPrecondition when the chain verifies or names another record, NotFound
        when the record it names is missing rather than bad."""
        verified = await self.verify()
        if verified.ok:
            raise FailedPrecondition("the audit chain verifies: no record is to be "
                                     "quarantined")
        if verified.first_broken != seq:
            named = (f"names record {verified.first_broken}" if verified.first_broken
                     else "names no single record")
            raise FailedPrecondition(f"`stigmer-broker audit verify` {named}, not {seq}; only "
                                     "the record it names is quarantined")
        async with self._flushing:  # what is buffered follows (it may wait on this)
            async with self._store.write() as db:
                await db.lock("audit")
                rows = await db.fetchall(f"SELECT {_COLUMNS} FROM audit WHERE seq = ?", (seq,))
                if not rows:
                    raise NotFound(f"record {seq} is missing, not bad: there is nothing to "
                                   "quarantine (verify says what is wrong)")
                bad = tuple(rows[0])
                await db.execute(f"INSERT INTO audit_quarantine({_COLUMNS}) "
                                 "VALUES (?,?,?,?,?,?,?,?,?,?)", bad)
                note: _Pending = (self._clock(), QUARANTINE, "ok", "", "", peer_uid, peer_pid,
                                  f"quarantined record {seq} (link {bad[-1]})")
                if self._head is not None and self._head.seq == seq:
                    self._head = None  # the head anchored was the bad record: no longer
                last = await db.fetchall("SELECT max(seq) FROM audit")
                if int(last[0][0]) < _LAST_SEQ:  # the note follows it, so no number repeats
                    head = await self._append(db, [note])
                    await db.execute("DELETE FROM audit WHERE seq = ?", (seq,))
                else:  # nothing can follow it (written before the store numbered records)
                    await db.execute("DELETE FROM audit WHERE seq = ?", (seq,))
                    head = await self._append(db, [note])
            await self._anchor_head(head)
        log.warning("audit record %d quarantined (kept in audit_quarantine)", seq)
        await self.flush_after_write()


def _checkpointed(records: list[AuditRecord], through: int) -> str | None:
    """Return the link of record ``through`` as a checkpoint among ``records`` states it."""
    for rec in records:
        if rec.event == CHECKPOINT:
            match = _CHECKPOINT_DETAIL.fullmatch(rec.detail)
            if match and int(match[1]) == through:
                return match[2]
    return None


def _quarantined(records: list[AuditRecord]) -> dict[int, str]:
    """The records quarantined, by seq, with their links, as the chain's records name them
    (a note that does not verify fails the chain where it stands)."""
    out = {}
    for rec in records:
        if rec.event == QUARANTINE:
            match = _QUARANTINE_DETAIL.fullmatch(rec.detail)
            if match:
                out[int(match[1])] = match[2]
    return out
