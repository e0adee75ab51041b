"""Execution contexts and their tokens: created merged and sealed, fetched from memory.

Theory of operation: a context is merged once, at creation, and sealed as one
record at its :meth:`Place.context` (row id, execution id); later edits to its
environments do not change it. The daemon keeps every live context in memory,
*still sealed* (:mod:`.index`), and the store in step with it (:mod:`.rows`;
each change is written first, then applied in memory). A fetch is then a hash
lookup and one AES-GCM open, with no thread hop and no disk write: its audit
record and use count are buffered and written by the next flush. When memory
cannot answer alone, the index says what it needs, and :meth:`Contexts.drive`
satisfies that and asks again. Decrypted values exist only while a fetch reply
is being built.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable

import anyio
import msgspec

from ..audit import Audit
from ..environments import MAX_ENVIRONMENT_BYTES, Environments, check_values
from ..grants import canonical_grants, hashes_binaries, matching_selector
from ..local.peer import Peer
from ..merge import merge
from ..protocol import ContextSummary, CreateContext, KeyInfo, MergedEnvironment, TokenInfo
from ..protocol.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
)
from ..store.backend import Store
from ..store.notices import Notice
from ..store.vault import Vault, tampered
from ..tokens import NewToken, new_token, token_hash
from .index import (
    NO_GRANT,
    UNAUTHENTICATED,
    Attest,
    ContextIndex,
    CountUse,
    Fetch,
    Fetched,
    LiveContext,
    LiveToken,
    LookUp,
    Match,
    Need,
)
from .rows import ContextRows, Described, Read

__all__ = ["Contexts", "Created", "match_process"]

log = logging.getLogger("stigmer.broker")

_VARS_ENCODER = msgspec.msgpack.Encoder()


@dataclasses.dataclass(frozen=True, slots=True)
class Created:
    execution_id: str
    expires_at: float
    token: NewToken | None
    token_expires_at: float
    keys: list[KeyInfo]
    runners: list[str]


async def match_process(runners: tuple[str, ...], peer: Peer) -> Match:
    """Attest the calling process and match it against ``runners``. That reads
    ``/proc`` (a few small reads, done here), and for an ``exe:...@sha256:`` term may
    hash a whole binary: then it runs in a worker thread, which holds the process pin
    open meanwhile."""
    if hashes_binaries(runners):
        return await anyio.to_thread.run_sync(_match, runners, peer)
    return _match(runners, peer)


def _match(runners: tuple[str, ...], peer: Peer) -> Match:
    process = peer.process
    if process is None:
        return Match(runners, None, "the process cannot be attested")
    try:
        with process.held():
            return Match(runners, matching_selector(runners, process.attest()))
    except LookupError as exc:
        return Match(runners, None, str(exc))


class Contexts:
    """Every live execution context, sealed in memory and in the store.

    With a store that other brokers share (:attr:`Store.shared`), memory is a
    cache (see :class:`.index.ContextIndex`).
    """

    def __init__(self, store: Store, vault: Vault, environments: Environments, audit: Audit, *,
                 clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._shared = store.shared
        self._writable = True  # set by load(): a fleet's runner-host role may not write
        self._environments = environments
        self._audit = audit
        self._clock = clock
        self.rows = ContextRows(store, vault)
        self.index = ContextIndex(vault, audit, shared=store.shared,
                                  fresh_until=store.fresh_until, clock=clock)

    # --------------------------------------------------------------------- counts

    async def live_counts(self) -> tuple[int, int]:
        """Return (live contexts, live tokens)."""
        if self._shared:  # the fleet's, not this broker's cache
            return await self.rows.live_counts(self._clock())
        return self.index.counts()

    # ----------------------------------------------------------------- start-up

    async def load(self) -> None:
        """Drop what expired while we were down, then index the rest in memory (a shared
        store's contexts are cached as they are asked for); a row that fails its MAC is
        logged and not indexed."""
        self._writable = await self._store.can_write()
        await self.sweep()
        if not self._shared:
            self._install(await self.rows.read("1 = 1", ()))

    async def authenticate_unchecked(self) -> int:
        """Authenticate every row that has no MAC yet; return how many."""
        return await self.rows.authenticate_unchecked()

    def _install(self, read: Read) -> None:
        self.index.refused.update(read.refused)
        self.index.install(read.contexts)

    async def _lookup(self, condition: str, params: tuple[object, ...]) -> list[LiveContext]:
        """Read contexts from a shared store and cache them, unless a change was heard
        while they were read (then they serve this request only)."""
        generation = self.index.generation
        read = await self.rows.read(condition, params)
        if generation == self.index.generation:
            self._install(read)
        return read.contexts

    async def _find(self, execution_id: str) -> LiveContext | None:
        """The context of ``execution_id``: cached, or (shared store) looked up."""
        context = self.index.by_execution.get(execution_id)
        if context is None and self._shared:
            found = await self._lookup("c.execution_id = ?", (execution_id,))
            context = found[0] if found else None
        return context

    async def _find_token(self, hash_: bytes) -> LiveToken | None:
        """The token of ``hash_``: cached, or (shared store) looked up."""
        entry = self.index.token(hash_)
        if entry is None and self._shared:
            entry = next((t for c in await self._look_up_token(hash_)
                          for t in c.tokens.values() if t.hash == hash_), None)
        return entry

    async def _look_up_token(self, hash_: bytes) -> list[LiveContext]:
        return await self._lookup("c.id = (SELECT context_id FROM tokens WHERE hash = ?)",
                                  (hash_,))

    # -------------------------------------------------------------- the fleet

    def heard(self, notice: Notice) -> None:
        """Drop what another broker revoked."""
        self.index.heard(notice)

    async def resync(self) -> None:
        """Drop the whole cache: changes may have gone unheard."""
        self.index.clear()

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
        self.index.check_not_refused(execution_id)
        if existing is not None:
            if existing.expires_at > now:
                raise AlreadyExists(
                    f"execution {execution_id!r} already has a live context; complete it "
                    "first or use another execution id")
            await self.sweep()
        check_values(request.env_spec, "env_spec entry ")
        check_values(request.runtime, "runtime variable ")
        layers = []
        versions = []
        for name in request.environments:
            try:
                variables, version = await self._environments.resolve(name)
            except NotFound:
                raise NotFound(f"environment {name!r} does not exist") from None
            layers.append((name, variables))
            versions.append(MergedEnvironment(name=name, version=version))
        merged = merge(request.env_spec, layers, request.runtime)
        keys = merged.keys()
        plaintext = _VARS_ENCODER.encode(merged.variables)
        if len(plaintext) > MAX_ENVIRONMENT_BYTES:
            raise ResourceExhausted(
                f"the merged context would hold {len(plaintext)} bytes, over the limit of "
                f"{MAX_ENVIRONMENT_BYTES}; reference fewer or smaller environments")
        expires_at = now + request.ttl_s
        token = new_token() if with_token else None
        token_expires = min(now + request.token_ttl_s, expires_at) if token else 0.0
        context, entry = await self.rows.insert(
            execution_id, plaintext, keys, versions, now, expires_at, token=token,
            token_expires=token_expires, max_uses=request.max_uses, runners=runners)
        self.index.install([context])
        if entry is not None:
            self.index.add_token(entry)
        self._record("context.created", "ok", peer, execution_id,
                     detail=f"{len(keys)} key{'s' * (len(keys) != 1)}, expires {expires_at:.0f}"
                     + (f", environments {', '.join(f'{v.name} v{v.version}' for v in versions)}"
                        if versions else "")
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
        entry = LiveToken(token.token_id, token.hash, context, now, expires_at, max_uses, 0)
        await self.rows.insert_token(entry)
        if not self.index.add_token(entry) and not self._shared:
            # completed while the token was written (its row went with the context's)
            raise NotFound(f"execution {execution_id!r} has no live context; "
                           "`stigmer-broker context list` shows the live ones")
        self._record("token.issued", "ok", peer, execution_id, token.token_id)
        await self._audit.flush_after_write()
        return token, expires_at

    async def describe(self, execution_id: str
                       ) -> tuple[LiveContext, Described, list[TokenInfo]]:
        """A live context, its key summary and the environment versions it merged, and
        its usable tokens (``context.grant`` holds its runner selectors)."""
        if self._shared:  # fresh use counts: other brokers count too
            found = await self._lookup("c.execution_id = ?", (execution_id,))
            context = self.index.alive(execution_id, found[0] if found else None)
        else:
            context = await self._live(execution_id)
        described = await self.rows.describe(context)
        if described is None:
            raise tampered(f"the key summary of execution {execution_id!r}",
                           "complete the context and create it again")
        now = self._clock()
        tokens = [TokenInfo(token_id=t.token_id, created_at=t.created_at,
                            expires_at=t.expires_at, uses=t.uses, max_uses=t.max_uses)
                  for t in sorted(context.tokens.values(), key=lambda t: t.created_at)
                  if t.usable(now)]
        return context, described, tokens

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
            live = {e: c for e, c in self.index.by_execution.items()
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
        row_id = self.index.refused.pop(execution_id, None)
        if row_id is not None:
            await self.rows.delete_refused(row_id, execution_id)
            self._record("context.completed", "ok", peer, execution_id,
                         detail="row had failed its integrity check")
            await self._audit.flush_after_write()
            return
        await self._delete(await self._live(execution_id), "context.completed", peer)

    # -------------------------------------------------------------------- runner

    async def fetch(self, token: str, peer: Peer) -> Fetched:
        """Return the variables the token opens. Raises Unauthenticated (always the same)."""
        fetch = Fetch(peer, token_hash=token_hash(token))
        return await self.drive(fetch, self.index.fetch(fetch))

    async def fetch_granted(self, execution_id: str, peer: Peer) -> Fetched:
        """Return the variables of a context granted to the calling process (attested
        now). Raises the same PermissionDenied for every reason it cannot."""
        fetch = Fetch(peer, execution_id=execution_id)
        return await self.drive(fetch, self.index.fetch(fetch))

    async def drive(self, fetch: Fetch, outcome: Fetched | Need) -> Fetched:
        """Satisfy what the index needs for ``fetch``, asking again, until it answers."""
        while True:
            match outcome:
                case Fetched():
                    return outcome
                case LookUp(token_hash=hash_, execution_id=execution_id):
                    fetch.looked_up = (await self._look_up_token(hash_) if hash_ is not None
                                       else await self._lookup("c.execution_id = ?",
                                                               (execution_id,)))
                    fetch.looked_up_in = self.index.generation
                case Attest(runners=runners):
                    fetch.matched = await match_process(runners, fetch.peer)
                case CountUse():
                    await self._count_use(outcome, fetch.peer)
                    return outcome.fetched
            outcome = self.index.fetch(fetch)

    async def _count_use(self, need: CountUse, peer: Peer) -> None:
        """Count a bounded token's use in the store before the reply leaves, or refuse.

        The count is a conditional update of the stored row (compare and set, the
        row's MAC with it), so a ``--max-uses N`` token opens at most N times however
        many fetches race, on one broker or on many; a use counted only in memory would
        come back after a crash.
        """
        token = need.token
        assert token.max_uses is not None
        execution_id = token.context.execution_id
        while True:
            expected = token.uses
            if expected >= token.max_uses or not token.usable(self._clock()):
                break
            counted = await self.rows.count_use(token, expected)
            if counted == "counted":
                token.uses = expected + 1
                self._audit.count("fetch", "granted", execution_id=execution_id,
                                  token_id=token.token_id, peer_uid=peer.uid, peer_pid=peer.pid,
                                  detail=need.detail)
                return
            if counted == "gone":  # revoked meanwhile (by another broker of a fleet)
                self.index.forget(context=token.context)
                break
            if counted == "refused":  # the stored row does not check (logged)
                break
            token.uses = counted  # another fetch counted first: try again from its count
        if token.runners:
            self.index.deny("fetch", execution_id, peer, "used up")
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

    async def release_granted(self, execution_id: str, peer: Peer) -> None:
        """End a context granted to the calling process (the runner's own complete)."""
        context = await self._find(execution_id)
        grant = context.grant if context is not None else None
        usable = grant is not None and grant.usable(self._clock())
        matched = await match_process(
            grant.runners if usable and grant is not None else NO_GRANT, peer)
        grant, _ = self.index.granted(grant, usable, matched, execution_id, peer,
                                      "context.released")
        now = await self._find(execution_id)  # it may have ended while the match ran
        if now is None or now.row_id != grant.context.row_id:
            self.index.deny("context.released", execution_id, peer, "ended meanwhile")
        await self._delete(grant.context, "context.completed", peer, grant.token_id)

    async def flush_uses(self) -> None:
        """Write the uses of unbounded tokens counted since the last flush (kept for the
        next one when the store refuses)."""
        uses, self.index.uses = self.index.uses, {}
        if not uses:
            return
        try:
            await self.rows.add_uses(uses)
        except BaseException:
            for token_id, n in uses.items():
                self.index.uses[token_id] = self.index.uses.get(token_id, 0) + n
            raise

    # ------------------------------------------------------------------ lifetime

    async def sweep(self) -> int:
        """Delete expired contexts and tokens from the store and memory; return how many.

        A broker whose role may not write (a fleet's runner host) only drops what
        expired from its cache."""
        now = self._clock()
        swept = await self.rows.sweep(now) if self._writable else None
        for execution_id in swept.execution_ids if swept else ():
            self.index.refused.pop(execution_id, None)
            self._record("context.expired", "ok", None, execution_id)
        self.index.drop_expired(now)
        return len(swept.execution_ids) + swept.tokens if swept else 0

    # ------------------------------------------------------------------- helpers

    async def _live(self, execution_id: str) -> LiveContext:
        return self.index.alive(execution_id, await self._find(execution_id))

    async def _delete(self, context: LiveContext, event: str, peer: Peer,
                      token_id: str = "") -> None:
        await self.rows.delete(context)
        for token in list(context.tokens.values()):
            self._record("token.revoked", "ok", peer, context.execution_id, token.token_id)
        self.index.forget(context=context)
        self._record(event, "ok", peer, context.execution_id, token_id)
        await self._audit.flush_after_write()

    def _record(self, event: str, outcome: str, peer: Peer | None, execution_id: str = "",
                token_id: str = "", detail: str = "") -> None:
        self._audit.record(event, outcome, execution_id=execution_id, token_id=token_id,
                           peer_uid=peer.uid if peer else None,
                           peer_pid=peer.pid if peer else None, detail=detail)
