"""The daemon's commands: serve, start, stop, status."""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..protocol.errors import BrokerError, BrokerUnavailable, StartupError, UnsafeSocket
from .common import (
    EXIT_FAILED,
    EXIT_NOT_RUNNING,
    EXIT_OK,
    KEY_COMMAND_VARIABLE,
    KEY_CREDENTIAL,
    KEY_VARIABLE,
    METRICS_VARIABLE,
    STORE_VARIABLE,
    UsageError,
    connect,
    count_arg,
    duration_arg,
    key_command_arg,
)
from .maskforms import MIN_SECRET_LENGTH
from .render import duration, error, print_json, warn, when

if TYPE_CHECKING:
    import argparse

    from ..config import MetricsAddress, Paths
    from ..daemon.homelock import Holder
    from ..protocol.messages import Status

__all__ = ["KEY_BACKUP_DAYS", "cmd_serve", "cmd_start", "cmd_status", "cmd_stop"]

#: how old a key the broker keeps may grow without a backup before `status --check`
#: counts it a problem (a new key gets time to be exported)
KEY_BACKUP_DAYS = 7


def cmd_serve(args: argparse.Namespace, paths: Paths) -> int:
    """Serve in the foreground; a StartupError reaches :func:`.main.main`, which reports it."""
    from ..config import Config
    from ..daemon.lifecycle import run
    from ..daemon.logs import configure as configure_logging
    from ..daemon.systemd import inherited_socket, systemd_unit, watchdog_interval

    retention = _retention(args.audit_retention)
    history_versions, history_s = _env_history(args.env_history)
    _store(args)  # a mistake is a usage error before anything starts
    metrics = _metrics(args)
    os.environ.pop(METRICS_VARIABLE, None)  # read once, here
    key_command = key_command_arg(args.key_command, os.environ.get(KEY_COMMAND_VARIABLE))
    os.environ.pop(KEY_COMMAND_VARIABLE, None)  # read once, here
    log_file = Path(args.log_file) if args.log_file else None
    configure_logging(verbose=args.verbose, log_file=log_file)
    env_key = os.environ.pop(KEY_VARIABLE, None)
    origin = KEY_VARIABLE
    if args.key_fd is not None:
        env_key = _read_key_fd(args.key_fd)
    credentials = os.environ.pop("CREDENTIALS_DIRECTORY", None)
    if env_key is None and credentials:
        env_key = _read_credential(Path(credentials) / KEY_CREDENTIAL)
        origin = f"systemd credential {KEY_CREDENTIAL}"
    listen_socket = inherited_socket(os.environ)
    for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # not for our children
    notify_socket = os.environ.pop("NOTIFY_SOCKET", None)
    watchdog = watchdog_interval(os.environ)
    for name in ("WATCHDOG_USEC", "WATCHDOG_PID"):
        os.environ.pop(name, None)
    unit = ""
    if os.environ.get("INVOCATION_ID"):
        try:
            unit = systemd_unit(Path("/proc/self/cgroup").read_text())
        except OSError:
            unit = ""
    if listen_socket is not None:
        started_by = "socket-activated"
    elif unit or os.environ.get("XPC_SERVICE_NAME", "0") != "0":
        started_by = "service"
    else:
        started_by = "manual"
    store_url, stale_after = _store(args)
    os.environ.pop(STORE_VARIABLE, None)  # read once, here
    config = Config(paths=paths, allow_group=args.allow_group, env_key=env_key,
                    env_key_origin=origin, key_command=key_command,
                    started_by=started_by, unit=unit,
                    notify_socket=notify_socket, watchdog_s=watchdog,
                    audit_retention_s=retention,
                    store_url=store_url, stale_after_s=stale_after, metrics=metrics,
                    env_history_versions=history_versions, env_history_s=history_s)
    run(config, ready_fd=args.ready_fd, listen_socket=listen_socket)
    return EXIT_OK


def _store(args: argparse.Namespace) -> tuple[str | None, float]:
    """``--store``/``STIGMER_STORE_URL`` and ``--stale-after``, checked."""
    from ..local.paths import resolve_store

    try:
        url = resolve_store(os.environ, args.store)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    stale_after = 30.0
    if args.stale_after is not None:
        if url is None:
            raise UsageError("--stale-after is for a shared store: give --store too")
        stale_after = duration_arg(args.stale_after, "--stale-after", longest=3600.0)
    return url, stale_after


def _metrics(args: argparse.Namespace) -> MetricsAddress | None:
    """``--metrics``, else ``STIGMER_METRICS``, checked (a mistake is a usage error);
    None when neither asks for metrics."""
    from ..config import parse_metrics_address

    if args.metrics is not None:
        text, what = args.metrics, "--metrics"
        if not text.strip():
            raise UsageError("--metrics is empty: give unix:PATH or tcp:127.0.0.1:PORT, or "
                             "leave it out for no metrics")
    else:
        text, what = os.environ.get(METRICS_VARIABLE, ""), METRICS_VARIABLE
    if not text:
        return None
    try:
        return parse_metrics_address(text, what)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _read_credential(path: Path) -> str | None:
    """The master key systemd loaded for us (``LoadCredential=``), if it did."""
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StartupError(f"cannot read the systemd credential {path}: {exc.strerror}"
                           ) from None


def _retention(text: str) -> float | None:
    """``--audit-retention``: a duration of at least a day, or ``forever``."""
    if text.strip() == "forever":
        return None
    seconds = duration_arg(text, "--audit-retention", longest=100 * 366 * 86400.0)
    if seconds < 86400:
        raise UsageError(f"--audit-retention {text!r} is under a day: audit records are what "
                         "you read after an incident; keep them at least 1d")
    return seconds


def _env_history(text: str) -> tuple[int | None, float | None]:
    """``--env-history``: how many versions of each environment to keep (a count, at least
    1), or for how long (a duration, at least an hour), or ``forever``; returned as (count,
    seconds), the other None."""
    text = text.strip()
    if text == "forever":
        return None, None
    if text.isdigit():
        count = int(text)
        if not 1 <= count <= 1_000_000:
            raise UsageError(f"--env-history {text}: keep 1 to 1000000 versions (the current "
                             "one counts), or give a duration such as 90d")
        return count, None
    usage = ("give a whole count of versions (e.g. 50), a duration of at least an hour "
             "(e.g. 90d), or forever")
    try:
        seconds = duration_arg(text, "--env-history", longest=100 * 366 * 86400.0)
    except UsageError:
        raise UsageError(f"--env-history {text!r} is not a count or a duration: "
                         f"{usage}") from None
    if seconds < 3600:
        raise UsageError(f"--env-history {text!r} is under an hour: a rollback needs the "
                         f"versions it goes back to; {usage}")
    return None, seconds


def _serving_home_elsewhere(paths: Paths) -> Holder | None:
    """The daemon that holds this home's lock, when it listens on another socket."""
    from ..daemon.homelock import holder

    found = holder(paths.home)
    return found if found is not None and found.socket != str(paths.socket) else None


def _open_log(paths: Paths) -> int:
    """Open ``HOME/broker.log`` for appending, only after the home proved private, and
    never through a symbolic link. Raises StartupError naming the problem."""
    from ..daemon.homelock import prepare_home

    prepare_home(paths.home)
    try:
        return os.open(paths.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
                       | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        reason = "it is a symbolic link; remove it" if exc.errno == errno.ELOOP \
            else exc.strerror
        raise StartupError(f"refusing log file {paths.log_file}: {reason}") from None


def _read_key_fd(fd: int) -> str:
    """Return the master key ``start`` wrote to pipe ``fd`` (and close it)."""
    chunks = []
    try:
        while chunk := os.read(fd, 4096):
            chunks.append(chunk)
    except OSError as exc:
        raise UsageError(f"--key-fd {fd}: cannot be read ({exc.strerror})") from None
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    return b"".join(chunks).decode("utf-8", "surrogateescape")


def cmd_start(args: argparse.Namespace, paths: Paths) -> int:
    """Start ``serve`` in the background; the master key, if it comes from the
    environment, reaches the daemon through a pipe, never through its environment."""
    import subprocess

    # mistakes are reported here, not in the log, whether or not a broker runs
    _metrics(args)  # STIGMER_METRICS reaches serve as it is
    if args.audit_retention:
        _retention(args.audit_retention)
    if args.env_history:
        _env_history(args.env_history)
    try:
        with connect(paths) as client:
            status = client.status()
        if args.json:
            print_json({"running": True, "started": False, "pid": status.pid,
                        "socket": str(paths.socket)})
        elif args.print_env:
            _print_env(paths, args.print_env)
        else:
            print(f"already running (pid {status.pid}) on {paths.socket}")
        given = [flag for flag, value in (
            ("--allow-group", args.allow_group), ("--audit-retention", args.audit_retention),
            ("--env-history", args.env_history), ("--metrics", args.metrics),
            ("--key-command", args.key_command), ("--store", args.store),
            ("--stale-after", args.stale_after)) if value]
        if given:
            warn(f"the running broker keeps the settings it started with; "
                 f"{', '.join(given)} take effect once it is stopped and started again")
        return EXIT_OK
    except BrokerUnavailable:
        pass
    log_fd = _open_log(paths)
    read_fd, write_fd = os.pipe()
    # The daemon writes (and rotates) broker.log itself; its stderr goes there too, for
    # what is said before logging is set up (a start-up error that `start` reports).
    command = [sys.executable, "-m", "stigmer.broker", "serve", "--home", str(paths.home),
               "--socket", str(paths.socket), "--ready-fd", str(write_fd),
               "--log-file", str(paths.log_file)]
    if args.allow_group:
        command += ["--allow-group", args.allow_group]
    if args.audit_retention:
        command += ["--audit-retention", args.audit_retention]
    if args.env_history:
        command += ["--env-history", args.env_history]
    store_url, _ = _store(args)
    if args.stale_after is not None:
        command += ["--stale-after", args.stale_after]
    if args.metrics is not None:
        command += ["--metrics", args.metrics]
    env = dict(os.environ)
    # The daemon runs the command (and reads the key); `start` passes the command on in
    # the environment, and a mistake in it is reported here, not in the log.
    key_command_arg(args.key_command, env.get(KEY_COMMAND_VARIABLE))
    if args.key_command is not None:
        env[KEY_COMMAND_VARIABLE] = args.key_command
    if store_url is not None:
        env[STORE_VARIABLE] = store_url  # not argv: the URL may hold a password
    pass_fds = [write_fd]
    key = env.pop(KEY_VARIABLE, None)
    if key is not None:
        key_read, key_write = os.pipe()
        os.write(key_write, key.encode("utf-8", "surrogateescape"))  # 45 bytes: fits the pipe
        os.close(key_write)
        command += ["--key-fd", str(key_read)]
        pass_fds.append(key_read)
    try:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_fd,
                                stderr=log_fd, pass_fds=pass_fds, start_new_session=True,
                                close_fds=True, env=env)
    finally:
        for fd in (*pass_fds, log_fd):
            os.close(fd)
    with os.fdopen(read_fd, "rb") as ready:
        signal_ = ready.read(6)  # "ready\n", or EOF when the daemon failed to start
    if signal_ != b"ready\n":
        proc.wait(timeout=10)
        reason = _last_error_line(paths.log_file) or f"it exited with status {proc.returncode}"
        error(f"the broker did not start: {reason} (log: {paths.log_file})")
        return EXIT_FAILED
    if args.json:
        print_json({"running": True, "started": True, "pid": proc.pid,
                    "socket": str(paths.socket)})
    elif args.print_env:
        _print_env(paths, args.print_env)
    else:
        print(paths.socket)
    with contextlib.suppress(BrokerError), connect(paths) as client:
        status = client.status()
        _warn_without_backup(status)
    return EXIT_OK


def _print_env(paths: Paths, shell: str) -> None:
    """The socket as a line a shell evaluates: a session whose default path differs (cron,
    ssh, sudo: another $XDG_RUNTIME_DIR) adopts the broker in one step."""
    from .common import SOCKET_VARIABLE
    from .shellquote import render

    sys.stdout.write(render({SOCKET_VARIABLE: str(paths.socket)}, shell))


def _last_error_line(log_file: Path) -> str:
    try:
        lines = log_file.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines[-50:]):
        if "error:" in line:
            return line.split("error:", 1)[1].strip()
    return ""


def cmd_stop(args: argparse.Namespace, paths: Paths) -> int:
    from ..daemon.homelock import holder

    try:
        with connect(paths) as client:
            pid = client.status().pid
            held = holder(paths.home)
            client.shutdown()
    except BrokerUnavailable:
        if args.json:
            print_json({"stopped": False, "pid": None, "socket": str(paths.socket)})
        else:
            print(f"not running (socket {paths.socket})")
        return EXIT_OK
    # The daemon of our home lets its lock go when it has closed the store, and the kernel
    # drops it at exit however it ends; a pid alone stays "alive" as a zombie until its
    # parent reaps it. A broker of another home (our socket variable points at it) is
    # waited for by its pid.
    if held is not None and held.pid == pid:
        def gone() -> bool:
            return holder(paths.home) is None
    else:
        def gone() -> bool:
            return not _alive(pid)
    deadline = time.monotonic() + args.timeout
    while not gone():
        if time.monotonic() >= deadline:
            error(f"the broker (pid {pid}) did not exit within {args.timeout:g}s")
            return EXIT_FAILED
        time.sleep(0.01)
    if args.json:
        print_json({"stopped": True, "pid": pid, "socket": str(paths.socket)})
    else:
        print(f"stopped (pid {pid})")
    return EXIT_OK


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a running process: a zombie (exited, not yet reaped) is not."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return stat[stat.rindex(b")") + 2:][:1] != b"Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (macOS): ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def cmd_status(args: argparse.Namespace, paths: Paths) -> int:
    try:
        with connect(paths) as client:
            status = client.status()
    except UnsafeSocket:
        raise  # not "not running": a broker may well run; the message says what to fix
    except BrokerUnavailable:
        elsewhere = _serving_home_elsewhere(paths)
        if elsewhere is not None:
            # our socket variable points elsewhere than the daemon of this home listens
            note = (f"note: the broker of home {paths.home} listens on {elsewhere.socket}, "
                    f"not on {paths.socket}; set STIGMER_BROKER_SOCKET={elsewhere.socket}")
            print(note, file=sys.stderr)
            return cmd_status(args, paths._replace(socket=Path(elsewhere.socket)))
        from ..local.trust import refused_socket

        refused = refused_socket(str(paths.socket))
        if args.json:
            line = f"not running (socket {paths.socket})" + (f": {refused}" if refused else "")
            print_json({"running": False, "socket": str(paths.socket),
                        **({"problem": refused} if refused else {}),
                        # the shape of a running broker's check, for `jq .healthy`
                        **({"healthy": False, "problems": [line]}
                           if getattr(args, "check", False) else {})})
        else:
            print(f"not running (socket {paths.socket})" + (f": {refused}" if refused else ""))
        return EXIT_NOT_RUNNING
    import msgspec

    days = count_arg(getattr(args, "key_backup_days", None), "--key-backup-days", 0, 36500)
    if days is not None and not getattr(args, "check", False):
        raise UsageError("--key-backup-days goes with --check")
    if getattr(args, "check", False):
        return _check(status, as_json=args.json,
                      key_backup_days=KEY_BACKUP_DAYS if days is None else days)
    if args.json:
        data = msgspec.to_builtins(status)
        data.pop("id", None)
        data.pop("op", None)
        print_json({"running": True, **data, "mask_min_length": MIN_SECRET_LENGTH})
        return EXIT_OK
    unit = f", unit {status.unit}" if status.unit else ""
    print(f"stigmer-broker {status.version} running (pid {status.pid}, up "
          f"{duration(status.uptime_s)}, started: {status.started_by}{unit})")
    rows = [
        ("socket", f"{status.socket} ({status.socket_mode})"),
        ("store", status.store + (f" - {status.store_problem}" if status.store_problem
                                  else "")),
        ("key source", status.key_source),
        *([("audit", status.audit_problem)] if status.audit_problem else []),
        ("environments", str(status.environments)),
        ("contexts", str(status.contexts)),
        ("tokens", str(status.tokens)),
        ("requests", str(status.requests)),
        ("connections", str(status.connections)),
        ("key backup", _backup_row(status)),
        ("masking", f"secrets shorter than {MIN_SECRET_LENGTH} characters are not masked"),
    ]
    if status.attest_limit:
        rows.append(("runners", status.attest_limit))
    for label, value in rows:
        print(f"  {label:<13}{value}")
    _warn_without_backup(status)
    return EXIT_OK


def _check(status: Status, *, as_json: bool, key_backup_days: int) -> int:
    """``status --check``: one line per problem and exit 1, or "healthy" and exit 0."""
    found = _problems(status, key_backup_days)
    if as_json:
        print_json({"running": True, "healthy": not found, "problems": found,
                    "pid": status.pid, "socket": status.socket})
    elif found:
        for line in found:
            print(line)
    else:
        print(f"healthy (pid {status.pid}, up {duration(status.uptime_s)})")
    return EXIT_FAILED if found else EXIT_OK


def _problems(status: Status, key_backup_days: int) -> list[str]:
    """What makes a running broker degraded, one line each: its store (a fleet's
    database out or stale, another broker's key rotation), its audit chain, a master key
    it keeps without a backup once it is ``key_backup_days`` old (of unknown age: at
    once)."""
    from ..store.backup import backup_is_tracked, no_backup_line

    found = []
    if status.store_problem:
        found.append(f"store: {status.store_problem}")
    if status.audit_problem:
        found.append(f"audit: {status.audit_problem} (`stigmer-broker audit verify` says "
                     "more)")
    age_s = None if status.key_made_at is None else time.time() - status.key_made_at
    if status.key_backed_up_at is None and backup_is_tracked(status.key_source) and (
            age_s is None or age_s >= key_backup_days * 86400):
        found.append(f"key backup: {no_backup_line(status.key_source)}")
    return found


def _backup_row(status: Status) -> str:
    from ..store.backup import backup_is_tracked

    if status.key_backed_up_at:
        return when(status.key_backed_up_at)
    if not backup_is_tracked(status.key_source):
        return "not tracked: the key is handed in, back it up where it comes from"
    return "none since the key was made or rotated"


def _warn_without_backup(status: Status) -> None:
    """`start` and `status` say it while a key the broker keeps has no backup."""
    from ..store.backup import backup_is_tracked, no_backup_line

    if status.key_backed_up_at is None and backup_is_tracked(status.key_source):
        warn(no_backup_line(status.key_source))

