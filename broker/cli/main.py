"""``stigmer-broker``: argv -> library calls -> output and an exit status.

A thin layer: parsing flags, reading files and prompts, printing. It never
opens the store (every write goes through the daemon) and it imports the
daemon's heavy dependencies only for ``serve``, so ``status`` stays fast.

Exit status: 0 success, 1 the broker refused or failed the request, 2 a usage
mistake, 3 no broker is running (``status``, and client commands).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, NoReturn, cast

if TYPE_CHECKING:
    import argparse

from . import __version__
from .config import Config, Paths, resolve_paths
from .errors import BrokerError, BrokerUnavailable, InvalidArgument

__all__ = ["entry", "main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_RUNNING = 0, 1, 2, 3
PROG = "stigmer-broker"


class UsageError(Exception):
    """A mistake in how the command was called (exit 2)."""


def entry() -> NoReturn:
    """The console script: run, flush, and leave without tearing the interpreter down.

    Module teardown would cost a short command like `status` a tenth of its time;
    nothing of ours needs it (the store is closed, sockets go with the process).
    """
    try:
        code = main()
    except SystemExit as exc:  # argparse's --help, --version and usage errors
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    fast = _status_fast_path(argv)
    if fast is not None:
        return fast
    parser = _parser(argv)
    args, extras = parser.parse_known_args(argv)
    if extras:
        # argparse stops filling KEY=VALUE positionals at the first option; take the rest
        if hasattr(args, "pairs") and not any(e.startswith("-") for e in extras):
            args.pairs = [*args.pairs, *extras]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        paths = resolve_paths(os.environ, home=getattr(args, "home", None),
                              socket=getattr(args, "socket", None))
        result: int = args.func(args, paths)
        return result
    except UsageError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except BrokerUnavailable as exc:
        _error(exc.message)
        return EXIT_NOT_RUNNING
    except BrokerError as exc:
        _error(exc.message)
        return EXIT_FAILED
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except BrokenPipeError:
        return EXIT_FAILED


def _status_fast_path(argv: list[str]) -> int | None:
    """`status` is what people type most: for its plain forms, skip building argparse."""
    if not argv or argv[0] != "status":
        return None
    options: dict[str, str | None] = {"home": None, "socket": None}
    as_json = False
    rest = argv[1:]
    while rest:
        arg = rest.pop(0)
        if arg == "--json" and not as_json:
            as_json = True
        elif arg in ("--home", "--socket") and rest and options[arg[2:]] is None:
            options[arg[2:]] = rest.pop(0)
        else:
            return None  # anything else: let argparse parse (and explain) it
    args = cast("argparse.Namespace", SimpleNamespace(json=as_json, **options))
    try:
        return cmd_status(args, resolve_paths(os.environ, home=options["home"],
                                              socket=options["socket"]))
    except BrokerError as exc:
        _error(exc.message)
        return EXIT_FAILED


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


def _client(paths: Paths) -> Any:
    from stigmer.client import Client

    return Client(paths.socket)


# ------------------------------------------------------------------------ daemon


def cmd_serve(args: argparse.Namespace, paths: Paths) -> int:
    import logging

    from .daemon import run
    from .listen import AlreadyRunning, StartupError

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .systemd import SystemdError, inherited_socket, systemd_unit

    env_key = os.environ.pop("STIGMER_ENCRYPTION_KEY", None)
    try:
        listen_socket = inherited_socket(os.environ)
    except SystemdError as exc:
        _error(str(exc))
        return EXIT_FAILED
    for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # not for our children
    notify_socket = os.environ.pop("NOTIFY_SOCKET", None)
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
    config = Config(paths=paths, allow_group=args.allow_group, env_key=env_key,
                    started_by=started_by, unit=unit, notify_socket=notify_socket)
    try:
        run(config, ready_fd=args.ready_fd, listen_socket=listen_socket)
    except AlreadyRunning as exc:
        _error(str(exc))
        return EXIT_FAILED
    except StartupError as exc:
        _error(str(exc))
        return EXIT_FAILED
    return EXIT_OK


def cmd_start(args: argparse.Namespace, paths: Paths) -> int:
    import subprocess

    try:
        with _client(paths) as client:
            status = client.status()
        print(f"already running (pid {status.pid}) on {paths.socket}")
        return EXIT_OK
    except BrokerUnavailable:
        pass
    paths.home.mkdir(mode=0o700, parents=True, exist_ok=True)
    log_fd = os.open(paths.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                     0o600)
    read_fd, write_fd = os.pipe()
    command = [sys.executable, "-m", "stigmer.broker", "serve", "--home", str(paths.home),
               "--socket", str(paths.socket), "--ready-fd", str(write_fd)]
    if args.allow_group:
        command += ["--allow-group", args.allow_group]
    try:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_fd,
                                stderr=log_fd, pass_fds=(write_fd,), start_new_session=True,
                                close_fds=True)
    finally:
        os.close(write_fd)
        os.close(log_fd)
    with os.fdopen(read_fd, "rb") as ready:
        signal_ = ready.read(6)  # "ready\n", or EOF when the daemon failed to start
    if signal_ != b"ready\n":
        proc.wait(timeout=10)
        reason = _last_error_line(paths.log_file) or f"it exited with status {proc.returncode}"
        _error(f"the broker did not start: {reason} (log: {paths.log_file})")
        return EXIT_FAILED
    print(paths.socket)
    return EXIT_OK


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
    try:
        with _client(paths) as client:
            pid = client.status().pid
            client.shutdown()
    except BrokerUnavailable:
        print(f"not running (socket {paths.socket})")
        return EXIT_OK
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            print(f"stopped (pid {pid})")
            return EXIT_OK
        except PermissionError:
            break
        time.sleep(0.05)
    _error(f"the broker (pid {pid}) did not exit within {args.timeout:g}s")
    return EXIT_FAILED


def cmd_status(args: argparse.Namespace, paths: Paths) -> int:
    try:
        with _client(paths) as client:
            status = client.status()
    except BrokerUnavailable:
        if args.json:
            _print_json({"running": False, "socket": str(paths.socket)})
        else:
            print(f"not running (socket {paths.socket})")
        return EXIT_NOT_RUNNING
    import msgspec

    if args.json:
        data = msgspec.to_builtins(status)
        data.pop("id", None)
        data.pop("op", None)
        _print_json({"running": True, **data})
        return EXIT_OK
    unit = f", unit {status.unit}" if status.unit else ""
    print(f"stigmer-broker {status.version} running (pid {status.pid}, up "
          f"{_duration(status.uptime_s)}, started: {status.started_by}{unit})")
    rows = [
        ("socket", f"{status.socket} ({status.socket_mode})"),
        ("store", status.store),
        ("key source", status.key_source),
        ("environments", str(status.environments)),
        ("contexts", str(status.contexts)),
        ("tokens", str(status.tokens)),
        ("requests", str(status.requests)),
        ("connections", str(status.connections)),
    ]
    for label, value in rows:
        print(f"  {label:<13}{value}")
    return EXIT_OK


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def _print_json(data: object) -> None:
    import json

    print(json.dumps(data, indent=2, sort_keys=True))


# ------------------------------------------------------------------ environments


def _read_secret_value(key: str) -> str:
    """Prompt without echo on a terminal; read one line from stdin otherwise."""
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass(f"{key}: ")
    line = sys.stdin.readline()
    if not line:
        raise UsageError(f"--secret {key}: no value on standard input (one line per key)")
    return line.rstrip("\r\n")


def collect_variables(pairs: Sequence[str], secrets: Sequence[str], env_file: str | None,
                      *, pair_flag: str = "KEY=VALUE") -> dict[str, Any]:
    """Merge --env-file (secret), KEY=VALUE pairs and --secret flags into wire variables.

    The command line wins over the file; a key given twice on the command line is
    a usage error. Values from --env-file are stored as secrets.
    """
    from .manifests import parse_assignment, read_env_file
    from .protocol import Variable

    from_file = read_env_file(env_file) if env_file else {}
    out: dict[str, Variable] = {k: Variable(value=v, is_secret=True) for k, v in
                                from_file.items()}
    given: set[str] = set()

    def add(key: str, value: str, secret: bool) -> None:
        if key in given:
            raise UsageError(f"{key} is given twice on the command line")
        given.add(key)
        out[key] = Variable(value=value, is_secret=secret)

    for text in pairs:
        add(*parse_assignment(text, pair_flag), secret=False)
    inline_secret = False
    for text in secrets:
        if "=" in text:
            inline_secret = True
            add(*parse_assignment(text, "--secret"), secret=True)
        else:
            from .manifests import check_var_name

            key = check_var_name(text, "--secret")
            if key in given:
                raise UsageError(f"{key} is given twice on the command line")
            add(key, _read_secret_value(key), secret=True)
    if inline_secret:
        print(f"{PROG}: warning: a secret given as --secret KEY=VALUE is visible to other "
              "processes and kept in shell history; prefer --secret KEY (prompt or stdin) "
              "or --env-file", file=sys.stderr)
    return out


def cmd_env_set(args: argparse.Namespace, paths: Paths) -> int:
    from .manifests import check_name

    name = check_name(args.name, "environment name")
    data = collect_variables(args.pairs, args.secret or [], args.env_file)
    if not data:
        raise UsageError("nothing to set: give KEY=VALUE, --secret KEY or --env-file FILE")
    with _client(paths) as client:
        env = client.put_environment(name, data)
    secret_count = sum(1 for v in data.values() if v.is_secret)
    print(f"environment {env.name}: set {len(data)} variable(s) ({secret_count} secret), "
          f"{len(env.data)} in all")
    return EXIT_OK


def cmd_env_show(args: argparse.Namespace, paths: Paths) -> int:
    from .manifests import check_name

    with _client(paths) as client:
        env = client.get_environment(check_name(args.name, "environment name"),
                                     reveal=args.reveal)
    if args.json:
        _print_json({"name": env.name, "created_at": env.created_at,
                     "updated_at": env.updated_at,
                     "data": {k: {"value": v.value, "is_secret": v.is_secret}
                              for k, v in env.data.items()}})
        return EXIT_OK
    print(f"environment {env.name} ({len(env.data)} variables)")
    width = max((len(k) for k in env.data), default=0)
    for key, var in env.data.items():
        shown = "********" if var.value is None else _printable(var.value)
        marker = "  (secret)" if var.is_secret else ""
        print(f"  {key:<{width}}  {shown}{marker}")
    return EXIT_OK


def _printable(value: str) -> str:
    """A value as it can be shown on a terminal: control characters escaped, quoted."""
    if value.isprintable():
        return value
    import json

    return json.dumps(value, ensure_ascii=False)


def cmd_env_list(args: argparse.Namespace, paths: Paths) -> int:
    with _client(paths) as client:
        envs = client.list_environments()
    if args.json:
        _print_json([{"name": e.name, "variables": e.variables, "secrets": e.secrets,
                      "updated_at": e.updated_at} for e in envs])
        return EXIT_OK
    if not envs:
        print("no environments (create one with `stigmer-broker env set NAME KEY=VALUE`)")
        return EXIT_OK
    width = max(len(e.name) for e in envs)
    for e in envs:
        print(f"{e.name:<{width}}  {e.variables} variables, {e.secrets} secret")
    return EXIT_OK


def cmd_env_unset(args: argparse.Namespace, paths: Paths) -> int:
    from .manifests import check_name, check_var_name

    keys = [check_var_name(k) for k in args.keys]
    with _client(paths) as client:
        env = client.unset_variables(check_name(args.name, "environment name"), keys)
    print(f"environment {env.name}: removed {len(keys)} variable(s), {len(env.data)} left")
    return EXIT_OK


def cmd_env_delete(args: argparse.Namespace, paths: Paths) -> int:
    from .manifests import check_name

    with _client(paths) as client:
        client.delete_environment(check_name(args.name, "environment name"))
    print(f"environment {args.name} deleted")
    return EXIT_OK


def cmd_apply(args: argparse.Namespace, paths: Paths) -> int:
    from .manifests import read_environment_manifests

    if args.file == "-":
        text, source = sys.stdin.read(), "<stdin>"
    else:
        text, source = _read_text(args.file, "-f"), args.file
    specs = read_environment_manifests(text, source)
    with _client(paths) as client:
        client.apply_environments(specs)
    for spec in specs:
        print(f"environment/{spec.name} applied ({len(spec.data)} variables)")
    return EXIT_OK


def _read_text(path: str, flag: str) -> str:
    """Return a UTF-8 file's text; raise InvalidArgument naming the flag when it cannot."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise InvalidArgument(f"{flag} {path}: cannot be read ({reason})") from None


def cmd_key_rotate(args: argparse.Namespace, paths: Paths) -> int:
    import threading

    print("rotating the master key (rewrapping data keys, checking every sealed value)...",
          file=sys.stderr)
    outcome: dict[str, Any] = {}

    def rotate() -> None:
        try:
            with _client(paths) as client:
                client.timeout = max(client.timeout, 3600.0)
                outcome["result"] = client.rotate_key()
        except BrokerError as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=rotate, daemon=True)
    worker.start()
    shown = ""
    with _client(paths) as watcher:  # a second connection reports progress meanwhile
        while worker.is_alive():
            worker.join(0.5)
            if worker.is_alive():
                activity = watcher.status().activity
                if activity and activity != shown:
                    print(f"  {activity}", file=sys.stderr)
                    shown = activity
    if "error" in outcome:
        raise outcome["error"]
    result = outcome["result"]
    print(f"master key rotated: new key id {result.key_id}, {result.rewrapped} data key(s) "
          f"rewrapped, kept in {result.key_source}")
    return EXIT_OK


# ---------------------------------------------------------------------- contexts


def cmd_context_create(args: argparse.Namespace, paths: Paths) -> int:
    from .manifests import check_name, parse_duration, read_env_spec

    execution_id = check_name(args.execution_id, "execution id")
    environments = [check_name(e, "--environment") for e in args.environment or []]
    spec = read_env_spec(_read_text(args.spec, "--spec"), args.spec) if args.spec else {}
    runtime = collect_variables(args.env or [], args.secret or [], args.env_file,
                                pair_flag="--env")
    ttl = parse_duration(args.ttl, "--ttl")
    token_ttl = parse_duration(args.token_ttl, "--token-ttl")
    with _client(paths) as client:
        created = client.create_context(execution_id, env_spec=spec, environments=environments,
                                        runtime=runtime, ttl_s=ttl, token_ttl_s=token_ttl,
                                        max_uses=args.max_uses)
    if args.json:
        _print_json({"execution_id": created.execution_id, "token": created.token,
                     "token_id": created.token_id, "expires_at": created.expires_at,
                     "token_expires_at": created.token_expires_at,
                     "keys": [_key_json(k) for k in created.keys]})
    else:
        print(created.token)
    return EXIT_OK


def _key_json(key: Any) -> dict[str, Any]:
    return {"key": key.key, "is_secret": key.is_secret, "source": key.source}


def cmd_context_token(args: argparse.Namespace, paths: Paths) -> int:
    from .manifests import check_name, parse_duration

    with _client(paths) as client:
        issued = client.issue_token(check_name(args.execution_id, "execution id"),
                                    ttl_s=parse_duration(args.ttl, "--ttl"),
                                    max_uses=args.max_uses)
    print(issued.token)
    return EXIT_OK


def cmd_context_show(args: argparse.Namespace, paths: Paths) -> int:
    from .manifests import check_name

    with _client(paths) as client:
        info = client.get_context(check_name(args.execution_id, "execution id"))
    if args.json:
        _print_json({"execution_id": info.execution_id, "created_at": info.created_at,
                     "expires_at": info.expires_at, "keys": [_key_json(k) for k in info.keys],
                     "tokens": [{"token_id": t.token_id, "created_at": t.created_at,
                                 "expires_at": t.expires_at, "uses": t.uses,
                                 "uses_left": None if t.max_uses is None
                                 else max(t.max_uses - t.uses, 0)} for t in info.tokens]})
        return EXIT_OK
    print(f"context {info.execution_id} (expires {_when(info.expires_at)})")
    width = max((len(k.key) for k in info.keys), default=0)
    for k in info.keys:
        print(f"  {k.key:<{width}}  {'secret' if k.is_secret else 'plain ':<6}  from {k.source}")
    print(f"tokens ({len(info.tokens)} live):")
    for t in info.tokens:
        left = "unlimited" if t.max_uses is None else f"{max(t.max_uses - t.uses, 0)} uses left"
        print(f"  {t.token_id}  expires {_when(t.expires_at)}, used {t.uses}, {left}")
    return EXIT_OK


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def cmd_context_list(args: argparse.Namespace, paths: Paths) -> int:
    with _client(paths) as client:
        contexts = client.list_contexts()
    if args.json:
        _print_json([{"execution_id": c.execution_id, "created_at": c.created_at,
                      "expires_at": c.expires_at, "keys": c.keys, "secrets": c.secrets,
                      "tokens": c.tokens} for c in contexts])
        return EXIT_OK
    if not contexts:
        print("no live contexts")
    for c in contexts:
        print(f"{c.execution_id}  {c.keys} keys ({c.secrets} secret), {c.tokens} tokens, "
              f"expires {_when(c.expires_at)}")
    return EXIT_OK


def cmd_context_complete(args: argparse.Namespace, paths: Paths) -> int:
    from .manifests import check_name

    with _client(paths) as client:
        client.complete_context(check_name(args.execution_id, "execution id"))
    print(f"context {args.execution_id} completed; its tokens are revoked")
    return EXIT_OK


def cmd_context_release(args: argparse.Namespace, paths: Paths) -> int:
    with _client(paths) as client:
        client.release_context(args.token)
    print("context released; its tokens are revoked")
    return EXIT_OK


def cmd_run(args: argparse.Namespace, paths: Paths) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError("run needs a command: stigmer-broker run [--token T] -- COMMAND [ARGS]")
    with _client(paths) as client:
        context = client.fetch_context(args.token)
    env = dict(os.environ)
    env.pop("STIGMER_EXECUTION_TOKEN", None)
    env.update(context.as_env())
    unpassable = sorted(k for k, v in context.items() if "\0" in v)
    if unpassable:
        raise InvalidArgument(f"{', '.join(unpassable)} contain(s) a NUL byte, which no "
                              "environment can carry; read them with stigmer.client instead")
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvpe(command[0], command, env)  # noqa: S606 - the user's own command
    except FileNotFoundError:
        _error(f"command not found: {command[0]}")
        return 127
    except PermissionError:
        _error(f"command not executable: {command[0]}")
        return 126
    except OSError as exc:
        _error(f"cannot run {command[0]}: {exc.strerror}")
        return 126


def cmd_audit(args: argparse.Namespace, paths: Paths) -> int:
    from .manifests import check_name

    execution_id = check_name(args.execution, "--execution") if args.execution else None
    with _client(paths) as client:
        records = client.audit(execution_id, args.limit)
    if args.json:
        import msgspec

        _print_json(msgspec.to_builtins(records))
        return EXIT_OK
    for r in records:
        who = f"uid {r.peer_uid} pid {r.peer_pid}" if r.peer_uid is not None else "broker"
        token = f" {r.token_id}" if r.token_id else ""
        detail = f" ({r.detail})" if r.detail else ""
        print(f"{r.seq:>6}  {_when(r.at)}  {r.event:<18} {r.outcome:<8} "
              f"{r.execution_id or '-'}{token}  {who}{detail}")
    return EXIT_OK


def cmd_audit_verify(args: argparse.Namespace, paths: Paths) -> int:
    with _client(paths) as client:
        result = client.verify_audit()
    if result.ok:
        print(f"audit chain intact ({result.records} records)")
        return EXIT_OK
    _error(f"audit chain broken at record {result.first_broken}: {result.reason}")
    return EXIT_FAILED


# ----------------------------------------------------------------------- service


def _manager(args: argparse.Namespace) -> str:
    from .install import LAUNCHD, SYSTEMD, default_manager

    if args.systemd:
        return SYSTEMD
    if args.launchd:
        return LAUNCHD
    return default_manager()


def cmd_service_install(args: argparse.Namespace, paths: Paths) -> int:
    from .install import console_script, enable_hint, install, render

    manager = _manager(args)
    service_files = render(manager, exec_path=console_script(), home=paths.home,
                           user_home=Path.home(),
                           xdg_config_home=os.environ.get("XDG_CONFIG_HOME"))
    if args.print:
        for f in service_files:
            print(f"# {f.path}")
            print(f.content)
        return EXIT_OK
    paths.home.mkdir(mode=0o700, parents=True, exist_ok=True)  # ReadWritePaths= needs it
    install(service_files)
    for f in service_files:
        print(f"wrote {f.path}")
    print(f"enable it with:\n  {enable_hint(manager, service_files)}")
    return EXIT_OK


def cmd_service_uninstall(args: argparse.Namespace, paths: Paths) -> int:
    from .install import disable_hint, uninstall

    manager = _manager(args)
    removed = uninstall(manager, Path.home(), os.environ.get("XDG_CONFIG_HOME"))
    for path in removed:
        print(f"removed {path}")
    if not removed:
        print(f"no {manager} files of stigmer-broker were installed")
    else:
        print(f"if it is still loaded, stop it with:\n  {disable_hint(manager, Path.home())}")
    return EXIT_OK


# ------------------------------------------------------------------------ parser


def _group_help(group: argparse.ArgumentParser) -> Callable[[argparse.Namespace, Paths], int]:
    """A command group typed without its subcommand shows its own help (exit 2)."""
    def show(args: argparse.Namespace, paths: Paths) -> int:
        group.print_help(sys.stderr)
        return EXIT_USAGE
    return show


class _Unused:
    """Stands in for the parser of a command this run does not use: building every
    command's arguments costs more than `status` itself, so only the chosen one is built."""

    def add_argument(self, *args: Any, **kwargs: Any) -> None:
        pass

    def add_mutually_exclusive_group(self) -> _Unused:
        return self

    def add_subparsers(self, **kwargs: Any) -> _Unused:
        return self

    def add_parser(self, *args: Any, **kwargs: Any) -> _Unused:
        return self


def _chosen(argv: Sequence[str]) -> list[str]:
    """The command words in ``argv`` (``["env", "set"]``), skipping global options."""
    words: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--home", "--socket"):
            skip = True
        elif arg == "--":
            break
        elif not arg.startswith("-"):
            words.append(arg)
    return words


def _parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    import argparse  # here, not at the top: `status` never needs it

    class _Parser(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:
            self.print_usage(sys.stderr)
            self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")

    words = _chosen(argv)

    def wanted(*path: str) -> bool:
        return not words or words[:len(path)] == list(path) or words == list(path[:-1])

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", default=argparse.SUPPRESS,
                        help="broker home (default: $STIGMER_HOME or ~/.stigmer)")
    common.add_argument("--socket", default=argparse.SUPPRESS,
                        help="socket path (default: $STIGMER_BROKER_SOCKET, "
                             "$XDG_RUNTIME_DIR/stigmer/broker.sock or HOME/run/broker.sock)")
    parser = _Parser(prog=PROG, description="The local secret broker for agent runners.",
                     parents=[common])
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    def command(name: str, func: Callable[[argparse.Namespace, Paths], int], help_: str,
                parent: Any = sub, group: str = "") -> Any:
        if not wanted(*([group] if group else []), name):
            parent.add_parser(name, help=help_, add_help=False)
            return _Unused()
        p: argparse.ArgumentParser = parent.add_parser(name, help=help_, description=help_,
                                                       parents=[common])
        p.set_defaults(func=func)
        return p

    p = command("serve", cmd_serve, "run the broker in the foreground (logs to stderr)")
    p.add_argument("--allow-group", metavar="GROUP",
                   help="let members of GROUP connect to fetch contexts (nothing else)")
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", action="store_true", help="log debug events too")
    p = command("start", cmd_start, "start the broker in the background if it is not running")
    p.add_argument("--allow-group", metavar="GROUP", help="as for serve")
    p = command("stop", cmd_stop, "stop the running broker gracefully")
    p.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for it to exit")
    p = command("status", cmd_status, "show whether the broker runs, and its figures")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    env = sub.add_parser("env", help="manage environments (named sets of variables)")
    env.set_defaults(func=_group_help(env))
    env_sub = env.add_subparsers(title="env commands", metavar="COMMAND")
    p = command("set", cmd_env_set, "create an environment or set variables in it", env_sub,
                "env")
    p.add_argument("name", metavar="NAME")
    p.add_argument("pairs", nargs="*", metavar="KEY=VALUE", help="plain variables")
    p.add_argument("--secret", action="append", metavar="KEY[=VALUE]",
                   help="a secret; without =VALUE it is prompted for (or read from stdin)")
    p.add_argument("--env-file", metavar="FILE", help="read variables (as secrets) from a .env "
                   "file; the command line wins")
    p = command("show", cmd_env_show, "show an environment (secrets masked)", env_sub, "env")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--reveal", action="store_true", help="show secret values")
    p.add_argument("--json", action="store_true")
    p = command("list", cmd_env_list, "list environments", env_sub, "env")
    p.add_argument("--json", action="store_true")
    p = command("unset", cmd_env_unset, "remove variables from an environment", env_sub,
                "env")
    p.add_argument("name", metavar="NAME")
    p.add_argument("keys", nargs="+", metavar="KEY")
    p = command("delete", cmd_env_delete, "delete an environment", env_sub, "env")
    p.add_argument("name", metavar="NAME")

    p = command("apply", cmd_apply, "apply Environment manifests (YAML, one or more documents)")
    p.add_argument("-f", "--file", required=True, metavar="FILE", help="manifest file, - for stdin")

    ctx = sub.add_parser("context", help="execution contexts: create, tokens, show, complete")
    ctx.set_defaults(func=_group_help(ctx))
    ctx_sub = ctx.add_subparsers(title="context commands", metavar="COMMAND")
    p = command("create", cmd_context_create,
                "merge spec < environments < runtime into a context; print its token",
                ctx_sub, "context")
    p.add_argument("execution_id", metavar="EXEC_ID")
    p.add_argument("--environment", action="append", metavar="NAME",
                   help="an environment to merge, in order (repeatable)")
    p.add_argument("--spec", metavar="FILE", help="Agent/Workflow manifest or bare env_spec map "
                   "(YAML or JSON)")
    p.add_argument("--env", action="append", metavar="KEY=VALUE", help="a runtime variable")
    p.add_argument("--secret", action="append", metavar="KEY[=VALUE]",
                   help="a runtime secret; without =VALUE it is prompted for (or read from stdin)")
    p.add_argument("--env-file", metavar="FILE", help="runtime variables (as secrets) from a "
                   ".env file; --env/--secret win")
    p.add_argument("--ttl", default="24h", help="context lifetime (default 24h)")
    p.add_argument("--token-ttl", default="15m", help="token lifetime (default 15m)")
    p.add_argument("--max-uses", type=int, metavar="N", help="fetches the token allows")
    p.add_argument("--json", action="store_true")
    p = command("token", cmd_context_token, "issue another token for a context", ctx_sub,
                "context")
    p.add_argument("execution_id", metavar="EXEC_ID")
    p.add_argument("--ttl", default="15m", help="token lifetime (default 15m)")
    p.add_argument("--max-uses", type=int, metavar="N")
    p = command("show", cmd_context_show, "keys, provenance, expiry and tokens (no values)",
                ctx_sub, "context")
    p.add_argument("execution_id", metavar="EXEC_ID")
    p.add_argument("--json", action="store_true")
    p = command("list", cmd_context_list, "list live contexts", ctx_sub, "context")
    p.add_argument("--json", action="store_true")
    p = command("complete", cmd_context_complete, "delete a context and revoke its tokens",
                ctx_sub, "context")
    p.add_argument("execution_id", metavar="EXEC_ID")

    p = command("release", cmd_context_release,
                "end the context your token opens (the runner's own complete)", ctx_sub,
                "context")
    p.add_argument("--token", help="execution token (default: $STIGMER_EXECUTION_TOKEN)")

    p = command("run", cmd_run, "fetch a context and exec COMMAND with its variables")
    p.add_argument("--token", help="execution token (default: $STIGMER_EXECUTION_TOKEN)")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS]")

    p = command("audit", cmd_audit, "show the audit log")
    p.add_argument("--execution", metavar="ID", help="only this execution's records")
    p.add_argument("--limit", type=int, default=100, help="newest N records (default 100)")
    p.add_argument("--json", action="store_true")
    audit_sub = p.add_subparsers(title="audit commands", metavar="COMMAND")
    command("verify", cmd_audit_verify, "check the audit log's hash chain", audit_sub, "audit")

    svc = sub.add_parser("service", help="run the broker as a systemd/launchd user service")
    svc.set_defaults(func=_group_help(svc))
    svc_sub = svc.add_subparsers(title="service commands", metavar="COMMAND")
    for name, func, help_ in (
            ("install", cmd_service_install, "write the user unit files (or plist) and say "
                                             "how to enable them"),
            ("uninstall", cmd_service_uninstall, "remove the files install writes")):
        p = command(name, func, help_, svc_sub, "service")
        which = p.add_mutually_exclusive_group()
        which.add_argument("--systemd", action="store_true", help="systemd user units")
        which.add_argument("--launchd", action="store_true", help="a launchd user agent")
        if name == "install":
            p.add_argument("--print", action="store_true", help="only print the files")

    key = sub.add_parser("key", help="manage the master key")
    key.set_defaults(func=_group_help(key))
    key_sub = key.add_subparsers(title="key commands", metavar="COMMAND")
    command("rotate", cmd_key_rotate, "replace the master key and rewrap the data keys",
            key_sub, "key")
    return parser
