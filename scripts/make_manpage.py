"""Generate the man page from the CLI's argparse definitions (``make man``), or check that
the shipped one is current (``--check``, run by the test suite).

``broker/cli/stigmer-broker.1`` ships in the package; ``stigmer-broker help --man``
prints it. argparse-manpage (a test dependency) writes it, so the page says exactly
what ``--help`` says; the sections argparse cannot describe (exit status, environment,
files) come from ``manpage.include`` beside this script.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from argparse_manpage.manpage import Manpage
from generated import write_or_check

from stigmer.broker import __version__
from stigmer.broker.cli.parser import build_parser

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "broker" / "cli" / "stigmer-broker.1"
#: the sections argparse does not describe: exit status, environment, files
SECTIONS = Path(__file__).resolve().parent / "manpage.include"


def generate() -> str:
    """The man page the CLI's parser describes (no date, and argparse's wrapping at a fixed
    width: the output is reproducible)."""
    os.environ["COLUMNS"] = "80"
    data = {"project_name": "stigmer-broker", "version": __version__,
            "date": f"version {__version__}", "manual_title": "stigmer-broker manual",
            "manual_section": "1",
            "description": "the local secret broker for agent runners",
            "include": str(SECTIONS)}
    return str(Manpage(build_parser(), _data=data))


def main(argv: list[str]) -> int:
    return write_or_check(TARGET, generate(), argv, remake="make man")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
