"""Input from people: secret prompts, variables from flags and files, text files."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..protocol.errors import InvalidArgument
from .common import UsageError, assignment_arg, var_arg
from .render import warn

if TYPE_CHECKING:
    from ..protocol import Variable

__all__ = ["collect_variables", "confirm", "read_passphrase", "read_secret_value",
           "read_text", "warn_unpassable"]

#: Linux's MAX_ARG_STRLEN: the most one argument or environment string (NAME=value and its
#: NUL) may take
_MAX_ARG_STRLEN = 32 * 4096


def read_secret_value(key: str, *, whole: bool = False) -> str:
    """Prompt without echo on a terminal; otherwise read stdin: all of it with ``whole``
    (one value, a PEM key say; one final line break dropped), else one line. An empty
    value is refused: a secret that is nothing is a mistake."""
    try:
        if sys.stdin.isatty():
            import getpass

            value = getpass.getpass(f"{key}: ")
        else:
            value = sys.stdin.read() if whole else sys.stdin.readline()
            if not value:
                raise UsageError(f"--secret {key}: no value on standard input"
                                 + ("" if whole else " (one line per key)"))
            value = value.removesuffix("\n").removesuffix("\r")
    except EOFError:  # Ctrl-D at the prompt
        raise UsageError(f"--secret {key}: no value was entered; nothing was changed") from None
    except UnicodeDecodeError:
        raise UsageError(f"--secret {key}: the value is not UTF-8 text; nothing was changed"
                         ) from None
    if not value:
        raise UsageError(f"--secret {key}: the value is empty; nothing was changed")
    return value


def _nothing_left(keys: Sequence[str]) -> None:
    """Several keys read from a pipe take one line each: a line left over would be the
    rest of a multi-line value, silently cut. Raises UsageError."""
    if sys.stdin.isatty():
        return
    if sys.stdin.read().strip("\r\n"):
        raise UsageError(f"standard input holds more lines than the {len(keys)} --secret keys "
                         "take (one line each); give a multi-line value (a PEM key) its own "
                         "--secret KEY < FILE, the only key read from stdin; nothing was changed")


def warn_unpassable(data: Mapping[str, Variable]) -> None:
    """Say which values no process environment can hold: Linux caps one environment
    string (NAME=value) at 128 KiB, so `run` could not pass them, though a mount can."""
    large = sorted(k for k, v in data.items()
                   if len(k) + 2 + len(v.value.encode("utf-8", "surrogatepass"))
                   > _MAX_ARG_STRLEN)
    if large:
        warn(f"{', '.join(large)}: over 128 KiB with the name, too large for a process "
             "environment (the kernel's limit per variable): `run` cannot pass it as a "
             "variable; `run --mount PATH=FORMAT` passes the context as a file")


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
        add(key, read_secret_value(key, whole=len(prompted) == 1), secret=True)
    if len(prompted) > 1:
        _nothing_left(prompted)
    if inline_secret:
        warn("a secret given as --secret KEY=VALUE is visible to other processes and kept in "
             "shell history; prefer --secret KEY (prompt or stdin) or --env-file")
    warn_unpassable(out)
    return out


def read_text(path: str, flag: str) -> str:
    """Return a UTF-8 file's text; raise InvalidArgument naming the flag when it cannot."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise InvalidArgument(f"{flag} {path}: cannot be read ({reason})") from None

