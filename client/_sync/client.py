# Generated from client/_async/client.py by `make unasync`: do not edit.
"""The client API, written once: this file is the source, ``client/_sync/client.py`` its
generated blocking twin (``make unasync``). Keep it free of anyio: every wait goes
through the transport, which each side writes for itself."""

from __future__ import annotations

import os
from collections.abc import Iterator, Callable, Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, TypeVar

from stigmer.broker.protocol import (
    CLOSED,
    MAX_PAGE_SIZE,
    NEED_DATA,
    PROTOCOL_VERSION,
    Applied,
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
    DiffEnvironmentVersions,
    Environment,
    EnvironmentChange,
    EnvironmentDiff,
    EnvironmentHistory,
    EnvironmentList,
    EnvironmentSpec,
    EnvironmentSummary,
    EnvironmentVersion,
    EnvironmentVersionInfo,
    FetchContext,
    GetContext,
    GetEnvironment,
    GetEnvironmentVersion,
    GetStatus,
    Hello,
    IssueToken,
    KeyDiff,
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
    Role,
    RollbackEnvironment,
    RolledBack,
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
from stigmer.broker.protocol.errors import BrokerUnavailable, ProtocolError, ResourceExhausted

from .._common import (
    RETRY_SAFE,
    Backoff,
    ClosedBeforeReply,
    check_peer,
    check_socket_dir,
    checked_values,
    closed_by_peer,
    credential_from,
    default_socket,
    expect,
    request_ids,
    unavailable,
)
from .._context import ExecutionContext
from .transport import SyncLock, SyncSocket

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["Client"]

R = TypeVar("R", bound=Response)
P = TypeVar("P", EnvironmentList, ContextList, EnvironmentHistory)  # the pages of a listing


class Client:
    """A connection to the local broker; use it as a context manager.

    ``socket_path`` defaults to the socket every stigmer-broker command uses
    (``STIGMER_BROKER_SOCKET``, ``$XDG_RUNTIME_DIR/stigmer/broker.sock``, ...).
    ``timeout`` bounds each wait for the broker. Requests from several threads
    or tasks take turns on the one connection. Raises BrokerUnavailable when no
    trustworthy broker answers there.
    """

    def __init__(self, socket_path: str | Path | None = None, *, timeout: float = 30.0) -> None:
        self.socket_path = os.fspath(socket_path) if socket_path else default_socket()
        self.timeout = timeout
        self.server_version = ""
        self._sock: SyncSocket | None = None
        self._conn = Connection(Role.CLIENT)
        self._ids = request_ids()
        self._lock = SyncLock()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(socket_path={self.socket_path!r})"

    # ------------------------------------------------------------------ lifecycle

    def connect(self) -> None:
        """Connect, check who serves the socket, and shake hands (once)."""
        with self._lock:
            self._connect()

    def close(self) -> None:
        """Close the connection; the next request opens a new one."""
        if self._sock is not None:
            sock, self._sock = self._sock, None
            sock.close()

    def __enter__(self) -> Client:
        self.connect()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.close()

    def _connect(self, *, probe: bool = True) -> None:
        if self._sock is not None:
            if not probe or not closed_by_peer(self._sock.raw):
                return
            self.close()  # closed while idle: start afresh before sending anything
        path = self.socket_path
        dir_owner = check_socket_dir(path)
        backoff = Backoff(self.timeout)  # one connect timeout, however many attempts
        while True:
            try:
                sock = SyncSocket.connect(path, backoff)
            except FileNotFoundError:
                raise unavailable(path, "no socket there") from None
            except ConnectionRefusedError:
                raise unavailable(path, "connection refused") from None
            except TimeoutError:
                raise unavailable(path, "connect timed out") from None
            except OSError as exc:
                raise unavailable(path, exc.strerror or type(exc).__name__) from None
            try:
                check_peer(sock.raw, path, dir_owner)
            except BaseException:
                sock.close()
                raise
            self._sock = sock
            self._conn = Connection(Role.CLIENT)  # a new socket: a new protocol state
            try:
                welcome = expect(self._roundtrip(
                    Hello(id=self._ids(), version=PROTOCOL_VERSION, client="stigmer.client")),
                    Welcome)
                break
            except ResourceExhausted as exc:  # turned away for want of room: come back
                self.close()
                try:
                    SyncSocket.pause(backoff)
                except TimeoutError:
                    raise unavailable(path, exc.message) from None
            except BaseException:
                self.close()
                raise
        self.server_version = welcome.server_version

    # ------------------------------------------------------------------- requests

    def call(self, request: Request, kind: type[R]) -> R:
        """Send one request and return its reply as ``kind``; raise its error.

        A request that is safe to repeat (a read or a fetch) and found the
        connection already closed (a broker restart, its idle timeout) is sent
        once more on a fresh connection; a write is never repeated blindly.
        """
        with self._lock:
            # Before a write, make sure the broker has not closed the idle connection (a
            # write sent into a closed one could not be told apart from one carried out).
            # A read needs no such check, which costs a system call: it is sent again.
            retry_safe = isinstance(request, RETRY_SAFE)
            if self._sock is None or not retry_safe:
                self._connect(probe=not retry_safe)
            try:
                reply = self._roundtrip(request)
            except ClosedBeforeReply:
                if not retry_safe:
                    raise
                self._connect()
                reply = self._roundtrip(request)
            return reply if type(reply) is kind else expect(reply, kind)

    def _roundtrip(self, request: Request) -> Response:
        sock = self._sock
        if sock is None:
            raise BrokerUnavailable(f"not connected to the broker on {self.socket_path}")
        replied = False
        try:
            try:
                sock.send_all(self._conn.send(request), self.timeout)
            except (BrokenPipeError, ConnectionResetError):
                pass  # closed by the broker: what it said first (a refusal) is still to read
            while True:
                event = self._conn.next_event()
                if event is NEED_DATA:
                    data = sock.receive(self.timeout)
                    replied = replied or bool(data)
                    self._conn.receive_data(data)
                    continue
                if event is CLOSED:
                    raise ConnectionResetError(0, "the broker closed the connection")
                assert isinstance(event, Response)
                if event.id in (request.id, 0):  # else a late answer to one we gave up on
                    return event
        except TimeoutError:
            self.close()
            raise BrokerUnavailable(f"the broker on {self.socket_path} did not answer within "
                                    f"{self.timeout:g}s") from None
        except OSError as exc:
            self.close()
            message = (f"lost the connection to the broker on {self.socket_path}: "
                       f"{exc.strerror or exc}")
            raise (BrokerUnavailable(message) if replied else ClosedBeforeReply(message)
                   ) from None
        except ProtocolError:
            self.close()  # the stream cannot continue; the next call starts afresh
            raise

    # ------------------------------------------------------------------- the API

    def status(self) -> Status:
        """Return the broker's status."""
        return self.call(GetStatus(id=self._ids()), Status)

    def shutdown(self) -> None:
        """Ask the broker to stop gracefully."""
        self.call(Shutdown(id=self._ids()), Ok)

    def put_environment(self, name: str, data: Mapping[str, Variable]) -> Environment:
        """Create ``name`` or merge ``data`` into it; return it with secrets masked."""
        return self.call(PutEnvironment(id=self._ids(), name=name,
                                              data=checked_values(data, f"environment {name}")),
                               Environment)

    def get_environment(self, name: str, *, reveal: bool = False) -> Environment:
        """Return an environment; secret values are None unless ``reveal``."""
        return self.call(GetEnvironment(id=self._ids(), name=name, reveal=reveal),
                               Environment)

    def list_environments(self) -> list[EnvironmentSummary]:
        """Return a summary of every environment, by name (all pages)."""
        return [env for env in self.iter_environments()]

    def iter_environments(self, page_size: int = 500) -> Iterator[EnvironmentSummary]:
        """Yield a summary of every environment, by name, asking for a page at a time."""
        for page in self._pages(
                lambda token: ListEnvironments(id=self._ids(), page_size=page_size,
                                               page_token=token), EnvironmentList):
            for env in page.environments:
                yield env

    def unset_variables(self, name: str, keys: Iterable[str]) -> Environment:
        """Remove ``keys`` from an environment (all or none); return what is left."""
        return self.call(UnsetVariables(id=self._ids(), name=name, keys=list(keys)),
                               Environment)

    def delete_environment(self, name: str) -> None:
        """Delete an environment and its variables."""
        self.call(DeleteEnvironment(id=self._ids(), name=name), Ok)

    def apply_environments(self, specs: Iterable[EnvironmentSpec], *,
                                 dry_run: bool = False) -> list[EnvironmentChange]:
        """Set each environment to exactly its data, all or nothing; return what changed
        (key names only). With ``dry_run``, return what would change and write nothing."""
        specs = list(specs)
        for spec in specs:
            checked_values(spec.data, f"environment {spec.name}")
        reply = self.call(ApplyEnvironments(id=self._ids(), environments=specs,
                                                  dry_run=dry_run), Applied)
        return reply.changes

    def rotate_key(self) -> KeyRotated:
        """Replace the master key; may take a while on a large store."""
        return self.call(RotateKey(id=self._ids()), KeyRotated)

    # ----------------------------------------------------------- execution contexts

    def create_context(self, execution_id: str, *,
                             env_spec: Mapping[str, SpecEntry] | None = None,
                             environments: Iterable[str] = (),
                             runtime: Mapping[str, Variable] | None = None,
                             ttl_s: float = 86400.0, token_ttl_s: float = 900.0,
                             max_uses: int | None = None, runners: Iterable[str] = (),
                             token: bool | None = None) -> ContextCreated:
        """Merge spec defaults < environments (in order) < runtime into a new context.

        ``runners`` are selectors of the processes that may open it by its execution id
        (``"group:stigmer-runners"``, ``"user:runner,exe:/usr/bin/python3"``). A token
        is issued unless runners are given (``token=True`` issues one as well); it is
        shown only here. Raises AlreadyExists, NotFound (an environment),
        FailedPrecondition (required keys missing) or InvalidArgument (a selector).
        """
        request = CreateContext(id=self._ids(), execution_id=execution_id,
                                env_spec=checked_values(env_spec or {}, "env_spec"),
                                environments=list(environments),
                                runtime=checked_values(runtime or {}, "runtime"), ttl_s=ttl_s,
                                token_ttl_s=token_ttl_s, max_uses=max_uses,
                                runners=list(runners), token=token)
        return self.call(request, ContextCreated)

    def issue_token(self, execution_id: str, *, ttl_s: float = 900.0,
                          max_uses: int | None = None) -> TokenIssued:
        """Issue another token for a live context."""
        return self.call(IssueToken(id=self._ids(), execution_id=execution_id,
                                          ttl_s=ttl_s, max_uses=max_uses), TokenIssued)

    def get_context(self, execution_id: str) -> ContextInfo:
        """Describe a live context: keys, provenance, expiry, tokens (never values)."""
        return self.call(GetContext(id=self._ids(), execution_id=execution_id),
                               ContextInfo)

    def list_contexts(self) -> list[ContextSummary]:
        """Return a summary of every live context, by execution id (all pages)."""
        return [context for context in self.iter_contexts()]

    def iter_contexts(self, page_size: int = 500) -> Iterator[ContextSummary]:
        """Yield a summary of every live context, by execution id, a page at a time."""
        for page in self._pages(
                lambda token: ListContexts(id=self._ids(), page_size=page_size,
                                           page_token=token), ContextList):
            for context in page.contexts:
                yield context

    def _pages(self, request: Callable[[str], Request], kind: type[P]
                     ) -> Iterator[P]:
        """Each page of a listing, following its page tokens to the last."""
        token = ""
        while True:
            page = self.call(request(token), kind)
            yield page
            token = page.next_page_token
            if not token:
                return

    def complete_context(self, execution_id: str) -> None:
        """Delete a context and revoke its tokens."""
        self.call(CompleteContext(id=self._ids(), execution_id=execution_id), Ok)

    def fetch_context(self, token: str | None = None, *,
                            execution_id: str | None = None) -> ExecutionContext:
        """Return the context ``token`` opens, or the context of ``execution_id`` when it
        was granted to this process (``context create --runner``). With neither:
        ``$STIGMER_EXECUTION_TOKEN``, else ``$STIGMER_EXECUTION_ID``.

        Raises Unauthenticated for any token that does not open a live context, and
        PermissionDenied, the same for every reason, when the execution id does not.
        """
        token, execution_id = credential_from(token, execution_id)
        reply = self.call(FetchContext(id=self._ids(), token=token,
                                             execution_id=execution_id), ContextFetched)
        return ExecutionContext(reply.execution_id, reply.expires_at, reply.variables)

    def release_context(self, token: str | None = None, *,
                              execution_id: str | None = None) -> None:
        """End the context ``token`` (or the grant of ``execution_id``) opens: a runner
        done with its execution. The defaults are those of :meth:`fetch_context`."""
        token, execution_id = credential_from(token, execution_id)
        self.call(ReleaseContext(id=self._ids(), token=token,
                                       execution_id=execution_id), Ok)

    def audit(self, execution_id: str | None = None, limit: int = 100
                    ) -> list[AuditRecord]:
        """Return the newest ``limit`` audit records (of one execution), oldest first,
        asking for as many pages as that takes."""
        pages: list[list[AuditRecord]] = []
        token, wanted = "", limit
        while wanted > 0:
            page = self.call(ListAudit(id=self._ids(), execution_id=execution_id,
                                             limit=min(wanted, MAX_PAGE_SIZE), page_token=token),
                                   AuditLog)
            pages.append(page.records)
            wanted -= len(page.records)
            token = page.next_page_token
            if not token:
                break
        return [record for page in reversed(pages) for record in page]

    def verify_audit(self) -> AuditVerified:
        """Check the audit log's hash chain."""
        return self.call(VerifyAudit(id=self._ids()), AuditVerified)

    def quarantine_audit(self, seq: int) -> None:
        """Move the bad audit record ``seq``, the one :meth:`verify_audit` names, aside."""
        self.call(QuarantineAudit(id=self._ids(), seq=seq), Ok)

    # ---------------------------------------------------------- environment history

    def environment_history(self, name: str, *, page_size: int = 500
                                  ) -> tuple[int, list[EnvironmentVersionInfo]]:
        """Return ``name``'s current version and the versions it keeps, newest first (key
        names only, never values), asking for as many pages as that takes."""
        current, versions = 0, []
        for page in self._pages(
                lambda token: ListEnvironmentVersions(id=self._ids(), name=name,
                                                      page_size=page_size, page_token=token),
                EnvironmentHistory):
            current = page.current
            versions += page.versions
        return current, versions

    def get_environment_version(self, name: str, version: int, *,
                                      reveal: bool = False) -> EnvironmentVersion:
        """Return one version of an environment; secret values are None unless
        ``reveal``."""
        return self.call(GetEnvironmentVersion(id=self._ids(), name=name,
                                                     version=version, reveal=reveal),
                               EnvironmentVersion)

    def diff_environment_versions(self, name: str, from_version: int, to_version: int,
                                        *, reveal: bool = False) -> list[KeyDiff]:
        """Return the keys that differ from one version of ``name`` to another, by name;
        values only with ``reveal``."""
        reply = self.call(DiffEnvironmentVersions(
            id=self._ids(), name=name, from_version=from_version, to_version=to_version,
            reveal=reveal), EnvironmentDiff)
        return reply.keys

    def rollback_environment(self, name: str, to_version: int) -> EnvironmentVersionInfo:
        """Set ``name`` back to the variables of ``to_version``, as a new version; return
        that version."""
        reply = self.call(RollbackEnvironment(id=self._ids(), name=name,
                                                    to_version=to_version), RolledBack)
        return reply.info
