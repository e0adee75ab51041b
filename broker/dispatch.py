"""Answering requests: one request in, one response out. No sockets here.

:meth:`Dispatcher.handle` is what the server calls for every request after the
handshake checks; a request a runner-group peer may not make is refused here
with ``permission_denied`` before anything else happens. Errors are raised as
:mod:`.protocol.errors` classes and turned into error frames by the server.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar, cast

import msgspec

from . import __version__
from .audit import Audit
from .contexts import Contexts, Fetch, Fetched
from .contexts.index import Need
from .environments import Environments
from .local.peer import Peer
from .protocol import (
    PROTOCOL_VERSION,
    Applied,
    ApplyEnvironments,
    AuditLog,
    AuditVerified,
    CompleteContext,
    ContextCreated,
    ContextFetchedRaw,
    ContextInfo,
    ContextList,
    CreateContext,
    DeleteEnvironment,
    DiffEnvironmentVersions,
    Environment,
    EnvironmentDiff,
    EnvironmentHistory,
    EnvironmentList,
    EnvironmentVersion,
    FetchContext,
    GetContext,
    GetEnvironment,
    GetEnvironmentVersion,
    GetStatus,
    Hello,
    IssueToken,
    KeyRotated,
    ListAudit,
    ListContexts,
    ListEnvironments,
    ListEnvironmentVersions,
    Ok,
    PutEnvironment,
    QuarantineAudit,
    ReleaseContext,
    Request,
    Response,
    RollbackEnvironment,
    RolledBack,
    RotateKey,
    Shutdown,
    Status,
    TokenIssued,
    UnsetVariables,
    VerifyAudit,
    Welcome,
)
from .protocol.errors import InvalidArgument, PermissionDenied
from .store.vault import Vault
from .tokens import token_hash

__all__ = ["Counters", "Dispatcher", "Later"]

_ENCODER = msgspec.msgpack.Encoder()
_R = TypeVar("_R", bound=Response)
_T = TypeVar("_T")


@dataclasses.dataclass(frozen=True, slots=True)
class Later:
    """The answer to a request that must wait (for the store, a worker thread): the
    server awaits it in a task of its own, and the connection stops reading meanwhile."""

    answer: Callable[[], Awaitable[Response]]


@dataclasses.dataclass(slots=True)
class Counters:
    """Live figures the server and the dispatcher keep up to date and status reports."""

    requests: int = 0
    connections: int = 0
    activity: str = ""  # a long operation in progress (a key rotation)


class Dispatcher:
    """The broker's request handler: routes each request to the domain object it is for.
    It is composed by the daemon (:mod:`.daemon.startup`), which also owns start-up,
    housekeeping and the status report."""

    def __init__(self, environments: Environments, audit: Audit, contexts: Contexts,
                 vault: Vault, counters: Counters, *,
                 status: Callable[[int], Awaitable[Status]],
                 request_shutdown: Callable[[], None], largest_reply: int) -> None:
        self.environments = environments
        self.audit = audit
        self.contexts = contexts
        self._vault = vault
        self._counters = counters
        self._status = status
        self._request_shutdown = request_shutdown
        self._largest_reply = largest_reply  # a page's bound

    def handle(self, request: Request, peer: Peer) -> Response | Later:
        """The response to ``request`` when memory gives it now (a fetch the index
        answers, the handshake), else the :class:`Later` that gives it; raise a
        BrokerError to refuse it. The server calls this inside ``data_received``, so
        nothing here waits, reads a file or asks the store."""
        if request.admin and not peer.admin:
            # by uid and cause: a process per request adds to one record's count
            self.audit.count("request", "denied", peer_uid=peer.uid,
                             detail=f"op={type(request).__name__}")
            raise PermissionDenied(
                f"{type(request).__name__} is for the broker's owner; runner-group members "
                "may only fetch contexts")
        if type(request) is FetchContext:  # the runner's fetch: the hot path
            _one_credential(request.token, request.execution_id)
            if request.token is not None:
                fetch = Fetch(peer, token_hash=token_hash(request.token))
            else:
                assert request.execution_id is not None
                fetch = Fetch(peer, execution_id=request.execution_id)
            outcome = self.contexts.index.fetch(fetch)
            if isinstance(outcome, Fetched):
                return _fetched_reply(request.id, outcome)
            return Later(functools.partial(self._fetch, request.id, fetch, outcome))
        if type(request) is Hello:
            return _welcome(request.id)
        return Later(functools.partial(self._serve, request, peer))

    async def answer(self, request: Request, peer: Peer) -> Response:
        """:meth:`handle`, waited for."""
        reply = self.handle(request, peer)
        return await reply.answer() if type(reply) is Later else cast(Response, reply)

    async def _fetch(self, rid: int, fetch: Fetch, need: Need) -> Response:
        return _fetched_reply(rid, await self.contexts.drive(fetch, need))

    async def _serve(self, request: Request, peer: Peer) -> Response:
        """The response to a request that waits for the store (or a worker thread)."""
        rid = request.id
        match request:
            case GetStatus():
                return await self._status(rid)
            case Shutdown():
                self._request_shutdown()
                return Ok(id=rid)
            case PutEnvironment(name=name, data=data):
                await self.environments.put(name, data, actor_uid=peer.uid)
                await self._changed("environment.set", peer, name, sorted(data))
                return await self._environment(rid, name, reveal=False)
            case GetEnvironment(name=name, reveal=reveal):
                return await self._environment(rid, name, reveal=reveal)
            case ListEnvironments(page_size=size, page_token=after):
                envs, more = await self.environments.list(after=after, limit=size)
                return self._page(lambda n, token: EnvironmentList(
                    id=rid, environments=envs[:n], next_page_token=token),
                    envs, more, lambda e: e.name)
            case UnsetVariables(name=name, keys=keys):
                await self.environments.unset(name, keys, actor_uid=peer.uid)
                await self._changed("environment.unset", peer, name, sorted(keys))
                return await self._environment(rid, name, reveal=False)
            case DeleteEnvironment(name=name):
                await self.environments.delete(name)
                await self._changed("environment.deleted", peer, name)
                return Ok(id=rid)
            case ApplyEnvironments(environments=specs, dry_run=dry_run):
                names = [s.name for s in specs]
                if len(set(names)) != len(names):
                    raise InvalidArgument("the same environment appears twice in one apply")
                changes = await self.environments.apply(specs, dry_run=dry_run,
                                                        actor_uid=peer.uid)
                if not dry_run:
                    for spec in specs:
                        await self._changed("environment.applied", peer, spec.name,
                                            sorted(spec.data))
                return Applied(id=rid, changes=changes, dry_run=dry_run)
            case RotateKey():
                counters = self._counters

                def progress(done: int, total: int) -> None:
                    counters.activity = (f"key rotation: {done} of {total} sealed values "
                                         "checked")

                counters.activity = "key rotation: rewrapping data keys"
                try:
                    result = await self._vault.rotate(progress)
                finally:
                    counters.activity = ""
                await self._changed("key.rotated", peer, f"key id {result.key_id}")
                return KeyRotated(id=rid, key_id=result.key_id, rewrapped=result.rewrapped,
                                  key_source=result.key_source)
            case CreateContext():
                created = await self.contexts.create(request, peer)
                first = created.token
                return ContextCreated(id=rid, execution_id=created.execution_id,
                                      expires_at=created.expires_at,
                                      token=first.token if first else "",
                                      token_id=first.token_id if first else "",
                                      token_expires_at=created.token_expires_at,
                                      keys=created.keys, runners=created.runners)
            case IssueToken(execution_id=execution_id, ttl_s=ttl_s, max_uses=max_uses):
                issued, expires_at = await self.contexts.issue(execution_id, ttl_s, max_uses,
                                                               peer)
                return TokenIssued(id=rid, execution_id=execution_id, token=issued.token,
                                   token_id=issued.token_id, expires_at=expires_at)
            case GetContext(execution_id=execution_id):
                context, described, token_infos = await self.contexts.describe(execution_id)
                grant = context.grant
                return ContextInfo(id=rid, execution_id=execution_id,
                                   created_at=context.created_at, expires_at=context.expires_at,
                                   keys=described.keys, tokens=token_infos,
                                   runners=list(grant.runners) if grant else [],
                                   runner_uses=grant.uses if grant else 0,
                                   environments=described.environments)
            case ListContexts(page_size=size, page_token=after):
                contexts, more = await self.contexts.summaries(after=after, limit=size)
                return self._page(lambda n, token: ContextList(
                    id=rid, contexts=contexts[:n], next_page_token=token),
                    contexts, more, lambda c: c.execution_id)
            case CompleteContext(execution_id=execution_id):
                await self.contexts.complete(execution_id, peer)
                return Ok(id=rid)
            case ReleaseContext(token=token, execution_id=execution_id):
                _one_credential(token, execution_id)
                if token is not None:
                    await self.contexts.release(token, peer)
                else:
                    assert execution_id is not None
                    await self.contexts.release_granted(execution_id, peer)
                return Ok(id=rid)
            case ListAudit(execution_id=execution_id, limit=limit, page_token=token):
                if token and not token.isdigit():
                    raise InvalidArgument("page_token is not one this broker gave; start "
                                          "again without it")
                records, more = await self.audit.list(
                    execution_id, limit, before=int(token) if token else None)
                newest = records[::-1]
                return self._page(lambda n, next_token: AuditLog(
                    id=rid, records=newest[:n][::-1], next_page_token=next_token),
                    newest, more, lambda r: str(r.seq))
            case VerifyAudit():
                verified = await self.audit.verify()
                return AuditVerified(id=rid, ok=verified.ok, records=verified.records,
                                     first_broken=verified.first_broken, reason=verified.reason,
                                     anchored=verified.anchored,
                                     removed_through=verified.removed_through)
            case QuarantineAudit(seq=seq):
                await self.audit.quarantine(seq, peer_uid=peer.uid, peer_pid=peer.pid)
                return Ok(id=rid)
            # environment history
            case ListEnvironmentVersions(name=name, page_size=size, page_token=token):
                if token and not token.isdigit():
                    raise InvalidArgument("page_token is not one this broker gave; start "
                                          "again without it")
                current, versions, more = await self.environments.history(
                    name, before=int(token) if token else None, limit=size)
                return self._page(lambda n, next_token: EnvironmentHistory(
                    id=rid, name=name, current=current, versions=versions[:n],
                    next_page_token=next_token), versions, more, lambda v: str(v.version))
            case GetEnvironmentVersion(name=name, version=version, reveal=reveal):
                info, views = await self.environments.version(name, version, reveal=reveal)
                return EnvironmentVersion(id=rid, name=name, info=info, data=views)
            case DiffEnvironmentVersions(name=name, from_version=old, to_version=new,
                                         reveal=reveal):
                diff = await self.environments.diff(name, old, new, reveal=reveal)
                return EnvironmentDiff(id=rid, name=name, from_version=old, to_version=new,
                                       keys=diff)
            case RollbackEnvironment(name=name, to_version=version):
                info = await self.environments.rollback(name, version, actor_uid=peer.uid)
                await self._changed("environment.rolled_back", peer,
                                    f"{name} to version {version} (now version {info.version})",
                                    sorted({*info.added, *info.changed, *info.removed}))
                return RolledBack(id=rid, name=name, info=info)
        raise InvalidArgument(f"{type(request).__name__} is not a request this broker serves")

    def _page(self, reply: Callable[[int, str], _R], entries: Sequence[_T], more: bool,
              key: Callable[[_T], str]) -> _R:
        """The reply holding as many of ``entries`` as fit in one frame (all, unless they
        are large: audit details, say), with the token of the page that follows."""
        count = len(entries)
        while True:
            following = key(entries[count - 1]) if count and (more or count < len(entries)) \
                else ""
            page = reply(count, following)
            if count <= 1 or len(_ENCODER.encode(page)) <= self._largest_reply:
                return page
            count //= 2

    async def _changed(self, event: str, peer: Peer, what: str,
                       keys: list[str] | None = None) -> None:
        """Audit an owner's change (names and keys only, never a value)."""
        detail = f"{what}: {', '.join(keys)}" if keys else what
        self.audit.record(event, "ok", peer_uid=peer.uid, peer_pid=peer.pid, detail=detail)
        await self.audit.flush_after_write()

    async def _environment(self, rid: int, name: str, *, reveal: bool) -> Environment:
        record = await self.environments.get(name, reveal=reveal)
        return Environment(id=rid, name=record.name, data=record.data,
                           created_at=record.created_at, updated_at=record.updated_at)


def _fetched_reply(rid: int, fetched: Fetched) -> ContextFetchedRaw:
    """The reply to a fetch: the opened msgpack spliced in as it is."""
    return ContextFetchedRaw(id=rid, execution_id=fetched.execution_id,
                             expires_at=fetched.expires_at,
                             variables=msgspec.Raw(fetched.plaintext))


def _one_credential(token: str | None, execution_id: str | None) -> None:
    """Refuse a fetch or release that gives both a token and an execution id, or
    neither: which one opens the context must not depend on a rule of precedence."""
    if (token is None) == (execution_id is None):
        raise InvalidArgument("give a token or an execution id, exactly one of them")


def _welcome(rid: int) -> Welcome:
    return Welcome(id=rid, version=PROTOCOL_VERSION, server_version=__version__)
