"""Where the broker's home and socket are: the one rule the daemon and every client share.

Flags win over environment variables, environment variables over defaults.
The mapping of variables is handed in (the CLI passes ``os.environ``), so the
same rule can be evaluated for any environment, and both sides of the socket
always meet at the same path.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

__all__ = ["MAX_SOCKET_PATH", "resolve_home", "resolve_socket"]

#: bytes in sockaddr_un.sun_path minus the terminating NUL (Linux 108, macOS 104)
MAX_SOCKET_PATH = 103


def resolve_home(environ: Mapping[str, str], home: str | None = None) -> Path:
    """Return the broker's home: ``--home`` > ``STIGMER_HOME`` > ``~/.stigmer``."""
    home_str = home or environ.get("STIGMER_HOME") or ""
    if home_str:
        return Path(home_str).expanduser().absolute()
    user_home = environ.get("HOME") or str(Path.home())
    return (Path(user_home) / ".stigmer").absolute()


def resolve_socket(environ: Mapping[str, str], home: Path, socket: str | None = None) -> Path:
    """Return the socket path: ``--socket`` > ``STIGMER_BROKER_SOCKET`` >
    ``$XDG_RUNTIME_DIR/stigmer/broker.sock`` > ``HOME/run/broker.sock``."""
    socket_str = socket or environ.get("STIGMER_BROKER_SOCKET") or ""
    if socket_str:
        return Path(socket_str).expanduser().absolute()
    if environ.get("XDG_RUNTIME_DIR"):
        return Path(environ["XDG_RUNTIME_DIR"]).absolute() / "stigmer" / "broker.sock"
    return home / "run" / "broker.sock"
