"""The OS-service commands: service install/uninstall (systemd units, launchd plist)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .common import EXIT_OK
from .render import print_json

if TYPE_CHECKING:
    import argparse

    from ..config import Paths

__all__ = ["cmd_service_install", "cmd_service_uninstall"]


def _manager(args: argparse.Namespace) -> str:
    from ..daemon.install import LAUNCHD, SYSTEMD, default_manager

    if args.systemd:
        return SYSTEMD
    if args.launchd:
        return LAUNCHD
    return default_manager()


def cmd_service_install(args: argparse.Namespace, paths: Paths) -> int:
    from ..daemon.install import console_script, enable_hint, install, render

    manager = _manager(args)
    service_files = render(manager, exec_path=console_script(), home=paths.home,
                           user_home=Path.home(),
                           xdg_config_home=os.environ.get("XDG_CONFIG_HOME"))
    if args.print and args.json:
        print_json({"manager": manager,
                    "files": [{"path": str(f.path), "content": f.content} for f in service_files]})
        return EXIT_OK
    if args.print:
        for f in service_files:
            print(f"# {f.path}")
            print(f.content)
        return EXIT_OK
    paths.home.mkdir(mode=0o700, parents=True, exist_ok=True)  # ReadWritePaths= needs it
    install(service_files)
    if args.json:
        print_json({"manager": manager, "files": [str(f.path) for f in service_files],
                    "enable": enable_hint(manager, service_files)})
        return EXIT_OK
    for f in service_files:
        print(f"wrote {f.path}")
    print(f"enable it with:\n  {enable_hint(manager, service_files)}")
    return EXIT_OK


def cmd_service_uninstall(args: argparse.Namespace, paths: Paths) -> int:
    from ..daemon.install import disable_hint, uninstall

    manager = _manager(args)
    removed = uninstall(manager, Path.home(), os.environ.get("XDG_CONFIG_HOME"))
    if args.json:
        print_json({"manager": manager, "removed": [str(p) for p in removed]})
        return EXIT_OK
    for path in removed:
        print(f"removed {path}")
    if not removed:
        print(f"no {manager} files of stigmer-broker were installed")
    else:
        print(f"if it is still loaded, stop it with:\n  {disable_hint(manager, Path.home())}")
    return EXIT_OK

