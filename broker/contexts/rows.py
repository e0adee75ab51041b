"""The rows of contexts, their tokens and grants, and tombstones: every statement on them.

Context and token rows carry a MAC (:class:`Row`), checked when they are read: a
token row inserted, re-pointed or extended by someone without the key is never
returned, so it opens nothing, and a context row that fails is reported by
execution id, for the caller to refuse by name until it is completed. A completed
context leaves a tombstone (MAC'd too) until a copy of its row would have expired,
so a row written back without the key is not served again.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

import msgspec

from ..protocol import KeyInfo, MergedEnvironment
from ..store.backend import Store, Tx
from ..store.crypto import Place, Row
from ..store.notices import ContextEnded
from ..store.vault import Vault, log_refused
from ..tokens import NewToken, new_token
from .index import LiveContext, LiveToken

__all__ = ["ContextRows", "Described", "Read", "Swept", "new_context"]

log = logging.getLogger("stigmer.broker")

_KEYS_DECODER = msgspec.json.Decoder(list[KeyInfo])
_RUNNERS_DECODER = msgspec.json.Decoder(list[str])
_MERGED_DECODER = msgspec.json.Decoder(list[MergedEnvironment])


def new_context(row_id: int, execution_id: str, sealed: bytes, keys: list[KeyInfo],
                created_at: float, expires_at: float) -> LiveContext:
    # the keys are kept as counts only: `show` reads them from the store
    return LiveContext(row_id, execution_id, sealed, len(keys),
                       sum(1 for k in keys if k.is_secret), created_at, expires_at)


@dataclasses.dataclass(frozen=True, slots=True)
class Read:
    """Contexts read and checked, and those whose row failed its MAC (execution id ->
    row id)."""

    contexts: list[LiveContext]
    refused: dict[str, int]


@dataclasses.dataclass(frozen=True, slots=True)
class Described:
    """What a context's row says beside its envelope: its keys (no values), and the
    version of each environment it merged (empty in a row from before versions)."""

    keys: list[KeyInfo]
    environments: list[MergedEnvironment]


@dataclasses.dataclass(frozen=True, slots=True)
class Swept:
    """What a sweep deleted from the store."""

    execution_ids: list[str]  # the expired contexts
    tokens: int  # expired token rows


class ContextRows:
    """The context, token, grant and tombstone rows of one store."""

    def __init__(self, store: Store, vault: Vault) -> None:
        self._store = store
        self._vault = vault

    async def read(self, condition: str, params: tuple[Any, ...]) -> Read:
        """The contexts matching ``condition`` (on ``contexts c``) with their tokens and
        grant, read in one query and checked; a token row that fails is left out."""
        rows = await self._store.read(
            "SELECT c.id, c.execution_id, c.sealed, c.keys, c.created_at, c.expires_at, c.mac, "
            "t.id, t.hash, t.created_at, t.expires_at, t.max_uses, t.uses, t.runners, t.mac, "
            "d.expires_at, d.mac, c.environments FROM contexts c "
            "LEFT JOIN tokens t ON t.context_id = c.id "
            f"LEFT JOIN tombstones d ON d.context_id = c.id WHERE {condition} ORDER BY c.id",
            params)
        vault = self._vault
        # A completed context's rows written back (by a login without the key) are not
        # served again: its tombstone is checked first. (Anyone can add a tombstone that
        # does not check; it is ignored.)
        completed = {row[0] for row in rows if row[15] is not None and vault.check(
            Row.tombstone(row[0], row[1], row[15]), row[16])}
        found: dict[int, LiveContext | None] = {}
        refused: dict[str, int] = {}
        for (row_id, execution_id, sealed, keys_json, created_at, expires_at, mac,
             tid, hash_, t_created, t_expires, max_uses, uses, runners, t_mac,
             _, _, merged) in rows:
            if row_id in completed:
                if row_id not in found:
                    log.warning("the context of execution %r was completed, yet its row is "
                                "back in the store (written back without the key?); not "
                                "served", execution_id)
                    found[row_id] = None
                continue
            if row_id not in found:
                if vault.check(Row.context(row_id, execution_id, created_at, expires_at,
                                           keys_json, sealed, merged), mac):
                    found[row_id] = new_context(row_id, execution_id, sealed,
                                                _KEYS_DECODER.decode(keys_json), created_at,
                                                expires_at)
                else:
                    log_refused(f"the context of execution {execution_id!r}")
                    refused[execution_id] = row_id
                    found[row_id] = None
            context = found[row_id]
            if context is None or tid is None:
                continue
            token = LiveToken(tid, hash_, context, t_created, t_expires, max_uses, uses,
                              tuple(_RUNNERS_DECODER.decode(runners)) if runners else ())
            if not vault.check(token.row(), t_mac):
                log_refused(f"{'runner grant' if runners else 'token'} {tid} of execution "
                            f"{execution_id!r}")
            elif token.runners:
                context.grant = token
            else:
                context.tokens[token.token_id] = token
        return Read([c for c in found.values() if c is not None], refused)

    async def describe(self, context: LiveContext) -> Described | None:
        """The key summary of ``context`` and the environment versions it merged; None
        when its row does not check."""
        rows = await self._store.read(
            "SELECT keys, mac, environments FROM contexts WHERE id = ?", (context.row_id,))
        keys_json, mac, merged = rows[0] if rows else ("[]", None, None)
        if not self._vault.check(Row.context(context.row_id, context.execution_id,
                                             context.created_at, context.expires_at,
                                             keys_json, context.sealed, merged), mac):
            return None
        return Described(_KEYS_DECODER.decode(keys_json),
                         _MERGED_DECODER.decode(merged) if merged is not None else [])

    async def live_counts(self, now: float) -> tuple[int, int]:
        """(live contexts, live tokens) in the store: a fleet's, not one broker's."""
        contexts = await self._store.read_one(
            "SELECT count(*) FROM contexts WHERE expires_at > ?", (now,))
        tokens = await self._store.read_one(
            "SELECT count(*) FROM tokens t JOIN contexts c ON c.id = t.context_id WHERE "
            "t.runners IS NULL AND t.expires_at > ? AND c.expires_at > ? AND "
            "(t.max_uses IS NULL OR t.uses < t.max_uses)", (now, now))
        return int(contexts or 0), int(tokens or 0)

    async def authenticate_unchecked(self) -> int:
        """Authenticate every row that has no MAC yet; return how many. Only for the start
        that migrates a store written before rows carried MACs."""
        async with self._store.write() as db:
            contexts = await db.fetchall(
                "SELECT id, execution_id, created_at, expires_at, keys, sealed FROM contexts "
                "WHERE mac IS NULL")
            for row in contexts:
                await db.execute("UPDATE contexts SET mac = ? WHERE id = ?",
                                 (self._vault.mac(Row.context(*row)), row[0]))
            tokens = await db.fetchall(
                "SELECT id, hash, context_id, created_at, expires_at, max_uses, uses "
                "FROM tokens WHERE mac IS NULL")
            for row in tokens:
                await db.execute("UPDATE tokens SET mac = ? WHERE id = ?",
                                 (self._vault.mac(Row.token(*row)), row[0]))
        return len(contexts) + len(tokens)

    async def insert(self, execution_id: str, plaintext: bytes, keys: list[KeyInfo],
                     merged: list[MergedEnvironment], now: float, expires_at: float, *,
                     token: NewToken | None,
                     token_expires: float, max_uses: int | None,
                     runners: list[str]) -> tuple[LiveContext, LiveToken | None]:
        """Seal and store a new context with its first token and its grant, in one
        transaction; return it (its grant attached) and the token's entry."""
        keys_json = msgspec.json.encode(keys).decode()
        merged_json = msgspec.json.encode(merged).decode()
        async with self._store.write() as db:
            row_id = await db.insert(
                "INSERT INTO contexts(execution_id, sealed, keys, created_at, expires_at, "
                "environments) VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
                (execution_id, b"", keys_json, now, expires_at, merged_json))
            sealed = self._vault.seal(plaintext, Place.context(row_id, execution_id))
            mac = self._vault.mac(Row.context(row_id, execution_id, now, expires_at,
                                              keys_json, sealed, merged_json))
            await db.execute("UPDATE contexts SET sealed = ?, mac = ? WHERE id = ?",
                             (sealed, mac, row_id))
            context = new_context(row_id, execution_id, sealed, keys, now, expires_at)
            entry = None
            if token is not None:
                entry = LiveToken(token.token_id, token.hash, context, now, token_expires,
                                  max_uses, 0)
                await self._insert_token(db, entry)
            if runners:  # a token row that no token opens: a random hash, never handed out
                grant_id = new_token()
                context.grant = LiveToken("g" + grant_id.token_id, grant_id.hash, context, now,
                                          expires_at, max_uses, 0, tuple(runners))
                await self._insert_token(db, context.grant)
        return context, entry

    async def insert_token(self, token: LiveToken) -> None:
        async with self._store.write() as db:
            await self._insert_token(db, token)

    async def _insert_token(self, db: Tx, token: LiveToken) -> None:
        await db.execute(
            "INSERT INTO tokens(id, hash, context_id, created_at, expires_at, max_uses, "
            "runners, mac) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (token.token_id, token.hash, token.context.row_id, token.created_at,
             token.expires_at, token.max_uses, token.runners_json(),
             self._vault.mac(token.row())))

    async def count_use(self, token: LiveToken,
                        expected: int) -> Literal["counted", "gone", "refused"] | int:
        """Count one use of a bounded token if its stored count is still ``expected``
        (compare and set, its MAC with it). Else return the count the store holds (its
        row checked), "gone" when the row is (revoked), or "refused" when it does not
        check (logged)."""
        async with self._store.write() as db:
            done = await db.fetchall(
                "UPDATE tokens SET uses = ?, mac = ? WHERE id = ? AND uses = ? "
                "RETURNING uses", (expected + 1, self._vault.mac(token.row(expected + 1)),
                                   token.token_id, expected))
            current = [] if done else await db.fetchall(
                "SELECT uses, mac FROM tokens WHERE id = ?", (token.token_id,))
        if done:
            return "counted"
        if not current:
            return "gone"
        uses, mac = current[0]
        if not self._vault.check(token.row(int(uses)), mac):
            log_refused(f"token {token.token_id} of execution "
                        f"{token.context.execution_id!r}")
            return "refused"
        return int(uses)

    async def add_uses(self, uses: dict[str, int]) -> None:
        """Add counted uses to unbounded tokens' stored counts (a bounded token's count is
        set by :meth:`count_use`, never added to)."""
        async with self._store.write() as db:
            await db.executemany(
                "UPDATE tokens SET uses = uses + ? WHERE id = ? AND max_uses IS NULL",
                [(n, token_id) for token_id, n in uses.items()])

    async def delete(self, context: LiveContext) -> None:
        """Delete a context and its tokens, leave its tombstone, and tell the fleet."""
        async with self._store.write() as db:
            await db.execute("DELETE FROM tokens WHERE context_id = ?", (context.row_id,))
            await db.execute("DELETE FROM contexts WHERE id = ?", (context.row_id,))
            # kept (the store refuses to drop it sooner) until a copy of the row would
            # have expired anyway
            await db.execute(
                "INSERT INTO tombstones(context_id, execution_id, expires_at, mac) "
                "VALUES (?, ?, ?, ?)",
                (context.row_id, context.execution_id, context.expires_at, self._vault.mac(
                    Row.tombstone(context.row_id, context.execution_id, context.expires_at))))
            db.notify(ContextEnded(context.row_id, context.execution_id))

    async def delete_refused(self, row_id: int, execution_id: str) -> None:
        """Delete a context row that failed its integrity check, and its tokens."""
        async with self._store.write() as db:
            await db.execute("DELETE FROM tokens WHERE context_id = ?", (row_id,))
            await db.execute("DELETE FROM contexts WHERE id = ?", (row_id,))
            db.notify(ContextEnded(row_id, execution_id))

    async def sweep(self, now: float) -> Swept:
        """Delete what expired by ``now``. In a fleet, one broker at a time sweeps the
        store (a store-wide lock; the others skip their turn)."""
        store = self._store
        expired: list[Any] = []
        stale_tokens = 0
        if await store.read_one(
                "SELECT 1 WHERE EXISTS (SELECT 1 FROM contexts WHERE expires_at <= ?) OR "
                "EXISTS (SELECT 1 FROM tokens WHERE expires_at <= ?) OR "
                "EXISTS (SELECT 1 FROM tombstones WHERE expires_at <= ?)", (now, now, now)):
            async with store.write() as db:
                if await db.try_lock("sweep"):
                    expired = await db.fetchall(
                        "SELECT execution_id FROM contexts WHERE expires_at <= ?", (now,))
                    stale_tokens = len(await db.fetchall(
                        "SELECT id FROM tokens WHERE expires_at <= ?", (now,)))
                    await db.execute("DELETE FROM tokens WHERE expires_at <= ? OR context_id "
                                     "IN (SELECT id FROM contexts WHERE expires_at <= ?)",
                                     (now, now))
                    await db.execute("DELETE FROM contexts WHERE expires_at <= ?", (now,))
                    await db.execute("DELETE FROM tombstones WHERE expires_at <= ?", (now,))
        return Swept([execution_id for (execution_id,) in expired], stale_tokens)
