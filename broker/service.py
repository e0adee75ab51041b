"""Answering requests: one request in, one response out. No sockets here.

:meth:`Service.handle` is the dispatcher the server calls for every request
after the handshake checks; a request a runner-group peer may not make is
refused here with ``permission_denied`` before anything else happens. Errors
are raised as :mod:`.errors` classes and turned into error frames by the server.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import time
from collections.abc import Callable

from . import __version__
from .config import Config
from .environments import Environments
from .errors import InvalidArgument, PermissionDenied
from .protocol import (
    PROTOCOL_VERSION,
    ApplyEnvironments,
    DeleteEnvironment,
    Environment,
    EnvironmentList,
    GetEnvironment,
    GetStatus,
    Hello,
    KeyRotated,
    ListEnvironments,
    Ok,
    PutEnvironment,
    Request,
    Response,
    RotateKey,
    Shutdown,
    Status,
    UnsetVariables,
    Welcome,
)
from .server import Peer
from .vault import Vault

__all__ = ["Counters", "Service"]


@dataclasses.dataclass(slots=True)
class Counters:
    """Live figures the server keeps up to date and status reports."""

    requests: int = 0
    connections: int = 0


class Service:
    """The broker's request handler."""

    def __init__(self, config: Config, vault: Vault, counters: Counters, *,
                 request_shutdown: Callable[[], None]) -> None:
        self._config = config
        self._vault = vault
        self._counters = counters
        self._request_shutdown = request_shutdown
        self._started = time.monotonic()
        self.environments = Environments(vault)

    async def handle(self, request: Request, peer: Peer) -> Response:
        """Return the response to ``request``; raise a BrokerError to refuse it."""
        if request.admin and not peer.admin:
            raise PermissionDenied(
                f"{type(request).__name__} is for the broker's owner; runner-group members "
                "may only fetch contexts")
        rid = request.id
        match request:
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
                result = await self._vault.rotate()
                return KeyRotated(id=rid, key_id=result.key_id, rewrapped=result.rewrapped,
                                  key_source=result.key_source)
        raise InvalidArgument(f"{type(request).__name__} is not a request this broker serves")

    async def _environment(self, rid: int, name: str, *, reveal: bool) -> Environment:
        record = await self.environments.get(name, reveal=reveal)
        return Environment(id=rid, name=record.name, data=record.data,
                           created_at=record.created_at, updated_at=record.updated_at)

    async def _status(self, rid: int) -> Status:
        paths = self._config.paths
        try:
            mode = f"{stat.S_IMODE(os.lstat(paths.socket).st_mode):04o}"
        except OSError:
            mode = "missing"
        return Status(
            id=rid, version=__version__, pid=os.getpid(),
            uptime_s=round(time.monotonic() - self._started, 3),
            socket=str(paths.socket), socket_mode=mode, store=str(paths.store),
            key_source=self._vault.master.describe(), started_by=self._config.started_by,
            environments=await self.environments.count(), contexts=0, tokens=0,
            requests=self._counters.requests, connections=self._counters.connections,
        )
