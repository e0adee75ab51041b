"""The async client (anyio): the same protocol object as the blocking client."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, TypeVar

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

from stigmer.broker.errors import BrokerUnavailable
from stigmer.broker.protocol import (
    CLOSED,
    NEED_DATA,
    PROTOCOL_VERSION,
    ApplyEnvironments,
    AuditLog,
    AuditRecord,
    AuditVerified,
    CompleteContext,
    Connection,
    ContextCreated,
    ContextFetched,
    ContextInfo,
    ContextList,
    ContextSummary,
    CreateContext,
    DeleteEnvironment,
    Environment,
    EnvironmentList,
    EnvironmentSpec,
    EnvironmentSummary,
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
    Role,
    RotateKey,
    Shutdown,
    SpecEntry,
    Status,
    TokenIssued,
    UnsetVariables,
    Variable,
    VerifyAudit,
    Welcome,
)

from ._common import (
    RequestIds,
    check_peer,
    check_socket_dir,
    default_socket,
    expect,
    token_from,
    unavailable,
)
from ._context import ExecutionContext

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["AsyncClient"]

R = TypeVar("R", bound=Response)


class AsyncClient:
    """An async connection to the broker. Use as ``async with AsyncClient() as c``.

    Same checks, errors and methods as :class:`stigmer.client.Client`. One
    request at a time per client; open one client per concurrent task.
    """

    def __init__(self, socket_path: str | Path | None = None, *, timeout: float = 30.0) -> None:
        self.socket_path = os.fspath(socket_path) if socket_path else default_socket()
        self.timeout = timeout
        self._stream: anyio.abc.SocketStream | None = None
        self._conn = Connection(Role.CLIENT)
        self._ids = RequestIds()
        self._lock = anyio.Lock()
        self.server_version = ""

    def __repr__(self) -> str:
        return f"AsyncClient(socket_path={self.socket_path!r})"

    async def connect(self) -> None:
        """Connect, check who serves the socket, and shake hands."""
        if self._stream is not None:
            return
        path = self.socket_path
        dir_owner = check_socket_dir(path)
        try:
            with anyio.fail_after(self.timeout):
                stream = await anyio.connect_unix(path)
        except FileNotFoundError:
            raise unavailable(path, "no socket there") from None
        except ConnectionRefusedError:
            raise unavailable(path, "connection refused") from None
        except TimeoutError:
            raise unavailable(path, "connect timed out") from None
        except OSError as exc:
            raise unavailable(path, exc.strerror or type(exc).__name__) from None
        raw: socket.socket = stream.extra(SocketAttribute.raw_socket)
        try:
            check_peer(raw, path, dir_owner)
        except BaseException:
            await stream.aclose()
            raise
        self._stream = stream
        try:
            welcome = expect(await self._roundtrip(
                Hello(id=self._ids(), version=PROTOCOL_VERSION, client="stigmer.client")),
                Welcome)
        except BaseException:
            await self.aclose()
            raise
        self.server_version = welcome.server_version

    async def aclose(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            await stream.aclose()

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def call(self, request: Request, kind: type[R]) -> R:
        """Send one request and return its reply as ``kind``; raise its error."""
        await self.connect()
        return expect(await self._roundtrip(request), kind)

    async def _roundtrip(self, request: Request) -> Response:
        async with self._lock:
            stream = self._stream
            if stream is None:
                raise BrokerUnavailable(f"not connected to the broker on {self.socket_path}")
            try:
                with anyio.fail_after(self.timeout):
                    await stream.send(self._conn.send(request))
                    while True:
                        event = self._conn.next_event()
                        if event is NEED_DATA:
                            try:
                                data = await stream.receive(65536)
                            except anyio.EndOfStream:
                                data = b""
                            self._conn.receive_data(data)
                            continue
                        if event is CLOSED:
                            raise BrokerUnavailable(
                                f"the broker on {self.socket_path} closed the connection")
                        assert isinstance(event, Response)
                        if event.id in (request.id, 0):
                            return event
            except TimeoutError:
                await self.aclose()
                raise BrokerUnavailable(f"the broker on {self.socket_path} did not answer "
                                        f"within {self.timeout:g}s") from None
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                await self.aclose()
                raise BrokerUnavailable(f"lost the connection to the broker on "
                                        f"{self.socket_path}: {exc}") from None

    # ---------------------------------------------------------------- the API

    async def status(self) -> Status:
        return await self.call(GetStatus(id=self._ids()), Status)

    async def shutdown(self) -> None:
        await self.call(Shutdown(id=self._ids()), Ok)

    async def put_environment(self, name: str, data: Mapping[str, Variable]) -> Environment:
        return await self.call(PutEnvironment(id=self._ids(), name=name, data=dict(data)),
                               Environment)

    async def get_environment(self, name: str, *, reveal: bool = False) -> Environment:
        return await self.call(GetEnvironment(id=self._ids(), name=name, reveal=reveal),
                               Environment)

    async def list_environments(self) -> list[EnvironmentSummary]:
        return (await self.call(ListEnvironments(id=self._ids()), EnvironmentList)).environments

    async def unset_variables(self, name: str, keys: Iterable[str]) -> Environment:
        return await self.call(UnsetVariables(id=self._ids(), name=name, keys=list(keys)),
                               Environment)

    async def delete_environment(self, name: str) -> None:
        await self.call(DeleteEnvironment(id=self._ids(), name=name), Ok)

    async def apply_environments(self, specs: Iterable[EnvironmentSpec]) -> None:
        await self.call(ApplyEnvironments(id=self._ids(), environments=list(specs)), Ok)

    async def rotate_key(self) -> KeyRotated:
        return await self.call(RotateKey(id=self._ids()), KeyRotated)

    # ----------------------------------------------------------- execution contexts

    async def create_context(self, execution_id: str, *,
                       env_spec: Mapping[str, SpecEntry] | None = None,
                       environments: Iterable[str] = (),
                       runtime: Mapping[str, Variable] | None = None,
                       ttl_s: float = 86400.0, token_ttl_s: float = 900.0,
                       max_uses: int | None = None) -> ContextCreated:
        """Merge spec defaults < environments (in order) < runtime into a new context.

        Returns it with its first token (shown only here). Raises AlreadyExists,
        NotFound (an environment) or FailedPrecondition (required keys missing).
        """
        request = CreateContext(id=self._ids(), execution_id=execution_id,
                                env_spec=dict(env_spec or {}), environments=list(environments),
                                runtime=dict(runtime or {}), ttl_s=ttl_s,
                                token_ttl_s=token_ttl_s, max_uses=max_uses)
        return await self.call(request, ContextCreated)

    async def issue_token(self, execution_id: str, *, ttl_s: float = 900.0,
                    max_uses: int | None = None) -> TokenIssued:
        """Issue another token for a live context."""
        return await self.call(IssueToken(id=self._ids(), execution_id=execution_id, ttl_s=ttl_s,
                                   max_uses=max_uses), TokenIssued)

    async def get_context(self, execution_id: str) -> ContextInfo:
        """Describe a live context: keys, provenance, expiry, tokens (never values)."""
        return await self.call(GetContext(id=self._ids(), execution_id=execution_id), ContextInfo)

    async def list_contexts(self) -> list[ContextSummary]:
        return (await self.call(ListContexts(id=self._ids()), ContextList)).contexts

    async def complete_context(self, execution_id: str) -> None:
        """Delete a context and revoke its tokens."""
        await self.call(CompleteContext(id=self._ids(), execution_id=execution_id), Ok)

    async def fetch_context(self, token: str | None = None) -> ExecutionContext:
        """Return the context ``token`` opens (default: ``$STIGMER_EXECUTION_TOKEN``).

        Raises Unauthenticated for any token that does not open a live context.
        """
        reply = await self.call(FetchContext(id=self._ids(), token=token_from(token)),
                             ContextFetched)
        return ExecutionContext(reply.execution_id, reply.expires_at, reply.variables)

    async def release_context(self, token: str | None = None) -> None:
        """End the context ``token`` belongs to (a runner done with its execution)."""
        await self.call(ReleaseContext(id=self._ids(), token=token_from(token)), Ok)

    async def audit(self, execution_id: str | None = None, limit: int = 100) -> list[AuditRecord]:
        """Return the newest audit records, oldest first."""
        return (await self.call(ListAudit(id=self._ids(), execution_id=execution_id, limit=limit),
                               AuditLog)).records

    async def verify_audit(self) -> AuditVerified:
        """Check the audit log's hash chain."""
        return await self.call(VerifyAudit(id=self._ids()), AuditVerified)
