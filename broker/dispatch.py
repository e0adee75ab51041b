"""Answering requests: one request in, one response out. No sockets here.

:meth:`Dispatcher.handle` is what the server calls for every request after the
handshake checks; a request a runner-group peer may not make is refused here
with ``permission_denied`` before anything else happens. Errors are raised as
:mod:`.protocol.errors` classes and turned into error frames by the server.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import anyio
import msgspec

from . import __version__
from .audit import Audit
from .config import Config
from .contexts import Contexts, Fetched
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
    Environment,
    EnvironmentList,
    FetchContext,
    GetContext,
    GetEnvironment,
    GetStatus,
    Hello,
    IssueToken,
    KeyRotated,
    ListAudit,
    ListContexts,
    ListEnvironments,
    Ok,
    PutEnvironment,
    QuarantineAudit,
    ReleaseContext,
    Request,
    Response,
    RotateKey,
    Shutdown,
    Status,
    TokenIssued,
    UnsetVariables,
    VerifyAudit,
    Welcome,
)
from .protocol.errors import BrokerError, InvalidArgument, PermissionDenied
from .store.anchor import HeadAnchor
from .store.backend import MASTER_KEY_ID, Store, StoreError, StorePeek
from .store.backup import backed_up_at
from .store.notices import MasterKeyRotated, Notice
from .store.vault import Vault

__all__ = ["Counters", "Dispatcher", "refuse_replaced_store"]

log = logging.getLogger("stigmer.broker")
_ENCODER = msgspec.msgpack.Encoder()
_R = TypeVar("_R", bound=Response)
_T = TypeVar("_T")


@dataclasses.dataclass(slots=True)
class Counters:
    """Live figures the server keeps up to date and status reports."""

    requests: int = 0
    connections: int = 0


def refuse_replaced_store(config: Config, store: StorePeek) -> None:
    """Refuse a store with an old schema on a home where a newer broker already ran (its
    audit head anchor exists): the store was replaced by an older file. Called on what
    was read before the store is opened, so the refused store is not migrated. Raises
    StoreError."""
    anchor = HeadAnchor(config.paths.audit_anchor)
    if store.legacy_rows and anchor.exists():
        raise StoreError(
            f"store {store.where} has an old schema, but a newer broker already ran on this "
            f"home ({anchor.path} exists): the store was replaced by an older file. If you "
            f"restored a backup on purpose, remove {anchor.path} and start again")


class Dispatcher:
    """The broker's request handler: routes each request to the domain object it is for."""

    def __init__(self, config: Config, store: Store, vault: Vault, counters: Counters, *,
                 request_shutdown: Callable[[], None]) -> None:
        self._config = config
        self._vault = vault
        self._counters = counters
        self._request_shutdown = request_shutdown
        self._started = time.monotonic()
        self.socket_path = config.paths.socket  # the daemon sets the one it listens on
        self.activity = ""  # a long operation in progress, for status
        self.attest_limit = ""  # runner grants it cannot check, for status (the daemon's)
        self._largest_reply = config.limits.max_frame_size - 1024  # a page's bound
        self._store = store
        self._anchor = HeadAnchor(config.paths.audit_anchor, journal=bool(config.unit))
        self.environments = Environments(store, vault)
        self.audit = Audit(store, vault, anchor=self._anchor)
        self.contexts = Contexts(store, vault, self.environments, self.audit)

    async def start(self) -> None:
        """Authenticate the rows of a store written before rows carried MACs (only on the
        start that migrates it, which :func:`refuse_replaced_store` let through), then load
        the live contexts (dropping expired ones)."""
        if self._store.legacy_rows:
            rows = (await self.environments.authenticate_unchecked()
                    + await self.contexts.authenticate_unchecked())
            log.info("authenticated %d rows of a store written before rows carried MACs",
                     rows)
        elif self._store.migrated_from == 0 and self._anchor.exists():
            kept = self._anchor.path.with_name(self._anchor.path.name + ".replaced")
            os.replace(self._anchor.path, kept)
            log.warning("a new store was created where an audit head anchor existed; the old "
                        "anchor is kept as %s", kept)
        await self.contexts.load()
        await self.audit.anchor()

    async def maintain(self, *, flush_interval: float = 0.2, sweep_interval: float = 10.0,
                       retention_interval: float = 3600.0) -> None:
        """Run forever: flush buffered audit records, sweep expired contexts, apply the
        audit retention, give free pages back."""
        next_sweep = time.monotonic() + sweep_interval
        next_retention = time.monotonic()  # the first cut runs soon, not in start-up
        while True:
            await anyio.sleep(flush_interval)
            try:
                await self.audit.flush()
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + sweep_interval
                    if await self.contexts.sweep():
                        await self.audit.flush()
                        await self._store.reclaim()
                if time.monotonic() >= next_retention:
                    next_retention = time.monotonic() + retention_interval
                    await self._retain()
            except BrokerError as exc:  # disk full and the like: keep buffering, retry
                log.warning("background write failed: %s", exc.message)
            except Exception:  # a bug here must not take the daemon down with it
                log.exception("background maintenance failed; retrying")

    async def watch(self) -> None:
        """Run forever: follow what other brokers of a fleet change in a shared store."""
        await self._store.watch(self._heard, self.contexts.resync)

    def _heard(self, notice: Notice) -> None:
        if isinstance(notice, MasterKeyRotated) and notice.key_id != self._vault.key_id:
            # not our own rotation
            log.warning("another broker of the fleet rotated the master key (now key id %s); "
                        "this one keeps serving, but needs the new key before it next "
                        "starts", notice.key_id)
        self.contexts.heard(notice)

    async def _retain(self) -> None:
        retention = self._config.audit_retention_s
        if retention is not None and await self.audit.prune(time.time() - retention):
            await self._store.reclaim()

    async def close(self) -> None:
        """Write what is still buffered."""
        try:
            await self.audit.flush()
        except BrokerError as exc:
            log.error("could not write %d buffered audit records: %s", self.audit.pending,
                      exc.message)

    def handle_now(self, request: Request, peer: Peer) -> Response | None:
        """The response to ``request`` when memory alone gives it (a fetch the cache
        answers, the handshake); None when it must wait (then :meth:`handle`)."""
        if type(request) is FetchContext:  # the runner's fetch: the hot path
            if request.token is not None:
                fetched = self.contexts.fetch_now(request.token, peer)
            elif request.execution_id is not None:
                fetched = self.contexts.fetch_granted_now(request.execution_id, peer)
            else:
                return None
            return None if fetched is None else _fetched_reply(request.id, fetched)
        if type(request) is Hello:
            return _welcome(request.id)
        return None

    async def handle(self, request: Request, peer: Peer) -> Response:
        """Return the response to ``request``; raise a BrokerError to refuse it."""
        if request.admin and not peer.admin:
            # by uid and cause: a process per request adds to one record's count
            self.audit.count("request", "denied", peer_uid=peer.uid,
                             detail=f"op={type(request).__name__}")
            raise PermissionDenied(
                f"{type(request).__name__} is for the broker's owner; runner-group members "
                "may only fetch contexts")
        rid = request.id
        match request:  # the runner's fetch first: it is the hot path
            case FetchContext(token=token, execution_id=execution_id):
                if token is not None:
                    fetched = await self.contexts.fetch(token, peer)
                elif execution_id is not None:
                    fetched = await self.contexts.fetch_granted(execution_id, peer)
                else:
                    raise InvalidArgument("give a token or an execution id")
                if fetched.pending_use is not None:  # max-uses: counted before the reply
                    await self.contexts.persist_use(fetched, peer)
                return _fetched_reply(rid, fetched)
            case Hello():
                return _welcome(rid)
            case GetStatus():
                return await self._status(rid)
            case Shutdown():
                self._request_shutdown()
                return Ok(id=rid)
            case PutEnvironment(name=name, data=data):
                await self.environments.put(name, data)
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
                await self.environments.unset(name, keys)
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
                changes = await self.environments.apply(specs, dry_run=dry_run)
                if not dry_run:
                    for spec in specs:
                        await self._changed("environment.applied", peer, spec.name,
                                            sorted(spec.data))
                return Applied(id=rid, changes=changes, dry_run=dry_run)
            case RotateKey():
                def progress(done: int, total: int) -> None:
                    self.activity = f"key rotation: {done} of {total} sealed values checked"

                self.activity = "key rotation: rewrapping data keys"
                try:
                    result = await self._vault.rotate(progress)
                finally:
                    self.activity = ""
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
                context, key_infos, token_infos = await self.contexts.describe(execution_id)
                grant = context.grant
                return ContextInfo(id=rid, execution_id=execution_id,
                                   created_at=context.created_at, expires_at=context.expires_at,
                                   keys=key_infos, tokens=token_infos,
                                   runners=list(grant.runners) if grant else [],
                                   runner_uses=grant.uses if grant else 0)
            case ListContexts(page_size=size, page_token=after):
                contexts, more = await self.contexts.summaries(after=after, limit=size)
                return self._page(lambda n, token: ContextList(
                    id=rid, contexts=contexts[:n], next_page_token=token),
                    contexts, more, lambda c: c.execution_id)
            case CompleteContext(execution_id=execution_id):
                await self.contexts.complete(execution_id, peer)
                return Ok(id=rid)
            case ReleaseContext(token=token, execution_id=execution_id):
                if token is not None:
                    await self.contexts.release(token, peer)
                elif execution_id is not None:
                    await self.contexts.release_granted(execution_id, peer)
                else:
                    raise InvalidArgument("give a token or an execution id")
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

    async def _status(self, rid: int) -> Status:
        try:  # figures from a shared store: none while it is out (store_problem says so)
            contexts, tokens = await self.contexts.live_counts()
            environments = await self.environments.count()
        except BrokerError:
            if not self._store.shared:
                raise
            contexts = tokens = environments = 0
        try:
            mode = f"{stat.S_IMODE(os.lstat(self.socket_path).st_mode):04o}"
        except OSError:
            mode = "missing"
        return Status(
            id=rid, version=__version__, pid=os.getpid(),
            uptime_s=round(time.monotonic() - self._started, 3),
            socket=str(self.socket_path), socket_mode=mode, store=self._store.describe(),
            store_problem=await self._store_problem(),
            audit_problem=self.audit.problem,
            key_source=self._vault.key_source(), started_by=self._config.started_by,
            unit=self._config.unit, activity=self.activity,
            environments=environments, contexts=contexts, tokens=tokens,
            requests=self._counters.requests, connections=self._counters.connections,
            key_backed_up_at=self.key_backed_up_at(), attest_limit=self.attest_limit,
        )

    async def _store_problem(self) -> str:
        problem = self._store.problem()
        if problem or not self._store.shared:
            return problem
        try:
            fleet_key = await self._store.meta(MASTER_KEY_ID)
        except BrokerError as exc:
            return exc.message
        if fleet_key is not None and fleet_key != self._vault.key_id:
            return (f"another broker rotated the fleet's master key (now key id {fleet_key}); "
                    f"this one holds key id {self._vault.key_id}: install the new key here "
                    "before it restarts")
        return ""

    def key_backed_up_at(self) -> float | None:
        """When the current master key was exported, or None (never, or before a
        rotation)."""
        return backed_up_at(self._config.paths.key_backup_record, self._vault.key_id)


def _fetched_reply(rid: int, fetched: Fetched) -> ContextFetchedRaw:
    """The reply to a fetch: the opened msgpack spliced in as it is."""
    return ContextFetchedRaw(id=rid, execution_id=fetched.execution_id,
                             expires_at=fetched.expires_at,
                             variables=msgspec.Raw(fetched.plaintext))


def _welcome(rid: int) -> Welcome:
    return Welcome(id=rid, version=PROTOCOL_VERSION, server_version=__version__)
