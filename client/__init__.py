"""The thin runner library: talk to the local stigmer broker.

``Client`` is blocking (a plain socket, no event loop, no thread);
``AsyncClient`` is its anyio twin, imported on first use so that
``import stigmer.client`` stays cheap. Every error is a :class:`BrokerError`;
each wire error code has its own class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stigmer.broker.errors import (
    AlreadyExists,
    BrokerError,
    BrokerUnavailable,
    ErrorCode,
    FailedPrecondition,
    HandshakeRequired,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ProtocolError,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    UnsupportedVersion,
)
from stigmer.broker.protocol import SpecEntry, Variable

from ._common import TOKEN_VARIABLE, variables
from ._context import ExecutionContext, PlaceholderError
from ._sync import Client

if TYPE_CHECKING:
    from ._async import AsyncClient
    from ._logfilter import SecretFilter

__all__ = [
    "AlreadyExists", "AsyncClient", "BrokerError", "BrokerUnavailable", "Client", "ErrorCode",
    "FailedPrecondition", "HandshakeRequired", "Internal", "InvalidArgument", "NotFound",
    "PermissionDenied", "ProtocolError", "ResourceExhausted", "Unauthenticated", "Unavailable",
    "UnsupportedVersion", "Variable", "variables", "ExecutionContext", "PlaceholderError",
    "SecretFilter", "SpecEntry", "TOKEN_VARIABLE",
]


def __getattr__(name: str) -> object:
    if name == "AsyncClient":
        from ._async import AsyncClient

        return AsyncClient
    if name == "SecretFilter":
        from ._logfilter import SecretFilter

        return SecretFilter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
