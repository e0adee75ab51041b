"""The README's fleet recipes run as written against a real PostgreSQL: the key it says
to generate starts a broker, and the teardown block leaves no schema and no role."""

from __future__ import annotations

import re
import secrets
import subprocess
import sys
from pathlib import Path

from conftest import cli_env, run_cli
from postgres import Server, psql

from stigmer.broker.config import Paths

README = Path(__file__).resolve().parents[2] / "README.md"


def _fleet_section() -> str:
    text = README.read_text()
    return text[text.index("\n## A fleet"):text.index("\n## Using it from a runner")]


def test_the_key_recipe_makes_a_key_a_broker_takes(paths: Paths) -> None:
    line = next(line for line in _fleet_section().splitlines()
                if line.startswith("python3 -c ") and "urandom(32)" in line)
    key = subprocess.run(["sh", "-c", line.replace("python3", sys.executable, 1)],
                         capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    started = run_cli(paths, "start", env=cli_env(paths, STIGMER_ENCRYPTION_KEY=key))
    try:
        assert started.returncode == 0, started.stderr
        status = run_cli(paths, "status", env=cli_env(paths, STIGMER_ENCRYPTION_KEY=key))
        assert "env (STIGMER_ENCRYPTION_KEY)" in status.stdout
    finally:
        run_cli(paths, "stop")


def test_the_teardown_block_removes_the_schema_and_both_roles(paths: Paths,
                                                              postgres: Server) -> None:
    suffix = secrets.token_hex(4)
    schema, control, runner = f"fd_{suffix}", f"fd_control_{suffix}", f"fd_runner_{suffix}"
    run_cli(paths, "fleet", "init", "--store", postgres.url(), "--schema", schema,
            "--control-role", control, "--runner-role", runner, check=True)
    block = re.search(r"\*\*Taking a fleet down\.\*\*.*?```sh\n(.*?)```", _fleet_section(),
                      re.S)
    assert block is not None
    commands = re.findall(r"-c '([^']*)'", block.group(1))
    assert commands, block.group(1)
    try:
        for command in commands:  # as the README runs them, with this test's names
            sql = (command.replace("stigmer_control", control)
                   .replace("stigmer_runner", runner).replace("stigmer", schema))
            psql(postgres.url(), sql)
        left = subprocess.run(
            ["psql", "-X", "-A", "-t", "-d", postgres.url(), "-c",
             f"SELECT rolname FROM pg_roles WHERE rolname IN ('{control}', '{runner}') "
             f"UNION ALL SELECT nspname FROM pg_namespace WHERE nspname = '{schema}'"],
            capture_output=True, text=True, check=True, timeout=60).stdout.split()
        assert left == []
    finally:
        postgres.drop_schema(schema)
        for role in (control, runner):
            psql(postgres.url(), f"DROP OWNED BY {role} CASCADE; DROP ROLE IF EXISTS {role}",
                 check=False)
