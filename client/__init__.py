"""The thin runner library: talk to the local stigmer broker.

``Client`` is blocking (a plain socket, no event loop, no thread);
``AsyncClient`` is its anyio twin, imported on first use so that
``import stigmer.client`` stays cheap. The API is written once, in
``_async/client.py``; ``_sync/client.py`` is generated from it. Every error is
a :class:`BrokerError`; each wire error code has its own class. This package
imports nothing of the daemon: only :mod:`stigmer.broker.protocol`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stigmer.broker.protocol import SpecEntry, Variable
from stigmer.broker.protocol.errors import (
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
    UnsafeSocket,
    UnsupportedVersion,
)

from ._common import EXECUTION_VARIABLE, TOKEN_VARIABLE, variables
from ._context import ExecutionContext, PlaceholderError
from ._sync.client import Client

if TYPE_CHECKING:
    from ._async.client import AsyncClient
    from ._logfilter import SecretFilter

__all__ = [
    "AlreadyExists", "AsyncClient", "BrokerError", "BrokerUnavailable", "Client", "ErrorCode",
    "FailedPrecondition", "HandshakeRequired", "Internal", "InvalidArgument", "NotFound",
    "PermissionDenied", "ProtocolError", "ResourceExhausted", "Unauthenticated", "Unavailable",
    "UnsafeSocket", "UnsupportedVersion", "Variable", "variables", "ExecutionContext",
    "PlaceholderError", "SecretFilter", "SpecEntry", "TOKEN_VARIABLE", "EXECUTION_VARIABLE",
]


def __getattr__(name: str) -> object:
    if name == "AsyncClient":
        from ._async.client import AsyncClient

        return AsyncClient
    if name == "SecretFilter":
        from ._logfilter import SecretFilter

        return SecretFilter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
