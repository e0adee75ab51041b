"""The async client (anyio): the same protocol object as the blocking client."""

from __future__ import annotations

import socket
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

from stigmer.broker.errors import BrokerUnavailable
from stigmer.broker.protocol import (
    CLOSED,
    NEED_DATA,
    PROTOCOL_VERSION,
    ApplyEnvironments,
    Connection,
    DeleteEnvironment,
    Environment,
    EnvironmentList,
    EnvironmentSpec,
    EnvironmentSummary,
    GetEnvironment,
    GetStatus,
    Hello,
    KeyRotated,
    ListEnvironments,
    Ok,
    PutEnvironment,
    Request,
    Response,
    Role,
    RotateKey,
    Shutdown,
    Status,
    UnsetVariables,
    Variable,
    Welcome,
)

from ._common import RequestIds, check_peer, check_socket_dir, default_socket, expect, unavailable

__all__ = ["AsyncClient"]

R = TypeVar("R", bound=Response)


class AsyncClient:
    """An async connection to the broker. Use as ``async with AsyncClient() as c``.

    Same checks, errors and methods as :class:`stigmer.client.Client`. One
    request at a time per client; open one client per concurrent task.
    """

    def __init__(self, socket_path: str | Path | None = None, *, timeout: float = 30.0) -> None:
        self.socket_path = Path(socket_path) if socket_path else default_socket()
        self.timeout = timeout
        self._stream: anyio.abc.SocketStream | None = None
        self._conn = Connection(Role.CLIENT)
        self._ids = RequestIds()
        self._lock = anyio.Lock()
        self.server_version = ""

    def __repr__(self) -> str:
        return f"AsyncClient(socket_path={str(self.socket_path)!r})"

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
