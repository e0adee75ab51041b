"""The execution-context commands: context create/token/show/list/complete/release, run."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from ..protocol.errors import InvalidArgument, NotFound
from .common import (
    BROKER_VARIABLES,
    EXIT_OK,
    UsageError,
    check_broker,
    connect,
    count_arg,
    credential_arg,
    duration_arg,
    name_arg,
    runner_arg,
)
from .inputs import collect_variables, confirm, read_text
from .maskforms import MIN_SECRET_LENGTH, context_patterns
from .render import error, key_json, plural, print_json, print_json_array, warn, when

if TYPE_CHECKING:
    import argparse

    from ..config import Paths

#: set to 1, `run` execs the command as it is, its output unmasked (as --no-masking)
NO_MASKING_VARIABLE = "STIGMER_RUN_NO_MASKING"
#: the most fetches one token may allow (the protocol's bound)
MAX_USES = 2**31

__all__ = ["cmd_context_complete", "cmd_context_create", "cmd_context_export", "cmd_context_list",
           "cmd_context_release", "cmd_context_show", "cmd_context_token", "cmd_run"]


def cmd_context_create(args: argparse.Namespace, paths: Paths) -> int:
    from ..manifests import read_env_spec

    execution_id = name_arg(args.execution_id, "execution id")
    environments = [name_arg(e, "--environment") for e in args.environment or []]
    spec = read_env_spec(read_text(args.spec, "--spec"), args.spec) if args.spec else {}
    ttl = duration_arg(args.ttl, "--ttl")
    token_ttl = duration_arg(args.token_ttl, "--token-ttl")
    max_uses = count_arg(args.max_uses, "--max-uses", 1, MAX_USES)
    runners = [runner_arg(r) for r in args.runner or []]
    if args.with_token and not runners:
        raise UsageError("--with-token goes with --runner (without it a token is issued)")
    runtime = collect_variables(args.env or [], args.secret or [], args.env_file,
                                pair_flag="--env", before_prompt=lambda: check_broker(paths))
    with connect(paths) as client:
        created = client.create_context(execution_id, env_spec=spec, environments=environments,
                                        runtime=runtime, ttl_s=ttl, token_ttl_s=token_ttl,
                                        max_uses=max_uses, runners=runners,
                                        token=True if args.with_token else None)
    if args.json:
        print_json({"execution_id": created.execution_id, "token": created.token or None,
                     "token_id": created.token_id or None, "expires_at": created.expires_at,
                     "token_expires_at": created.token_expires_at if created.token else None,
                     "keys": [key_json(k) for k in created.keys], "runners": created.runners})
    elif created.token:
        print(created.token)
    else:
        print(f"context {created.execution_id} is open to runners "
              f"{' | '.join(created.runners)} (no token)")
    return EXIT_OK


def cmd_context_token(args: argparse.Namespace, paths: Paths) -> int:

    execution_id = name_arg(args.execution_id, "execution id")
    ttl = duration_arg(args.ttl, "--ttl")
    max_uses = count_arg(args.max_uses, "--max-uses", 1, MAX_USES)
    with connect(paths) as client:
        issued = client.issue_token(execution_id, ttl_s=ttl, max_uses=max_uses)
    if args.json:
        print_json({"execution_id": issued.execution_id, "token": issued.token,
                    "token_id": issued.token_id, "expires_at": issued.expires_at,
                    "max_uses": max_uses})
        return EXIT_OK
    print(issued.token)
    return EXIT_OK


def cmd_context_show(args: argparse.Namespace, paths: Paths) -> int:

    execution_id = name_arg(args.execution_id, "execution id")
    with connect(paths) as client:
        info = client.get_context(execution_id)
    if args.json:
        print_json({"execution_id": info.execution_id, "created_at": info.created_at,
                     "expires_at": info.expires_at, "keys": [key_json(k) for k in info.keys],
                     "tokens": [{"token_id": t.token_id, "created_at": t.created_at,
                                 "expires_at": t.expires_at, "uses": t.uses,
                                 "uses_left": None if t.max_uses is None
                                 else max(t.max_uses - t.uses, 0)} for t in info.tokens],
                     "runners": info.runners, "runner_uses": info.runner_uses,
                     "environments": [{"name": e.name, "version": e.version}
                                      for e in info.environments]})
        return EXIT_OK
    print(f"context {info.execution_id} (expires {when(info.expires_at)})")
    if info.environments:
        print("merged " + ", ".join(f"environment {e.name} version {e.version}"
                                    for e in info.environments))
    width = max((len(k.key) for k in info.keys), default=0)
    for k in info.keys:
        print(f"  {k.key:<{width}}  {'secret' if k.is_secret else 'plain ':<6}  from {k.source}")
    print(f"tokens ({len(info.tokens)} live):")
    for t in info.tokens:
        left = "unlimited" if t.max_uses is None else f"{max(t.max_uses - t.uses, 0)} uses left"
        print(f"  {t.token_id}  expires {when(t.expires_at)}, used {t.uses}, {left}")
    if info.runners:
        fetched = plural(info.runner_uses, "time")
        print(f"runners (any of these, by execution id; fetched {fetched}):")
        for selector in info.runners:
            print(f"  {selector}")
    return EXIT_OK


def cmd_context_list(args: argparse.Namespace, paths: Paths) -> int:
    with connect(paths) as client:  # printed page by page, as the pages arrive
        contexts = client.iter_contexts()
        if args.json:
            print_json_array({"execution_id": c.execution_id, "created_at": c.created_at,
                              "expires_at": c.expires_at, "keys": c.keys,
                              "secrets": c.secrets, "tokens": c.tokens} for c in contexts)
            return EXIT_OK
        shown = 0
        for c in contexts:
            print(f"{c.execution_id}  {plural(c.keys, 'key')} ({c.secrets} secret), "
                  f"{plural(c.tokens, 'token')}, "
                  f"expires {when(c.expires_at)}")
            shown += 1
    if not shown:
        print("no live contexts")
    return EXIT_OK


def cmd_context_complete(args: argparse.Namespace, paths: Paths) -> int:

    execution_id = name_arg(args.execution_id, "execution id")
    with connect(paths) as client:
        try:
            info = client.get_context(execution_id)
        except NotFound:
            info = None  # complete says so (or removes a context that fails its check)
        if info is not None and (info.tokens or info.runners):
            confirm(f"complete {execution_id}: delete it and revoke its {len(info.tokens)} "
                    f"live token(s){' and runner grant' if info.runners else ''}?",
                    yes=args.yes, command="context complete")
        client.complete_context(execution_id)
    if args.json:
        print_json({"execution_id": execution_id, "completed": True})
        return EXIT_OK
    print(f"context {args.execution_id} completed; its tokens are revoked")
    return EXIT_OK


def cmd_context_release(args: argparse.Namespace, paths: Paths) -> int:
    token, execution = credential_arg(args.token, args.execution)
    with connect(paths) as client:
        client.release_context(token, execution_id=execution)
    if args.json:
        print_json({"released": True, "execution_id": execution})
        return EXIT_OK
    print("context released; its tokens are revoked")
    return EXIT_OK


def cmd_context_export(args: argparse.Namespace, paths: Paths) -> int:
    """Print the context for ``eval`` (or a .env file, or JSON); values are quoted."""
    from .shellquote import render

    token, execution = credential_arg(args.token, args.execution)
    with connect(paths) as client:
        context = client.fetch_context(token, execution_id=execution)
    text = render(context.as_env(), args.format)
    warn("the exported values, secrets included, will be in the shell's environment (and "
         "its children's); prefer `stigmer-broker run -- COMMAND`, which scopes them to one "
         "command")
    sys.stdout.write(text)
    return EXIT_OK


def cmd_run(args: argparse.Namespace, paths: Paths) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError("run needs a command: stigmer-broker run [--token T] -- COMMAND [ARGS]")
    token, execution = credential_arg(args.token, args.execution)
    from .guard import guard_run_process

    guard_run_process(BROKER_VARIABLES)  # before the context is in memory
    mounts = []
    if args.mount:
        from .mounts import parse_mount

        mounts = [parse_mount(text) for text in args.mount]
    with connect(paths) as client:
        context = client.fetch_context(token, execution_id=execution)
    env = {k: v for k, v in os.environ.items() if k not in BROKER_VARIABLES}
    env.update(context.as_env())
    unpassable = sorted(k for k, v in context.items() if "\0" in v)
    if unpassable:
        raise InvalidArgument(f"{', '.join(unpassable)} contain(s) a NUL byte, which no "
                              "environment can carry; read them with stigmer.client instead")
    if mounts:
        from .mounts import open_mount, substitute

        for mount in mounts:
            open_mount(mount, context.as_env())
        command = substitute(command, mounts)
    masking = not args.no_masking and os.environ.get(NO_MASKING_VARIABLE, "") != "1"
    secrets, short = context_patterns(context)
    if masking and short:
        warn(f"not masked, shorter than {MIN_SECRET_LENGTH} characters: {', '.join(short)}")
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        if masking and secrets:
            from .child import run_masked

            return run_masked(command, env, secrets)
        if mounts:  # stay the parent, to empty the mounts when the command is done
            from .child import run_waiting

            return run_waiting(command, env)
        os.execvpe(command[0], command, env)  # noqa: S606 - the user's own command
    except FileNotFoundError:
        error(f"command not found: {command[0]}")
        return 127
    except PermissionError:
        error(f"command not executable: {command[0]}")
        return 126
    except OSError as exc:
        error(f"cannot run {command[0]}: {exc.strerror}")
        return 126
    finally:
        if mounts:
            from .mounts import empty_mount

            for mount in mounts:
                empty_mount(mount)

