"""Where the broker lives and what limits it keeps, resolved once at the edge.

:func:`resolve_paths` is the only function that looks at environment variables,
and it is handed them (the CLI passes ``os.environ``); everything after that
reads the frozen :class:`Config`. The daemon and every client command resolve
the socket the same way, so they always meet.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

__all__ = ["Config", "Limits", "Paths", "resolve_paths", "MAX_SOCKET_PATH"]

#: bytes in sockaddr_un.sun_path minus the terminating NUL (Linux 108, macOS 104)
MAX_SOCKET_PATH = 103


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


class Limits(NamedTuple):
    """Every limit the daemon enforces, in one place, set by keyword."""

    max_frame_size: int = 1024 * 1024
    max_connections: int = 256
    handshake_timeout: float = 5.0  # from accept until Hello is in
    frame_timeout: float = 10.0  # from a frame's first byte until its last
    idle_timeout: float = 300.0  # between requests on a greeted connection
    shutdown_grace: float = 5.0  # for in-flight requests at shutdown
    max_auth_failures: int = 3  # bad tokens on one connection before it is cut


class Config(NamedTuple):
    """Everything ``serve`` needs; built by the CLI, never read from the environment.

    (NamedTuples rather than dataclasses: `status` imports this module, and
    dataclasses alone would cost it a few milliseconds.)
    """

    paths: Paths
    limits: Limits = Limits()
    allow_group: str | None = None
    #: base64 master key handed over by the CLI from STIGMER_ENCRYPTION_KEY (never in repr)
    env_key: str | None = None
    #: keyring backend use: False forces the key file (tests, headless hosts)
    use_keyring: bool = True
    #: "manual", "service" (systemd/launchd) or "socket-activated"
    started_by: str = "manual"
    #: the systemd unit we run in, if any
    unit: str = ""
    #: where to send sd_notify readiness (NOTIFY_SOCKET), if anywhere
    notify_socket: str | None = None

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={'***' if name == 'env_key' and value else value!r}"
                          for name, value in zip(self._fields, self, strict=True))
        return f"Config({shown})"


def resolve_paths(environ: Mapping[str, str], *, home: str | None = None,
                  socket: str | None = None) -> Paths:
    """Return the broker's paths: flags win over environment, environment over defaults.

    Home: ``--home`` > ``STIGMER_HOME`` > ``~/.stigmer``.
    Socket: ``--socket`` > ``STIGMER_BROKER_SOCKET`` >
    ``$XDG_RUNTIME_DIR/stigmer/broker.sock`` > ``HOME/run/broker.sock``.
    """
    home_str = home or environ.get("STIGMER_HOME") or ""
    if home_str:
        home_path = Path(home_str).expanduser()
    else:
        user_home = environ.get("HOME") or str(Path.home())
        home_path = Path(user_home) / ".stigmer"
    home_path = home_path.absolute()

    socket_str = socket or environ.get("STIGMER_BROKER_SOCKET") or ""
    if socket_str:
        socket_path = Path(socket_str).expanduser().absolute()
    elif environ.get("XDG_RUNTIME_DIR"):
        socket_path = Path(environ["XDG_RUNTIME_DIR"]).absolute() / "stigmer" / "broker.sock"
    else:
        socket_path = home_path / "run" / "broker.sock"
    return Paths(home=home_path, socket=socket_path)

