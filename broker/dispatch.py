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
from collections.abc import Callable

import anyio
import msgspec

from . import __version__
from .audit import Audit
from .config import Config
from .contexts import Contexts
from .environments import Environments
from .protocol import (
    PROTOCOL_VERSION,
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
from .protocol.peer import Peer
from .store.sqlite import Store
from .store.vault import Vault

__all__ = ["Counters", "Dispatcher"]

log = logging.getLogger("stigmer.broker")


@dataclasses.dataclass(slots=True)
class Counters:
    """Live figures the server keeps up to date and status reports."""

    requests: int = 0
    connections: int = 0


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
        self.environments = Environments(store, vault)
        self.audit = Audit(store)
        self.contexts = Contexts(store, vault, self.environments, self.audit)

    async def start(self) -> None:
        """Load the live contexts (dropping expired ones)."""
        await self.contexts.load()

    async def maintain(self, *, flush_interval: float = 0.2, sweep_interval: float = 10.0) -> None:
        """Run forever: flush buffered audit records, sweep expired contexts."""
        next_sweep = time.monotonic() + sweep_interval
        while True:
            await anyio.sleep(flush_interval)
            try:
                await self.audit.flush()
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + sweep_interval
                    if await self.contexts.sweep():
                        await self.audit.flush()
            except BrokerError as exc:  # disk full and the like: keep buffering, retry
                log.warning("background write failed: %s", exc.message)
            except Exception:  # a bug here must not take the daemon down with it
                log.exception("background maintenance failed; retrying")

    async def close(self) -> None:
        """Write what is still buffered."""
        try:
            await self.audit.flush()
        except BrokerError as exc:
            log.error("could not write %d buffered audit records: %s", self.audit.pending,
                      exc.message)

    async def handle(self, request: Request, peer: Peer) -> Response:
        """Return the response to ``request``; raise a BrokerError to refuse it."""
        if request.admin and not peer.admin:
            raise PermissionDenied(
                f"{type(request).__name__} is for the broker's owner; runner-group members "
                "may only fetch contexts")
        rid = request.id
        match request:  # the runner's fetch first: it is the hot path
            case FetchContext(token=token):
                fetched = self.contexts.fetch(token, peer)
                if fetched.pending_use is not None:  # max-uses: durable before the reply
                    await self.contexts.persist_use(fetched)
                return ContextFetchedRaw(id=rid, execution_id=fetched.execution_id,
                                         expires_at=fetched.expires_at,
                                         variables=msgspec.Raw(fetched.plaintext))
            case Hello():
                return Welcome(id=rid, version=PROTOCOL_VERSION, server_version=__version__)
            case GetStatus():
                return await self._status(rid)
            case Shutdown():
                self._request_shutdown()
                return Ok(id=rid)
            case PutEnvironment(name=name, data=data):
                await self.environments.put(name, data)
                return await self._environment(rid, name, reveal=False)
            case GetEnvironment(name=name, reveal=reveal):
                return await self._environment(rid, name, reveal=reveal)
            case ListEnvironments():
                return EnvironmentList(id=rid, environments=await self.environments.list())
            case UnsetVariables(name=name, keys=keys):
                await self.environments.unset(name, keys)
                return await self._environment(rid, name, reveal=False)
            case DeleteEnvironment(name=name):
                await self.environments.delete(name)
                return Ok(id=rid)
            case ApplyEnvironments(environments=specs):
                names = [s.name for s in specs]
                if len(set(names)) != len(names):
                    raise InvalidArgument("the same environment appears twice in one apply")
                await self.environments.apply(specs)
                return Ok(id=rid)
            case RotateKey():
                def progress(done: int, total: int) -> None:
                    self.activity = f"key rotation: {done} of {total} sealed values checked"

                self.activity = "key rotation: rewrapping data keys"
                try:
                    result = await self._vault.rotate(progress)
                finally:
                    self.activity = ""
                return KeyRotated(id=rid, key_id=result.key_id, rewrapped=result.rewrapped,
                                  key_source=result.key_source)
            case CreateContext():
                created = await self.contexts.create(request, peer)
                return ContextCreated(id=rid, execution_id=created.execution_id,
                                      expires_at=created.expires_at, token=created.token.token,
                                      token_id=created.token.token_id,
                                      token_expires_at=created.token_expires_at,
                                      keys=created.keys)
            case IssueToken(execution_id=execution_id, ttl_s=ttl_s, max_uses=max_uses):
                issued, expires_at = await self.contexts.issue(execution_id, ttl_s, max_uses,
                                                               peer)
                return TokenIssued(id=rid, execution_id=execution_id, token=issued.token,
                                   token_id=issued.token_id, expires_at=expires_at)
            case GetContext(execution_id=execution_id):
                context, key_infos, token_infos = await self.contexts.describe(execution_id)
                return ContextInfo(id=rid, execution_id=execution_id,
                                   created_at=context.created_at, expires_at=context.expires_at,
                                   keys=key_infos, tokens=token_infos)
            case ListContexts():
                return ContextList(id=rid, contexts=self.contexts.summaries())
            case CompleteContext(execution_id=execution_id):
                await self.contexts.complete(execution_id, peer)
                return Ok(id=rid)
            case ReleaseContext(token=token):
                await self.contexts.release(token, peer)
                return Ok(id=rid)
            case ListAudit(execution_id=execution_id, limit=limit):
                return AuditLog(id=rid, records=await self.audit.list(execution_id, limit))
            case VerifyAudit():
                count, broken, reason = await self.audit.verify()
                return AuditVerified(id=rid, ok=broken is None, records=count,
                                     first_broken=broken, reason=reason)
        raise InvalidArgument(f"{type(request).__name__} is not a request this broker serves")

    async def _environment(self, rid: int, name: str, *, reveal: bool) -> Environment:
        record = await self.environments.get(name, reveal=reveal)
        return Environment(id=rid, name=record.name, data=record.data,
                           created_at=record.created_at, updated_at=record.updated_at)

    async def _status(self, rid: int) -> Status:
        paths = self._config.paths
        contexts, tokens = self.contexts.live_counts()
        try:
            mode = f"{stat.S_IMODE(os.lstat(self.socket_path).st_mode):04o}"
        except OSError:
            mode = "missing"
        return Status(
            id=rid, version=__version__, pid=os.getpid(),
            uptime_s=round(time.monotonic() - self._started, 3),
            socket=str(self.socket_path), socket_mode=mode, store=str(paths.store),
            key_source=self._vault.key_source(), started_by=self._config.started_by,
            unit=self._config.unit, activity=self.activity,
            environments=await self.environments.count(), contexts=contexts, tokens=tokens,
            requests=self._counters.requests, connections=self._counters.connections,
        )
