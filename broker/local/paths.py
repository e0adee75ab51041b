"""Where the broker's home, socket and store are: the rules the daemon and every client share.

Flags win over environment variables, environment variables over defaults.
The mapping of variables is handed in (the CLI passes ``os.environ``), so the
same rule can be evaluated for any environment, and both sides of the socket
always meet at the same path.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

__all__ = ["MAX_SOCKET_PATH", "STORE_SCHEMES", "redact_url", "resolve_home", "resolve_socket",
           "resolve_store"]

#: the URL schemes of a shared (fleet) store
STORE_SCHEMES = ("postgresql://", "postgres://")

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


def resolve_store(environ: Mapping[str, str], store: str | None = None) -> str | None:
    """Return the shared store's URL: ``--store`` > ``STIGMER_STORE_URL``; None means the
    embedded SQLite file in the home. Raises ValueError naming what is wrong."""
    url = store or environ.get("STIGMER_STORE_URL") or None
    if url is not None and not url.startswith(STORE_SCHEMES):
        source = "--store" if store else "STIGMER_STORE_URL"
        raise ValueError(f"{source} must be a postgresql:// URL (leave it unset for the "
                         f"embedded store in the home), not {redact_url(url)!r}")
    return url


def redact_url(url: str) -> str:
    """``url`` without its password (in the user part or a ``password=`` parameter)."""
    import urllib.parse  # here: the client imports this module, and never needs it

    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}@{hostport}" if user else hostport
    query = urllib.parse.urlencode(
        [(k, v) for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
         if k.lower() not in ("password", "sslpassword")], safe="/:")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))
