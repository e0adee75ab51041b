"""The README's walkthrough runs as written: its shell blocks, verbatim and in order, in
a scratch directory, as a new user pastes them (so the text cannot drift from the tool)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from stigmer.broker.config import Paths

README = Path(__file__).resolve().parents[2] / "README.md"


def walkthrough_blocks() -> list[str]:
    """The ```sh blocks of the Walkthrough section, but the first (which activates the
    virtualenv and makes the scratch directory: the test does both itself)."""
    text = README.read_text()
    section = text[text.index("\n## Walkthrough\n"):text.index("\n## Commands\n")]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    assert blocks[0].startswith("source .venv/bin/activate"), blocks[0]
    return blocks[1:]


def test_the_walkthrough_runs_as_written(paths: Paths, short_dir: Path) -> None:
    scratch = short_dir / "scratch"
    scratch.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STIGMER_")}
    env.update(PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}",
               STIGMER_HOME=str(paths.home), STIGMER_BROKER_SOCKET=str(paths.socket),
               PYTHON_KEYRING_BACKEND="keyring.backends.fail.Keyring")
    script = "set -euo pipefail\n" + "\n".join(walkthrough_blocks())
    try:
        result = subprocess.run(["bash", "-c", script], cwd=scratch, env=env,
                                stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=240)
    finally:
        subprocess.run([sys.executable, "-m", "stigmer.broker", "stop"], env=env,
                       capture_output=True, timeout=60)
    out = result.stdout
    assert result.returncode == 0, f"{result.stderr}\n--- stdout:\n{out}"
    assert "Traceback" not in result.stderr
    assert "large debug\n" in out  # runtime > environment > spec default
    assert "refused (exit 1)\n" in out  # the token is revoked with its context
    assert re.search(r"audit chain intact \(\d+ records", out)
    after_restart = out[out.rindex("environment prod"):]
    assert "GITHUB_TOKEN  ghp_example" in after_restart, after_restart
    assert "no file there holds it\n" in out
    assert sorted(p.name for p in scratch.iterdir()) == [".env", "agent.yaml", "prod.yaml"]
