"""What every command shares: exit statuses, the usage error, and the client it talks through."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..protocol.errors import InvalidArgument

if TYPE_CHECKING:
    from stigmer.client import Client

    from ..config import Paths

__all__ = ["BROKER_VARIABLES", "EXIT_FAILED", "EXIT_NOT_RUNNING", "EXIT_OK", "EXIT_USAGE",
           "KEY_COMMAND_VARIABLE", "KEY_CREDENTIAL", "KEY_VARIABLE", "METRICS_VARIABLE", "PROG",
           "SOCKET_VARIABLE",
           "STORE_VARIABLE", "UsageError",
           "assignment_arg", "check_broker", "connect", "count_arg", "credential_arg",
           "duration_arg", "key_command_arg", "name_arg", "runner_arg", "var_arg"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_RUNNING = 0, 1, 2, 3
PROG = "stigmer-broker"

KEY_VARIABLE = "STIGMER_ENCRYPTION_KEY"
#: the command that prints the master key (what --key-command gives)
KEY_COMMAND_VARIABLE = "STIGMER_KEY_COMMAND"
#: where a client finds the broker's socket (local.paths.resolve_socket reads it)
SOCKET_VARIABLE = "STIGMER_BROKER_SOCKET"
#: the URL of a fleet's shared store (PostgreSQL)
STORE_VARIABLE = "STIGMER_STORE_URL"
#: where the daemon serves its metrics (what --metrics gives)
METRICS_VARIABLE = "STIGMER_METRICS"
#: the systemd credential (``LoadCredential=stigmer-master-key:PATH``) that holds the key
KEY_CREDENTIAL = "stigmer-master-key"
#: variables the broker reads for its own secrets: never passed on to a child command
BROKER_VARIABLES = (KEY_VARIABLE, "STIGMER_EXECUTION_TOKEN", STORE_VARIABLE)


class UsageError(InvalidArgument):
    """A mistake in how the command was called (exit 2)."""


@contextlib.contextmanager
def _usage() -> Iterator[None]:
    """A value typed on the command line that does not check is a usage mistake."""
    try:
        yield
    except InvalidArgument as exc:
        if isinstance(exc, UsageError):
            raise
        raise UsageError(exc.message) from None


def name_arg(text: str, what: str) -> str:
    """An environment or execution name given as an argument."""
    from ..manifests import check_name

    with _usage():
        return check_name(text, what)


def var_arg(text: str, flag: str = "") -> str:
    """A variable name given as an argument."""
    from ..manifests import check_var_name

    with _usage():
        return check_var_name(text, flag)


def duration_arg(text: str, flag: str, **limits: float) -> float:
    """A duration given as an argument."""
    from ..manifests import parse_duration

    with _usage():
        return parse_duration(text, flag, **limits)


def key_command_arg(flag: str | None, variable: str | None) -> tuple[str, ...]:
    """``--key-command``, else ``STIGMER_KEY_COMMAND``, split as a shell would (never run
    by one): the program and its arguments; empty when neither is given."""
    import shlex

    text, where = (flag, "--key-command") if flag is not None else \
        (variable, KEY_COMMAND_VARIABLE)
    if text is None:
        return ()
    try:
        argv = tuple(shlex.split(text))
    except ValueError as exc:
        raise UsageError(f"{where} cannot be split into a program and its arguments "
                         f"({exc}); quote it as you would in a shell") from None
    if not argv:
        raise UsageError(f"{where} is empty; give the program that prints the master key, "
                         "e.g. --key-command 'op read op://vault/stigmer/key'")
    return argv


def assignment_arg(text: str, flag: str) -> tuple[str, str]:
    """A KEY=VALUE given as an argument."""
    from ..manifests import parse_assignment

    with _usage():
        return parse_assignment(text, flag)


def count_arg(text: str | None, flag: str, low: int, high: int) -> int | None:
    """A whole number given as an argument (None when the flag was not given)."""
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"{flag} must be a whole number, not {text!r}") from None
    if value < low:
        raise UsageError(f"{flag} must be at least {low}")
    if value > high:
        raise UsageError(f"{flag} must be at most {high}")
    return value


def credential_arg(token: str | None, execution: str | None) -> tuple[str | None, str | None]:
    """What opens the context: --token or --execution, else $STIGMER_EXECUTION_TOKEN,
    else $STIGMER_EXECUTION_ID."""
    from stigmer.client import EXECUTION_VARIABLE, TOKEN_VARIABLE

    if token and execution:
        raise UsageError("give --token or --execution, not both")
    if execution:
        return None, name_arg(execution, "--execution")
    if token := token or os.environ.get(TOKEN_VARIABLE, ""):
        return token, None
    if execution := os.environ.get(EXECUTION_VARIABLE, ""):
        return None, name_arg(execution, EXECUTION_VARIABLE)
    raise UsageError(f"no execution token: give --token TOKEN or set {TOKEN_VARIABLE} (or, "
                     f"for a context granted to this process, --execution ID or "
                     f"{EXECUTION_VARIABLE})")


def runner_arg(text: str) -> str:
    """A --runner selector, checked (names resolved) before the broker is asked."""
    from ..grants import parse_selector

    with _usage():
        parse_selector(text, owner_uid=os.getuid())
    return text


def check_broker(paths: Paths) -> None:
    """Raise BrokerUnavailable now, before a prompt makes someone type a secret for
    nothing (the request itself connects again once the input is complete)."""
    with connect(paths):
        pass


def connect(paths: Paths) -> Client:
    """Return a client for the broker on ``paths.socket`` (it connects when entered)."""
    from stigmer.client import Client

    return Client(paths.socket)
