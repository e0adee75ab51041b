"""Generate the blocking client from the async one (``make unasync``), or check it is
current (``--check``, run by ``make lint`` and by the test suite).

``client/_async/client.py`` is the only hand-written definition of the client
API; unasync (the python-trio tool httpcore's approach is based on) removes
``async``/``await`` and renames the few names that differ.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import unasync
from generated import write_or_check

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "client" / "_async" / "client.py"
TARGET = ROOT / "client" / "_sync" / "client.py"
HEADER = "# Generated from client/_async/client.py by `make unasync`: do not edit.\n"
REPLACEMENTS = {"AsyncClient": "Client", "aclose": "close"}


def generate() -> str:
    """Return the text the blocking client must have."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "_async" / "client.py"
        src.parent.mkdir()
        shutil.copy(SOURCE, src)
        unasync.unasync_files([str(src)], [unasync.Rule(
            "/_async/", "/_sync/", additional_replacements=REPLACEMENTS)])
        return HEADER + (Path(tmp) / "_sync" / "client.py").read_text()


def main(argv: list[str]) -> int:
    return write_or_check(TARGET, generate(), argv, remake="make unasync")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
