"""What a person meets at the command line: one-line usage mistakes with a near miss,
``help COMMAND``, the man page where ``man`` looks, an unwritable stdout reported in
one line, and output that reads as English."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli_env, run_cli

from stigmer.broker.config import Paths


@pytest.fixture
def store() -> None:
    """Nothing here is about the store: the embedded one is enough."""
    return None


@pytest.mark.parametrize(("argv", "expected"), [
    (["env", "show", "prod", "--revael"],
     "env show: unknown option --revael (did you mean --reveal?); "
     "`stigmer-broker help env show` explains it"),
    (["sttaus"], "no command 'sttaus' (did you mean status?); `stigmer-broker help` explains it"),
    (["env", "sho", "prod"], "env: no command 'sho' (did you mean show?)"),
    (["env", "set"], "env set: the following arguments are required: NAME;"),
    (["context", "create"], "context create: the following arguments are required: EXEC_ID"),
    (["run", "--mount"], "run: argument --mount: expected one argument"),
])
def test_a_usage_mistake_is_one_line_with_the_near_miss(paths: Paths, argv: list[str],
                                                       expected: str) -> None:
    result = run_cli(paths, *argv)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("stigmer-broker: error: " + expected), result.stderr


def test_help_command_explains_that_command(paths: Paths) -> None:
    for words in (["run"], ["env", "set"], ["key", "import"]):
        result = run_cli(paths, "help", *words)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"usage: stigmer-broker {' '.join(words)} ")
    unknown = run_cli(paths, "help", "nosuch")
    assert unknown.returncode == 2
    assert unknown.stderr == ("stigmer-broker: error: no command 'nosuch'; "
                              "`stigmer-broker help` explains it\n")


def test_the_man_page_is_where_man_looks() -> None:
    installed = Path(sys.prefix) / "share" / "man" / "man1" / "stigmer-broker.1"
    shipped = Path(__file__).resolve().parents[2] / "broker" / "cli" / "stigmer-broker.1"
    assert installed.read_text() == shipped.read_text()
    page = shipped.read_text()
    for section in ("EXIT STATUS", "ENVIRONMENT", "FILES"):
        assert f"\n.SH {section}\n" in page, section
    for variable in ("STIGMER_HOME", "STIGMER_BROKER_SOCKET", "STIGMER_ENCRYPTION_KEY",
                     "STIGMER_STORE_URL", "STIGMER_EXECUTION_ID", "CREDENTIALS_DIRECTORY"):
        assert variable in page.replace("\\-", "-").replace("\\_", "_"), variable
    if shutil.which("man") is None:
        return  # the file is where man-db looks; there is no man here to ask
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "LANG": "C.UTF-8"}
    found = subprocess.run(["man", "-w", "stigmer-broker"], capture_output=True, text=True,
                           env=env, timeout=60)
    assert found.returncode == 0, found.stderr
    assert Path(found.stdout.strip()).resolve() == shipped


#: commands that print something, as a user types them
_PRINTING = [["status"], ["status", "--json"], ["env", "list"], ["context", "list"],
             ["audit"], ["completion", "bash"], ["help"], ["--help"], ["--version"]]


def test_an_unwritable_stdout_is_one_line_and_status_1(cli_broker: Paths) -> None:
    env = cli_env(cli_broker)
    broker = [sys.executable, "-m", "stigmer.broker"]
    for argv in _PRINTING:
        with open("/dev/full", "w") as full:
            result = subprocess.run([*broker, *argv], stdout=full, stderr=subprocess.PIPE,
                                    text=True, env=env, timeout=60)
        last = result.stderr.strip().splitlines()[-1]
        assert result.returncode == 1, (argv, result.stderr)
        assert last == ("stigmer-broker: error: cannot write to standard output: "
                        "No space left on device"), (argv, result.stderr)
        assert "Traceback" not in result.stderr
        closed = subprocess.run(["sh", "-c", 'exec "$@" >&-', "sh", *broker, *argv],
                                stderr=subprocess.PIPE, text=True, env=env, timeout=60)
        assert closed.returncode == 1, (argv, closed.stderr)
        assert closed.stderr.strip().splitlines()[-1] == (
            "stigmer-broker: error: cannot write to standard output: it is closed")
        assert "Traceback" not in closed.stderr


def test_a_reader_that_stops_early_is_not_an_error(cli_broker: Paths) -> None:
    """`stigmer-broker help | head -1` ends quietly, as standard tools do."""
    result = subprocess.run(
        ["sh", "-c", f"{sys.executable} -m stigmer.broker help | head -1"],
        capture_output=True, text=True, env=cli_env(cli_broker), timeout=60)
    assert result.returncode == 0
    assert result.stdout.startswith("usage: stigmer-broker")
    assert result.stderr == ""


def test_counts_and_times_read_as_english(cli_broker: Paths) -> None:
    run_cli(cli_broker, "env", "set", "dev", "A=1", check=True)
    run_cli(cli_broker, "context", "create", "e1", "--environment", "dev", check=True)
    assert "dev" in (listing := run_cli(cli_broker, "env", "list", check=True).stdout)
    assert "1 variable, 0 secret" in listing
    shown = run_cli(cli_broker, "env", "show", "dev", check=True).stdout
    assert shown.startswith("environment dev (1 variable)")
    contexts = run_cli(cli_broker, "context", "list", check=True).stdout
    assert "e1  1 key (0 secret), 1 token, expires " in contexts
    audit = run_cli(cli_broker, "audit", "--execution", "e1", check=True).stdout
    created = next(line for line in audit.splitlines() if "context.created" in line)
    assert re.search(r"\(1 key, expires \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}, "
                     r"environments dev v1\)", created)
    as_json = run_cli(cli_broker, "audit", "--execution", "e1", "--json", check=True).stdout
    assert re.search(r'"detail": "1 key, expires \d{10}, environments dev v1"', as_json)
    assert run_cli(cli_broker, "audit", "--execution", "none-such",
                   check=True).stdout == "no audit records of execution none-such\n"


def test_version_is_quick_to_answer(paths: Paths) -> None:
    """`--version` answers without building the parser (it used to take longer than a
    round trip to the broker)."""
    code = ("import importlib, sys; "
            "importlib.import_module('stigmer.broker.cli.main').main(['--version']); "
            "print('argparse' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}, timeout=60)
    assert out.stdout.splitlines() == ["stigmer-broker 0.1.0", "False"], out.stderr


@pytest.mark.parametrize("shell", ["sh", "fish"])
def test_start_prints_a_line_a_shell_evaluates(paths: Paths, shell: str) -> None:
    """`eval "$(stigmer-broker start --print-env sh)"` adopts the broker's socket, like
    ssh-agent -s; a second start (already running) prints the same line."""
    from conftest import need_program

    need_program(shell)
    env = {k: v for k, v in cli_env(paths).items() if k != "STIGMER_BROKER_SOCKET"}
    env["STIGMER_BROKER_SOCKET"] = str(paths.socket)
    started = run_cli(paths, "start", "--print-env", shell, env=env, check=True).stdout
    try:
        again = run_cli(paths, "start", "--print-env", shell, env=env, check=True).stdout
        assert again == started
        del env["STIGMER_BROKER_SOCKET"]  # a session that does not know the path yet
        status = f"{sys.executable} -m stigmer.broker status"
        script = f"eval \"$({sys.executable} -m stigmer.broker --socket {paths.socket} " \
                 f"start --print-env sh)\"; {status}" if shell == "sh" else \
                 f"eval ({sys.executable} -m stigmer.broker --socket {paths.socket} " \
                 f"start --print-env fish); {status}"
        result = subprocess.run([shell, "-c", script], capture_output=True, text=True,
                                env=env, timeout=60)
        assert result.returncode == 0, result.stderr
        assert f"socket       {paths.socket}" in result.stdout
    finally:
        run_cli(paths, "stop")


def test_one_piped_secret_takes_all_of_stdin(cli_broker: Paths) -> None:
    """`env set pem --secret TLS_KEY < key.pem` stores the whole key, not its first line."""
    pem = "-----BEGIN KEY-----\nMIIB0123456789abcdef\nmore+base64/lines==\n-----END KEY-----\n"
    run_cli(cli_broker, "env", "set", "pem", "--secret", "TLS_KEY", input=pem, check=True)
    shown = run_cli(cli_broker, "env", "show", "pem", "--reveal", "--json", check=True).stdout
    import json

    assert json.loads(shown)["data"]["TLS_KEY"]["value"] == pem.removesuffix("\n")


def test_several_piped_secrets_take_a_line_each_and_refuse_a_leftover(
        cli_broker: Paths) -> None:
    run_cli(cli_broker, "env", "set", "two", "--secret", "A", "--secret", "B",
            input="first\nsecond\n", check=True)
    cut = run_cli(cli_broker, "env", "set", "cut", "--secret", "A", "--secret", "B",
                  input="first\n-----BEGIN KEY-----\nrest of the key\n")
    assert cut.returncode == 2
    assert "more lines than the 2 --secret keys take" in cut.stderr
    assert "rest of the key" not in cut.stderr and "BEGIN" not in cut.stderr
    assert run_cli(cli_broker, "env", "show", "cut").returncode == 1  # nothing stored


def test_an_empty_secret_is_refused(cli_broker: Paths) -> None:
    for given in ("\n", ""):
        result = run_cli(cli_broker, "env", "set", "e", "--secret", "TOKEN", input=given)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("stigmer-broker: error: --secret TOKEN: ")
    assert run_cli(cli_broker, "env", "show", "e").returncode == 1


def test_a_value_too_large_for_an_environment_is_named_at_the_door(cli_broker: Paths) -> None:
    """Linux caps one environment string at 128 KiB with its name: such a value is
    accepted (a mount can pass it) but `env set` says `run` cannot pass it as a variable."""
    big = "x" * (128 * 1024 - 4)  # within the value limit; with "BIG=" and NUL over the cap
    result = run_cli(cli_broker, "env", "set", "big", "--secret", "BIG", input=big)
    assert result.returncode == 0, result.stderr
    assert "BIG: over 128 KiB with the name, too large for a process environment" \
        in result.stderr and "--mount" in result.stderr
    small = run_cli(cli_broker, "env", "set", "small", "--secret", "S", input="x" * 1000)
    assert small.stderr == ""


def test_keys_typed_before_the_command_starts_reach_it(cli_broker: Paths) -> None:
    """`run` on a terminal puts it in raw mode without flushing what was typed ahead."""
    from conftest import PtyProcess

    token = run_cli(cli_broker, "context", "create", "tty", "--secret", "S",
                    input="a-secret-value\n", check=True).stdout.strip()
    env = {**cli_env(cli_broker), "STIGMER_EXECUTION_TOKEN": token}
    term = PtyProcess([sys.executable, "-m", "stigmer.broker", "run", "--", sys.executable,
                       "-c", "import time; time.sleep(1); print('got', input())"], env)
    term.write("typed-ahead\r")  # at once: before run has even fetched the context
    status, shown = term.wait()
    assert status == 0 and "got typed-ahead" in shown, shown


def test_a_socket_the_broker_refuses_is_named_not_called_not_running(paths: Paths) -> None:
    """A socket unit with SocketMode=0644 makes the broker refuse the socket it is handed:
    nothing answers there, and status and the client say why instead of "not running"."""
    import socket as socket_

    paths.socket.parent.mkdir(mode=0o700)
    listener = socket_.socket(socket_.AF_UNIX)
    listener.bind(str(paths.socket))  # bound, not listening: refused, as after the refusal
    try:
        os.chmod(paths.socket, 0o644)
        status = run_cli(paths, "status")
        assert status.returncode == 3
        assert status.stdout.startswith(f"not running (socket {paths.socket}): the broker "
                                        "refuses its socket, whose mode 0644 lets any user")
        assert "journalctl --user -u stigmer-broker" in status.stdout
        env_list = run_cli(paths, "env", "list")
        assert env_list.returncode == 3 and "mode 0644" in env_list.stderr
        os.chmod(paths.socket, 0o600)
        assert run_cli(paths, "status").stdout == f"not running (socket {paths.socket})\n"
    finally:
        listener.close()
