"""Shell integration: `context export` for eval, quoted so that no value breaks out."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli_env, run_cli

from stigmer.broker.config import Paths
from stigmer.broker.manifests import read_env_file
from stigmer.client import Client, variables

HOSTILE = {
    "QUOTES": "it's \"quoted\" 'twice'",
    "SUBST": "$(touch /tmp/stigmer-pwned) `id` ${HOME} $HOME",
    "NEWLINES": "line one\nline two\n\nexport EVIL=1\n",
    "BACKSLASH": "C:\\path\\to\\ \\' \\\\ end\\",
    "SEMICOLON": "a; rm -rf / #; echo done & | > <",
    "UNICODE": "ünïcødé ✓ \t tab",
    "EMPTY": "",
}
DUMP = f"{sys.executable} -c 'import json, os; print(json.dumps(dict(os.environ)))'"


@pytest.fixture
def exported(cli_broker: Paths) -> tuple[Paths, str]:
    """A context holding every hostile value (as secrets), and its token."""
    with Client(cli_broker.socket) as client:
        token = client.create_context("hostile", runtime=variables({}, HOSTILE)).token
    return cli_broker, token


def _export(paths: Paths, token: str, fmt: str) -> subprocess.CompletedProcess[str]:
    return run_cli(paths, "context", "export", "--format", fmt, "--token", token)


def _environ_after(shell: list[str], script: str) -> dict[str, str]:
    out = subprocess.run([*shell, script], capture_output=True, text=True, timeout=60,
                         check=True)
    environ: dict[str, str] = json.loads(out.stdout)
    return environ


@pytest.mark.parametrize("shell", ["sh", "bash", "fish"])
def test_eval_gives_every_hostile_value_back_exactly(exported: tuple[Paths, str],
                                                      shell: str, short_dir: Path) -> None:
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed")
    paths, token = exported
    result = _export(paths, token, "fish" if shell == "fish" else "sh")
    assert result.returncode == 0, result.stderr
    assert "will be in the shell's environment" in result.stderr
    script_file = short_dir / "exported"
    script_file.write_text(result.stdout)
    marker = Path("/tmp/stigmer-pwned")
    marker.unlink(missing_ok=True)
    if shell == "fish":
        environ = _environ_after(["fish", "-c"], f"source {script_file}; {DUMP}")
    else:
        environ = _environ_after([shell, "-c"], f'eval "$(cat {script_file})"; {DUMP}')
    assert {k: environ.get(k) for k in HOSTILE} == HOSTILE
    assert "EVIL" not in environ and not marker.exists()


def test_dotenv_and_json_round_trip(exported: tuple[Paths, str], short_dir: Path) -> None:
    paths, token = exported
    dotenv = _export(paths, token, "dotenv")
    assert dotenv.returncode == 0, dotenv.stderr
    file = short_dir / "x.env"
    file.write_text(dotenv.stdout)
    assert read_env_file(str(file)) == HOSTILE
    as_json = _export(paths, token, "json")
    assert json.loads(as_json.stdout) == HOSTILE


def test_a_nul_is_refused_by_name_except_in_json(cli_broker: Paths) -> None:
    with Client(cli_broker.socket) as client:
        token = client.create_context("nul", runtime=variables({"OK": "1"},
                                                                {"BAD": "a\0b"})).token
    result = run_cli(cli_broker, "context", "export", "--token", token)
    assert result.returncode == 1 and "BAD contain(s) a NUL byte" in result.stderr
    assert result.stdout == ""  # nothing half-printed
    as_json = run_cli(cli_broker, "context", "export", "--format", "json", "--token", token)
    assert json.loads(as_json.stdout) == {"OK": "1", "BAD": "a\0b"}


def test_export_follows_the_token_and_execution_id_rules(cli_broker: Paths) -> None:
    result = run_cli(cli_broker, "context", "export")
    assert result.returncode == 2 and "--token" in result.stderr
    env = cli_env(cli_broker, STIGMER_EXECUTION_TOKEN="stg_not-a-token")
    result = run_cli(cli_broker, "context", "export", env=env)
    assert result.returncode == 1 and "not valid" in result.stderr and result.stdout == ""
    with Client(cli_broker.socket) as client:
        client.create_context("mine", runtime=variables({"A": "1"}), runners=["self"])
    env = cli_env(cli_broker, STIGMER_EXECUTION_ID="mine")
    result = run_cli(cli_broker, "context", "export", env=env)
    assert result.stdout == "export A='1'\n", result.stderr
