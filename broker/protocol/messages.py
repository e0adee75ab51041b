"""Wire messages: tagged msgspec Structs, one union for requests, one for responses.

A message travels as a msgpack map whose ``op`` key names its class (the tag) and
whose other keys are the fields below; ``proto/stigmer/broker/v1/broker.proto``
is the same contract for other languages. Limits live in the types, so a frame
that decodes is already within them. New fields must get defaults (older peers
omit them), and a number whose default is not zero takes its default for zero
too, as protobuf's absent-is-zero peers expect. The broker rejects unknown
request fields (a misspelt ``is_secret`` must not quietly store a plain value);
replies and the records only replies carry ignore unknown fields, so a client
keeps working with a newer broker that added some. ``Variable`` travels both
ways and stays strict: it gains no field within a protocol version.
"""

from __future__ import annotations

import functools
from typing import Annotated, ClassVar, NoReturn, TypeVar

import msgspec
from msgspec import Meta

from .errors import BrokerError, ErrorCode, UnsupportedVersion

__all__ = [
    "PROTOCOL_VERSION", "SUPPORTED_VERSIONS",
    "Request", "Response", "REQUEST_TYPES", "RESPONSE_TYPES", "RECORD_TYPES",
    "CreateContext", "IssueToken", "GetContext", "ListContexts", "CompleteContext",
    "FetchContext", "ReleaseContext", "ListAudit", "VerifyAudit", "QuarantineAudit",
    "ContextCreated", "TokenIssued", "ContextInfo", "ContextList", "ContextFetched",
    "ContextFetchedRaw",
    "AuditLog", "AuditVerified",
    "SpecEntry", "KeyInfo", "TokenInfo", "ContextSummary", "AuditRecord", "EnvironmentChange",
    "Hello", "GetStatus", "Shutdown",
    "PutEnvironment", "GetEnvironment", "ListEnvironments", "UnsetVariables",
    "DeleteEnvironment", "ApplyEnvironments", "RotateKey",
    "Welcome", "Status", "Ok", "Environment", "EnvironmentList", "Applied", "KeyRotated",
    "Error",
    "Variable", "VariableView", "EnvironmentSpec", "EnvironmentSummary",
    "NAME_PATTERN", "VAR_NAME_PATTERN", "MAX_NAME_LENGTH", "MAX_VALUE_LENGTH", "MAX_PAGE_SIZE",
    "error_reply", "AnyRequest", "AnyResponse", "SECRET_MASK",
    # environment history
    "MergedEnvironment", "EnvironmentVersionInfo", "KeyDiff",
    "ListEnvironmentVersions", "GetEnvironmentVersion", "DiffEnvironmentVersions",
    "RollbackEnvironment",
    "EnvironmentHistory", "EnvironmentVersion", "EnvironmentDiff", "RolledBack",
]

#: what a secret value shows as wherever it is masked (reprs, the CLI, log records)
SECRET_MASK = "***"  # noqa: S105 - a placeholder, not a password

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS: tuple[int, ...] = (1,)

NAME_PATTERN = r"^[A-Za-z0-9._-]+\Z"  # \Z, not $: $ also matches before a final newline
VAR_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*\Z"
MAX_NAME_LENGTH = 253
MAX_VAR_NAME_LENGTH = 255
#: bytes of a value in UTF-8: the type below bounds its characters, and the broker its
#: bytes (``environments.check_values``), as the client does before sending
MAX_VALUE_LENGTH = 128 * 1024
MAX_VARIABLES = 4096

RequestId = Annotated[int, Meta(ge=0, le=2**63 - 1)]
Name = Annotated[str, Meta(min_length=1, max_length=MAX_NAME_LENGTH, pattern=NAME_PATTERN)]
VarName = Annotated[
    str, Meta(min_length=1, max_length=MAX_VAR_NAME_LENGTH, pattern=VAR_NAME_PATTERN)
]
Value = Annotated[str, Meta(max_length=MAX_VALUE_LENGTH)]
Text = Annotated[str, Meta(max_length=4096)]
Count = Annotated[int, Meta(ge=0)]
_T = TypeVar("_T")


def _refuse_pickle(self: object) -> NoReturn:
    """``__reduce__`` of the messages that hold a secret value or a token.

    A pickle is plaintext on disk or on a queue, so these refuse to become one.
    ``copy.deepcopy`` also goes through ``__reduce__``; they are immutable, so
    :func:`_same` stands in for it.
    """
    raise TypeError(f"{type(self).__name__} holds secret values or a token and cannot be "
                    "pickled; keep it in memory, or store the execution id instead")


def _same(self: _T, memo: object = None) -> _T:
    return self


class _Data(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Base of the plain records nested inside requests: unknown fields are refused."""


class _ReplyData(msgspec.Struct, frozen=True):
    """Base of the plain records only replies carry: unknown fields are ignored, so an
    older client reads a newer broker's replies."""


def _zero_is_default(message: msgspec.Struct, *names: str) -> None:
    """Give each field ``names`` that is zero its default: a peer whose messages are
    protobuf structs cannot tell an absent number from 0."""
    for name in names:
        if not getattr(message, name):
            msgspec.structs.force_setattr(message, name, _defaults(type(message))[name])


@functools.cache
def _defaults(cls: type[msgspec.Struct]) -> dict[str, object]:
    return {f.name: f.default for f in msgspec.structs.fields(cls)}


class Variable(_Data, frozen=True, gc=False):
    """One variable as written: its value and whether it is a secret.

    Untracked by the garbage collector (``gc=False``): it holds a string and a bool, so
    it can be part of no cycle, and a fetch decodes one per variable.
    """

    value: Value
    is_secret: bool = False

    __reduce__ = _refuse_pickle
    __deepcopy__ = _same

    def __repr__(self) -> str:
        shown = f"'{SECRET_MASK}'" if self.is_secret else repr(self.value)
        return f"Variable(value={shown}, is_secret={self.is_secret})"


class VariableView(_ReplyData, frozen=True):
    """One variable as read back: ``value`` is None when a secret is masked."""

    is_secret: bool
    value: Value | None = None

    __reduce__ = _refuse_pickle
    __deepcopy__ = _same

    def __repr__(self) -> str:
        masked = self.is_secret and self.value is not None
        shown = f"'{SECRET_MASK}'" if masked else repr(self.value)
        return f"VariableView(is_secret={self.is_secret}, value={shown})"


class EnvironmentSpec(_Data, frozen=True):
    """A whole environment, as ``apply`` sets it."""

    name: Name
    data: Annotated[dict[VarName, Variable], Meta(max_length=MAX_VARIABLES)]


class EnvironmentSummary(_ReplyData, frozen=True):
    """One row of ``ListEnvironments``."""

    name: str
    variables: Count
    secrets: Count
    updated_at: float


Token = Annotated[str, Meta(min_length=1, max_length=128)]
#: a lifetime in seconds; 0 (or absent) is the field's default
Seconds = Annotated[float, Meta(ge=0, le=366 * 86400)]
Uses = Annotated[int, Meta(ge=1, le=2**31)]


class SpecEntry(_Data, frozen=True):
    """One declaration of a template's env_spec: with a value it is a default, else required."""

    value: Value | None = None
    is_secret: bool = False
    description: Text = ""

    __reduce__ = _refuse_pickle
    __deepcopy__ = _same

    def __repr__(self) -> str:
        masked = self.is_secret and self.value is not None
        shown = f"'{SECRET_MASK}'" if masked else repr(self.value)
        return f"SpecEntry(value={shown}, is_secret={self.is_secret})"


class KeyInfo(_ReplyData, frozen=True):
    """A context key without its value: is it secret, and which layer gave its value."""

    key: str
    is_secret: bool
    source: str  # "spec", "environment:NAME" or "runtime"


class TokenInfo(_ReplyData, frozen=True):
    """An execution token as ``context show`` lists it (never the token itself)."""

    token_id: str
    created_at: float
    expires_at: float
    uses: Count
    max_uses: int | None = None


class EnvironmentChange(_ReplyData, frozen=True):
    """What an apply does to one environment: key names only, never values."""

    name: str
    created: bool
    added: list[str]
    changed: list[str]  # a different value, or a change between plain and secret
    removed: list[str]


class ContextSummary(_ReplyData, frozen=True):
    """One row of ``ListContexts``."""

    execution_id: str
    created_at: float
    expires_at: float
    keys: Count
    secrets: Count
    tokens: Count


class AuditRecord(_ReplyData, frozen=True):
    """One record of the hash-chained audit log. Never a value, never a token."""

    seq: int
    at: float
    event: str
    outcome: str
    execution_id: str = ""
    token_id: str = ""
    peer_uid: int | None = None
    peer_pid: int | None = None
    detail: str = ""
    hash: str = ""


# ------------------------------------------------------------ environment history records

#: an environment's version number (the first is 1)
VersionNumber = Annotated[int, Meta(ge=1, le=2**63 - 1)]


class MergedEnvironment(_Data, frozen=True):
    """An environment a context merged, and which of its versions."""

    name: str
    version: Count


class EnvironmentVersionInfo(_Data, frozen=True):
    """One version of an environment: when, by whom, which keys it changed. Names only,
    never a value."""

    version: int
    created_at: float
    actor_uid: int | None  # who made it; None: from before history was kept
    added: list[str]
    changed: list[str]  # a different value, or a change between plain and secret
    removed: list[str]
    restored_from: int | None = None  # the version a rollback restored


class KeyDiff(_Data, frozen=True):
    """One key that differs between two versions; ``before``/``after`` is absent where the
    key is, and holds a value only when revealed."""

    key: str
    change: str  # "added", "changed" or "removed"
    before: VariableView | None = None
    after: VariableView | None = None


def _masked_token(cls_name: str, fields: dict[str, object]) -> str:
    parts = ", ".join(f"{k}={v!r}" for k, v in fields.items())
    return f"{cls_name}({parts}, token='{SECRET_MASK}')"


# --------------------------------------------------------------------------- requests


class Request(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="op",
              kw_only=True):
    """Base of every client-to-broker message; ``id`` is echoed by the response."""

    id: RequestId
    admin: ClassVar[bool] = True  # False for the requests a runner may make


class Hello(Request, frozen=True, kw_only=True):
    """First frame on a connection: the protocol version the client speaks."""

    version: int
    client: Text = ""
    admin: ClassVar[bool] = False


class GetStatus(Request, frozen=True, kw_only=True):
    """Ask for the broker's status summary."""


class Shutdown(Request, frozen=True, kw_only=True):
    """Ask the broker to stop gracefully; answered with Ok before it stops."""


class PutEnvironment(Request, frozen=True, kw_only=True):
    """Create an environment or merge keys into it."""

    name: Name
    data: Annotated[dict[VarName, Variable], Meta(max_length=MAX_VARIABLES)]


class GetEnvironment(Request, frozen=True, kw_only=True):
    """Read an environment; secret values only when ``reveal`` is set."""

    name: Name
    reveal: bool = False


#: most entries in one page of a listing: a page must fit in a frame with room to spare
MAX_PAGE_SIZE = 1000
#: 0 (or absent) is the field's default
PageSize = Annotated[int, Meta(ge=0, le=MAX_PAGE_SIZE)]
#: where the previous page ended, as the broker said (empty: the first page)
PageToken = Annotated[str, Meta(max_length=256)]


class ListEnvironments(Request, frozen=True, kw_only=True):
    """List environment names with counts, a page at a time."""

    page_size: PageSize = 500
    page_token: PageToken = ""

    def __post_init__(self) -> None:
        _zero_is_default(self, "page_size")


class UnsetVariables(Request, frozen=True, kw_only=True):
    """Remove keys from an environment."""

    name: Name
    keys: Annotated[list[VarName], Meta(min_length=1, max_length=MAX_VARIABLES)]


class DeleteEnvironment(Request, frozen=True, kw_only=True):
    """Delete an environment and all its variables."""

    name: Name


class ApplyEnvironments(Request, frozen=True, kw_only=True):
    """Set several environments to exactly the data given, all or nothing.

    The reply lists what changed; with ``dry_run`` it lists what would, and
    nothing is written.
    """

    environments: Annotated[list[EnvironmentSpec], Meta(min_length=1, max_length=1024)]
    dry_run: bool = False


class RotateKey(Request, frozen=True, kw_only=True):
    """Replace the master key and rewrap every data key under the new one."""


class CreateContext(Request, frozen=True, kw_only=True):
    """Merge spec defaults < environments (in order) < runtime into a new context."""

    execution_id: Name
    env_spec: Annotated[dict[VarName, SpecEntry], Meta(max_length=MAX_VARIABLES)] = {}
    environments: Annotated[list[Name], Meta(max_length=64)] = []
    runtime: Annotated[dict[VarName, Variable], Meta(max_length=MAX_VARIABLES)] = {}
    ttl_s: Seconds = 86400.0
    token_ttl_s: Seconds = 900.0
    max_uses: Uses | None = None  # for the token, and for fetches by the runners granted
    #: who may open the context by its execution id alone: selectors such as
    #: "group:stigmer-runners" or "user:runner,exe:/usr/bin/python3" (all terms must
    #: match); several are alternatives
    runners: Annotated[list[Annotated[str, Meta(min_length=1, max_length=4096)]],
                       Meta(max_length=64)] = []
    #: issue a token too (the default without runners)
    token: bool | None = None

    def __post_init__(self) -> None:
        _zero_is_default(self, "ttl_s", "token_ttl_s")


class IssueToken(Request, frozen=True, kw_only=True):
    """Issue another execution token for a live context."""

    execution_id: Name
    ttl_s: Seconds = 900.0
    max_uses: Uses | None = None

    def __post_init__(self) -> None:
        _zero_is_default(self, "ttl_s")


class GetContext(Request, frozen=True, kw_only=True):
    """Describe a context: keys, provenance, expiry, tokens. Never values."""

    execution_id: Name


class ListContexts(Request, frozen=True, kw_only=True):
    """List live contexts, a page at a time."""

    page_size: PageSize = 500
    page_token: PageToken = ""

    def __post_init__(self) -> None:
        _zero_is_default(self, "page_size")


class CompleteContext(Request, frozen=True, kw_only=True):
    """Delete a context and revoke its tokens (the control side, by execution id)."""

    execution_id: Name


class FetchContext(Request, frozen=True, kw_only=True):
    """A runner presents its token, or the execution id of a context granted to its
    process, and receives the context's variables."""

    token: Token | None = None
    execution_id: Name | None = None
    admin: ClassVar[bool] = False

    __reduce__ = _refuse_pickle
    __deepcopy__ = _same

    def __repr__(self) -> str:
        return _masked_token("FetchContext", {"id": self.id})


class ReleaseContext(Request, frozen=True, kw_only=True):
    """A runner ends its own context: by its token, or by the execution id of a context
    granted to its process."""

    token: Token | None = None
    execution_id: Name | None = None
    admin: ClassVar[bool] = False

    __reduce__ = _refuse_pickle
    __deepcopy__ = _same

    def __repr__(self) -> str:
        return _masked_token("ReleaseContext", {"id": self.id})


class ListAudit(Request, frozen=True, kw_only=True):
    """Read audit records newest first, a page of at most ``limit`` at a time, optionally
    of one execution (each page's records are oldest first)."""

    execution_id: Name | None = None
    limit: PageSize = 100
    page_token: PageToken = ""

    def __post_init__(self) -> None:
        _zero_is_default(self, "limit")


class VerifyAudit(Request, frozen=True, kw_only=True):
    """Check the audit log's hash chain from its first record."""


class QuarantineAudit(Request, frozen=True, kw_only=True):
    """Move the bad audit record ``seq`` (the one VerifyAudit names) out of the chain, kept
    aside as evidence, behind a chained record that names it."""

    seq: Annotated[int, Meta(ge=1, le=2**63 - 1)]


# ------------------------------------------------------------ environment history requests


class ListEnvironmentVersions(Request, frozen=True, kw_only=True):
    """List the versions an environment keeps, newest first, a page at a time (names
    only)."""

    name: Name
    page_size: PageSize = 500
    page_token: PageToken = ""


class GetEnvironmentVersion(Request, frozen=True, kw_only=True):
    """Read one version of an environment; secret values only when ``reveal`` is set."""

    name: Name
    version: VersionNumber
    reveal: bool = False


class DiffEnvironmentVersions(Request, frozen=True, kw_only=True):
    """Compare two versions of an environment: key names, and values only when
    ``reveal`` is set."""

    name: Name
    from_version: VersionNumber
    to_version: VersionNumber
    reveal: bool = False


class RollbackEnvironment(Request, frozen=True, kw_only=True):
    """Set an environment back to the variables of an earlier version, as a new version."""

    name: Name
    to_version: VersionNumber


# -------------------------------------------------------------------------- responses


class Response(msgspec.Struct, frozen=True, tag_field="op", kw_only=True):
    """Base of every broker-to-client message; ``id`` is the request's. Unknown fields
    are ignored: a newer broker may add some within a protocol version."""

    id: RequestId


class Welcome(Response, frozen=True, kw_only=True):
    """Answer to Hello: the version agreed and the broker's own version."""

    version: int
    server_version: str


class Status(Response, frozen=True, kw_only=True):
    """Answer to GetStatus."""

    version: str
    pid: int
    uptime_s: float
    socket: str
    socket_mode: str
    store: str
    key_source: str
    started_by: str
    environments: Count
    contexts: Count
    tokens: Count
    requests: Count
    connections: Count
    unit: str = ""  # the systemd unit, when run by systemd
    activity: str = ""  # a long operation under way (key rotation progress)
    #: when the current master key was last exported (`key export`); none since it was
    #: made or rotated: null
    key_backed_up_at: float | None = None
    #: what is wrong with the store right now (a fleet's database outage); empty if nothing
    store_problem: str = ""
    #: which runner grants this broker cannot check (exe: of other uids without root)
    attest_limit: str = ""
    #: what the broker last found wrong with the audit chain; empty if nothing
    audit_problem: str = ""
    #: when the current master key was made or rotated in; null when the store does not
    #: say (made by a broker from before it did)
    key_made_at: float | None = None


class Ok(Response, frozen=True, kw_only=True):
    """Plain success with nothing to return."""


class Environment(Response, frozen=True, kw_only=True):
    """An environment as read back (secret values masked unless revealed)."""

    name: str
    data: dict[str, VariableView]
    created_at: float
    updated_at: float


class EnvironmentList(Response, frozen=True, kw_only=True):
    """Answer to ListEnvironments, sorted by name; ``next_page_token`` asks for the next
    page (empty: this was the last)."""

    environments: list[EnvironmentSummary]
    next_page_token: str = ""


class Applied(Response, frozen=True, kw_only=True):
    """Answer to ApplyEnvironments: one change per environment, in the request's order."""

    changes: list[EnvironmentChange]
    dry_run: bool


class KeyRotated(Response, frozen=True, kw_only=True):
    """Answer to RotateKey."""

    key_id: str
    rewrapped: Count
    key_source: str


class ContextCreated(Response, frozen=True, kw_only=True):
    """A new context and its first token (shown once: only its hash is kept). Without a
    token (a context for granted runners only) ``token`` and ``token_id`` are empty."""

    execution_id: str
    expires_at: float
    token: str
    token_id: str
    token_expires_at: float
    keys: list[KeyInfo]
    runners: list[str] = []  # the grants as stored: names resolved

    __reduce__ = _refuse_pickle
    __deepcopy__ = _same

    def __repr__(self) -> str:
        return _masked_token("ContextCreated", {"id": self.id,
                                                "execution_id": self.execution_id,
                                                "token_id": self.token_id})


class TokenIssued(Response, frozen=True, kw_only=True):
    """Another token for a context."""

    execution_id: str
    token: str
    token_id: str
    expires_at: float

    __reduce__ = _refuse_pickle
    __deepcopy__ = _same

    def __repr__(self) -> str:
        return _masked_token("TokenIssued", {"id": self.id, "execution_id": self.execution_id,
                                             "token_id": self.token_id})


class ContextInfo(Response, frozen=True, kw_only=True):
    """Answer to GetContext."""

    execution_id: str
    created_at: float
    expires_at: float
    keys: list[KeyInfo]
    tokens: list[TokenInfo]
    runners: list[str] = []  # who may open it by execution id (selectors, names resolved)
    runner_uses: int = 0  # fetches by those runners so far
    #: the version of each environment it merged (empty: created before versions were kept)
    environments: list[MergedEnvironment] = []


class ContextList(Response, frozen=True, kw_only=True):
    """Answer to ListContexts, sorted by execution id; ``next_page_token`` asks for the
    next page (empty: this was the last)."""

    contexts: list[ContextSummary]
    next_page_token: str = ""


class ContextFetched(Response, frozen=True, kw_only=True):
    """The merged variables of one execution, for the runner that holds its token."""

    execution_id: str
    expires_at: float
    variables: dict[str, Variable]


class ContextFetchedRaw(Response, frozen=True, kw_only=True, tag="ContextFetched"):
    """The broker's encoding twin of ContextFetched: ``variables`` is already msgpack.

    A context is sealed as the msgpack of its ``dict[str, Variable]``, so the
    broker splices the opened bytes into the reply instead of decoding and
    re-encoding them. The bytes on the wire are those of ContextFetched, which
    is what peers decode; this class is never decoded and is not in the unions.
    """

    execution_id: str
    expires_at: float
    variables: msgspec.Raw

    __reduce__ = _refuse_pickle
    __deepcopy__ = _same

    def __repr__(self) -> str:
        return f"ContextFetchedRaw(id={self.id}, execution_id={self.execution_id!r}, ...)"


class AuditLog(Response, frozen=True, kw_only=True):
    """Audit records, oldest first; ``next_page_token`` asks for the page of older ones
    (empty: there are none)."""

    records: list[AuditRecord]
    next_page_token: str = ""


class AuditVerified(Response, frozen=True, kw_only=True):
    """Answer to VerifyAudit: ``first_broken`` is the seq of the first bad record, ``reason``
    says what is wrong (also when no single record is to blame)."""

    ok: bool
    records: Count
    first_broken: int | None = None
    reason: str = ""
    #: the seq the head anchor names (None: no anchor, so removal at the tail is unchecked)
    anchored: int | None = None
    #: records up to this seq were removed by the audit retention, behind a checkpoint
    removed_through: int = 0


class Error(Response, frozen=True, kw_only=True):
    """A request failed; ``code`` is an ErrorCode value, ``message`` says what to do."""

    code: str
    message: Text
    supported_versions: list[int] = []


# ----------------------------------------------------------- environment history responses


class EnvironmentHistory(Response, frozen=True, kw_only=True):
    """Answer to ListEnvironmentVersions: versions newest first; ``current`` is the
    environment's version now; ``next_page_token`` asks for older ones (empty: none)."""

    name: str
    current: Count
    versions: list[EnvironmentVersionInfo]
    next_page_token: str = ""


class EnvironmentVersion(Response, frozen=True, kw_only=True):
    """One version of an environment (secret values masked unless revealed)."""

    name: str
    info: EnvironmentVersionInfo
    data: dict[str, VariableView]


class EnvironmentDiff(Response, frozen=True, kw_only=True):
    """Answer to DiffEnvironmentVersions: the keys that differ, by name."""

    name: str
    from_version: int
    to_version: int
    keys: list[KeyDiff]


class RolledBack(Response, frozen=True, kw_only=True):
    """Answer to RollbackEnvironment: the version the rollback wrote."""

    name: str
    info: EnvironmentVersionInfo


REQUEST_TYPES: tuple[type[Request], ...] = (
    Hello, GetStatus, Shutdown, PutEnvironment, GetEnvironment, ListEnvironments,
    UnsetVariables, DeleteEnvironment, ApplyEnvironments, RotateKey, CreateContext,
    IssueToken, GetContext, ListContexts, CompleteContext, FetchContext, ReleaseContext,
    ListAudit, VerifyAudit, QuarantineAudit,
    # environment history
    ListEnvironmentVersions, GetEnvironmentVersion, DiffEnvironmentVersions,
    RollbackEnvironment,
)
RESPONSE_TYPES: tuple[type[Response], ...] = (
    Welcome, Status, Ok, Environment, EnvironmentList, Applied, KeyRotated, ContextCreated,
    TokenIssued, ContextInfo, ContextList, ContextFetched, AuditLog, AuditVerified, Error,
    # environment history
    EnvironmentHistory, EnvironmentVersion, EnvironmentDiff, RolledBack,
)
RECORD_TYPES: tuple[type[msgspec.Struct], ...] = (
    Variable, VariableView, EnvironmentSpec, EnvironmentSummary, SpecEntry, KeyInfo, TokenInfo,
    EnvironmentChange, ContextSummary, AuditRecord,
    # environment history
    MergedEnvironment, EnvironmentVersionInfo, KeyDiff,
)

AnyRequest = (
    Hello | GetStatus | Shutdown | PutEnvironment | GetEnvironment | ListEnvironments
    | UnsetVariables | DeleteEnvironment | ApplyEnvironments | RotateKey | CreateContext
    | IssueToken | GetContext | ListContexts | CompleteContext | FetchContext | ReleaseContext
    | ListAudit | VerifyAudit | QuarantineAudit
    # environment history
    | ListEnvironmentVersions | GetEnvironmentVersion | DiffEnvironmentVersions
    | RollbackEnvironment
)
AnyResponse = (
    Welcome | Status | Ok | Environment | EnvironmentList | Applied | KeyRotated
    | ContextCreated | TokenIssued | ContextInfo | ContextList | ContextFetched | AuditLog
    | AuditVerified | Error
    # environment history
    | EnvironmentHistory | EnvironmentVersion | EnvironmentDiff | RolledBack
)


def error_reply(request_id: int, exc: BaseException) -> Error:
    """Return the Error frame for ``exc``: the one place exceptions become wire errors.

    A :class:`BrokerError` travels with its own code and message; anything else
    is a bug and travels as ``internal`` with a message that reveals nothing.
    """
    if isinstance(exc, BrokerError):
        supported = list(exc.supported) if isinstance(exc, UnsupportedVersion) else []
        return Error(id=request_id, code=exc.code.value, message=exc.message[:4096],
                     supported_versions=supported)
    return Error(id=request_id, code=ErrorCode.INTERNAL.value,
                 message="internal broker error; see the broker's log")
