"""systemd's two small protocols, in stdlib: inherited sockets and notification.

``LISTEN_FDS``/``LISTEN_PID`` (sd_listen_fds): when systemd starts us for a
socket unit, the listening socket is fd 3. :func:`inherited_socket` checks that
the variables are meant for this process and that fd 3 really is a listening
AF_UNIX stream socket before the daemon trusts it.

``NOTIFY_SOCKET`` (sd_notify): :class:`Notifier` sends ``READY=1`` once the
broker answers, ``STATUS=...`` lines, and ``STOPPING=1`` at shutdown, as one
datagram each. With ``WatchdogSec=`` in the unit, systemd sets ``WATCHDOG_USEC``
and restarts a service that stays silent that long: :func:`keep_alive` sends
``WATCHDOG=1`` every half of it from the event loop, so a wedged loop (not only a
dead process) is restarted. The CLI reads the environment once and hands the
values in (:func:`watchdog_interval`).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Mapping

import anyio

from ..protocol.errors import StartupError

__all__ = ["LISTEN_FDS_START", "Notifier", "SystemdError", "inherited_socket", "keep_alive",
           "systemd_unit", "watchdog_interval"]

LISTEN_FDS_START = 3


class SystemdError(StartupError):
    """The service manager's hand-over is not usable; the message says why."""


def inherited_socket(environ: Mapping[str, str], pid: int | None = None) -> socket.socket | None:
    """Return the socket systemd passed us, None when we were not socket-activated.

    Raises SystemdError for a hand-over meant for another process, more than one
    socket, or an fd 3 that is not a listening AF_UNIX stream socket.
    """
    fds_text = environ.get("LISTEN_FDS")
    if fds_text is None:
        return None
    pid_text = environ.get("LISTEN_PID", "")
    me = os.getpid() if pid is None else pid
    if pid_text != str(me):
        raise SystemdError(
            f"LISTEN_PID is {pid_text or 'unset'} but this process is {me}: the inherited "
            "socket was meant for another process; unset LISTEN_FDS or start via systemd")
    if fds_text != "1":
        raise SystemdError(f"LISTEN_FDS is {fds_text!r}: the broker takes exactly one socket "
                           "(one ListenStream= in its .socket unit)")
    try:
        sock = socket.socket(fileno=LISTEN_FDS_START)
    except OSError as exc:
        raise SystemdError(f"inherited fd {LISTEN_FDS_START} is not a socket "
                           f"({exc.strerror})") from None
    try:
        problem = _listening_unix_stream(sock)
    except OSError as exc:
        problem = f"cannot be inspected ({exc.strerror})"
    if problem:
        sock.detach()
        raise SystemdError(f"inherited fd {LISTEN_FDS_START} {problem}; it must be a listening "
                           "AF_UNIX stream socket (ListenStream=PATH)")
    os.set_inheritable(sock.fileno(), False)
    return sock


def _listening_unix_stream(sock: socket.socket) -> str:
    if sock.family != socket.AF_UNIX:
        return f"is a {sock.family.name} socket"
    if sock.type != socket.SOCK_STREAM:
        return f"is a {sock.type.name} socket"
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        return "is not listening"
    return ""


def systemd_unit(cgroup_text: str) -> str:
    """Return the unit name from /proc/self/cgroup's text ("" when not under systemd)."""
    for line in cgroup_text.splitlines():
        path = line.rsplit(":", 1)[-1]
        for part in reversed(path.split("/")):
            if part.endswith((".service", ".scope")) and not part.startswith("user@"):
                return part
    return ""


class Notifier:
    """Sends sd_notify datagrams; does nothing when there is no NOTIFY_SOCKET."""

    def __init__(self, address: str | None) -> None:
        self._address = address
        if address and address.startswith("@"):
            self._address = "\0" + address[1:]  # abstract namespace

    def __repr__(self) -> str:
        return f"Notifier({self._address!r})"

    def notify(self, *lines: str) -> None:
        """Send ``lines`` (e.g. ``READY=1``) as one datagram; errors are ignored."""
        if not self._address:
            return
        with contextlib.suppress(OSError), \
                socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto("\n".join(lines).encode(), self._address)


def watchdog_interval(environ: Mapping[str, str], pid: int | None = None) -> float | None:
    """Return how often to send ``WATCHDOG=1``, in seconds: half of ``WATCHDOG_USEC``, as
    sd_watchdog_enabled(3) advises; None when systemd expects no keep-alive from this
    process (no ``WATCHDOG_USEC``, or ``WATCHDOG_PID`` names another). Raises
    SystemdError for a ``WATCHDOG_USEC`` that is not a positive number of microseconds."""
    usec_text = environ.get("WATCHDOG_USEC")
    if usec_text is None:
        return None
    pid_text = environ.get("WATCHDOG_PID")
    if pid_text is not None and pid_text != str(os.getpid() if pid is None else pid):
        return None
    try:
        usec = int(usec_text)
    except ValueError:
        usec = 0
    if usec <= 0:
        raise SystemdError(f"WATCHDOG_USEC is {usec_text!r}: it must be a positive number of "
                           "microseconds (WatchdogSec= in the unit); unset it or fix the unit")
    return usec / 2e6


async def keep_alive(notifier: Notifier, interval: float) -> None:
    """Send ``WATCHDOG=1`` every ``interval`` seconds, forever, from the event loop: while
    the loop is blocked nothing is sent, and systemd restarts the service."""
    while True:
        notifier.notify("WATCHDOG=1")
        await anyio.sleep(interval)
