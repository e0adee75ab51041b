"""Shell completion through argcomplete: subcommands and flags from the parser, and
environment names and execution ids from the running broker.

argcomplete was chosen over shtab because it serves bash, zsh *and* fish from one
script, and because it completes by asking the program itself: values that only the
running broker knows (environment names, execution ids) can be offered, which a
static script cannot do. Each TAB runs ``stigmer-broker`` once (``_ARGCOMPLETE``
set); when no broker answers within half a second those values are quietly left out.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from ..config import Paths, resolve_paths

if TYPE_CHECKING:
    from stigmer.client import Client

__all__ = ["SHELLS", "complete", "shell_script"]

SHELLS = ("bash", "zsh", "fish")
_ENV_NAMES = {("env", "name"), ("context", "environment"), ("mcp", "into")}
_EXECUTION_IDS = {("context", "execution_id"), ("context", "execution"), ("run", "execution"),
                  ("audit", "execution"), ("mcp", "execution")}


def shell_script(shell: str) -> str:
    """The script that registers completion for ``stigmer-broker`` in ``shell``."""
    from argcomplete.shell_integration import shellcode

    return str(shellcode(["stigmer-broker"], shell=shell))


def complete(parser: argparse.ArgumentParser) -> None:
    """Answer the shell's completion request (argcomplete's protocol); exits."""
    import argcomplete

    _attach(parser, "")
    argcomplete.autocomplete(parser, always_complete_options=False)


def _attach(parser: argparse.ArgumentParser, group: str) -> None:
    for action in parser._actions:  # argparse offers no public walk of its actions
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                _attach(sub, group or name)
            continue
        key = (group, action.dest)
        if key in _ENV_NAMES:
            action.completer = _from_broker(  # type: ignore[attr-defined]
                lambda c: (e.name for e in c.iter_environments()))
        elif key in _EXECUTION_IDS:
            action.completer = _from_broker(  # type: ignore[attr-defined]
                lambda c: (x.execution_id for x in c.iter_contexts()))


def _from_broker(names: Callable[[Client], Iterable[str]]
                 ) -> Callable[..., list[str]]:
    def completer(prefix: str, parsed_args: argparse.Namespace, **_: object) -> list[str]:
        from stigmer.client import BrokerError, Client

        paths: Paths = resolve_paths(os.environ, home=getattr(parsed_args, "home", None),
                                     socket=getattr(parsed_args, "socket", None))
        try:
            with Client(paths.socket, timeout=0.5) as client:
                return [n for n in names(client) if n.startswith(prefix)]
        except (BrokerError, OSError):
            return []  # no broker answering: complete nothing, say nothing

    return completer
