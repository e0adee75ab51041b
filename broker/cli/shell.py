"""The shell-integration commands: completion, and help (with the man page)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from .common import EXIT_OK

if TYPE_CHECKING:
    import argparse

    from ..config import Paths

__all__ = ["cmd_completion", "cmd_help"]


def cmd_completion(args: argparse.Namespace, paths: Paths) -> int:
    """Print the script that registers completion in the given shell."""
    from .completion import shell_script

    sys.stdout.write(shell_script(args.shell))
    return EXIT_OK


def cmd_help(args: argparse.Namespace, paths: Paths) -> int:
    """Print the usage of every command, or with --man the man page (roff, for
    ``stigmer-broker help --man | man -l -``)."""
    if args.man:
        from importlib.resources import files

        sys.stdout.write(files("stigmer.broker.cli").joinpath("stigmer-broker.1").read_text())
        return EXIT_OK
    from .parser import build_parser

    if args.topic:  # `help env set` is `env set --help`
        build_parser(args.topic).parse_args([*args.topic, "--help"])
    build_parser().print_help()
    return EXIT_OK
