"""The environment commands: env set/show/list/unset/delete, their history (env history,
show --version, diff, rollback), and apply."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from ..protocol.messages import SECRET_MASK
from .common import EXIT_OK, UsageError, check_broker, connect, count_arg, name_arg, var_arg
from .inputs import collect_variables, confirm, read_text, warn_unpassable
from .render import plural, print_json, print_json_array, printable, when

if TYPE_CHECKING:
    import argparse

    from ..config import Paths
    from ..protocol import EnvironmentChange, EnvironmentVersionInfo, VariableView

__all__ = ["cmd_apply", "cmd_env_delete", "cmd_env_diff", "cmd_env_history", "cmd_env_list",
           "cmd_env_rollback", "cmd_env_set", "cmd_env_show", "cmd_env_unset"]

#: the largest version number a command line may name
_MAX_VERSION = 2**63 - 1


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
    if args.version is not None:
        return _show_version(args, paths, name, _version_arg(args.version, "--version"))
    with connect(paths) as client:
        env = client.get_environment(name, reveal=args.reveal)
    if args.json:
        print_json({"name": env.name, "created_at": env.created_at,
                     "updated_at": env.updated_at,
                     "data": {k: {"value": v.value, "is_secret": v.is_secret}
                              for k, v in env.data.items()}})
        return EXIT_OK
    print(f"environment {env.name} ({plural(len(env.data), 'variable')})")
    _print_variables(env.data)
    return EXIT_OK


def _print_variables(data: dict[str, VariableView]) -> None:
    width = max((len(k) for k in data), default=0)
    for key, var in data.items():
        shown = SECRET_MASK if var.value is None else printable(var.value)
        marker = "  (secret)" if var.is_secret else ""
        print(f"  {key:<{width}}  {shown}{marker}")


def _show_version(args: argparse.Namespace, paths: Paths, name: str, version: int) -> int:
    with connect(paths) as client:
        reply = client.get_environment_version(name, version, reveal=args.reveal)
    if args.json:
        print_json({"name": reply.name, **_version_json(reply.info),
                    "data": {k: {"value": v.value, "is_secret": v.is_secret}
                             for k, v in reply.data.items()}})
        return EXIT_OK
    print(f"environment {reply.name} version {version} ({plural(len(reply.data), 'variable')}; "
          f"{_made(reply.info)})")
    _print_variables(reply.data)
    return EXIT_OK


def cmd_env_history(args: argparse.Namespace, paths: Paths) -> int:

    name = name_arg(args.name, "environment name")
    with connect(paths) as client:
        current, versions = client.environment_history(name)
    if args.json:
        print_json({"name": name, "current": current,
                    "versions": [_version_json(v) for v in versions]})
        return EXIT_OK
    if not versions:
        print(f"environment {name}: no versions kept yet (history starts at its next change)")
        return EXIT_OK
    print(f"environment {name}: version {current} now, {plural(len(versions), 'version')} kept")
    for info in versions:
        print(f"  {info.version:>5}  {_made(info)}: {_described(info)}")
    return EXIT_OK


def cmd_env_diff(args: argparse.Namespace, paths: Paths) -> int:

    name = name_arg(args.name, "environment name")
    old = _version_arg(args.from_version, "version A")
    new = _version_arg(args.to_version, "version B")
    with connect(paths) as client:
        keys = client.diff_environment_versions(name, old, new, reveal=args.reveal)
    if args.json:
        print_json({"name": name, "from_version": old, "to_version": new, "keys": [
            {"key": d.key, "change": d.change, "before": _view_json(d.before),
             "after": _view_json(d.after)} for d in keys]})
        return EXIT_OK
    if not keys:
        print(f"environment {name}: versions {old} and {new} hold the same variables")
        return EXIT_OK
    print(f"environment {name}, version {old} to {new}:")
    width = max(len(d.key) for d in keys)
    for d in keys:
        sign = {"added": "+", "removed": "-"}.get(d.change, "~")
        values = ""
        if args.reveal:
            shown = [_shown(v) for v in (d.before, d.after) if v is not None]
            values = "  " + " -> ".join(shown)
        print(f"  {sign} {d.key:<{width}}  {d.change}{values}")
    return EXIT_OK


def cmd_env_rollback(args: argparse.Namespace, paths: Paths) -> int:

    name = name_arg(args.name, "environment name")
    version = _version_arg(args.to, "--to")
    with connect(paths) as client:
        info = client.rollback_environment(name, version)
    if args.json:
        print_json({"name": name, **_version_json(info)})
        return EXIT_OK
    print(f"environment {name}: rolled back to version {version}, now version {info.version} "
          f"({_described(info)})")
    return EXIT_OK


def _version_arg(text: str, what: str) -> int:
    """A version number given on the command line."""
    return count_arg(text, what, 1, _MAX_VERSION) or 1  # never None: text is given


def _version_json(info: EnvironmentVersionInfo) -> dict[str, object]:
    return {"version": info.version, "created_at": info.created_at,
            "actor_uid": info.actor_uid, "added": info.added, "changed": info.changed,
            "removed": info.removed, "restored_from": info.restored_from}


def _view_json(view: VariableView | None) -> dict[str, object] | None:
    return None if view is None else {"value": view.value, "is_secret": view.is_secret}


def _shown(view: VariableView) -> str:
    return SECRET_MASK if view.value is None else printable(view.value)


def _made(info: EnvironmentVersionInfo) -> str:
    """``2026-12-02 10:00:00 by uid 1000``."""
    who = "from before history" if info.actor_uid is None else f"by uid {info.actor_uid}"
    return f"{when(info.created_at)} {who}"


def _described(info: EnvironmentVersionInfo) -> str:
    """``rollback to 2: added A; changed B`` (names only)."""
    parts = [f"{verb} {', '.join(keys)}" for verb, keys in
             (("added", info.added), ("changed", info.changed), ("removed", info.removed))
             if keys]
    text = "; ".join(parts) or "no change"
    return f"rollback to {info.restored_from}: {text}" if info.restored_from else text


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

