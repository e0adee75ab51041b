"""Variables written for a shell to ``eval``, quoted so that no value can break out.

Each format quotes with the one construct of its language that takes every
character literally except a few, escaped here: POSIX sh single quotes (a
quote is closed, escaped and reopened: ``'\\''``) and fish single quotes
(``\\'`` and ``\\\\``). NUL cannot be carried by any of them, nor by an
environment: such a value is refused, naming its key.

``dotenv`` is read by more than one reader, and they disagree: ``set -a; .
FILE`` in sh, bash, dash or zsh, python-dotenv (which expands ``${VAR}`` in
every value, quoted or not, and decodes ``\\\\`` and ``\\'`` in single quotes),
and ``docker --env-file`` (which takes the raw text after ``=``, no quoting at
all). So a value goes out bare when every character is one no reader treats
specially (letters, digits, ``_@%+=:,./-``): then all four read it exactly. Any
other value goes in single quotes, which sh and python-dotenv both take
literally as long as the value holds no ``'``, no ``\\``, no ``${`` and no
carriage return (which Python's text files read as a line break); docker
would keep the quotes (use ``run -- docker run -e KEY``, or bare values, there).
A value that holds one of those cannot be written exactly for sh and
python-dotenv alike: it is refused, naming its key (never the value).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

from ..protocol.errors import InvalidArgument

__all__ = ["FORMATS", "render"]

FORMATS = ("sh", "fish", "json", "dotenv")

#: a value every dotenv reader takes as written, without quotes
_DOTENV_BARE = re.compile(r"[A-Za-z0-9_@%+=:,./-]*")
#: what sh and python-dotenv read differently inside single quotes
_DOTENV_UNSAFE = re.compile(r"['\\\r]|\$\{")


def render(variables: Mapping[str, str], fmt: str) -> str:
    """The text that sets ``variables`` in format ``fmt`` (keys are valid names). Raises
    InvalidArgument naming the keys whose values the format cannot carry exactly."""
    if fmt == "json":
        return json.dumps(dict(variables), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    refused = sorted(k for k, v in variables.items() if "\0" in v)
    if refused:
        raise InvalidArgument(f"{', '.join(refused)} contain(s) a NUL byte, which no shell "
                              "or environment can carry; use --format json")
    if fmt == "dotenv":
        refused = sorted(k for k, v in variables.items() if _DOTENV_UNSAFE.search(v))
        if refused:
            raise InvalidArgument(
                f"{', '.join(refused)} contain(s) a single quote, a backslash, a carriage return "
                "or '${{', which "
                "no .env file carries exactly for both sh and python-dotenv; use json (or sh)")
    template, quote = {"sh": ("export {}={}", _sh), "fish": ("set -gx {} {}", _fish),
                       "dotenv": ("{}={}", _dotenv)}[fmt]
    return "".join(template.format(k, quote(v)) + "\n" for k, v in sorted(variables.items()))


def _sh(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


def _fish(value: str) -> str:
    """Single quotes in which only \\' and \\\\ are escapes."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _dotenv(value: str) -> str:
    """Bare when every reader takes it as is, else single quotes (checked safe by render)."""
    return value if _DOTENV_BARE.fullmatch(value) else "'" + value + "'"
