"""What every command shares: exit statuses, the usage error, and the client it talks through."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..protocol.errors import InvalidArgument

if TYPE_CHECKING:
    from stigmer.client import Client

    from ..config import Paths

__all__ = ["BROKER_VARIABLES", "EXIT_FAILED", "EXIT_NOT_RUNNING", "EXIT_OK", "EXIT_USAGE",
           "KEY_CREDENTIAL", "KEY_VARIABLE", "PROG", "UsageError", "connect"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_RUNNING = 0, 1, 2, 3
PROG = "stigmer-broker"

KEY_VARIABLE = "STIGMER_ENCRYPTION_KEY"
#: the systemd credential (``LoadCredential=stigmer-master-key:PATH``) that holds the key
KEY_CREDENTIAL = "stigmer-master-key"
#: variables the broker reads for its own secrets: never passed on to a child command
BROKER_VARIABLES = (KEY_VARIABLE, "STIGMER_EXECUTION_TOKEN")


class UsageError(InvalidArgument):
    """A mistake in how the command was called (exit 2)."""


def connect(paths: Paths) -> Client:
    """Return a client for the broker on ``paths.socket`` (it connects when entered)."""
    from stigmer.client import Client

    return Client(paths.socket)
