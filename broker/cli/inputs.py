"""Input from people: secret prompts, variables from flags and files, text files."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..protocol.errors import InvalidArgument
from .common import UsageError, assignment_arg, var_arg
from .render import warn

if TYPE_CHECKING:
    from ..protocol import Variable

__all__ = ["collect_variables", "confirm", "read_passphrase", "read_secret_value",
           "read_text"]


def read_secret_value(key: str) -> str:
    """Prompt without echo on a terminal; read one line from stdin otherwise."""
    try:
        if sys.stdin.isatty():
            import getpass

            return getpass.getpass(f"{key}: ")
        line = sys.stdin.readline()
    except EOFError:  # Ctrl-D at the prompt
        raise UsageError(f"--secret {key}: no value was entered; nothing was changed") from None
    except UnicodeDecodeError:
        raise UsageError(f"--secret {key}: the value is not UTF-8 text; nothing was changed"
                         ) from None
    if not line:
        raise UsageError(f"--secret {key}: no value on standard input (one line per key)")
    return line.rstrip("\r\n")


class Cancelled(InvalidArgument):
    """The person at the terminal said no (exit 1: nothing was changed)."""


def confirm(question: str, *, yes: bool, command: str) -> None:
    """Ask ``question`` on the terminal before something that cannot be undone; with
    ``--yes`` do not ask. Without a terminal to ask on, refuse unless ``--yes``."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise UsageError(f"{command} cannot be undone: confirm it with --yes (there is no "
                         "terminal to ask on)")
    sys.stderr.write(f"{question} [y/N] ")
    sys.stderr.flush()
    answer = sys.stdin.readline()
    if answer.strip().lower() not in ("y", "yes"):
        raise Cancelled("cancelled: nothing was changed")


def read_passphrase(*, confirm: bool, shortest: int = 0) -> str:
    """A passphrase: asked without echo on a terminal (twice with ``confirm``), or one
    line from stdin for scripts."""
    import getpass

    try:
        if not sys.stdin.isatty():
            line = sys.stdin.readline()
            if not line:
                raise UsageError("no passphrase on standard input")
            passphrase = line.rstrip("\r\n")
        else:
            passphrase = getpass.getpass("passphrase: ")
            if confirm and getpass.getpass("passphrase again: ") != passphrase:
                raise UsageError("the passphrases differ; nothing was written")
    except EOFError:
        raise UsageError("no passphrase was entered; nothing was written") from None
    except UnicodeDecodeError:
        raise UsageError("the passphrase is not UTF-8 text") from None
    if len(passphrase) < shortest:
        raise UsageError(f"the passphrase is shorter than {shortest} characters; a longer "
                         "one (several words) resists guessing")
    return passphrase


def collect_variables(pairs: Sequence[str], secrets: Sequence[str], env_file: str | None,
                      *, pair_flag: str = "KEY=VALUE",
                      before_prompt: Callable[[], None] = lambda: None) -> dict[str, Variable]:
    """Merge --env-file (secret), KEY=VALUE pairs and --secret flags into wire variables.

    The command line wins over the file; a key given twice on the command line is
    a usage error. Values from --env-file are stored as secrets. Every argument is
    checked before anything is read from the user, and ``before_prompt`` runs once
    before the first secret is read (the CLI checks that the broker answers).
    """
    from ..manifests import read_env_file
    from ..protocol import Variable

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
        add(*assignment_arg(text, pair_flag), secret=False)
    inline_secret = False
    prompted: list[str] = []
    for text in secrets:
        if "=" in text:
            inline_secret = True
            add(*assignment_arg(text, "--secret"), secret=True)
        else:
            key = var_arg(text, "--secret")
            if key in given or key in prompted:
                raise UsageError(f"{key} is given twice on the command line")
            prompted.append(key)
    if prompted:
        before_prompt()
    for key in prompted:
        add(key, read_secret_value(key), secret=True)
    if inline_secret:
        warn("a secret given as --secret KEY=VALUE is visible to other processes and kept in "
             "shell history; prefer --secret KEY (prompt or stdin) or --env-file")
    return out


def read_text(path: str, flag: str) -> str:
    """Return a UTF-8 file's text; raise InvalidArgument naming the flag when it cannot."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise InvalidArgument(f"{flag} {path}: cannot be read ({reason})") from None

