"""The environment commands: env set/show/list/unset/delete, and apply."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from ..protocol.messages import SECRET_MASK
from .common import EXIT_OK, UsageError, check_broker, connect, name_arg, var_arg
from .inputs import collect_variables, confirm, read_text, warn_unpassable
from .render import plural, print_json, print_json_array, printable

if TYPE_CHECKING:
    import argparse

    from ..config import Paths
    from ..protocol import EnvironmentChange

__all__ = ["cmd_apply", "cmd_env_delete", "cmd_env_list", "cmd_env_set", "cmd_env_show",
           "cmd_env_unset"]


def cmd_env_set(args: argparse.Namespace, paths: Paths) -> int:

    name = name_arg(args.name, "environment name")
    data = collect_variables(args.pairs, args.secret or [], args.env_file,
                             before_prompt=lambda: check_broker(paths))
    if not data:
        raise UsageError("nothing to set: give KEY=VALUE, --secret KEY or --env-file FILE")
    with connect(paths) as client:
        env = client.put_environment(name, data)
    secret_count = sum(1 for v in data.values() if v.is_secret)
    if args.json:
        print_json({"name": env.name, "set": sorted(data), "secrets": secret_count,
                    "variables": len(env.data)})
        return EXIT_OK
    print(f"environment {env.name}: set {plural(len(data), 'variable')} ({secret_count} secret), "
          f"{len(env.data)} in all")
    return EXIT_OK


def cmd_env_show(args: argparse.Namespace, paths: Paths) -> int:

    name = name_arg(args.name, "environment name")
    with connect(paths) as client:
        env = client.get_environment(name, reveal=args.reveal)
    if args.json:
        print_json({"name": env.name, "created_at": env.created_at,
                     "updated_at": env.updated_at,
                     "data": {k: {"value": v.value, "is_secret": v.is_secret}
                              for k, v in env.data.items()}})
        return EXIT_OK
    print(f"environment {env.name} ({plural(len(env.data), 'variable')})")
    width = max((len(k) for k in env.data), default=0)
    for key, var in env.data.items():
        shown = SECRET_MASK if var.value is None else printable(var.value)
        marker = "  (secret)" if var.is_secret else ""
        print(f"  {key:<{width}}  {shown}{marker}")
    return EXIT_OK


def cmd_env_list(args: argparse.Namespace, paths: Paths) -> int:
    with connect(paths) as client:  # printed page by page, as the pages arrive
        envs = client.iter_environments()
        if args.json:
            print_json_array({"name": e.name, "variables": e.variables, "secrets": e.secrets,
                              "updated_at": e.updated_at} for e in envs)
            return EXIT_OK
        shown = 0
        for e in envs:
            print(f"{e.name:<24}  {plural(e.variables, 'variable')}, {e.secrets} secret")
            shown += 1
    if not shown:
        print("no environments (create one with `stigmer-broker env set NAME KEY=VALUE`)")
    return EXIT_OK


def cmd_env_unset(args: argparse.Namespace, paths: Paths) -> int:

    keys = [var_arg(k) for k in args.keys]
    name = name_arg(args.name, "environment name")
    with connect(paths) as client:
        env = client.unset_variables(name, keys)
    if args.json:
        print_json({"name": env.name, "removed": sorted(set(keys)), "variables": len(env.data)})
        return EXIT_OK
    print(f"environment {env.name}: removed {plural(len(keys), 'variable')}, {len(env.data)} left")
    return EXIT_OK


def cmd_env_delete(args: argparse.Namespace, paths: Paths) -> int:

    name = name_arg(args.name, "environment name")
    with connect(paths) as client:
        variables = len(client.get_environment(name).data)  # NotFound before asking
        confirm(f"delete environment {name} and its {plural(variables, 'variable')}?", yes=args.yes,
                command="env delete")
        client.delete_environment(name)
    if args.json:
        print_json({"name": name, "deleted": True})
        return EXIT_OK
    print(f"environment {args.name} deleted")
    return EXIT_OK


def cmd_apply(args: argparse.Namespace, paths: Paths) -> int:
    from ..manifests import read_environment_manifests

    if args.file == "-":
        text, source = sys.stdin.read(), "<stdin>"
    else:
        text, source = read_text(args.file, "-f"), args.file
    specs = read_environment_manifests(text, source)
    for spec in specs:
        warn_unpassable(spec.data)
    with connect(paths) as client:
        changes = client.apply_environments(specs, dry_run=args.dry_run)
    if args.json:
        print_json({"dry_run": args.dry_run, "changes": [
            {"name": c.name, "created": c.created, "added": c.added, "changed": c.changed,
             "removed": c.removed} for c in changes]})
        return EXIT_OK
    for change in changes:
        print(f"environment/{change.name}: {describe_change(change)}")
    if args.dry_run:
        print("dry run: nothing was changed")
    return EXIT_OK


def describe_change(change: EnvironmentChange) -> str:
    """``created: added A, B`` or ``added A; changed B; removed C`` or ``unchanged``."""
    parts = [f"{verb} {', '.join(keys)}" for verb, keys in
             (("added", change.added), ("changed", change.changed),
              ("removed", change.removed)) if keys]
    if change.created:
        return "created" + (f": {'; '.join(parts)}" if parts else " (empty)")
    return "; ".join(parts) or "unchanged"

