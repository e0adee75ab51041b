"""Execution contexts and their tokens: created merged and sealed, fetched from memory.

Theory of operation: a context is merged once, at creation, and sealed as one
record at its :meth:`Place.context` (row id, execution id); later edits to its
environments do not change it. The daemon keeps every live context in memory,
*still sealed*, indexed by execution id and by token hash, and the store in
step with it (each change is written first, then applied in memory). A fetch is
then a hash lookup and one AES-GCM open, with no thread hop and no disk write:
its audit record and use count are buffered and written by the next flush.
Decrypted values exist only while a fetch reply is being built.

Every way a token can fail (unknown, expired, revoked, used up, context gone)
gives the same Unauthenticated answer, so a token reveals nothing about which
contexts exist.

Context and token rows carry a MAC (:class:`Row`), checked when they are loaded:
a token row inserted, re-pointed or extended by someone without the key is
never indexed, so it opens nothing, and a context row that fails is refused by
name until it is completed. Memory is authoritative while the daemon runs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from typing import Any, NoReturn

import msgspec

from .audit import Audit
from .environments import MAX_ENVIRONMENT_BYTES, Environments, check_values
from .grants import canonical_grants, matching_selector
from .local.peer import Peer
from .merge import merge
from .protocol import (
    ContextSummary,
    CreateContext,
    KeyInfo,
    TokenInfo,
    Variable,
)
from .protocol.errors import (
    AlreadyExists,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from .store.backend import Store, Tx
from .store.crypto import Place, Row, SealError
from .store.notices import ContextEnded, Notice
from .store.vault import Vault, log_refused, tampered
from .tokens import NewToken, new_token, token_hash

__all__ = ["Contexts", "Created", "Fetched"]

log = logging.getLogger("stigmer.broker")

_VARS_ENCODER = msgspec.msgpack.Encoder()
_VARS_DECODER = msgspec.msgpack.Decoder(dict[str, Variable])
_KEYS_DECODER = msgspec.json.Decoder(list[KeyInfo])
_RUNNERS_ENCODER = msgspec.json.Encoder()
_RUNNERS_DECODER = msgspec.json.Decoder(list[str])

UNAUTHENTICATED = ("the execution token is not valid (unknown, expired, revoked or used up); "
                   "ask the control side for a new one")


#: the one refusal of a fetch or release by execution id, whatever the cause (no such
#: context, no grant, another uid or binary, expired, completed, used up): the same words
#: for every execution id, so that it tells nothing
NOT_GRANTED = ("no live context of that execution id is open to this process; check the id, "
               "and the --runner selectors the context was created with")
#: what an id with no usable grant is matched against: a uid the kernel never reports
_NO_GRANT = ("user:4294967295",)


@dataclasses.dataclass(eq=False, slots=True)
class _Context:
    row_id: int
    execution_id: str
    sealed: bytes = dataclasses.field(repr=False)
    n_keys: int
    n_secrets: int
    created_at: float
    expires_at: float
    tokens: dict[str, _Token] = dataclasses.field(default_factory=dict, repr=False)
    grant: _Token | None = dataclasses.field(default=None, repr=False)  # runner selectors

    bound: bytes = b""  # associated data binding ``sealed`` to this context, made once

    def __post_init__(self) -> None:
        try:
            self.bound = Vault.bind(self.sealed, Place.context(self.row_id, self.execution_id))
        except SealError:
            self.bound = b""  # a damaged envelope: every fetch of it fails cleanly


def _new_context(row_id: int, execution_id: str, sealed: bytes, keys: list[KeyInfo],
                 created_at: float, expires_at: float) -> _Context:
    # the keys are kept as counts only: `show` reads them from the store
    return _Context(row_id, execution_id, sealed, len(keys),
                    sum(1 for k in keys if k.is_secret), created_at, expires_at)


@dataclasses.dataclass(eq=False, slots=True)
class _Token:
    token_id: str
    hash: bytes = dataclasses.field(repr=False)
    context: _Context = dataclasses.field(repr=False)
    created_at: float
    expires_at: float
    max_uses: int | None
    uses: int
    runners: tuple[str, ...] = ()  # a grant: who may open the context by execution id

    def usable(self, now: float) -> bool:
        return (self.expires_at > now and self.context.expires_at > now
                and (self.max_uses is None or self.uses < self.max_uses))

    def row(self, uses: int | None = None) -> Row:
        return Row.token(self.token_id, self.hash, self.context.row_id, self.created_at,
                         self.expires_at, self.max_uses, self.uses if uses is None else uses,
                         self.runners_json())

    def runners_json(self) -> str | None:
        return _RUNNERS_ENCODER.encode(list(self.runners)).decode() if self.runners else None


@dataclasses.dataclass(frozen=True, slots=True)
class Created:
    execution_id: str
    expires_at: float
    token: NewToken | None
    token_expires_at: float
    keys: list[KeyInfo]
    runners: list[str]


@dataclasses.dataclass(frozen=True, slots=True)
class Fetched:
    """An opened context: ``plaintext`` is the msgpack of its ``dict[str, Variable]``.

    ``pending_use`` is the token whose use must be counted in the store
    (:meth:`Contexts.persist_use`) before the reply may leave: set for tokens with
    max-uses; ``detail`` is what the audit record of that use will say.
    """

    execution_id: str
    expires_at: float
    plaintext: bytes = dataclasses.field(repr=False)
    pending_use: _Token | None = dataclasses.field(default=None, repr=False)
    detail: str = ""

    def variables(self) -> dict[str, Variable]:
        return _VARS_DECODER.decode(self.plaintext)


class Contexts:
    """Every live execution context, sealed in memory and in the store.

    With a store that other brokers share (:attr:`Store.shared`), memory is a
    cache: a miss is looked up in the store once and cached, what another broker
    revokes is dropped when the store says so (:meth:`heard`), everything is
    dropped when the store may have missed saying so (:meth:`resync`), and
    nothing cached is served once :meth:`Store.fresh_until` has passed.
    """

    def __init__(self, store: Store, vault: Vault, environments: Environments, audit: Audit, *,
                 clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._shared = store.shared
        self._writable = True  # set by load(): a fleet's runner-host role may not write
        self._vault = vault
        self._environments = environments
        self._audit = audit
        self._clock = clock
        self._by_execution: dict[str, _Context] = {}
        self._by_hash: dict[bytes, _Token] = {}
        self._refused: dict[str, int] = {}  # execution id -> row id of a row failing its MAC
        # bumped by every change heard from the store: a lookup that straddled one does
        # not cache what it read
        self._generation = 0

    # --------------------------------------------------------------------- counts

    async def live_counts(self) -> tuple[int, int]:
        """Return (live contexts, live tokens)."""
        now = self._clock()
        if self._shared:  # the fleet's, not this broker's cache
            contexts = await self._store.read_one(
                "SELECT count(*) FROM contexts WHERE expires_at > ?", (now,))
            tokens = await self._store.read_one(
                "SELECT count(*) FROM tokens t JOIN contexts c ON c.id = t.context_id WHERE "
                "t.runners IS NULL AND t.expires_at > ? AND c.expires_at > ? AND "
                "(t.max_uses IS NULL OR t.uses < t.max_uses)", (now, now))
            return int(contexts or 0), int(tokens or 0)
        contexts = sum(1 for c in self._by_execution.values() if c.expires_at > now)
        tokens = sum(1 for t in self._by_hash.values() if t.usable(now))
        return contexts, tokens

    # ----------------------------------------------------------------- start-up

    async def load(self) -> None:
        """Drop what expired while we were down, then index the rest in memory (a shared
        store's contexts are cached as they are asked for); a row that fails its MAC is
        logged and not indexed."""
        self._writable = await self._store.can_write()
        await self.sweep()
        if not self._shared:
            self._install(await self._read_contexts("1 = 1", ()))

    async def _read_contexts(self, condition: str, params: tuple[Any, ...]) -> list[_Context]:
        """The contexts matching ``condition`` (on ``contexts c``) with their tokens and
        grant, read in one query and checked; a context row that fails its MAC is noted
        in ``_refused``, a token row that fails is left out."""
        rows = await self._store.read(
            "SELECT c.id, c.execution_id, c.sealed, c.keys, c.created_at, c.expires_at, c.mac, "
            "t.id, t.hash, t.created_at, t.expires_at, t.max_uses, t.uses, t.runners, t.mac, "
            "d.expires_at, d.mac FROM contexts c LEFT JOIN tokens t ON t.context_id = c.id "
            f"LEFT JOIN tombstones d ON d.context_id = c.id WHERE {condition} ORDER BY c.id",
            params)
        vault = self._vault
        # A completed context's rows written back (by a login without the key) are not
        # served again: its tombstone is checked first. (Anyone can add a tombstone that
        # does not check; it is ignored.)
        completed = {row[0] for row in rows if row[15] is not None and vault.check(
            Row.tombstone(row[0], row[1], row[15]), row[16])}
        found: dict[int, _Context | None] = {}
        for (row_id, execution_id, sealed, keys_json, created_at, expires_at, mac,
             tid, hash_, t_created, t_expires, max_uses, uses, runners, t_mac,
             *_tombstone) in rows:
            if row_id in completed:
                if row_id not in found:
                    log.warning("the context of execution %r was completed, yet its row is "
                                "back in the store (written back without the key?); not "
                                "served", execution_id)
                    found[row_id] = None
                continue
            if row_id not in found:
                if vault.check(Row.context(row_id, execution_id, created_at, expires_at,
                                           keys_json, sealed), mac):
                    found[row_id] = _new_context(row_id, execution_id, sealed,
                                                 _KEYS_DECODER.decode(keys_json), created_at,
                                                 expires_at)
                else:
                    log_refused(f"the context of execution {execution_id!r}")
                    self._refused[execution_id] = row_id
                    found[row_id] = None
            context = found[row_id]
            if context is None or tid is None:
                continue
            token = _Token(tid, hash_, context, t_created, t_expires, max_uses, uses,
                           tuple(_RUNNERS_DECODER.decode(runners)) if runners else ())
            if not vault.check(token.row(), t_mac):
                log_refused(f"{'runner grant' if runners else 'token'} {tid} of execution "
                            f"{execution_id!r}")
            elif token.runners:
                context.grant = token
            else:
                context.tokens[token.token_id] = token
        return [c for c in found.values() if c is not None]

    def _install(self, contexts: list[_Context]) -> None:
        for context in contexts:
            old = self._by_execution.get(context.execution_id)
            if old is not None:
                self._forget(old)
            self._by_execution[context.execution_id] = context
            self._refused.pop(context.execution_id, None)
            for token in context.tokens.values():
                self._by_hash[token.hash] = token

    async def _lookup(self, condition: str, params: tuple[Any, ...]) -> list[_Context]:
        """Read contexts from a shared store and cache them, unless a change was heard
        while they were read (then they serve this request only)."""
        generation = self._generation
        contexts = await self._read_contexts(condition, params)
        if generation == self._generation:
            self._install(contexts)
        return contexts

    async def _find(self, execution_id: str) -> _Context | None:
        """The context of ``execution_id``: cached, or (shared store) looked up."""
        context = self._by_execution.get(execution_id)
        if context is None and self._shared:
            found = await self._lookup("c.execution_id = ?", (execution_id,))
            context = found[0] if found else None
        return context

    async def _find_token(self, hash_: bytes) -> _Token | None:
        """The token of ``hash_``: cached, or (shared store) looked up."""
        entry = self._by_hash.get(hash_)
        if entry is None and self._shared:
            entry = await self._lookup_token(hash_)
        return entry

    async def _lookup_token(self, hash_: bytes) -> _Token | None:
        for context in await self._lookup(
                "c.id = (SELECT context_id FROM tokens WHERE hash = ?)", (hash_,)):
            return next((t for t in context.tokens.values() if t.hash == hash_), None)
        return None

    def _check_fresh(self) -> None:
        if time.monotonic() > self._store.fresh_until():
            raise Unavailable(
                "this broker has lost its store for longer than its staleness window, so it "
                "no longer serves contexts: retry once the database is back, or use another "
                "host")

    # -------------------------------------------------------------- the fleet

    def heard(self, notice: Notice) -> None:
        """Drop what another broker revoked."""
        self._generation += 1
        if not isinstance(notice, ContextEnded):
            return
        context = self._by_execution.get(notice.execution_id)
        if context is not None and context.row_id == notice.row_id:
            self._forget(context)
        self._refused.pop(notice.execution_id, None)

    async def resync(self) -> None:
        """Drop the whole cache: changes may have gone unheard."""
        self._generation += 1
        for context in list(self._by_execution.values()):
            self._forget(context)
        self._by_hash.clear()
        self._refused.clear()

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

    def _index_token(self, token: _Token) -> None:
        token.context.tokens[token.token_id] = token
        self._by_hash[token.hash] = token

    # ------------------------------------------------------------------- control

    async def create(self, request: CreateContext, peer: Peer) -> Created:
        """Merge, seal and store a new context with its first token.

        Raises AlreadyExists, NotFound (an environment, named), FailedPrecondition
        (every required key without a value).
        """
        now = self._clock()
        execution_id = request.execution_id
        runners = canonical_grants(request.runners, owner_uid=os.getuid())
        with_token = request.token if request.token is not None else not runners
        if not with_token and not runners:
            raise InvalidArgument("a context needs a token or a runner grant (--runner), "
                                  "or no one could open it")
        existing = await self._find(execution_id)
        self._check_not_refused(execution_id)
        if existing is not None:
            if existing.expires_at > now:
                raise AlreadyExists(
                    f"execution {execution_id!r} already has a live context; complete it "
                    "first or use another execution id")
            await self.sweep()
        check_values(request.runtime, "runtime variable ")
        layers = []
        for name in request.environments:
            try:
                layers.append((name, await self._environments.resolve(name)))
            except NotFound:
                raise NotFound(f"environment {name!r} does not exist") from None
        merged = merge(request.env_spec, layers, request.runtime)
        keys = merged.keys()
        keys_json = msgspec.json.encode(keys)
        plaintext = _VARS_ENCODER.encode(merged.variables)
        if len(plaintext) > MAX_ENVIRONMENT_BYTES:
            raise ResourceExhausted(
                f"the merged context would hold {len(plaintext)} bytes, over the limit of "
                f"{MAX_ENVIRONMENT_BYTES}; reference fewer or smaller environments")
        expires_at = now + request.ttl_s
        token = new_token() if with_token else None
        token_expires = min(now + request.token_ttl_s, expires_at) if token else 0.0
        async with self._store.write() as db:
            row_id = await db.insert(
                "INSERT INTO contexts(execution_id, sealed, keys, created_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?) RETURNING id",
                (execution_id, b"", keys_json.decode(), now, expires_at))
            sealed = self._vault.seal(plaintext, Place.context(row_id, execution_id))
            mac = self._vault.mac(Row.context(row_id, execution_id, now, expires_at,
                                              keys_json.decode(), sealed))
            await db.execute("UPDATE contexts SET sealed = ?, mac = ? WHERE id = ?",
                             (sealed, mac, row_id))
            context = _new_context(row_id, execution_id, sealed, keys, now, expires_at)
            entry = None
            if token is not None:
                entry = _Token(token.token_id, token.hash, context, now, token_expires,
                               request.max_uses, 0)
                await self._insert_token(db, entry)
            if runners:  # a token row that no token opens: a random hash, never handed out
                grant_id = new_token()
                context.grant = _Token("g" + grant_id.token_id, grant_id.hash, context, now,
                                       expires_at, request.max_uses, 0, tuple(runners))
                await self._insert_token(db, context.grant)
        self._by_execution[execution_id] = context
        if entry is not None:
            self._index_token(entry)
        self._record("context.created", "ok", peer, execution_id,
                     detail=f"{len(keys)} key{'s' * (len(keys) != 1)}, expires {expires_at:.0f}"
                     + (f", runners {'; '.join(runners)}" if runners else ""))
        if token is not None:
            self._record("token.issued", "ok", peer, execution_id, token.token_id)
        await self._audit.flush_after_write()
        return Created(execution_id, expires_at, token, token_expires, keys, runners)

    async def issue(self, execution_id: str, ttl_s: float, max_uses: int | None,
                    peer: Peer) -> tuple[NewToken, float]:
        """Issue another token for a live context; return it and its expiry."""
        context = await self._live(execution_id)
        now = self._clock()
        token = new_token()
        expires_at = min(now + ttl_s, context.expires_at)
        entry = _Token(token.token_id, token.hash, context, now, expires_at, max_uses, 0)
        async with self._store.write() as db:
            await self._insert_token(db, entry)
        self._index_token(entry)
        self._record("token.issued", "ok", peer, execution_id, token.token_id)
        await self._audit.flush_after_write()
        return token, expires_at

    async def describe(self, execution_id: str
                       ) -> tuple[_Context, list[KeyInfo], list[TokenInfo]]:
        """A live context, its key summary and its usable tokens (``context.grant`` holds
        its runner selectors)."""
        if self._shared:  # fresh use counts: other brokers count too
            found = await self._lookup("c.execution_id = ?", (execution_id,))
            context = self._alive(execution_id, found[0] if found else None)
        else:
            context = await self._live(execution_id)
        rows = await self._store.read("SELECT keys, mac FROM contexts WHERE id = ?",
                                      (context.row_id,))
        keys_json, mac = rows[0] if rows else ("[]", None)
        if not self._vault.check(Row.context(context.row_id, execution_id, context.created_at,
                                             context.expires_at, keys_json, context.sealed), mac):
            raise tampered(f"the key summary of execution {execution_id!r}",
                           "complete the context and create it again")
        now = self._clock()
        tokens = [TokenInfo(token_id=t.token_id, created_at=t.created_at,
                            expires_at=t.expires_at, uses=t.uses, max_uses=t.max_uses)
                  for t in sorted(context.tokens.values(), key=lambda t: t.created_at)
                  if t.usable(now)]
        return context, _KEYS_DECODER.decode(keys_json), tokens

    async def summaries(self, *, after: str = "",
                        limit: int = 1000) -> tuple[list[ContextSummary], bool]:
        """Up to ``limit`` live contexts by execution id, from the first after ``after``,
        and whether more follow."""
        now = self._clock()
        if self._shared:
            contexts = await self._lookup(
                "c.id IN (SELECT id FROM contexts WHERE expires_at > ? AND execution_id > ? "
                "ORDER BY execution_id LIMIT ?)", (now, after, limit + 1))
            live = {c.execution_id: c for c in contexts}
        else:
            live = {e: c for e, c in self._by_execution.items()
                    if c.expires_at > now and e > after}
        ids = sorted(live)
        out = []
        for execution_id in ids[:limit]:
            c = live[execution_id]
            out.append(ContextSummary(
                execution_id=execution_id, created_at=c.created_at, expires_at=c.expires_at,
                keys=c.n_keys, secrets=c.n_secrets,
                tokens=sum(1 for t in c.tokens.values() if t.usable(now))))
        return out, len(ids) > limit

    async def complete(self, execution_id: str, peer: Peer) -> None:
        """Delete a context and revoke its tokens (also a context refused for failing its
        integrity check: that is the way out). Raises NotFound."""
        await self._find(execution_id)
        row_id = self._refused.pop(execution_id, None)
        if row_id is not None:
            async with self._store.write() as db:
                await db.execute("DELETE FROM tokens WHERE context_id = ?", (row_id,))
                await db.execute("DELETE FROM contexts WHERE id = ?", (row_id,))
                db.notify(ContextEnded(row_id, execution_id))
            self._record("context.completed", "ok", peer, execution_id,
                         detail="row had failed its integrity check")
            await self._audit.flush_after_write()
            return
        await self._delete(await self._live(execution_id), "context.completed", peer)

    # -------------------------------------------------------------------- runner

    def fetch_now(self, token: str, peer: Peer) -> Fetched | None:
        """:meth:`fetch`, when memory alone can answer it; None when it cannot (a shared
        store's cache misses, or the token's uses are counted in the store first)."""
        if self._shared:
            self._check_fresh()
        entry = self._by_hash.get(token_hash(token))
        if (entry is None and self._shared) or (entry is not None and entry.max_uses is not None):
            return None
        return self._open_token(entry, peer)

    async def fetch(self, token: str, peer: Peer) -> Fetched:
        """Return the variables the token opens. Raises Unauthenticated (always the same)."""
        if self._shared:
            self._check_fresh()
        return self._open_token(await self._find_token(token_hash(token)), peer)

    def _open_token(self, entry: _Token | None, peer: Peer) -> Fetched:
        if entry is None or not entry.usable(self._clock()):
            self._audit.count("fetch", "denied",  # by uid, not pid: see _deny
                              execution_id=entry.context.execution_id if entry else "",
                              token_id=entry.token_id if entry else "", peer_uid=peer.uid)
            raise Unauthenticated(UNAUTHENTICATED)
        return self._open(entry, peer)

    def fetch_granted_now(self, execution_id: str, peer: Peer) -> Fetched | None:
        """:meth:`fetch_granted`, when memory alone can answer it; else None."""
        if self._shared:
            self._check_fresh()
        context = self._by_execution.get(execution_id)
        if (context is None and self._shared) or (
                context is not None and context.grant is not None
                and context.grant.max_uses is not None):
            return None
        grant, selector, who = self._grant_of(context, execution_id, peer, "fetch")
        return self._open(grant, peer, f"runner {selector}; {who}")

    async def fetch_granted(self, execution_id: str, peer: Peer) -> Fetched:
        """Return the variables of a context granted to the calling process (attested
        now). Raises the same PermissionDenied for every reason it cannot."""
        if self._shared:
            self._check_fresh()
        grant, selector, who = await self._granted(execution_id, peer, "fetch")
        return self._open(grant, peer, f"runner {selector}; {who}")

    def _open(self, entry: _Token, peer: Peer, detail: str = "") -> Fetched:
        """Open the context ``entry`` reaches; count the use of an unbounded token (a
        bounded one is counted by :meth:`persist_use`)."""
        context = entry.context
        try:
            plaintext = self._vault.open_bound(context.sealed, context.bound)
        except SealError:
            self._record("fetch", "error", peer, context.execution_id, entry.token_id,
                         detail="sealed context does not open")
            raise Internal(f"the context of execution {context.execution_id!r} cannot be "
                           "opened (tampered with or damaged); create it again") from None
        if entry.max_uses is not None:
            return Fetched(context.execution_id, context.expires_at, plaintext, entry, detail)
        entry.uses += 1
        self._audit.count("fetch", "granted", execution_id=context.execution_id,
                          token_id=entry.token_id, peer_uid=peer.uid, peer_pid=peer.pid,
                          detail=detail)
        self._audit.count_use(entry.token_id)  # batched: nothing rides on it
        return Fetched(context.execution_id, context.expires_at, plaintext)

    async def release_granted(self, execution_id: str, peer: Peer) -> None:
        """End a context granted to the calling process (the runner's own complete)."""
        grant = (await self._granted(execution_id, peer, "context.released"))[0]
        await self._delete(grant.context, "context.completed", peer, grant.token_id)

    async def _granted(self, execution_id: str, peer: Peer,
                       event: str) -> tuple[_Token, str, str]:
        """The grant of ``execution_id`` that the calling process satisfies, the selector
        it matched and who it is; the audit says why when there is none, the caller only
        learns that there is none."""
        return self._grant_of(await self._find(execution_id), execution_id, peer, event)

    def _grant_of(self, context: _Context | None, execution_id: str, peer: Peer,
                  event: str) -> tuple[_Token, str, str]:
        grant = context.grant if context is not None else None
        now = self._clock()  # read for an unknown id too (see below)
        usable = grant is not None and grant.usable(now)
        # Every refusal costs what refusing a live grant costs: the process is attested
        # and matched against a selector whether or not the id has a usable grant, so the
        # time of the answer does not tell which ids exist.
        runners = grant.runners if usable and grant is not None else _NO_GRANT
        problem = ""
        selector: str | None = None
        try:
            if peer.process is None:
                raise LookupError("the process cannot be attested")
            selector = matching_selector(runners, peer.process.attest())
        except LookupError as exc:
            problem = str(exc)
        if grant is None:  # a made-up id: not in the record's key, or each one is a record
            self._deny(event, "", peer, "no live context with runner grants for the id")
        if not usable:
            self._deny(event, execution_id, peer, "expired or used up")
        if problem:
            self._deny(event, execution_id, peer, problem)
        if selector is None:
            self._deny(event, execution_id, peer, "no selector matches")  # uid: the record's
        return grant, selector, f"uid {peer.uid} pid {peer.pid}"

    def _deny(self, event: str, execution_id: str, peer: Peer, reason: str) -> NoReturn:
        """Refuse, counted in the audit by uid and cause (``reason`` names no pid): a
        process per request adds to one record's count instead of writing one each."""
        self._audit.count(event, "denied", execution_id=execution_id, peer_uid=peer.uid,
                          detail=reason)
        raise PermissionDenied(NOT_GRANTED)

    async def persist_use(self, fetched: Fetched, peer: Peer) -> None:
        """Count a bounded token's use in the store before the reply leaves, or refuse.

        The count is a conditional update of the stored row (compare and set, the
        row's MAC with it), so a ``--max-uses N`` token opens at most N times however
        many fetches race, on one broker or on many; a use counted only in memory would
        come back after a crash.
        """
        token = fetched.pending_use
        if token is None:
            return
        assert token.max_uses is not None
        execution_id = token.context.execution_id
        while True:
            expected = token.uses
            if expected >= token.max_uses or not token.usable(self._clock()):
                break
            async with self._store.write() as db:
                done = await db.fetchall(
                    "UPDATE tokens SET uses = ?, mac = ? WHERE id = ? AND uses = ? "
                    "RETURNING uses", (expected + 1, self._vault.mac(token.row(expected + 1)),
                                       token.token_id, expected))
                current = [] if done else await db.fetchall(
                    "SELECT uses, mac FROM tokens WHERE id = ?", (token.token_id,))
            if done:
                token.uses = expected + 1
                self._audit.count("fetch", "granted", execution_id=execution_id,
                                  token_id=token.token_id, peer_uid=peer.uid, peer_pid=peer.pid,
                                  detail=fetched.detail)
                return
            if not current:  # revoked meanwhile (by another broker of a fleet)
                self._forget(token.context)
                break
            uses, mac = current[0]
            if not self._vault.check(token.row(int(uses)), mac):
                log_refused(f"token {token.token_id} of execution {execution_id!r}")
                break
            token.uses = int(uses)  # another fetch counted first: try again from its count
        if token.runners:
            self._deny("fetch", execution_id, peer, "used up")
        self._audit.count("fetch", "denied", execution_id=execution_id,
                          token_id=token.token_id, peer_uid=peer.uid)
        raise Unauthenticated(UNAUTHENTICATED)

    async def release(self, token: str, peer: Peer) -> None:
        """End the context a (still valid) token belongs to."""
        entry = await self._find_token(token_hash(token))
        if entry is None or not entry.usable(self._clock()):
            self._audit.count("context.released", "denied", peer_uid=peer.uid)
            raise Unauthenticated(UNAUTHENTICATED)
        await self._delete(entry.context, "context.completed", peer, entry.token_id)

    # ------------------------------------------------------------------ lifetime

    async def sweep(self) -> int:
        """Delete expired contexts and tokens from the store and memory; return how many.

        In a fleet, one broker at a time sweeps the store (a store-wide lock; the others
        skip their turn), and a broker whose role may not write only drops what expired
        from its cache."""
        now = self._clock()
        store = self._store
        expired: list[Any] = []
        stale_tokens = 0
        if self._writable and await store.read_one(
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
        for (execution_id,) in expired:
            self._refused.pop(execution_id, None)
            self._record("context.expired", "ok", None, execution_id)
        for context in [c for c in self._by_execution.values() if c.expires_at <= now]:
            self._forget(context)
        for token in [t for t in self._by_hash.values() if t.expires_at <= now]:
            self._by_hash.pop(token.hash, None)
            token.context.tokens.pop(token.token_id, None)
        return len(expired) + stale_tokens

    # ------------------------------------------------------------------- helpers

    async def _insert_token(self, db: Tx, token: _Token) -> None:
        await db.execute(
            "INSERT INTO tokens(id, hash, context_id, created_at, expires_at, max_uses, "
            "runners, mac) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (token.token_id, token.hash, token.context.row_id, token.created_at,
             token.expires_at, token.max_uses, token.runners_json(),
             self._vault.mac(token.row())))

    def _check_not_refused(self, execution_id: str) -> None:
        if execution_id in self._refused:
            raise tampered(f"the stored context of execution {execution_id!r}",
                           f"`stigmer-broker context complete {execution_id}` removes it")

    async def _live(self, execution_id: str) -> _Context:
        return self._alive(execution_id, await self._find(execution_id))

    def _alive(self, execution_id: str, context: _Context | None) -> _Context:
        self._check_not_refused(execution_id)
        if context is None or context.expires_at <= self._clock():
            raise NotFound(f"execution {execution_id!r} has no live context; "
                           "`stigmer-broker context list` shows the live ones")
        return context

    async def _delete(self, context: _Context, event: str, peer: Peer,
                      token_id: str = "") -> None:
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
        for token in list(context.tokens.values()):
            self._record("token.revoked", "ok", peer, context.execution_id, token.token_id)
        self._forget(context)
        self._record(event, "ok", peer, context.execution_id, token_id)
        await self._audit.flush_after_write()

    def _forget(self, context: _Context) -> None:
        if self._by_execution.get(context.execution_id) is context:
            del self._by_execution[context.execution_id]
        for token in context.tokens.values():
            if self._by_hash.get(token.hash) is token:
                del self._by_hash[token.hash]

    def _record(self, event: str, outcome: str, peer: Peer | None, execution_id: str = "",
                token_id: str = "", detail: str = "") -> None:
        self._audit.record(event, outcome, execution_id=execution_id, token_id=token_id,
                           peer_uid=peer.uid if peer else None,
                           peer_pid=peer.pid if peer else None, detail=detail)
