"""Runs the atheris harness, where atheris installs: over its corpus (every input that
once broke the decoder), then for a bounded number of fuzzed inputs grown from it."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parent / "fuzz_protocol.py"
CORPUS = Path(__file__).resolve().parent / "fuzz_corpus"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("atheris") is None,
                                reason="atheris is not installed (no wheel for this "
                                       "platform/Python)")


def test_the_corpus_decodes_to_messages_or_one_line_errors(short_dir: Path) -> None:
    inputs = sorted(str(p) for p in CORPUS.iterdir())
    assert any("newline" in p for p in inputs)  # issue 23: a field name with a newline
    result = subprocess.run([sys.executable, str(HARNESS), f"-artifact_prefix={short_dir}/",
                             *inputs], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Executed {inputs[-1]}" in result.stderr


@pytest.mark.slow
def test_atheris_frame_and_message_fuzzing(short_dir: Path) -> None:
    corpus = short_dir / "corpus"  # libFuzzer adds what it finds: not to the checkout
    shutil.copytree(CORPUS, corpus)
    result = subprocess.run([sys.executable, str(HARNESS), "-runs=200000", "-max_len=4096",
                             f"-artifact_prefix={short_dir}/", str(corpus)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done 200000 runs" in result.stderr
