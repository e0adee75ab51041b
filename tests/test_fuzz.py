"""Runs the atheris harness for a bounded number of inputs, where atheris installs."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parent / "fuzz_protocol.py"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("atheris") is None,
                    reason="atheris is not installed (no wheel for this platform/Python)")
def test_atheris_frame_and_message_fuzzing(short_dir: Path) -> None:
    result = subprocess.run([sys.executable, str(HARNESS), "-runs=200000", "-max_len=4096",
                             f"-artifact_prefix={short_dir}/"], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done 200000 runs" in result.stderr
