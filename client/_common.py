"""What the blocking and the async client share: trust checks, ids, reply handling."""

from __future__ import annotations

import errno
import itertools
import os
import socket
import stat
import struct
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

from stigmer.broker.local.paths import resolve_home, resolve_socket
from stigmer.broker.local.peer import peer_credentials
from stigmer.broker.local.trust import refused_socket
from stigmer.broker.protocol import (
    MAX_VALUE_LENGTH,
    DiffEnvironmentVersions,
    Error,
    FetchContext,
    GetContext,
    GetEnvironment,
    GetEnvironmentVersion,
    GetStatus,
    ListAudit,
    ListContexts,
    ListEnvironments,
    ListEnvironmentVersions,
    Response,
    SpecEntry,
    Variable,
    VerifyAudit,
)
from stigmer.broker.protocol.errors import (
    BrokerUnavailable,
    InvalidArgument,
    UnsafeSocket,
    error_from_code,
)

__all__ = [
    "RETRY_SAFE", "TOKEN_VARIABLE", "Backoff", "ClosedBeforeReply", "check_peer",
    "connect_in_turn", "timeval",
    "check_socket_dir", "checked_values", "closed_by_peer", "default_socket",
    "EXECUTION_VARIABLE", "credential_from", "expect", "request_ids", "unavailable",
    "variables",
]

R = TypeVar("R", bound=Response)


def default_socket(environ: Mapping[str, str] | None = None) -> str:
    """The socket every stigmer-broker command uses (the rule: stigmer.broker.local.paths)."""
    env = os.environ if environ is None else environ
    return str(resolve_socket(env, resolve_home(env)))


#: requests a client may send again on a fresh connection when the old one was closed
#: before any reply arrived: reads and fetches, never writes
RETRY_SAFE = (FetchContext, GetStatus, GetEnvironment, ListEnvironments, GetContext,
              ListContexts, ListAudit, VerifyAudit,
              ListEnvironmentVersions, GetEnvironmentVersion, DiffEnvironmentVersions)


class Backoff:
    """The pauses of one connect while the broker is busy (its listen backlog full, or
    a refusal for want of room): capped exponential, from 1 ms to 50 ms, each drawn at
    random from the upper half of its range so that clients turned away together do not
    come back together, and none past the connect timeout.

    A busy broker is one flooded by some peer: a client retrying every few milliseconds
    would add to the flood, and one waiting seconds would be starved by it. 50 ms keeps
    a retry within a few of the broker's accepting turns.
    """

    FIRST = 0.001
    LONGEST = 0.05

    def __init__(self, timeout: float) -> None:
        self._deadline = time.monotonic() + timeout
        self._ceiling = self.FIRST

    def left(self) -> float:
        """Seconds until the connect timeout (at least a millisecond, for a socket's)."""
        return max(self._deadline - time.monotonic(), 0.001)

    def spent(self) -> bool:
        """Whether the connect timeout has passed."""
        return time.monotonic() >= self._deadline

    def pause(self) -> float | None:
        """The next pause, or None once the connect timeout has passed."""
        import random  # here: only a busy broker needs it, and every import of the client

        left = self._deadline - time.monotonic()
        if left <= 0:
            return None
        pause = random.uniform(self._ceiling / 2, self._ceiling)  # jitter, not a secret
        self._ceiling = min(self._ceiling * 2, self.LONGEST)
        return min(pause, left)


def connect_in_turn(sock: socket.socket, path: str, seconds: float) -> bool:
    """Connect the blocking Unix socket ``sock``; return False when the listen backlog
    stayed full for ``seconds`` (or a signal cut the wait short): call again, or give up.

    While the backlog is full (a burst, or a peer flooding it) the connect waits in the
    kernel, which lets the waiters in one by one as the broker accepts, in turn: no
    retries, and no place lost to a peer that hammers the socket. A socket with a
    Python timeout would say EAGAIN at once instead; SO_SNDTIMEO bounds the wait.
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval(seconds))
    try:
        sock.connect(path)
        sock.getpeername()  # a wait cut short by a signal returns as if it had connected
    except (BlockingIOError, InterruptedError):
        return False
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise
        return False
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval(0))
    return True


def timeval(seconds: float) -> bytes:
    """``seconds`` as the timeval of SO_SNDTIMEO and SO_RCVTIMEO: at least a microsecond,
    since 0 is no limit; an infinite or huge one is the longest the kernel takes."""
    if not seconds < _LONGEST_TIMEVAL:  # also inf and nan
        return _LONGEST
    micro = max(int(seconds * 1_000_000), 1)
    return struct.pack("@ll", micro // 1_000_000, micro % 1_000_000)


_LONGEST_TIMEVAL = 2**31 - 1  # seconds: within every platform's time_t and the kernel's
_LONGEST = struct.pack("@ll", _LONGEST_TIMEVAL, 0)


class ClosedBeforeReply(BrokerUnavailable):
    """The connection was found closed before any byte of the reply arrived."""


def unavailable(path: str, reason: str) -> BrokerUnavailable:
    refused = refused_socket(path)
    if refused:
        return BrokerUnavailable(f"no broker is answering on {path}: {refused}")
    return BrokerUnavailable(
        f"no broker is answering on {path} ({reason}); start it with `stigmer-broker start`")


def check_socket_dir(path: str) -> int:
    """Return the uid owning the socket's directory if it can be trusted; raise otherwise.

    Trusted: a real directory (not a symlink) owned by us or root, or by the broker
    owner when we reach it as a runner-group member; no permission for others and
    no write permission for the group.
    """
    directory = os.path.dirname(path) or "."
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        raise unavailable(path, "its directory does not exist") from None
    except OSError as exc:
        raise unavailable(path, f"its directory cannot be read: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise UnsafeSocket(f"refusing socket {path}: its directory is not a real "
                                "directory (a symlink?)")
    loose = stat.S_IMODE(st.st_mode) & 0o027
    if loose:
        raise UnsafeSocket(
            f"refusing socket {path}: its directory has mode {stat.S_IMODE(st.st_mode):04o}, "
            "so others could have replaced the socket; it must be 0700 (0750 for a runner "
            "group)")
    return st.st_uid


def closed_by_peer(sock: socket.socket) -> bool:
    """Return whether the broker has already closed this idle connection (its idle
    timeout, a restart, or an eviction to make room): a request sent on it would be
    lost, and the caller could not tell whether it was carried out.

    ``sock`` is blocking with no Python timeout (the blocking client's) or non-blocking
    (the async client's): one system call either way, that never waits."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False  # open, nothing to read: the normal case
    except OSError:
        return True  # reset


def check_peer(sock: socket.socket, path: str, dir_owner: int) -> None:
    """Refuse a server that is not us, root, or the owner of the socket's directory."""
    try:
        uid = peer_credentials(sock).uid
    except OSError:
        raise UnsafeSocket(f"refusing socket {path}: the server's identity cannot be "
                                "checked") from None
    if uid not in (os.getuid(), 0, dir_owner):
        raise UnsafeSocket(f"refusing socket {path}: it is served by uid {uid}, not by "
                                "you, root or the directory's owner")


def expect(reply: Response, kind: type[R]) -> R:
    """Return ``reply`` as ``kind``, raising the BrokerError an Error reply stands for."""
    if isinstance(reply, Error):
        raise error_from_code(reply.code, reply.message, tuple(reply.supported_versions))
    if not isinstance(reply, kind):
        raise InvalidArgument(f"broker answered {type(reply).__name__}, expected "
                              f"{kind.__name__}")
    return reply


def variables(plain: Mapping[str, str] | None = None,
              secrets: Mapping[str, str] | None = None) -> dict[str, Variable]:
    """Build the wire form of variables from plain and secret key/value maps."""
    out = {k: Variable(value=v) for k, v in (plain or {}).items()}
    for k, v in (secrets or {}).items():
        if k in out:
            raise InvalidArgument(f"{k} is given both as a plain and as a secret variable")
        out[k] = Variable(value=v, is_secret=True)
    return out


V = TypeVar("V", Variable, SpecEntry)


def checked_values(data: Mapping[str, V], where: str) -> dict[str, V]:
    """Return ``data`` as a dict; raise naming the variable whose value is too long
    (the broker would only say that some value is)."""
    for key, var in data.items():
        if var.value is None or len(var.value) <= MAX_VALUE_LENGTH // 4:
            continue  # at most four bytes a character: within the limit
        size = len(var.value.encode("utf-8", "surrogatepass"))
        if size > MAX_VALUE_LENGTH:
            raise InvalidArgument(
                f"the value of {key} ({where}) is {size} bytes long in UTF-8, over the "
                f"limit of {MAX_VALUE_LENGTH}; keep large files elsewhere and pass their path")
    return dict(data)


TOKEN_VARIABLE = "STIGMER_EXECUTION_TOKEN"  # noqa: S105 - a variable name
EXECUTION_VARIABLE = "STIGMER_EXECUTION_ID"


def credential_from(token: str | None, execution_id: str | None
                    ) -> tuple[str | None, str | None]:
    """What opens the context: the token or execution id given, else
    ``$STIGMER_EXECUTION_TOKEN``, else ``$STIGMER_EXECUTION_ID``; raise if none."""
    if token and execution_id:
        raise InvalidArgument("give a token or an execution id, not both")
    if token or execution_id:
        return token or None, execution_id or None
    if env_token := os.environ.get(TOKEN_VARIABLE, ""):
        return env_token, None
    if env_execution := os.environ.get(EXECUTION_VARIABLE, ""):
        return None, env_execution
    raise InvalidArgument(f"no execution token or execution id: pass token= or "
                          f"execution_id=, or set {TOKEN_VARIABLE} or {EXECUTION_VARIABLE}")


def request_ids() -> Callable[[], int]:
    """Request ids for one connection: each call returns the next of 1, 2, 3, ...
    (a counter's own ``__next__``: no Python call per request)."""
    return itertools.count(1).__next__
