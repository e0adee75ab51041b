"""The README's library examples run as written, against a real broker."""

from __future__ import annotations

import doctest
import re
from pathlib import Path

import pytest
from conftest import run_cli

from stigmer.broker.config import Paths

README = Path(__file__).resolve().parents[2] / "README.md"


def pycon_blocks() -> list[str]:
    return re.findall(r"```pycon\n(.*?)```", README.read_text(), re.S)


def test_the_readme_has_library_examples() -> None:
    assert len(pycon_blocks()) >= 2


def test_the_readme_library_examples_run(cli_broker: Paths,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    run_cli(cli_broker, "env", "set", "models", "MODEL=large", check=True)
    token = run_cli(cli_broker, "context", "create", "exec-42", "--environment", "models",
                    "--secret", "GITHUB_TOKEN", input="ghp_readme_example\n",
                    check=True).stdout.strip()
    monkeypatch.setenv("STIGMER_HOME", str(cli_broker.home))
    monkeypatch.setenv("STIGMER_BROKER_SOCKET", str(cli_broker.socket))
    monkeypatch.setenv("STIGMER_EXECUTION_TOKEN", token)
    parser = doctest.DocTestParser()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    globs: dict[str, object] = {}  # the blocks run in order, as one session
    for n, block in enumerate(pycon_blocks(), start=1):
        test = parser.get_doctest(block, globs, f"README block {n}", str(README), 0)
        runner.run(test, clear_globs=False)
        globs = test.globs  # a DocTest runs in a copy: carry what it defined on
    assert runner.summarize(verbose=False).failed == 0
