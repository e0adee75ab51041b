"""``stigmer-broker``: argv -> library calls -> output and an exit status.

A thin layer over :mod:`stigmer.client` and the daemon: this module parses argv
and turns every error into one line and an exit status; the commands live one
module per group (:mod:`.daemon`, :mod:`.environments`, :mod:`.contexts`,
:mod:`.audit`, :mod:`.keys`, :mod:`.service`). The CLI never opens the store
(every write goes through the daemon) but for ``backup`` and ``restore``
(:mod:`.backup`), and imports the daemon's heavy
dependencies only for ``serve``, so ``status`` stays fast.

Exit status: 0 success, 1 the broker refused or failed the request, 2 a usage
mistake, 3 no broker is running (``status``, and client commands).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING, NoReturn, cast

from ..config import resolve_paths
from ..protocol.errors import BrokerError, BrokerUnavailable, UnsafeSocket
from .common import EXIT_FAILED, EXIT_NOT_RUNNING, EXIT_OK, EXIT_USAGE, UsageError
from .daemon import cmd_status
from .render import OutputFailed, error, guard_stdout

if TYPE_CHECKING:
    import argparse

__all__ = ["entry", "main"]


def entry() -> NoReturn:
    """The console script: run, flush, and leave without tearing the interpreter down.

    Module teardown would cost a short command like `status` a tenth of its time;
    nothing of ours needs it (the store is closed, sockets go with the process).
    """
    if sys.argv[1:2] != ["serve"]:
        # as standard CLIs do: `stigmer-broker status | head` ends quietly when head
        # stops reading (the daemon keeps Python's SIG_IGN: a gone client must not kill it)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    guard_stdout()
    try:
        try:
            code = main()
        except SystemExit as exc:  # argparse's --help, --version and usage errors
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
        sys.stdout.flush()
    except OutputFailed as exc:  # `status > /dev/full`, `status >&-`
        error(f"cannot write to standard output: {exc}")
        code = EXIT_FAILED
    except BrokenPipeError:
        code = EXIT_FAILED
    if sys.stderr is not None:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "_ARGCOMPLETE" in os.environ:  # a shell asking for completions (argcomplete)
        from .completion import complete
        from .parser import build_parser

        complete(build_parser())
        return EXIT_OK  # complete() exits when it answered; here only outside completion
    if argv == ["--version"]:  # asked by scripts and package checks: no parser to build
        from .. import __version__

        print(f"stigmer-broker {__version__}")
        return EXIT_OK
    fast = _status_fast_path(argv)
    if fast is not None:
        return fast
    args = run_fast_path(argv)
    if args is None:
        from .parser import build_parser

        parser = build_parser(argv)
        args, extras = parser.parse_known_args(argv)
        if extras:
            # argparse stops filling KEY=VALUE positionals at the first option; take the rest
            if hasattr(args, "pairs") and not any(e.startswith("-") for e in extras):
                args.pairs = [*args.pairs, *extras]
            else:
                _command_parser(parser, getattr(args, "command", [])).error(
                    f"unrecognized arguments: {' '.join(extras)}")
        if not getattr(args, "func", None):
            parser.print_help(sys.stderr)
            return EXIT_USAGE
    try:
        paths = resolve_paths(os.environ, home=getattr(args, "home", None),
                              socket=getattr(args, "socket", None))
        result: int = args.func(args, paths)
        return result
    except UsageError as exc:
        error(str(exc))
        return EXIT_USAGE
    except UnsafeSocket as exc:  # a broker may run, but the socket cannot be trusted
        error(exc.message)
        return EXIT_FAILED
    except BrokerUnavailable as exc:
        error(exc.message)
        return EXIT_NOT_RUNNING
    except BrokerError as exc:
        error(exc.message)
        return EXIT_FAILED
    except KeyboardInterrupt:
        error("interrupted")
        return 130
    except BrokenPipeError:
        return EXIT_FAILED


def _command_parser(parser: argparse.ArgumentParser,
                    words: Sequence[str]) -> argparse.ArgumentParser:
    """The parser of the command ``words`` name (``["env", "show"]``), so that a usage
    mistake is explained by that command's own options."""
    import argparse

    for word in words:
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)),
                   None)
        if sub is None or word not in sub.choices:
            break
        parser = sub.choices[word]
    return parser


def run_fast_path(argv: list[str]) -> argparse.Namespace | None:
    """`run`'s plain forms, parsed without argparse, or None for argparse to parse.

    A runner starts `run` for every tool process, and building argparse (with the
    modules it loads) is a tenth of `run -- true`. Plain: ``run`` first, then only
    ``--no-masking``, ``--token T``, ``--execution ID``, ``--home H``, ``--socket S``
    (each once, as separate words), then ``--`` and the command. The namespace is the
    one argparse makes of them (a test holds the two to each other).
    """
    if argv[:1] != ["run"] or "--" not in argv:
        return None
    cut = argv.index("--")
    if cut == len(argv) - 1:
        return None  # no command: argparse says so
    values: dict[str, str | None] = dict.fromkeys(("home", "socket", "token", "execution"))
    no_masking = False
    rest = argv[1:cut]
    while rest:
        arg = rest.pop(0)
        if arg == "--no-masking" and not no_masking:
            no_masking = True
        elif arg[2:] in values and arg.startswith("--") and values[arg[2:]] is None \
                and rest and not rest[0].startswith("-"):
            values[arg[2:]] = rest.pop(0)
        else:
            return None
    from .contexts import cmd_run

    options = {name: value for name, value in values.items()
               if value is not None or name in ("token", "execution")}
    return cast("argparse.Namespace", SimpleNamespace(
        func=cmd_run, command=argv[cut:], mount=None, no_masking=no_masking, **options))


def _status_fast_path(argv: list[str]) -> int | None:
    """`status` is what people type most: for its plain forms, skip building argparse."""
    if not argv or argv[0] != "status":
        return None
    options: dict[str, str | None] = {"home": None, "socket": None}
    as_json = check = False
    rest = argv[1:]
    while rest:
        arg = rest.pop(0)
        if arg == "--json" and not as_json:
            as_json = True
        elif arg == "--check" and not check:
            check = True
        elif arg in ("--home", "--socket") and rest and options[arg[2:]] is None:
            options[arg[2:]] = rest.pop(0)
        else:
            return None  # anything else: let argparse parse (and explain) it
    args = cast("argparse.Namespace", SimpleNamespace(json=as_json, check=check, **options))
    try:
        return cmd_status(args, resolve_paths(os.environ, home=options["home"],
                                              socket=options["socket"]))
    except BrokerError as exc:
        error(exc.message)
        return EXIT_FAILED

