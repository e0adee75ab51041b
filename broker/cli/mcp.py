"""The MCP commands: `mcp proxy` stands in for a server, `mcp render` wraps a config.

`mcp proxy --server NAME --config FILE` fetches the execution's context (as
`run` does), fills the placeholders of server NAME in FILE, starts it with the
values in its environment, and relays MCP's stdio both ways, every message
from the server masked (:mod:`.mcpproxy`). `mcp render FILE --into ENV --out
OUT` moves the values of FILE into environment ENV (as secrets, through the
daemon), leaves placeholders in FILE, and writes OUT: the same servers, each
started by `mcp proxy`, for any MCP client to use unchanged.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import TYPE_CHECKING

from ..protocol.errors import (
    BrokerError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from .common import (
    BROKER_VARIABLES,
    EXIT_FAILED,
    EXIT_OK,
    PROG,
    UsageError,
    connect,
    credential_arg,
    duration_arg,
    name_arg,
)
from .render import error, print_json, warn

if TYPE_CHECKING:
    import argparse

    from ..config import Paths

__all__ = ["DEFAULT_CHECK_EVERY", "cmd_mcp_proxy", "cmd_mcp_render"]

#: how often `mcp proxy` asks the broker whether the context still exists
DEFAULT_CHECK_EVERY = "10s"


def cmd_mcp_proxy(args: argparse.Namespace, paths: Paths) -> int:
    from .maskforms import MIN_SECRET_LENGTH, context_patterns
    from .mcpconfig import load_config, resolve_server, server_of
    from .mcpproxy import relay
    from .mounts import open_mount, parse_mount, substitute

    config = load_config(args.config, "--config")
    server = server_of(config, args.server, args.config)
    token, execution = credential_arg(args.token, args.execution)
    check_every = duration_arg(args.check_every, "--check-every")
    from .guard import guard_run_process

    guard_run_process(BROKER_VARIABLES)  # the server is its child: as `run` does
    mounts = [parse_mount(text) for text in args.mount or []]
    with connect(paths) as client:
        context = client.fetch_context(token, execution_id=execution)
    resolved = resolve_server(server, context)
    unpassable = sorted(k for k, v in resolved.env.items() if "\0" in v)
    if unpassable:
        raise InvalidArgument(f"mcp server {server.name!r}: {', '.join(unpassable)} would "
                              "hold a NUL byte, which no environment can carry")
    patterns, short = context_patterns(context)
    if short:
        warn(f"not masked, shorter than {MIN_SECRET_LENGTH} characters: {', '.join(short)}")
    env = {k: v for k, v in os.environ.items() if k not in BROKER_VARIABLES}
    env.update(resolved.env)
    for mount in mounts:
        open_mount(mount, context.as_env())
    argv = substitute([resolved.command, *resolved.args], mounts)

    def alive() -> bool:
        try:
            with connect(paths) as again:
                again.fetch_context(token, execution_id=execution)
        except (Unauthenticated, NotFound, PermissionDenied):
            return False  # refused: the context is gone for this process
        except BrokerError:
            return True  # no answer is not a refusal: ask again at the next check
        return True

    try:
        status, ended = relay(argv, env, patterns, pass_fds=tuple(m.fd for m in mounts),
                              alive=alive, check_every=check_every,
                              expires_at=context.expires_at)
    except OSError as exc:
        error(f"mcp server {server.name!r}: cannot run {argv[0]}: {exc.strerror}")
        return 127 if isinstance(exc, FileNotFoundError) else 126
    finally:
        from .mounts import empty_mount

        for mount in mounts:
            empty_mount(mount)  # a process the server left behind reads nothing
    if ended:
        error(f"mcp server {server.name!r} stopped: the context ended (the broker refused "
              "to fetch it)")
        return EXIT_FAILED
    return status


def cmd_mcp_render(args: argparse.Namespace, paths: Paths) -> int:
    from ..protocol import Variable
    from .mcpconfig import load_config, render_config

    environment = name_arg(args.into, "--into")
    source = os.path.abspath(args.file)
    if args.out != "-" and os.path.abspath(args.out) == source:
        raise UsageError("--out must differ from FILE: FILE keeps the placeholders that "
                         "mcp proxy reads")
    config = load_config(args.file, "FILE")
    proxy_args = ["--config", source, "--socket", str(paths.socket)]
    if args.execution:
        proxy_args += ["--execution", name_arg(args.execution, "--execution")]
    rendered = render_config(config, [*_proxy_command(), "mcp", "proxy"], proxy_args)
    if args.dry_run:
        if args.json:
            print_json({"environment": environment, "dry_run": True,
                        "moves": [vars(m) for m in rendered.moves],
                        "skipped": rendered.skipped})
            return EXIT_OK
        for move in rendered.moves:
            print(f"would move {move.server}: {move.variable} -> {environment}/{move.key} "
                  "(secret)")
        for name in rendered.skipped:
            print(f"would leave {name} as it is (no command: not a stdio server)")
        if not rendered.moves:
            print("no values to move")
        return EXIT_OK
    if rendered.values:
        with connect(paths) as client:
            client.put_environment(environment, {k: Variable(v, is_secret=True)
                                                 for k, v in rendered.values.items()})
    _replace(source, _dump(rendered.placeholders))
    if args.out == "-":
        sys.stdout.write(_dump(rendered.client))
    else:
        _replace(os.path.abspath(args.out), _dump(rendered.client))
    if args.json:
        print_json({"environment": environment, "dry_run": False,
                    "moves": [vars(m) for m in rendered.moves], "skipped": rendered.skipped,
                    "config": source, "out": args.out})
    elif args.out != "-":
        print(f"moved {len(rendered.moves)} value(s) into environment {environment} "
              f"(secrets); {args.file} now holds placeholders; {args.out} starts each server "
              "through stigmer-broker mcp proxy")
    return EXIT_OK


def _proxy_command() -> list[str]:
    """How an MCP client (whose PATH may be short) starts this very install: by an
    absolute path."""
    script = os.path.abspath(sys.argv[0])
    if os.path.basename(script) == PROG:
        return [script]
    return [sys.executable, "-m", "stigmer.broker"]


def _dump(config: object) -> str:
    import json  # here: the parser imports this module for every command

    return json.dumps(config, indent=2, ensure_ascii=False) + "\n"


def _replace(path: str, text: str) -> None:
    """Write ``path`` whole or not at all, keeping its mode (0600 for a new file)."""
    try:
        mode = os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        mode = 0o600
    temporary = f"{path}.{os.getpid()}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
