"""The real CLI in real processes: start, status, stop, environments, apply, errors."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import NOBODY, Daemon, cli_env, cli_for_nobody, run_cli

from stigmer.broker.config import Paths
from stigmer.broker.protocol import SECRET_MASK


def test_status_when_not_running(paths: Paths) -> None:
    result = run_cli(paths, "status")
    assert result.returncode == 3
    assert result.stdout.strip() == f"not running (socket {paths.socket})"
    result = run_cli(paths, "status", "--json")
    assert result.returncode == 3
    assert json.loads(result.stdout)["running"] is False


def test_status_check_not_running_is_3(paths: Paths) -> None:
    for args in (["--check"], ["--check", "--json"], ["--check", "--home", str(paths.home)]):
        result = run_cli(paths, "status", *args)
        assert result.returncode == 3, args
    assert run_cli(paths, "status", "--check").stdout == f"not running (socket {paths.socket})\n"
    # the shape of a running broker's check (a probe's `jq .healthy` got null)
    shown = json.loads(run_cli(paths, "status", "--check", "--json").stdout)
    assert shown["healthy"] is False and shown["problems"] == [
        f"not running (socket {paths.socket})"]


def test_start_checks_its_options_and_says_a_running_broker_keeps_its_own(
        paths: Paths) -> None:
    """A new user's probe: `start --env-history 10m` against a running broker exited 0
    and said nothing; given to a stopped one, it was a usage error. Both now refuse it,
    and a running broker's options are said to be kept."""
    run_cli(paths, "start", check=True)
    try:
        for value, said in (("10m", "is under an hour"), ("1.5", "is under an hour"),
                            ("abc", "is not a count or a duration")):
            result = run_cli(paths, "start", "--env-history", value)
            assert result.returncode == 2, result
            assert said in result.stderr and "forever" in result.stderr
            assert len(result.stderr.strip().splitlines()) == 1
        result = run_cli(paths, "start", "--env-history", "20")
        assert result.returncode == 0 and "already running" in result.stdout
        assert "--env-history take effect once it is stopped and started again" \
            in result.stderr
    finally:
        run_cli(paths, "stop", check=True)


def test_status_check_healthy_is_0_and_a_broken_audit_chain_is_1(paths: Paths) -> None:
    import base64

    # a key handed in is backed up where it comes from: no key-backup problem
    env = cli_env(paths, STIGMER_ENCRYPTION_KEY=base64.b64encode(os.urandom(32)).decode())
    run_cli(paths, "start", env=env, check=True)
    run_cli(paths, "env", "set", "e", "A=1", env=env, check=True)
    healthy = run_cli(paths, "status", "--check", env=env)
    assert healthy.returncode == 0 and healthy.stdout.startswith("healthy (pid "), healthy
    as_json = json.loads(run_cli(paths, "status", "--check", "--json", env=env).stdout)
    assert (as_json["healthy"], as_json["problems"]) == (True, [])
    run_cli(paths, "stop", env=env, check=True)
    # the anchored head now names records the store does not hold: newest records removed
    anchor = json.loads(paths.audit_anchor.read_text())
    paths.audit_anchor.write_text(json.dumps({**anchor, "seq": anchor["seq"] + 5}))
    run_cli(paths, "start", env=env, check=True)
    try:
        degraded = run_cli(paths, "status", "--check", env=env)
        assert degraded.returncode == 1, degraded
        # found at start, then (the first retention pass) by a full verify: either says
        lines = degraded.stdout.splitlines()
        assert len(lines) == 1 and lines[0].startswith("audit: "), lines
        assert "head anchor" in lines[0] and str(paths.audit_anchor) in lines[0], lines
        shown = run_cli(paths, "status", env=env, check=True).stdout.splitlines()
        assert any(line.startswith("  audit        ") and "head anchor" in line
                   for line in shown), shown
    finally:
        run_cli(paths, "stop", env=env, check=True)


def test_status_check_a_stale_fleet_store_is_1(short_dir: Path, store_url: str) -> None:
    """Another broker of the fleet rotated the master key: this one's store is degraded."""
    import shutil

    a = Paths(home=short_dir / "a", socket=short_dir / "ra" / "b.sock")
    b = Paths(home=short_dir / "b", socket=short_dir / "rb" / "b.sock")
    env_a, env_b = (cli_env(p, STIGMER_STORE_URL=store_url) for p in (a, b))
    run_cli(a, "start", env=env_a, check=True)
    try:
        b.home.mkdir(mode=0o700)
        shutil.copy2(a.key_file, b.key_file)
        run_cli(b, "start", env=env_b, check=True)
        try:
            assert not any(line.startswith("store:") for line in run_cli(
                b, "status", "--check", env=env_b).stdout.splitlines())
            run_cli(a, "key", "rotate", "--yes", env=env_a, check=True)
            degraded = run_cli(b, "status", "--check", env=env_b)
            assert degraded.returncode == 1
            assert "store: another broker rotated the fleet's master key" in degraded.stdout
        finally:
            run_cli(b, "stop", env=env_b)
    finally:
        run_cli(a, "stop", env=env_a)


def test_start_status_stop(paths: Paths) -> None:
    started = run_cli(paths, "start")
    assert started.returncode == 0, started.stderr
    assert started.stdout.strip() == str(paths.socket)
    try:
        again = run_cli(paths, "start")
        assert again.returncode == 0
        assert "already running" in again.stdout
        human = run_cli(paths, "status")
        assert human.returncode == 0
        assert "running (pid" in human.stdout
        data = json.loads(run_cli(paths, "status", "--json", check=True).stdout)
        for key in ("running", "version", "pid", "uptime_s", "socket", "store", "key_source",
                    "environments", "contexts", "tokens", "requests"):
            assert key in data
        assert data["running"] is True
        assert data["socket"] == str(paths.socket)
        assert data["key_source"].startswith("file (")
        assert stat.S_IMODE(os.lstat(paths.home / "master.key").st_mode) == 0o600
        assert stat.S_IMODE(os.lstat(paths.home / "local.db").st_mode) == 0o600
    finally:
        stopped = run_cli(paths, "stop")
    assert stopped.returncode == 0
    assert "stopped" in stopped.stdout
    assert run_cli(paths, "status").returncode == 3
    assert not paths.socket.exists()


def test_stop_returns_when_the_daemon_exits_though_nobody_reaps_it(paths: Paths) -> None:
    """A daemon whose parent does not reap it (a container's init, a test runner) stays a
    zombie with its pid: `stop` waits for the home lock, which the kernel drops at exit."""
    daemon = Daemon(paths).start()  # our child: a zombie until we wait for it
    try:
        began = time.monotonic()
        stopped = run_cli(paths, "stop", "--timeout", "5")
        took = time.monotonic() - began
        assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stderr
        assert took < 4, f"stop took {took:.1f}s"
    finally:
        daemon.stop()


def test_start_failure_is_one_line(paths: Paths) -> None:
    paths.home.mkdir(mode=0o700)
    (paths.home / "master.key").write_text("not base64!\n")
    os.chmod(paths.home / "master.key", 0o600)
    result = run_cli(paths, "start")
    assert result.returncode == 1
    assert "not valid base64" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_serve_refuses_a_second_daemon(cli_broker: Paths) -> None:
    result = run_cli(cli_broker, "serve", timeout=30)
    assert result.returncode == 1
    assert "already running (pid" in result.stderr
    assert run_cli(cli_broker, "status").returncode == 0


def test_environment_commands(cli_broker: Paths, short_dir: Path) -> None:
    p = cli_broker
    r = run_cli(p, "env", "set", "dev", "LOG_LEVEL=debug", "--secret", "API_KEY",
                input="sk-test-1\n")
    assert r.returncode == 0, r.stderr
    env_file = short_dir / "x.env"
    env_file.write_text("# comment\nexport DB_URL='postgres://x'\nLOG_LEVEL=from-file\n")
    r = run_cli(p, "env", "set", "dev", "--env-file", str(env_file), "EXTRA=1")
    assert r.returncode == 0, r.stderr
    shown = run_cli(p, "env", "show", "dev", check=True).stdout
    assert "sk-test-1" not in shown
    assert "postgres" not in shown
    assert SECRET_MASK in shown
    data = json.loads(run_cli(p, "env", "show", "dev", "--reveal", "--json", check=True).stdout)
    assert data["data"]["API_KEY"] == {"value": "sk-test-1", "is_secret": True}
    assert data["data"]["DB_URL"] == {"value": "postgres://x", "is_secret": True}
    assert data["data"]["EXTRA"] == {"value": "1", "is_secret": False}
    assert data["data"]["LOG_LEVEL"]["value"] == "from-file"  # the latest set wins
    listed = json.loads(run_cli(p, "env", "list", "--json", check=True).stdout)
    assert listed[0]["name"] == "dev"
    assert listed[0]["secrets"] == 3
    assert run_cli(p, "env", "unset", "dev", "EXTRA", check=True).returncode == 0
    r = run_cli(p, "env", "unset", "dev", "NOPE")
    assert r.returncode == 1
    assert "NOPE" in r.stderr
    assert run_cli(p, "env", "delete", "dev", "--yes").returncode == 0
    r = run_cli(p, "env", "show", "dev")
    assert r.returncode == 1
    assert "does not exist" in r.stderr
    status = json.loads(run_cli(p, "status", "--json", check=True).stdout)
    assert status["environments"] == 0


def test_command_line_wins_over_env_file(cli_broker: Paths, short_dir: Path) -> None:
    env_file = short_dir / "y.env"
    env_file.write_text("A=from-file\nB=file-only\n")
    run_cli(cli_broker, "env", "set", "e", "--env-file", str(env_file), "A=cli", check=True)
    data = json.loads(run_cli(cli_broker, "env", "show", "e", "--reveal", "--json",
                              check=True).stdout)["data"]
    assert data["A"] == {"value": "cli", "is_secret": False}
    assert data["B"] == {"value": "file-only", "is_secret": True}


@pytest.mark.parametrize(("args", "message"), [
    (["env", "set", "bad name", "A=1"], "environment name 'bad name' is not valid"),
    (["env", "set", "e", "1A=1"], "variable name '1A'"),
    (["env", "set", "e", "NOVALUE"], "expects KEY=VALUE"),
    (["env", "set", "e", "A=1", "A=2"], "A is given twice"),
    (["env", "set", "e"], "nothing to set"),
    (["env", "set", "e", "--env-file", "/nonexistent.env"], "no such file"),
    (["env", "set", "e", "--env-file", "/tmp"], "is a directory"),
    (["apply", "-f", "/nonexistent.yaml"], "cannot be read"),
])
def test_user_mistakes_are_one_line(cli_broker: Paths, args: list[str], message: str) -> None:
    r = run_cli(cli_broker, *args)
    assert r.returncode in (1, 2)
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_client_commands_without_broker_exit_3(paths: Paths) -> None:
    r = run_cli(paths, "env", "list")
    assert r.returncode == 3
    assert "stigmer-broker start" in r.stderr


MANIFESTS = """\
apiVersion: ai.stigmer.agentic/v1
kind: Environment
metadata:
  name: prod
spec:
  data:
    TOKEN: {value: tok-123, is_secret: true}
    REGION: {value: eu-west-1}
---
apiVersion: ai.stigmer.agentic/v1
kind: Environment
metadata: {name: staging}
spec: {data: {PORT: {value: 8080}}}
"""


def test_apply_manifests(cli_broker: Paths, short_dir: Path) -> None:
    f = short_dir / "m.yaml"
    f.write_text(MANIFESTS)
    r = run_cli(cli_broker, "apply", "-f", str(f))
    assert r.returncode == 0, r.stderr
    prod = json.loads(run_cli(cli_broker, "env", "show", "prod", "--reveal", "--json",
                              check=True).stdout)["data"]
    assert prod == {"REGION": {"value": "eu-west-1", "is_secret": False},
                    "TOKEN": {"value": "tok-123", "is_secret": True}}
    staging = json.loads(run_cli(cli_broker, "env", "show", "staging", "--json",
                                 check=True).stdout)["data"]
    assert staging == {"PORT": {"value": "8080", "is_secret": False}}


def test_apply_prints_key_changes_and_dry_run_changes_nothing(cli_broker: Paths,
                                                              short_dir: Path) -> None:
    run_cli(cli_broker, "env", "set", "prod", "REGION=us-east-1", "ADDED_BY_HAND=1",
            check=True)
    run_cli(cli_broker, "env", "set", "prod", "--secret", "TOKEN", input="tok-123\n",
            check=True)
    f = short_dir / "m.yaml"
    f.write_text(MANIFESTS)
    r = run_cli(cli_broker, "apply", "-f", str(f), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "environment/prod: changed REGION; removed ADDED_BY_HAND",
        "environment/staging: created: added PORT",
        "dry run: nothing was changed"]
    assert "tok-123" not in r.stdout and "eu-west-1" not in r.stdout
    listed = json.loads(run_cli(cli_broker, "env", "list", "--json", check=True).stdout)
    assert [e["name"] for e in listed] == ["prod"]
    r = run_cli(cli_broker, "apply", "-f", str(f), "--json")
    assert json.loads(r.stdout) == {"dry_run": False, "changes": [
        {"name": "prod", "created": False, "added": [], "changed": ["REGION"],
         "removed": ["ADDED_BY_HAND"]},
        {"name": "staging", "created": True, "added": ["PORT"], "changed": [], "removed": []}]}
    r = run_cli(cli_broker, "apply", "-f", str(f))
    assert r.stdout.splitlines() == ["environment/prod: unchanged",
                                     "environment/staging: unchanged"]


@pytest.mark.parametrize(("bad", "message"), [
    ("kind: Agent", "kind 'Agent' is not supported"),
    ("spec: {data: {X: {value: '1', colour: red}}}", "unknown field 'colour'"),
    ("metadata: {name: 'bad name'}", "metadata.name"),
    ("apiVersion: v0", "apiVersion must be"),
])
def test_apply_with_any_error_applies_nothing(cli_broker: Paths, short_dir: Path, bad: str,
                                              message: str) -> None:
    second = ("apiVersion: ai.stigmer.agentic/v1\nkind: Environment\nmetadata: {name: two}\n"
              "spec: {data: {X: {value: '1'}}}\n")
    key = bad.split(":")[0]
    lines = [ln for ln in second.splitlines() if not ln.startswith(key + ":")]
    doc2 = "\n".join([*lines, bad]) + "\n"
    f = short_dir / "bad.yaml"
    f.write_text(MANIFESTS + "---\n" + doc2)
    r = run_cli(cli_broker, "apply", "-f", str(f))
    assert r.returncode == 1 and message in r.stderr and "document 3" in r.stderr, r.stderr
    listed = json.loads(run_cli(cli_broker, "env", "list", "--json", check=True).stdout)
    assert listed == []


def test_key_rotate_keeps_everything(cli_broker: Paths) -> None:
    run_cli(cli_broker, "env", "set", "e", "--secret", "S", input="value-1\n", check=True)
    before = (cli_broker.home / "master.key").read_text()
    r = run_cli(cli_broker, "key", "rotate", "--yes")
    assert r.returncode == 0, r.stderr
    assert (cli_broker.home / "master.key").read_text() != before
    run_cli(cli_broker, "stop", check=True)
    run_cli(cli_broker, "start", check=True)
    data = json.loads(run_cli(cli_broker, "env", "show", "e", "--reveal", "--json",
                              check=True).stdout)["data"]
    assert data["S"]["value"] == "value-1"


def test_module_and_console_script_agree(paths: Paths) -> None:
    r = run_cli(paths, "--version")
    assert r.returncode == 0
    assert r.stdout.startswith("stigmer-broker ")


AGENT = """\
apiVersion: ai.stigmer.agentic/v1
kind: Agent
metadata: {name: reviewer}
spec:
  env_spec:
    data:
      LOG_LEVEL: {value: info}
      GITHUB_TOKEN: {is_secret: true, description: repo access}
      MODEL: {}
"""


def test_end_to_end_story(cli_broker: Paths, short_dir: Path) -> None:
    p = cli_broker
    run_cli(p, "env", "set", "prod", "LOG_LEVEL=warn", "--secret", "GITHUB_TOKEN",
            input="ghp_story\n", check=True)
    spec = short_dir / "agent.yaml"
    spec.write_text(AGENT)
    missing = run_cli(p, "context", "create", "exec-1", "--spec", str(spec),
                      "--environment", "prod")
    assert missing.returncode == 1 and "MODEL" in missing.stderr
    created = run_cli(p, "context", "create", "exec-1", "--spec", str(spec),
                      "--environment", "prod", "--env", "MODEL=large", "--env",
                      "LOG_LEVEL=debug")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert token.startswith("stg_") and "\n" not in token
    shown = json.loads(run_cli(p, "context", "show", "exec-1", "--json", check=True).stdout)
    assert {k["key"]: k["source"] for k in shown["keys"]} == {
        "LOG_LEVEL": "runtime", "GITHUB_TOKEN": "environment:prod", "MODEL": "runtime"}
    assert token not in json.dumps(shown) and "ghp_story" not in json.dumps(shown)
    env = cli_env(p, STIGMER_EXECUTION_TOKEN=token)
    story = ("import os,sys; print(os.environ['GITHUB_TOKEN'], os.environ['LOG_LEVEL'],"
             " os.environ['MODEL'], 'STIGMER_EXECUTION_TOKEN' in os.environ); sys.exit(7)")
    ran = run_cli(p, "run", "--no-masking", "--", sys.executable, "-c", story, env=env)
    assert ran.returncode == 7
    assert ran.stdout.split() == ["ghp_story", "debug", "large", "False"]
    masked = run_cli(p, "run", "--", sys.executable, "-c", story, env=env)  # the default
    assert masked.returncode == 7 and "ghp_story" not in masked.stdout
    assert masked.stdout.strip() == "<concealed by stigmer> debug large False"
    assert run_cli(p, "context", "complete", "exec-1", "--yes").returncode == 0
    refused = run_cli(p, "run", "--", "true", env=env)
    assert refused.returncode == 1 and "not valid" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    verify = run_cli(p, "audit", "verify")
    assert verify.returncode == 0 and "intact" in verify.stdout
    events = [r["event"] for r in json.loads(run_cli(p, "audit", "--execution", "exec-1",
                                                     "--json", check=True).stdout)]
    assert events[:3] == ["context.created", "token.issued", "fetch"]
    assert "context.completed" in events


def test_context_create_flags(cli_broker: Paths, short_dir: Path) -> None:
    p = cli_broker
    r = run_cli(p, "context", "create", "c1", "--env", "A=1", "--env", "A=2")
    assert r.returncode == 2 and "A is given twice" in r.stderr
    r = run_cli(p, "context", "create", "c1", "--ttl", "soon")
    assert r.returncode == 2 and "not a duration" in r.stderr
    r = run_cli(p, "context", "create", "c1", "--environment", "missing")
    assert r.returncode == 1 and "'missing' does not exist" in r.stderr
    bare = short_dir / "spec.json"
    bare.write_text('{"A": {"value": "x"}, "B": {"is_secret": true}}')
    envf = short_dir / "rt.env"
    envf.write_text("B=from-file\nC=3\n")
    out = run_cli(p, "context", "create", "c1", "--spec", str(bare), "--env-file", str(envf),
                  "--secret", "B", "--json", "--ttl", "1h", "--token-ttl", "30s",
                  "--max-uses", "2", input="from-prompt\n")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert {k["key"]: (k["is_secret"], k["source"]) for k in data["keys"]} == {
        "A": (False, "spec"), "B": (True, "runtime"), "C": (True, "runtime")}
    assert data["token_expires_at"] - data["expires_at"] < -3500
    token = run_cli(p, "context", "token", "c1", "--max-uses", "1", check=True).stdout.strip()
    env = cli_env(p)
    fetched = run_cli(p, "run", "--no-masking", "--token", token, "--", "sh", "-c", "echo $B",
                      env=env)
    assert fetched.stdout.strip() == "from-prompt"
    again = run_cli(p, "run", "--token", token, "--", "true", env=env)
    assert again.returncode == 1
    assert run_cli(p, "run", "--token", data["token"], "--", "/nonexistent/cmd",
                   env=env).returncode == 127
    listed = json.loads(run_cli(p, "context", "list", "--json", check=True).stdout)
    assert [c["execution_id"] for c in listed] == ["c1"]
    r = run_cli(p, "context", "create", "c1")
    assert r.returncode == 1 and "already has a live context" in r.stderr
    status = json.loads(run_cli(p, "status", "--json", check=True).stdout)
    assert status["contexts"] == 1 and status["tokens"] >= 1


def test_start_with_a_key_command(paths: Paths, short_dir: Path) -> None:
    import base64
    import shlex

    key = base64.b64encode(os.urandom(32)).decode()
    (short_dir / "key.txt").write_text(key + "\n")
    command = shlex.join([sys.executable, "-c", "import sys; print(open(sys.argv[1]).read())",
                          str(short_dir / "key.txt")])
    env = cli_env(paths, STIGMER_KEY_COMMAND=command)
    run_cli(paths, "start", env=env, check=True)
    try:
        status = json.loads(run_cli(paths, "status", "--json", check=True).stdout)
        assert status["key_source"] == f"command ({sys.executable})"
        assert status["key_backed_up_at"] is None
        shown = run_cli(paths, "status", check=True)
        assert f"key source   command ({sys.executable})" in shown.stdout
        assert "back it up where it comes from" in shown.stdout
        assert "has no backup" not in shown.stderr  # handed in: backed up at its source
        cmdline = Path(f"/proc/{status['pid']}/cmdline").read_bytes()
        assert key.encode() not in cmdline and b"key.txt" not in cmdline
    finally:
        run_cli(paths, "stop", check=True)
    assert not (paths.home / "master.key").exists()
    # the key the command gives opens the store it made; another one is refused
    (short_dir / "key.txt").write_text(base64.b64encode(os.urandom(32)).decode())
    refused = run_cli(paths, "start", "--key-command", command)
    assert refused.returncode == 1
    assert "does not open the store" in refused.stderr
    assert f"from command ({sys.executable})" in refused.stderr
    failing = shlex.join([sys.executable, "-c", f"print({key!r}); raise SystemExit(3)"])
    refused = run_cli(paths, "start", "--key-command", failing)
    assert refused.returncode == 1
    assert f"the key command `{sys.executable}` exited with status 3" in refused.stderr
    assert len(refused.stderr.splitlines()) == 1 and "Traceback" not in refused.stderr
    for text in (refused.stdout, refused.stderr, paths.log_file.read_text()):
        assert key not in text


@pytest.mark.parametrize(("value", "message"), [
    ("'op read", "--key-command cannot be split"),
    ("  ", "--key-command is empty"),
])
def test_key_command_mistakes_are_usage_errors(paths: Paths, value: str,
                                               message: str) -> None:
    result = run_cli(paths, "start", "--key-command", value)
    assert result.returncode == 2 and message in result.stderr
    assert not paths.socket.exists()


def test_serve_reads_the_key_command_and_watchdog_once(
        paths: Paths, monkeypatch: pytest.MonkeyPatch) -> None:
    from stigmer.broker import cli
    from stigmer.broker.daemon import lifecycle

    seen: dict[str, object] = {}

    def fake_run(config: Any, **kwargs: object) -> None:
        seen["key_command"] = config.key_command
        seen["repr"] = repr(config)
        seen["watchdog_s"] = config.watchdog_s
        seen["left"] = sorted(k for k in ("STIGMER_KEY_COMMAND", "WATCHDOG_USEC", "WATCHDOG_PID")
                              if k in os.environ)

    monkeypatch.setattr(lifecycle, "run", fake_run)
    monkeypatch.setenv("STIGMER_KEY_COMMAND", "op read 'op://Infra/stigmer broker/key'")
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert cli.main(["--home", str(paths.home), "--socket", str(paths.socket), "serve"]) == 0
    shown = seen.pop("repr")
    assert "key_command=('op', " in str(shown) and "op://Infra" not in str(shown)
    assert seen == {"key_command": ("op", "read", "op://Infra/stigmer broker/key"),
                    "watchdog_s": 15.0, "left": []}
    monkeypatch.setenv("STIGMER_KEY_COMMAND", "ignored")  # the flag wins
    assert cli.main(["--home", str(paths.home), "--socket", str(paths.socket), "serve",
                     "--key-command", "gpg --decrypt k.gpg"]) == 0
    assert seen["key_command"] == ("gpg", "--decrypt", "k.gpg") and seen["watchdog_s"] is None


def test_serve_takes_the_env_key_out_of_its_environment(
        paths: Paths, monkeypatch: pytest.MonkeyPatch) -> None:
    from stigmer.broker import cli
    from stigmer.broker.daemon import lifecycle

    seen: dict[str, object] = {}

    def fake_run(config: object, **kwargs: object) -> None:
        seen["config_key"] = getattr(config, "env_key", None)
        seen["left_in_environ"] = "STIGMER_ENCRYPTION_KEY" in os.environ
        seen["repr"] = repr(config)

    monkeypatch.setattr(lifecycle, "run", fake_run)
    monkeypatch.setenv("STIGMER_ENCRYPTION_KEY", "the-key-value")
    assert cli.main(["--home", str(paths.home), "--socket", str(paths.socket), "serve"]) == 0
    assert seen["config_key"] == "the-key-value"
    assert seen["left_in_environ"] is False
    assert "the-key-value" not in str(seen["repr"])


def test_status_and_client_import_load_no_heavy_dependency(cli_broker: Paths) -> None:
    code = ("import sys\n"
            "import stigmer.client\n"
            "from stigmer.broker import cli\n"
            "assert cli.main(['status']) == 0\n"
            "heavy = {'keyring', 'aiosqlite', 'cryptography', 'uvloop', 'anyio', 'yaml',"
            " 'dotenv'}\n"
            "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))\n")
    result = subprocess.run([sys.executable, "-c", code], env=cli_env(cli_broker),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_a_nul_in_a_value_is_refused_at_the_door(cli_broker: Paths) -> None:
    """No environment, shell or .env file can carry a NUL: the broker refuses it when the
    value comes in (env set, apply, a context's runtime values), naming the key, rather
    than `run` and `export` finding out later."""
    from stigmer.client import Client, InvalidArgument, variables

    r = run_cli(cli_broker, "env", "set", "dev", "OK=1", "--secret", "BAD", input="a\0b")
    assert r.returncode == 1 and "BAD: a value cannot contain a NUL byte" in r.stderr
    assert "Traceback" not in r.stderr
    assert run_cli(cli_broker, "env", "show", "dev").returncode == 1  # nothing was stored
    with Client(cli_broker.socket) as c, pytest.raises(InvalidArgument,
                                                       match="runtime variable BAD: a value"):
        c.create_context("nul", runtime=variables({"OK": "1"}, {"BAD": "a\0b"}))
    manifest = ('{"apiVersion": "ai.stigmer.agentic/v1", "kind": "Environment", '
                '"metadata": {"name": "m"}, "spec": {"data": {"BAD": {"value": "a\\u0000b"}}}}')
    r = run_cli(cli_broker, "apply", "-f", "-", input=manifest)
    assert r.returncode == 1 and "environment 'm': BAD: a value cannot contain" in r.stderr


def test_secret_prompt_on_a_terminal_does_not_echo(cli_broker: Paths) -> None:
    import pty
    import select

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "stigmer.broker", "env", "set", "tty",
                             "--secret", "TYPED"], stdin=slave, stdout=slave, stderr=slave,
                            env=cli_env(cli_broker), start_new_session=True)
    os.close(slave)
    seen = b""
    try:
        deadline = time.monotonic() + 30
        while b"TYPED: " not in seen:
            assert time.monotonic() < deadline, seen
            if select.select([master], [], [], 0.5)[0]:
                seen += os.read(master, 1024)
        os.write(master, b"typed-on-a-tty\n")
        while proc.poll() is None or select.select([master], [], [], 0.2)[0]:
            try:
                chunk = os.read(master, 1024)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
        proc.wait(timeout=30)
    finally:
        os.close(master)
    assert proc.returncode == 0, seen
    assert b"typed-on-a-tty" not in seen  # never echoed
    shown = json.loads(run_cli(cli_broker, "env", "show", "tty", "--reveal", "--json",
                               check=True).stdout)
    assert shown["data"]["TYPED"] == {"value": "typed-on-a-tty", "is_secret": True}


def test_env_show_escapes_control_characters(cli_broker: Paths) -> None:
    run_cli(cli_broker, "env", "set", "esc", "A=\x1b[2Jcleared", check=True)
    shown = run_cli(cli_broker, "env", "show", "esc", check=True).stdout
    assert "\x1b" not in shown and '"\\u001b[2Jcleared"' in shown


def test_runner_releases_its_own_context(cli_broker: Paths) -> None:
    token = run_cli(cli_broker, "context", "create", "rel", "--env", "A=1",
                    check=True).stdout.strip()
    env = cli_env(cli_broker, STIGMER_EXECUTION_TOKEN=token)
    released = run_cli(cli_broker, "context", "release", env=env)
    assert released.returncode == 0, released.stderr
    again = run_cli(cli_broker, "context", "release", env=env)
    assert again.returncode == 1 and "not valid" in again.stderr
    assert run_cli(cli_broker, "context", "show", "rel").returncode == 1


@pytest.mark.parametrize("args", [("env", "set", "prod\n", "A=1"),
                                  ("env", "set", "prod", "GITHUB_TOKEN\n=x"),
                                  ("context", "create", "exec-1\n", "--env", "A=1")])
def test_the_cli_refuses_names_with_a_trailing_newline(paths: Paths,
                                                       args: tuple[str, ...]) -> None:
    result = run_cli(paths, *args)
    assert result.returncode in (1, 2) and "is not valid" in result.stderr, result.stderr


@pytest.mark.parametrize("args", [("env", "set", "dev", "LOG_LEVEL"),
                                  ("env", "unset", "dev", "1BAD"),
                                  ("context", "create", "c1", "--ttl", "0s"),
                                  ("context", "token", "bad name")])
def test_usage_mistakes_exit_2(paths: Paths, args: tuple[str, ...]) -> None:
    result = run_cli(paths, *args)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (("context", "create", "c1", "--max-uses", "0"), "--max-uses must be at least 1"),
    (("context", "token", "c1", "--max-uses", "many"), "--max-uses must be a whole number"),
    (("context", "token", "c1", "--max-uses", str(2**40)), "--max-uses must be at most"),
    (("audit", "--limit", "0"), "--limit must be at least 1"),
    (("run", "--", "true"), "give --token TOKEN or set STIGMER_EXECUTION_TOKEN"),
    (("context", "release"), "give --token TOKEN or set STIGMER_EXECUTION_TOKEN"),
])
def test_mistakes_are_told_in_the_flags_typed(paths: Paths, args: tuple[str, ...],
                                              message: str) -> None:
    """Not `malformed message: Expected int >= 1 - at $.max_uses`, not `token=`; and
    before any broker is asked (none runs here)."""
    result = run_cli(paths, *args)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert message in result.stderr and "token=" not in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize("args", [("env", "set", "e", "--secret", "K"),
                                  ("context", "create", "c1", "--secret", "K")])
def test_no_secret_is_asked_for_while_no_broker_answers(paths: Paths,
                                                         args: tuple[str, ...]) -> None:
    result = run_cli(paths, *args, input="")  # old: "no value on standard input", exit 2
    assert result.returncode == 3, result.stderr
    assert "stigmer-broker start" in result.stderr


def test_an_oversized_value_is_named(cli_broker: Paths, short_dir: Path) -> None:
    from stigmer.broker.protocol import MAX_VALUE_LENGTH

    env_file = short_dir / "big.env"
    env_file.write_text(f"SMALL=1\nHUGE_BLOB={'x' * (MAX_VALUE_LENGTH + 1)}\n")
    result = run_cli(cli_broker, "env", "set", "e", "--env-file", str(env_file))
    assert result.returncode == 1
    assert "the value of HUGE_BLOB (environment e) is" in result.stderr, result.stderr
    assert "xxxx" not in result.stderr


def test_status_into_a_closed_pipe_ends_quietly(cli_broker: Paths) -> None:
    import shlex

    command = " ".join(shlex.quote(a) for a in (sys.executable, "-m", "stigmer.broker"))
    for _ in range(10):
        result = subprocess.run(["sh", "-c", f"{command} status --json | true; "
                                 f"{command} env list | true"],
                                capture_output=True, text=True, env=cli_env(cli_broker),
                                timeout=60)
        assert result.stderr == "", result.stderr


def test_status_names_a_loose_socket_directory_instead_of_not_running(
        cli_broker: Paths) -> None:
    cli_broker.socket.parent.chmod(0o755)
    try:
        for args in (("status",), ("status", "--json"), ("env", "list")):
            result = run_cli(cli_broker, *args)
            assert result.returncode == 1, result
            assert "not running" not in result.stdout
            assert "mode 0755" in result.stderr and len(result.stderr.splitlines()) == 1
    finally:
        cli_broker.socket.parent.chmod(0o700)


def test_ctrl_d_at_the_secret_prompt_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import getpass

    from stigmer.broker.cli.common import UsageError
    from stigmer.broker.cli.inputs import read_secret_value

    def eof(prompt: str) -> str:
        raise EOFError

    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr(getpass, "getpass", eof)
    with pytest.raises(UsageError, match="no value was entered"):
        read_secret_value("API_KEY")


def test_values_that_are_not_utf8_are_refused_in_one_line(cli_broker: Paths) -> None:
    env = cli_env(cli_broker)
    base = [sys.executable, "-m", "stigmer.broker"]
    for args, stdin in (([b"env", b"set", b"d", b"A=\xffSENTINEL"], b""),
                        ([b"env", b"set", b"d", b"--secret", b"K"], b"\xffSENTINEL\n"),
                        ([b"context", b"create", b"x", b"--env", b"A=\xffSENTINEL"], b"")):
        result = subprocess.run([*base, *args], input=stdin, capture_output=True, env=env,
                                timeout=60)
        assert result.returncode in (1, 2), result
        assert b"Traceback" not in result.stderr and b"SENTINEL" not in result.stderr
        assert len(result.stderr.splitlines()) == 1, result.stderr


def test_allow_group_the_user_is_not_in_is_one_line(short_dir: Path) -> None:
    """`serve --allow-group G` by a user outside G used to die with a PermissionError
    traceback from chown."""
    cli = cli_for_nobody()
    home = short_dir / "h"
    home.mkdir(mode=0o700)
    os.chown(home, NOBODY, NOBODY)
    os.chmod(short_dir, 0o755)
    paths = Paths(home=home, socket=home / "run" / "b.sock")
    env = cli_env(paths)
    r = subprocess.run([*cli, "serve", "--allow-group", "root"],
                       user=NOBODY, group=NOBODY, extra_groups=[], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert "--allow-group root: user" in r.stderr and "is not a member" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_every_command_speaks_json(paths: Paths, short_dir: Path) -> None:
    """--json on every command, those that change things included: one JSON object (or
    array, for listings) with the documented keys, and nothing else on stdout."""
    def j(*args: str, input: str | None = None) -> Any:
        result = run_cli(paths, *args, "--json", input=input)
        assert result.returncode == 0, (args, result.stderr)
        return json.loads(result.stdout)

    assert j("start") == {"running": True, "started": True, "pid": ANY_INT,
                          "socket": str(paths.socket)}
    assert j("start")["started"] is False
    assert j("env", "set", "e", "A=1", "--secret", "S", input="v\n") == {
        "name": "e", "set": ["A", "S"], "secrets": 1, "variables": 2}
    assert j("env", "unset", "e", "A") == {"name": "e", "removed": ["A"], "variables": 1}
    created = j("context", "create", "c1", "--environment", "e")
    token = j("context", "token", "c1", "--max-uses", "2")
    assert set(token) == {"execution_id", "token", "token_id", "expires_at", "max_uses"}
    assert token["max_uses"] == 2 and token["token"].startswith("stg_")
    assert j("context", "release", "--token", created["token"]) == {
        "released": True, "execution_id": None}
    j("context", "create", "c2")
    assert j("context", "complete", "c2", "--yes") == {"execution_id": "c2", "completed": True}
    assert j("env", "delete", "e", "--yes") == {"name": "e", "deleted": True}
    rotated = j("key", "rotate", "--yes")
    assert set(rotated) == {"key_id", "rewrapped", "key_source"}
    verified = j("audit", "verify")
    assert verified["ok"] is True and verified["records"] > 0
    unit = j("service", "install", "--systemd", "--print")
    assert unit["manager"] == "systemd" and unit["files"][0]["content"]
    assert j("stop") == {"stopped": True, "pid": ANY_INT, "socket": str(paths.socket)}
    assert j("stop") == {"stopped": False, "pid": None, "socket": str(paths.socket)}


class _AnyInt:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, int) and not isinstance(other, bool)


ANY_INT: Any = _AnyInt()


@pytest.mark.parametrize("line", ["SENTINEL_7f3a", "9SENTINEL_7f3a=x", "SENTINEL-7f3a=x",
                                  "export SENTINEL_7f3a", "A B SENTINEL_7f3a=x",
                                  "A='SENTINEL_7f3a"])
def test_a_malformed_env_file_line_is_named_by_number_never_shown(paths: Paths, short_dir: Path,
                                                                  line: str) -> None:
    """A secret pasted alone on a line (or a line dotenv cannot split) used to be echoed in
    the error, reaching stderr and CI logs: only the line's number is named."""
    env_file = short_dir / "leak.env"
    env_file.write_text(f"# first\nGOOD=1\n{line}\n")
    r = run_cli(paths, "env", "set", "e", "--env-file", str(env_file))
    assert r.returncode == 1, r.stderr
    assert "SENTINEL" not in r.stderr and "7f3a" not in r.stderr
    assert "line 3" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("argv", [
    ["run", "--", "true"],
    ["run", "--no-masking", "--token", "stg_t", "--", "tool", "-v", "--", "x"],
    ["run", "--home", "/h", "--socket", "/s", "--execution", "e-1", "--", "--", "x"],
    ["run", "--token", "", "--", "x"],
])
def test_runs_plain_forms_skip_argparse_and_mean_what_argparse_makes_of_them(
        argv: list[str]) -> None:
    from stigmer.broker.cli.main import run_fast_path
    from stigmer.broker.cli.parser import build_parser

    fast = run_fast_path(argv)
    assert fast is not None
    parsed, extras = build_parser(argv).parse_known_args(argv)
    assert extras == []
    assert vars(fast) == vars(parsed)


@pytest.mark.parametrize("argv", [
    ["run", "true"], ["run", "--"], ["run", "--mount", "a=env", "--", "x"],
    ["run", "--token=t", "--", "x"], ["run", "--token", "-t", "--", "x"],
    ["run", "--no-masking", "--no-masking", "--", "x"], ["run", "-h", "--", "x"],
    ["run", "--json", "--", "x"], ["--home", "/h", "run", "--", "x"],
])
def test_runs_other_forms_are_left_to_argparse(argv: list[str]) -> None:
    from stigmer.broker.cli.main import run_fast_path

    assert run_fast_path(argv) is None
