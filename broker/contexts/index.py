"""The live contexts in memory, and a fetch's sans-IO core.

A fetch is answered from memory in one synchronous step, or the step says what
it needs first, as a typed :data:`Need`: the rows of a shared store's cache
miss (:class:`LookUp`), the calling process matched against a grant's
selectors (:class:`Attest`: that reads ``/proc``, and may hash a binary), or a
bounded credential's use counted in the store before the reply may leave
(:class:`CountUse`). The driver (:mod:`.service`) satisfies the need and asks
again with the same :class:`Fetch`. Nothing here touches a file, a socket or
the database, so the server may call :meth:`ContextIndex.fetch` inside
``data_received``; the audit records it makes are buffered in memory.

Every way a token can fail (unknown, expired, revoked, used up, context gone)
gives the same Unauthenticated answer, and every way a grant can fail the same
PermissionDenied, so neither reveals which contexts exist.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from typing import NoReturn

import msgspec

from ..audit import Audit
from ..local.peer import Peer
from ..protocol import Variable
from ..protocol.errors import Internal, NotFound, PermissionDenied, Unauthenticated, Unavailable
from ..store.crypto import Place, Row, SealError
from ..store.notices import ContextEnded, Notice
from ..store.vault import Vault, tampered

__all__ = [
    "NOT_GRANTED", "UNAUTHENTICATED", "Attest", "ContextIndex", "CountUse", "Fetch",
    "Fetched", "LiveContext", "LiveToken", "LookUp", "Match", "Need",
]

_VARS_DECODER = msgspec.msgpack.Decoder(dict[str, Variable])
_RUNNERS_ENCODER = msgspec.json.Encoder()

UNAUTHENTICATED = ("the execution token is not valid (unknown, expired, revoked or used up); "
                   "ask the control side for a new one")

#: the one refusal of a fetch or release by execution id, whatever the cause (no such
#: context, no grant, another uid or binary, expired, completed, used up): the same words
#: for every execution id, so that it tells nothing
NOT_GRANTED = ("no live context of that execution id is open to this process; check the id, "
               "and the --runner selectors the context was created with")
#: what an id with no usable grant is matched against: a uid the kernel never reports
NO_GRANT = ("user:4294967295",)


@dataclasses.dataclass(eq=False, slots=True)
class LiveContext:
    """A live context as memory keeps it: still sealed."""

    row_id: int
    execution_id: str
    sealed: bytes = dataclasses.field(repr=False)
    n_keys: int
    n_secrets: int
    created_at: float
    expires_at: float
    tokens: dict[str, LiveToken] = dataclasses.field(default_factory=dict, repr=False)
    grant: LiveToken | None = dataclasses.field(default=None, repr=False)  # runner selectors

    bound: bytes = b""  # associated data binding ``sealed`` to this context, made once

    def __post_init__(self) -> None:
        try:
            self.bound = Vault.bind(self.sealed, Place.context(self.row_id, self.execution_id))
        except SealError:
            self.bound = b""  # a damaged envelope: every fetch of it fails cleanly


@dataclasses.dataclass(eq=False, slots=True)
class LiveToken:
    """A token of a live context, or its runner grant (a token row that no token opens)."""

    token_id: str
    hash: bytes = dataclasses.field(repr=False)
    context: LiveContext = dataclasses.field(repr=False)
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
class Fetched:
    """An opened context: ``plaintext`` is the msgpack of its ``dict[str, Variable]``."""

    execution_id: str
    expires_at: float
    plaintext: bytes = dataclasses.field(repr=False)

    def variables(self) -> dict[str, Variable]:
        return _VARS_DECODER.decode(self.plaintext)


@dataclasses.dataclass(frozen=True, slots=True)
class Match:
    """The calling process matched against ``runners``: the selector it satisfies
    (None: none), or the reason it could not be checked."""

    runners: tuple[str, ...]
    selector: str | None
    problem: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class LookUp:
    """A shared store's cache missed: read the context (by token hash or execution id)."""

    token_hash: bytes | None = dataclasses.field(default=None, repr=False)
    execution_id: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Attest:
    """Match the calling process against these selectors (the id's grant's, or ones no
    process satisfies: a refusal costs what a live grant's does)."""

    runners: tuple[str, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class CountUse:
    """A bounded token or grant: count this use in the store before ``fetched`` leaves."""

    token: LiveToken = dataclasses.field(repr=False)
    fetched: Fetched
    detail: str  # what the audit record of the use says


Need = LookUp | Attest | CountUse


class Fetch:
    """One fetch in progress: the credential, and what the driver found for it so far."""

    __slots__ = ("execution_id", "looked_up", "matched", "peer", "token_hash")

    def __init__(self, peer: Peer, *, token_hash: bytes | None = None,
                 execution_id: str | None = None) -> None:
        self.peer = peer
        self.token_hash = token_hash
        self.execution_id = execution_id
        #: what the store held (a shared store's miss); None until it was asked
        self.looked_up: list[LiveContext] | None = None
        #: the process matched against the grant; None until it was attested
        self.matched: Match | None = None


class ContextIndex:
    """Every live context this broker serves, sealed, by execution id and token hash.

    With a store that other brokers share (``shared``), it is a cache: a miss is
    a :class:`LookUp`, what another broker revokes is dropped when heard
    (:meth:`heard`), everything when a change may have gone unheard
    (:meth:`clear`), and nothing is served once ``fresh_until`` has passed.
    """

    def __init__(self, vault: Vault, audit: Audit, *, shared: bool,
                 fresh_until: Callable[[], float],
                 clock: Callable[[], float] = time.time) -> None:
        self._vault = vault
        self._audit = audit
        self.shared = shared
        self._fresh_until = fresh_until
        self.clock = clock
        self.by_execution: dict[str, LiveContext] = {}
        self._by_hash: dict[bytes, LiveToken] = {}
        self.refused: dict[str, int] = {}  # execution id -> row id of a row failing its MAC
        # bumped by every change heard from the store: a lookup that straddled one does
        # not cache what it read
        self.generation = 0
        #: uses of unbounded tokens since the last flush (token id -> count): added to the
        #: stored counts as increments, since other brokers of a fleet count them too
        self.uses: dict[str, int] = {}

    # ------------------------------------------------------------------ fetching

    def fetch(self, fetch: Fetch) -> Fetched | Need:
        """Answer ``fetch`` from memory, or say what is needed first. Raises
        Unauthenticated (a token) or PermissionDenied (an execution id), always the same
        words, or Unavailable past a shared store's staleness window."""
        if self.shared and time.monotonic() > self._fresh_until():
            raise Unavailable(
                "this broker has lost its store for longer than its staleness window, so it "
                "no longer serves contexts: retry once the database is back, or use another "
                "host")
        if fetch.token_hash is not None:
            return self._fetch_token(fetch, fetch.token_hash)
        assert fetch.execution_id is not None
        return self._fetch_granted(fetch, fetch.execution_id)

    def _fetch_token(self, fetch: Fetch, hash_: bytes) -> Fetched | Need:
        entry = self._by_hash.get(hash_)
        if entry is None and self.shared:
            if fetch.looked_up is None:
                return LookUp(token_hash=hash_)
            entry = next((t for c in fetch.looked_up for t in c.tokens.values()
                          if t.hash == hash_), None)
        peer = fetch.peer
        if entry is None or not entry.usable(self.clock()):
            self._audit.count("fetch", "denied",  # by uid, not pid: see deny
                              execution_id=entry.context.execution_id if entry else "",
                              token_id=entry.token_id if entry else "", peer_uid=peer.uid)
            raise Unauthenticated(UNAUTHENTICATED)
        return self._open(entry, peer)

    def _fetch_granted(self, fetch: Fetch, execution_id: str) -> Fetched | Need:
        context = self.by_execution.get(execution_id)
        if context is None and self.shared:
            if fetch.looked_up is None:
                return LookUp(execution_id=execution_id)
            context = fetch.looked_up[0] if fetch.looked_up else None
        grant = context.grant if context is not None else None
        usable = grant is not None and grant.usable(self.clock())
        # Every refusal costs what refusing a live grant costs: the process is attested
        # and matched whether or not the id has a usable grant, so the time of the answer
        # does not tell which ids exist.
        runners = grant.runners if usable and grant is not None else NO_GRANT
        matched = fetch.matched
        if matched is None or matched.runners != runners:
            # (not yet, or the grant changed while the process was matched: again)
            return Attest(runners)
        grant, selector = self.granted(grant, usable, matched, execution_id, fetch.peer,
                                       "fetch")
        return self._open(grant, fetch.peer, f"runner {selector}; {who(fetch.peer)}")

    def granted(self, grant: LiveToken | None, usable: bool, matched: Match,
                execution_id: str, peer: Peer, event: str) -> tuple[LiveToken, str]:
        """The grant the calling process satisfies and the selector it matched; the audit
        says why when there is none, the caller only learns that there is none."""
        if grant is None:  # a made-up id: not in the record's key, or each one is a record
            self.deny(event, "", peer, "no live context with runner grants for the id")
        if not usable:
            self.deny(event, execution_id, peer, "expired or used up")
        if matched.problem:
            self.deny(event, execution_id, peer, matched.problem)
        if matched.selector is None:
            self.deny(event, execution_id, peer, "no selector matches")  # uid: the record's
        return grant, matched.selector

    def deny(self, event: str, execution_id: str, peer: Peer, reason: str) -> NoReturn:
        """Refuse, counted in the audit by uid and cause (``reason`` names no pid): a
        process per request adds to one record's count instead of writing one each."""
        self._audit.count(event, "denied", execution_id=execution_id, peer_uid=peer.uid,
                          detail=reason)
        raise PermissionDenied(NOT_GRANTED)

    def _open(self, entry: LiveToken, peer: Peer, detail: str = "") -> Fetched | CountUse:
        """Open the context ``entry`` reaches; count the use of an unbounded credential
        here (buffered: nothing rides on it), a bounded one's in the store first."""
        context = entry.context
        try:
            plaintext = self._vault.open_bound(context.sealed, context.bound)
        except SealError:
            self._audit.record("fetch", "error", execution_id=context.execution_id,
                               token_id=entry.token_id, peer_uid=peer.uid, peer_pid=peer.pid,
                               detail="sealed context does not open")
            raise Internal(f"the context of execution {context.execution_id!r} cannot be "
                           "opened (tampered with or damaged); create it again") from None
        fetched = Fetched(context.execution_id, context.expires_at, plaintext)
        if entry.max_uses is not None:
            return CountUse(entry, fetched, detail)
        entry.uses += 1
        self._audit.count("fetch", "granted", execution_id=context.execution_id,
                          token_id=entry.token_id, peer_uid=peer.uid, peer_pid=peer.pid,
                          detail=detail)
        self.uses[entry.token_id] = self.uses.get(entry.token_id, 0) + 1
        return fetched

    # ----------------------------------------------------------------- lookups

    def token(self, hash_: bytes) -> LiveToken | None:
        return self._by_hash.get(hash_)

    def alive(self, execution_id: str, context: LiveContext | None) -> LiveContext:
        """``context`` if it is live; else NotFound (or the refusal of a tampered row)."""
        self.check_not_refused(execution_id)
        if context is None or context.expires_at <= self.clock():
            raise NotFound(f"execution {execution_id!r} has no live context; "
                           "`stigmer-broker context list` shows the live ones")
        return context

    def check_not_refused(self, execution_id: str) -> None:
        if execution_id in self.refused:
            raise tampered(f"the stored context of execution {execution_id!r}",
                           f"`stigmer-broker context complete {execution_id}` removes it")

    def counts(self) -> tuple[int, int]:
        """(live contexts, live tokens) in memory."""
        now = self.clock()
        return (sum(1 for c in self.by_execution.values() if c.expires_at > now),
                sum(1 for t in self._by_hash.values() if t.usable(now)))

    # ----------------------------------------------------------------- changes

    def install(self, contexts: Iterable[LiveContext]) -> None:
        """Index contexts read from the store (replacing what memory had of each)."""
        for context in contexts:
            old = self.by_execution.get(context.execution_id)
            if old is not None:
                self.forget(context=old)
            self.by_execution[context.execution_id] = context
            self.refused.pop(context.execution_id, None)
            for token in context.tokens.values():
                self._by_hash[token.hash] = token

    def add_token(self, token: LiveToken) -> None:
        token.context.tokens[token.token_id] = token
        self._by_hash[token.hash] = token

    def forget(self, *, context: LiveContext) -> None:
        if self.by_execution.get(context.execution_id) is context:
            del self.by_execution[context.execution_id]
        for token in context.tokens.values():
            if self._by_hash.get(token.hash) is token:
                del self._by_hash[token.hash]

    def drop_expired(self, now: float) -> None:
        for context in [c for c in self.by_execution.values() if c.expires_at <= now]:
            self.forget(context=context)
        for token in [t for t in self._by_hash.values() if t.expires_at <= now]:
            self._by_hash.pop(token.hash, None)
            token.context.tokens.pop(token.token_id, None)

    def heard(self, notice: Notice) -> None:
        """Drop what another broker revoked."""
        self.generation += 1
        if not isinstance(notice, ContextEnded):
            return
        context = self.by_execution.get(notice.execution_id)
        if context is not None and context.row_id == notice.row_id:
            self.forget(context=context)
        self.refused.pop(notice.execution_id, None)

    def clear(self) -> None:
        """Drop everything: changes may have gone unheard."""
        self.generation += 1
        self.by_execution.clear()
        self._by_hash.clear()
        self.refused.clear()


def who(peer: Peer) -> str:
    return f"uid {peer.uid} pid {peer.pid}"
