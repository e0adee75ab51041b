"""The one exception tree of stigmer-broker.

Every class carries the wire :class:`ErrorCode` it travels as, so turning an
exception into an error frame is an attribute lookup (see
:func:`stigmer.broker.protocol.messages.error_reply`, the one place that does
it) and turning an error frame back into an exception is a dictionary lookup
(:func:`error_from_code`). The daemon raises these, the clients raise the same
classes, so a runner can write ``except NotFound`` whichever side found the
problem.

Start-up failures are :class:`StartupError`; each part of the daemon that can
refuse to start defines its subclass beside its code (``StoreError``,
``KeySourceError``, ``AlreadyRunning``, ``SystemdError``), and the CLI reports
them all in one place. The CLI's own ``UsageError`` is an
:class:`InvalidArgument`. One exception stays outside the tree on purpose:
``SealError`` (``stigmer.broker.store.crypto``), the opaque failure to open a
ciphertext, which the store layer always translates before it leaves.

Messages are for people: they say what was wrong and what to do, and they never
contain a secret value or a token.
"""

from __future__ import annotations

import enum

__all__ = [
    "AlreadyExists",
    "BrokerError",
    "BrokerUnavailable",
    "ErrorCode",
    "FailedPrecondition",
    "HandshakeRequired",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ProtocolError",
    "ResourceExhausted",
    "StartupError",
    "Unauthenticated",
    "Unavailable",
    "UnsafeSocket",
    "UnsupportedVersion",
    "error_from_code",
]


class ErrorCode(enum.StrEnum):
    """Wire error codes; the string values are what travels in ``Error.code``."""

    INVALID_ARGUMENT = "invalid_argument"
    UNAUTHENTICATED = "unauthenticated"
    PERMISSION_DENIED = "permission_denied"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    FAILED_PRECONDITION = "failed_precondition"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    UNSUPPORTED_VERSION = "unsupported_version"
    HANDSHAKE_REQUIRED = "handshake_required"
    INTERNAL = "internal"
    UNAVAILABLE = "unavailable"


class BrokerError(Exception):
    """Root of every error the broker or its clients raise on purpose."""

    code: ErrorCode = ErrorCode.INTERNAL
    #: id of the request this error answers, when it is known (else 0)
    request_id: int = 0

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class InvalidArgument(BrokerError):
    """A request field, name, file or flag is malformed."""

    code = ErrorCode.INVALID_ARGUMENT


class Unauthenticated(BrokerError):
    """An execution token is unknown, expired, revoked or used up (never says which)."""

    code = ErrorCode.UNAUTHENTICATED


class PermissionDenied(BrokerError):
    """The peer may connect but may not make this request."""

    code = ErrorCode.PERMISSION_DENIED


class NotFound(BrokerError):
    """A named environment or context does not exist."""

    code = ErrorCode.NOT_FOUND


class AlreadyExists(BrokerError):
    """Something with that name or id exists already."""

    code = ErrorCode.ALREADY_EXISTS


class FailedPrecondition(BrokerError):
    """The request is well formed but the state does not allow it."""

    code = ErrorCode.FAILED_PRECONDITION


class ResourceExhausted(BrokerError):
    """A limit was hit: frame size, connection count, disk space."""

    code = ErrorCode.RESOURCE_EXHAUSTED


class UnsupportedVersion(BrokerError):
    """The peer speaks a protocol version this side does not."""

    code = ErrorCode.UNSUPPORTED_VERSION

    def __init__(self, message: str, supported: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.supported = supported


class HandshakeRequired(BrokerError):
    """A request arrived before the ``Hello`` handshake."""

    code = ErrorCode.HANDSHAKE_REQUIRED


class Internal(BrokerError):
    """The broker failed in a way that is not the caller's fault."""

    code = ErrorCode.INTERNAL


class Unavailable(BrokerError):
    """The broker cannot serve right now (starting, stopping, not running)."""

    code = ErrorCode.UNAVAILABLE


class BrokerUnavailable(Unavailable):
    """The client could not reach a broker on its socket."""


class UnsafeSocket(BrokerUnavailable):
    """The client refused the socket: its directory or its server cannot be trusted (a
    broker may well be running; the message says what to fix)."""


class StartupError(Unavailable):
    """The daemon cannot start; the message names the path, the problem and the fix."""


class ProtocolError(BrokerError):
    """The byte stream broke the wire protocol; the connection cannot continue.

    ``code`` is set per instance (oversized frame: resource_exhausted, anything
    else: invalid_argument) and ``request_id`` is the id of the offending
    request when it could be read, else 0.
    """

    def __init__(self, message: str, code: ErrorCode = ErrorCode.INVALID_ARGUMENT,
                 request_id: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.request_id = request_id


_BY_CODE: dict[ErrorCode, type[BrokerError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument, Unauthenticated, PermissionDenied, NotFound, AlreadyExists,
        FailedPrecondition, ResourceExhausted, UnsupportedVersion, HandshakeRequired,
        Internal, Unavailable,
    )
}


def error_from_code(code: str, message: str,
                    supported: tuple[int, ...] = ()) -> BrokerError:
    """Return the exception for a wire error code; an unknown code becomes Internal."""
    try:
        cls = _BY_CODE[ErrorCode(code)]
    except ValueError:
        return Internal(f"broker answered an unknown error code {code!r}: {message}")
    if cls is UnsupportedVersion:
        return UnsupportedVersion(message, supported)
    return cls(message)
