"""Variables written for a shell to ``eval``, quoted so that no value can break out.

Each format quotes with the one construct of its language that takes every
character literally except a few, escaped here: POSIX sh single quotes (a
quote is closed, escaped and reopened: ``'\\''``), fish single quotes (``\\'``
and ``\\\\``), and the single quotes of python-dotenv (the same two). NUL
cannot be carried by any of them, nor by an environment: such a value is
refused, naming its key.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from ..protocol.errors import InvalidArgument

__all__ = ["FORMATS", "render"]

FORMATS = ("sh", "fish", "json", "dotenv")


def render(variables: Mapping[str, str], fmt: str) -> str:
    """The text that sets ``variables`` in format ``fmt`` (keys are valid names)."""
    if fmt == "json":
        return json.dumps(dict(variables), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    refused = sorted(k for k, v in variables.items() if "\0" in v)
    if refused:
        raise InvalidArgument(f"{', '.join(refused)} contain(s) a NUL byte, which no shell "
                              "or environment can carry; use --format json")
    template, quote = {"sh": ("export {}={}", _sh), "fish": ("set -gx {} {}", _fish),
                       "dotenv": ("{}={}", _fish)}[fmt]
    return "".join(template.format(k, quote(v)) + "\n" for k, v in sorted(variables.items()))


def _sh(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


def _fish(value: str) -> str:
    """Single quotes in which only \\' and \\\\ are escapes (fish, and python-dotenv)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
