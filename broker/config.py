"""The daemon's frozen settings: its paths and the limits it keeps, resolved once at the edge.

:func:`resolve_paths` is the only function that looks at environment variables,
and it is handed them (the CLI passes ``os.environ``); everything after that
reads the frozen :class:`Config`. The path rules themselves live in
:mod:`stigmer.broker.local.paths`, so that a client resolves the socket
exactly as the daemon does.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from .local.paths import MAX_SOCKET_PATH, redact_url, resolve_home, resolve_socket
from .protocol.messages import SECRET_MASK

__all__ = ["DEFAULT_AUDIT_RETENTION_S", "DEFAULT_ENV_HISTORY", "Config", "Limits",
           "MetricsAddress", "Paths", "parse_metrics_address", "resolve_paths"]

DEFAULT_AUDIT_RETENTION_S = 90 * 86400.0
#: how many versions of each environment are kept (the current one among them)
DEFAULT_ENV_HISTORY = 50


class Paths(NamedTuple):
    """The files the broker owns."""

    home: Path
    socket: Path

    @property
    def store(self) -> Path:
        return self.home / "local.db"

    @property
    def key_file(self) -> Path:
        return self.home / "master.key"

    @property
    def log_file(self) -> Path:
        return self.home / "broker.log"

    @property
    def key_backup_record(self) -> Path:
        """When the master key was last exported (`key export`), and which key."""
        return self.home / "key-backup.json"

    @property
    def audit_anchor(self) -> Path:
        """The audit chain's head, kept outside the store (beside the key file)."""
        return self.home / "audit.head"


class Limits(NamedTuple):
    """Every limit the daemon enforces, in one place, set by keyword."""

    max_frame_size: int = 1024 * 1024
    max_connections: int = 1024  # lowered at start to fit the open-file limit
    max_connections_per_uid: int = 64  # for uids other than the owner's and root's
    handshake_timeout: float = 5.0  # from accept until Hello is in
    frame_timeout: float = 10.0  # from a frame's first byte until its last
    idle_timeout: float = 300.0  # between requests on a greeted connection
    shutdown_grace: float = 5.0  # for in-flight requests at shutdown
    max_auth_failures: int = 3  # bad tokens or refused grants on a connection before it is cut


class MetricsAddress(NamedTuple):
    """Where the metrics endpoint listens: a Unix socket (``path``) or a loopback TCP
    port (``host``, ``port``). Built by :func:`parse_metrics_address` only."""

    path: Path | None = None
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


def parse_metrics_address(text: str, what: str = "--metrics") -> MetricsAddress:
    """``unix:PATH`` (an absolute path) or ``tcp:HOST:PORT`` with HOST a loopback address
    (``127.0.0.1``, ``[::1]``), as given by ``what``. Raises ValueError saying what is
    wrong: the endpoint
    has no authentication, so nothing beyond this host's loopback or a private socket
    is accepted, nor a host name (what it resolves to is not ours to decide)."""
    kind, _, rest = text.partition(":")
    if kind == "unix":
        path = Path(rest)
        if not rest or not path.is_absolute():
            raise ValueError(f"{what} {text}: give the socket's absolute path "
                             "(unix:/run/user/UID/stigmer/metrics.sock)")
        if len(str(path).encode()) > MAX_SOCKET_PATH:
            raise ValueError(f"{what} {text}: the path is over the {MAX_SOCKET_PATH}-byte "
                             "limit of Unix sockets; choose a shorter one")
        return MetricsAddress(path=path)
    if kind == "tcp":
        host, _, port_text = rest.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"{what} {text}: give a port from 1 to 65535 "
                             "(tcp:127.0.0.1:9464)")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{what} {text}: {host or 'the host'!r} is not an IP address; "
                             "the endpoint listens on loopback only: tcp:127.0.0.1:PORT") from None
        if not address.is_loopback:
            raise ValueError(f"{what} {text}: {host} is not a loopback address, and the "
                             "endpoint has no authentication; use tcp:127.0.0.1:PORT or "
                             "unix:PATH, and let a local agent forward what you need")
        return MetricsAddress(host=str(address), port=int(port_text))
    raise ValueError(f"{what} {text}: give unix:PATH or tcp:127.0.0.1:PORT")


class Config(NamedTuple):
    """Everything ``serve`` needs; built by the CLI, never read from the environment.

    (NamedTuples rather than dataclasses: `status` imports this module, and
    dataclasses alone would cost it a few milliseconds.)
    """

    paths: Paths
    limits: Limits = Limits()
    allow_group: str | None = None
    #: base64 master key handed over by the CLI from STIGMER_ENCRYPTION_KEY or a systemd
    #: credential (never in repr), and where it came from, for people
    env_key: str | None = None
    env_key_origin: str = "STIGMER_ENCRYPTION_KEY"
    #: the command that prints the master key (``--key-command``, split without a shell)
    key_command: tuple[str, ...] = ()
    #: keyring backend use: False forces the key file (tests, headless hosts)
    use_keyring: bool = True
    #: "manual", "service" (systemd/launchd) or "socket-activated"
    started_by: str = "manual"
    #: the systemd unit we run in, if any
    unit: str = ""
    #: where to send sd_notify readiness (NOTIFY_SOCKET), if anywhere
    notify_socket: str | None = None
    #: how often to send systemd WATCHDOG=1 (half its WATCHDOG_USEC); None: not asked to
    watchdog_s: float | None = None
    #: audit records older than this many seconds are removed (behind a checkpoint);
    #: None keeps them forever
    audit_retention_s: float | None = DEFAULT_AUDIT_RETENTION_S
    #: a PostgreSQL URL (a fleet's shared store); None: the SQLite file in the home
    store_url: str | None = None
    #: how long a broker that lost its shared store keeps serving what it cached
    stale_after_s: float = 30.0
    #: where to serve Prometheus metrics (``--metrics``); None: no metrics
    metrics: MetricsAddress | None = None
    #: the environment history kept: the newest this many versions of each environment,
    #: and/or those younger than this many seconds (None: no bound of that kind; the
    #: current version is always kept)
    env_history_versions: int | None = DEFAULT_ENV_HISTORY
    env_history_s: float | None = None

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={_shown(name, value)}"
                          for name, value in zip(self._fields, self, strict=True))
        return f"Config({shown})"


def _shown(name: str, value: object) -> str:
    if name == "env_key" and value:
        return SECRET_MASK
    if name == "key_command" and isinstance(value, tuple) and value:
        return repr((value[0], SECRET_MASK) if len(value) > 1 else value)  # only the program
    if name == "store_url" and isinstance(value, str):
        return repr(redact_url(value))
    return repr(value)


def resolve_paths(environ: Mapping[str, str], *, home: str | None = None,
                  socket: str | None = None) -> Paths:
    """Return the broker's paths: flags win over environment, environment over defaults
    (the rules: :func:`~stigmer.broker.local.paths.resolve_home` and
    :func:`~stigmer.broker.local.paths.resolve_socket`)."""
    home_path = resolve_home(environ, home)
    return Paths(home=home_path, socket=resolve_socket(environ, home_path, socket))
