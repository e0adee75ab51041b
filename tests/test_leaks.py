"""Sentinel secrets through every way in; afterwards none is anywhere in the clear."""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import pickle
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import cli_env, run_cli

from stigmer.broker.config import Paths
from stigmer.broker.protocol import ContextCreated, FetchContext, TokenIssued, Variable
from stigmer.client import ExecutionContext

# Made at run time, so no source file or editor buffer can hold them.
SENTINELS = {way: f"SENTINEL-{way.lower()}-{secrets.token_hex(8)}"
             for way in ("ARGV", "PROMPT", "FILE", "YAML", "RUNTIME")}


def scan(root: Path, needles: list[str], since: float | None = None) -> list[str]:
    hits = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            try:
                if since is not None and path.lstat().st_mtime < since:
                    continue
                data = path.read_bytes()
            except OSError:
                continue
            hits += [f"{path}: {n}" for n in needles if n.encode() in data]
    return hits


def test_sentinels_never_reach_disk_logs_or_tmp(paths: Paths, short_dir: Path) -> None:
    started = time.time() - 1
    run_cli(paths, "start", check=True)
    try:
        run_cli(paths, "env", "set", "dev", "--secret", f"ARGV={SENTINELS['ARGV']}", check=True)
        run_cli(paths, "env", "set", "dev", "--secret", "PROMPT",
                input=SENTINELS["PROMPT"] + "\n", check=True)
        env_file = short_dir / "in.env"
        env_file.write_text(f"FILE={SENTINELS['FILE']}\n")
        run_cli(paths, "env", "set", "dev", "--env-file", str(env_file), check=True)
        env_file.unlink()
        manifest = short_dir / "in.yaml"
        manifest.write_text(
            "apiVersion: ai.stigmer.agentic/v1\nkind: Environment\nmetadata: {name: prod}\n"
            f"spec: {{data: {{YAML: {{value: {SENTINELS['YAML']}, is_secret: true}}}}}}\n")
        run_cli(paths, "apply", "-f", str(manifest), check=True)
        manifest.unlink()
        shown = run_cli(paths, "env", "show", "dev", "--reveal", "--json", check=True).stdout
        assert all(SENTINELS[k] in shown for k in ("ARGV", "PROMPT", "FILE"))
        # error paths must not echo values either
        for args in (["env", "set", "bad name", "--secret", f"X={SENTINELS['ARGV']}"],
                     ["env", "unset", "dev", "NOPE"], ["env", "show", "nope"]):
            r = run_cli(paths, *args)
            assert not any(s in r.stderr + r.stdout for s in SENTINELS.values())
        token = run_cli(paths, "context", "create", "exec-1", "--environment", "dev",
                        "--secret", "RUNTIME", input=SENTINELS["RUNTIME"] + "\n",
                        check=True).stdout.strip()
        second = run_cli(paths, "context", "token", "exec-1", check=True).stdout.strip()
        tokens = [token, second]
        ran = run_cli(paths, "run", "--no-masking", "--token", token, "--", "sh", "-c",
                      "echo $RUNTIME")
        assert ran.stdout.strip() == SENTINELS["RUNTIME"]
        for bad in (token[:-2] + "xx", "stg_nope"):
            assert run_cli(paths, "run", "--token", bad, "--", "true").returncode == 1
        for args in (["context", "show", "exec-1", "--json"], ["context", "list"], ["audit"],
                     ["audit", "--json"], ["status", "--json"]):
            out = run_cli(paths, *args, check=True).stdout
            assert not any(t in out for t in [*tokens, *SENTINELS.values()]), args
        run_cli(paths, "key", "rotate", "--yes", check=True)
        run_cli(paths, "context", "complete", "exec-1", "--yes", check=True)
        run_cli(paths, "env", "delete", "prod", "--yes", check=True)
        status = run_cli(paths, "status", check=True).stdout
        assert not any(s in status for s in SENTINELS.values())
    finally:
        run_cli(paths, "stop")
    needles = [*SENTINELS.values(), *tokens]
    assert scan(paths.home, needles) == []
    assert scan(Path("/tmp"), needles, since=started) == []
    # the deleted environment's value is gone from the database files entirely
    assert scan(paths.home, [SENTINELS["YAML"]]) == []


@pytest.mark.slow
def test_rotation_killed_at_random_moments_loses_nothing(paths: Paths) -> None:
    import random

    rng = random.Random(1234)
    run_cli(paths, "start", check=True)
    values = {f"K{i}": f"value-{i}" for i in range(200)}
    run_cli(paths, "env", "set", "big", *[f"{k}={v}" for k, v in values.items()], check=True)
    secrets_in = "\n".join(values.values()) + "\n"
    run_cli(paths, "env", "set", "big", *[f"--secret={k}" for k in values], input=secrets_in,
            check=True)
    rounds = 25
    for _ in range(rounds):
        pid = json.loads(run_cli(paths, "status", "--json", check=True).stdout)["pid"]
        rotation = subprocess.Popen([sys.executable, "-m", "stigmer.broker", "key", "rotate",
                                     "--yes"], env=cli_env(paths), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.0, 0.25))
        os.kill(pid, signal.SIGKILL)
        rotation.wait(timeout=30)
        restarted = run_cli(paths, "start")
        assert restarted.returncode == 0, restarted.stderr
        data = json.loads(run_cli(paths, "env", "show", "big", "--reveal", "--json",
                                  check=True).stdout)["data"]
        assert {k: v["value"] for k, v in data.items()} == values
    assert run_cli(paths, "key", "rotate", "--yes").returncode == 0
    run_cli(paths, "stop", check=True)


# ------------------------------------------------------------ client-side leaks

PEM = "-----BEGIN KEY-----\nMIIsentinel\\x\"q'uote\n-----END KEY-----"
JSON_SECRET = '{"client_secret": "sentinel-json-77"}'


def _leak_context() -> ExecutionContext:
    return ExecutionContext("e1", 0.0, {
        "PEM": Variable(value=PEM, is_secret=True),
        "CRED": Variable(value=JSON_SECRET, is_secret=True),
        "PLAIN": Variable(value="visible")})


def _logged(ctx: ExecutionContext, emit: Callable[[logging.Logger], None]) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s %(user)s %(payload)s"))
    handler.addFilter(ctx.log_filter())
    logger = logging.getLogger("stigmer-leak-test")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        emit(logger)
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


def _no_fragment(text: str) -> None:
    for fragment in ("MIIsentinel", "sentinel-json-77"):
        assert fragment not in text, text


def test_the_log_filter_masks_extra_fields() -> None:
    ctx = _leak_context()
    text = _logged(ctx, lambda log: log.warning(
        "login", extra={"user": ctx["CRED"], "payload": {"pem": ctx["PEM"], "n": 1}}))
    _no_fragment(text)
    assert "login" in text


def test_the_log_filter_masks_escaped_spellings() -> None:
    ctx = _leak_context()
    text = _logged(ctx, lambda log: log.warning(
        "%r %s %s", ctx["PEM"], json.dumps({"k": ctx["PEM"]}), json.dumps(ctx["CRED"]),
        extra={"user": "-", "payload": [ctx["PEM"]]}))
    _no_fragment(text)
    assert text.count("***") >= 4


@pytest.mark.parametrize("make", [
    lambda: _leak_context(),
    lambda: Variable(value="sentinel-pickle", is_secret=True),
    lambda: ContextCreated(id=1, execution_id="e", expires_at=0.0, token="stg_sentinel",
                           token_id="t", token_expires_at=0.0, keys=[]),
    lambda: TokenIssued(id=1, execution_id="e", token="stg_sentinel", token_id="t",
                        expires_at=0.0),
    lambda: FetchContext(id=1, token="stg_sentinel"),
], ids=["context", "variable", "created", "token", "fetch"])
def test_secret_holders_refuse_to_be_pickled(make: Callable[[], object]) -> None:
    value = make()
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        with pytest.raises(TypeError, match="cannot be pickled") as info:
            pickle.dumps(value, protocol)
        assert "sentinel" not in str(info.value)
    assert copy.deepcopy(value) is value and copy.copy(value) == value
