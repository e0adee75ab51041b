"""Shell integration: `context export` for eval, quoted so that no value breaks out."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import (
    NOBODY,
    PtyProcess,
    cli_env,
    cli_for_nobody,
    need_program,
    python_for_nobody,
    run_cli,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from stigmer.broker.config import Paths
from stigmer.broker.manifests import read_env_file
from stigmer.client import Client, variables

if TYPE_CHECKING:
    from stigmer.broker.cli.masking import Masker

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
    need_program(shell)
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


def test_json_round_trips_and_dotenv_refuses_what_it_cannot_carry_by_name(
        exported: tuple[Paths, str]) -> None:
    paths, token = exported
    as_json = _export(paths, token, "json")
    assert json.loads(as_json.stdout) == HOSTILE
    dotenv = _export(paths, token, "dotenv")
    assert dotenv.returncode == 1 and dotenv.stdout == ""
    assert "BACKSLASH, QUOTES, SUBST contain(s) a single quote" in dotenv.stderr
    assert all(v not in dotenv.stderr for v in HOSTILE.values() if v)


def test_a_value_no_env_file_can_carry_is_refused_by_name_by_export_and_mount(
        cli_broker: Paths, short_dir: Path) -> None:
    marker = short_dir / "M"
    with Client(cli_broker.socket) as client:
        token = client.create_context("inject", runtime=variables(
            {"OK": "1"}, {"INJECT": f"ab'; touch {marker}; #"})).token
    exported = _export(cli_broker, token, "dotenv")
    mounted = run_cli(cli_broker, "run", "--token", token, "--mount", "/cfg=env", "--",
                      "touch", str(marker))
    for result in (exported, mounted):
        assert result.returncode == 1 and result.stdout == ""
        assert "INJECT contain(s) a single quote" in result.stderr and "ab'" not in result.stderr
    assert not marker.exists()


def _dotenv_values(marker: Path) -> dict[str, str]:
    """Values a .env file can carry exactly, hostile to sh all the same."""
    return {"SUBST": f"$(touch {marker}) `touch {marker}` $HOME $ end$",
            "SEMICOLON": f"a; touch {marker} #; echo done & | > < && ( )",
            "NEWLINES": f"line one\nline two\n\nexport EVIL=1\ntouch {marker}\n",
            "DQUOTE": 'say "hi" # not a comment', "TILDE": "~root:~", "GLOB": "* ? [a]",
            "SPACES": "  both ends  ", "UNICODE": "ünïcødé ✓ \t tab", "EMPTY": "",
            "BARE": "postgres://u:p@h:5432/db,x=1+2%_-", "HASH": "#start", "BRACE": "{a,b}"}


@pytest.mark.parametrize("reader", ["sh", "bash", "dash", "zsh", "python-dotenv", "docker"])
def test_dotenv_is_exact_and_inert_in_every_reader(cli_broker: Paths, short_dir: Path,
                                                    reader: str) -> None:
    """`set -a; . FILE` used to run code: fish's \\' escape is no escape in sh, so a value
    like ab\\'; touch M; # broke out. Values are now bare (exact everywhere, docker's raw
    --env-file included) or in plain single quotes; what cannot be either is refused."""
    marker = short_dir / "pwned"
    values = _dotenv_values(marker)
    with Client(cli_broker.socket) as client:
        token = client.create_context("dotenv", runtime=variables({}, values)).token
    result = _export(cli_broker, token, "dotenv")
    assert result.returncode == 0, result.stderr
    file = short_dir / "x.env"
    file.write_text(result.stdout)
    if reader == "python-dotenv":
        from dotenv import dotenv_values

        environ = {k: v or "" for k, v in dotenv_values(file).items()}  # ${VAR} expanded
    elif reader == "docker":
        # docker's env-file parser (opts/envfile.go): the text after the first '=' as is;
        # it has no quoting, so only the values written bare can reach it exactly
        lines = [line.partition("=") for line in result.stdout.splitlines()]
        environ = {k: v for k, _, v in lines if k in values}
        values = {k: v for k, v in values.items() if environ.get(k) == v}
        assert set(values) >= {"BARE", "EMPTY"}, environ
    else:
        need_program(reader)
        environ = _environ_after([reader, "-c"], f"set -a; . {file}; {DUMP}")
        assert "EVIL" not in environ
    assert {k: environ.get(k) for k in values} == values
    assert not marker.exists()


def test_read_env_file_reads_back_what_dotenv_writes(cli_broker: Paths,
                                                     short_dir: Path) -> None:
    values = _dotenv_values(short_dir / "pwned")
    with Client(cli_broker.socket) as client:
        token = client.create_context("dotenv", runtime=variables({}, values)).token
    file = short_dir / "x.env"
    file.write_text(_export(cli_broker, token, "dotenv").stdout)
    assert read_env_file(str(file)) == values


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


# ------------------------------------------------------------------ completion


def _complete(paths: Paths, line: str, short_dir: Path) -> list[str]:
    """Ask `stigmer-broker` for completions as the shell scripts do (argcomplete's
    protocol: the command line in COMP_LINE, the answers in a file)."""
    out = short_dir / "completions"
    env = cli_env(paths, _ARGCOMPLETE="1", _ARGCOMPLETE_STDOUT_FILENAME=str(out),
                  COMP_LINE=line, COMP_POINT=str(len(line)), _ARGCOMPLETE_IFS="\n")
    subprocess.run([sys.executable, "-m", "stigmer.broker"], env=env, timeout=60,
                   capture_output=True, check=False)
    words = out.read_text().split("\n") if out.exists() else []
    out.unlink(missing_ok=True)
    return sorted(w.strip() for w in words if w.strip())


def test_completion_offers_commands_flags_and_the_brokers_names(cli_broker: Paths,
                                                                short_dir: Path) -> None:
    run_cli(cli_broker, "env", "set", "prod", "A=1", check=True)
    run_cli(cli_broker, "env", "set", "preview", "A=1", check=True)
    run_cli(cli_broker, "context", "create", "exec-42", check=True)
    assert _complete(cli_broker, "stigmer-broker con", short_dir) == ["context"]
    assert _complete(cli_broker, "stigmer-broker env sh", short_dir) == ["show"]
    assert _complete(cli_broker, "stigmer-broker env show pr", short_dir) == ["preview", "prod"]
    assert _complete(cli_broker, "stigmer-broker context show ex", short_dir) == ["exec-42"]
    assert "--execution" in _complete(cli_broker, "stigmer-broker run --exe", short_dir)
    assert _complete(cli_broker, "stigmer-broker context create x --environment p",
                     short_dir) == ["preview", "prod"]
    run_cli(cli_broker, "stop", check=True)
    started = time.monotonic()  # no broker: names are quietly left out, quickly
    assert _complete(cli_broker, "stigmer-broker env show pr", short_dir) == []
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts_load_in_their_shells(paths: Paths, shell: str,
                                                  short_dir: Path) -> None:
    result = run_cli(paths, "completion", shell)
    assert result.returncode == 0 and "stigmer-broker" in result.stdout, result.stderr
    need_program(shell)
    script = short_dir / f"completion.{shell}"
    script.write_text(result.stdout)
    check = {"bash": f"source {script} && complete -p stigmer-broker",
             "zsh": f"autoload -U compinit && compinit -u && source {script}",
             "fish": f"source {script}; and complete -c stigmer-broker"}[shell]
    loaded = subprocess.run([shell, "-c", check], capture_output=True, text=True, timeout=60)
    assert loaded.returncode == 0, loaded.stderr
    if shell != "zsh":
        assert "stigmer-broker" in loaded.stdout


def test_bash_completes_through_the_script(cli_broker: Paths, short_dir: Path) -> None:
    """The real bash function the script registers, called as bash calls it on TAB."""
    run_cli(cli_broker, "env", "set", "prod", "A=1", check=True)
    script = short_dir / "completion.bash"
    script.write_text(run_cli(cli_broker, "completion", "bash", check=True).stdout)
    shim = short_dir / "bin" / "stigmer-broker"
    shim.parent.mkdir()
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m stigmer.broker \"$@\"\n")
    shim.chmod(0o755)
    env = cli_env(cli_broker, PATH=f"{shim.parent}:/usr/bin:/bin")
    driver = (f"source {script}; COMP_WORDS=(stigmer-broker env show pr); COMP_CWORD=3; "
              "COMP_LINE='stigmer-broker env show pr'; COMP_POINT=${#COMP_LINE}; "
              "_python_argcomplete stigmer-broker pr show; printf '%s\\n' \"${COMPREPLY[@]}\"")
    result = subprocess.run(["bash", "-c", driver], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.stdout.split() == ["prod"], result.stderr


# -------------------------------------------------------------------- man page


def test_the_man_page_is_generated_current_and_printed() -> None:
    import make_manpage

    assert make_manpage.main(["--check"]) == 0, "run `make man`"
    page = subprocess.run([sys.executable, "-m", "stigmer.broker", "help", "--man"],
                          capture_output=True, text=True, timeout=60, check=True).stdout
    assert page == make_manpage.TARGET.read_text()
    assert page.startswith(".TH STIGMER\\-BROKER \"1\"")
    for command in ("context export", "key import", "completion"):
        assert command.replace(" ", " ") in page.replace("\\-", "-"), command
    if shutil.which("man"):
        rendered = subprocess.run(["man", "-l", "-"], input=page, capture_output=True,
                                  text=True, timeout=60, env={"MANWIDTH": "80", "PATH":
                                                              "/usr/bin:/bin"})
        assert "stigmer-broker - the local secret broker" in rendered.stdout


# ------------------------------------------------------------------ masked run

SECRET = "hunter2-sentinel-7f3a"


@pytest.fixture
def masked(cli_broker: Paths) -> tuple[Paths, dict[str, str]]:
    """A broker with a context holding SECRET; the env a runner would have."""
    with Client(cli_broker.socket) as client:
        token = client.create_context("masked", runtime=variables(
            {"PLAIN": "visible-value"}, {"SECRET": SECRET})).token
    return cli_broker, cli_env(cli_broker, STIGMER_EXECUTION_TOKEN=token)


def _run(env: dict[str, str], script: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stigmer.broker", "run", *flags, "--",
                           sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=60)


SPLIT = ("import os, sys, time\n"
         "s = os.environ['SECRET']\n"
         "print('plain', os.environ['PLAIN'], flush=True)\n"
         "sys.stdout.write(s[:5]); sys.stdout.flush(); time.sleep(0.3)\n"
         "sys.stdout.write(s[5:] + '\\n'); sys.stdout.flush()\n"
         "print('err', s, file=sys.stderr)\n"
         "sys.exit(7)\n")


def test_run_masks_secrets_in_both_streams_even_split_across_writes(
        masked: tuple[Paths, dict[str, str]]) -> None:
    _, env = masked
    result = _run(env, SPLIT)
    assert result.returncode == 7
    assert SECRET not in result.stdout and SECRET not in result.stderr
    assert "plain visible-value" in result.stdout
    assert result.stdout.count("<concealed by stigmer>") == 1
    assert "err <concealed by stigmer>" in result.stderr


KEY_SENTINEL = "masterkey-sentinel-5c1e"
PEEK = ("import os, sys\n"
        "def peek(pid):\n"
        "    try:\n"
        "        with open(f'/proc/{pid}/environ', 'rb') as f:\n"
        "            block = f.read()\n"
        "    except OSError:\n"
        "        return 'unreadable'\n"
        "    found = [s for s in sys.argv[1:] if s.encode() in block]\n"
        "    return 'found ' + ','.join(found) if found else 'clean'\n"
        "print('self', peek('self'), 'parent', peek(os.getppid()), flush=True)\n")


@pytest.mark.parametrize("mode", [(), ("--no-masking",), ("--mount", "/cfg=env"),
                                  ("--no-masking", "--mount", "/cfg=env")],
                         ids=["masked", "no-masking", "mount", "mount-no-masking"])
def test_the_command_finds_no_token_or_key_in_its_own_or_runs_environment(
        masked: tuple[Paths, dict[str, str]], mode: tuple[str, ...]) -> None:
    """The command used to read /proc/$PPID/environ and find the token and the master
    key that `run` (alive, to mask its output) had been started with."""
    _, env = masked
    env = {**env, "STIGMER_ENCRYPTION_KEY": KEY_SENTINEL}
    result = subprocess.run([sys.executable, "-m", "stigmer.broker", "run", *mode, "--",
                             sys.executable, "-c", PEEK, env["STIGMER_EXECUTION_TOKEN"],
                             KEY_SENTINEL], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "found" not in result.stdout, result.stdout
    assert "self clean" in result.stdout


def test_runs_environ_is_closed_to_the_command_as_an_ordinary_user(short_dir: Path) -> None:
    """As root the command may read anything; as the ordinary user who runs it, `run`
    (not dumpable) keeps its /proc/PID/environ closed to the command."""
    cli = cli_for_nobody()
    os.chmod(short_dir, 0o711)
    home = short_dir / "nobody"
    home.mkdir(mode=0o700)
    os.chown(home, NOBODY, NOBODY)
    paths = Paths(home=home / "h", socket=home / "run" / "b.sock")
    env = cli_env(paths, HOME=str(home))

    def as_nobody(*args: str, stdin: str = "", **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli, *args], user=NOBODY, group=NOBODY, extra_groups=[],
                              env={**env, **extra}, input=stdin, capture_output=True,
                              text=True, timeout=60)

    daemon = subprocess.Popen([*cli, "serve"], user=NOBODY, group=NOBODY, extra_groups=[],
                              env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not paths.socket.exists():
            assert daemon.poll() is None, daemon.communicate()[1]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        created = as_nobody("context", "create", "peek", "--secret", "S", "--json",
                            stdin=SECRET + "\n")
        assert created.returncode == 0, created.stderr
        token = json.loads(created.stdout)["token"]
        result = as_nobody("run", "--", cli[0], "-c", PEEK, token, KEY_SENTINEL,
                           STIGMER_EXECUTION_TOKEN=token, STIGMER_ENCRYPTION_KEY=KEY_SENTINEL)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "self clean parent unreadable", result.stdout
    finally:
        daemon.terminate()
        daemon.communicate(timeout=30)


GUARDED = ("import ctypes, os, site, sys\n"
           "site.addsitedir(sys.argv[1])\n"
           "from stigmer.broker.cli.guard import guard_run_process\n"
           "guard_run_process(['STIGMER_EXECUTION_TOKEN'])\n"
           "fields = open('/proc/self/stat', 'rb').read().rpartition(b')')[2].split()\n"
           "start, end = int(fields[47]), int(fields[48])\n"
           "block = ctypes.string_at(start, end - start)\n"
           "print('found' if sys.argv[2].encode() in block else 'blank', "
           "os.environ.get('STIGMER_EXECUTION_TOKEN'))\n")


def test_the_guard_blanks_the_environment_block_as_an_ordinary_user() -> None:
    """Not dumpable, an ordinary user's /proc/self/environ is root's: the block is read
    and blanked in place, so what a root-run test saw holds for users too."""
    python = python_for_nobody()
    sentinel = "stg_token-sentinel-93f2"
    result = subprocess.run([python, "-c", GUARDED, sysconfig.get_paths()["purelib"],
                             sentinel], user=NOBODY, group=NOBODY, extra_groups=[],
                            env={"STIGMER_EXECUTION_TOKEN": sentinel, "PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["blank", "None"], result.stdout


def test_mcp_proxy_closes_its_environment_to_the_server(
        masked: tuple[Paths, dict[str, str]], short_dir: Path) -> None:
    """The MCP server is the proxy's child, often third-party code: it must not find the
    token or the key in /proc/$PPID/environ, as `run`'s command does not."""
    _, env = masked
    env = {**env, "STIGMER_ENCRYPTION_KEY": KEY_SENTINEL}
    config = short_dir / "mcp.json"
    config.write_text(json.dumps({"mcpServers": {"peek": {
        "command": sys.executable,
        "args": ["-c", PEEK, env["STIGMER_EXECUTION_TOKEN"], KEY_SENTINEL]}}}))
    result = subprocess.run([sys.executable, "-m", "stigmer.broker", "mcp", "proxy",
                             "--server", "peek", "--config", str(config)], env=env,
                            input="", capture_output=True, text=True, timeout=60)
    assert "self clean parent" in result.stdout, (result.stdout, result.stderr)
    assert "found" not in result.stdout, result.stdout


@pytest.mark.parametrize("how", ["flag", "variable"])
def test_no_masking_execs_as_before(masked: tuple[Paths, dict[str, str]], how: str) -> None:
    _, env = masked
    if how == "variable":
        result = _run({**env, "STIGMER_RUN_NO_MASKING": "1"}, SPLIT)
    else:
        result = _run(env, SPLIT, "--no-masking")
    assert result.returncode == 7 and SECRET in result.stdout


def test_a_death_by_signal_is_128_plus_n_and_signals_are_passed_on(
        masked: tuple[Paths, dict[str, str]]) -> None:
    _, env = masked
    assert _run(env, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)").returncode \
        == 128 + 9
    waiter = ("import signal, sys, time\n"
              "def bye(n, f): print('got', n, flush=True); sys.exit(3)\n"
              "signal.signal(signal.SIGTERM, bye)\n"
              "print('ready', flush=True)\n"
              "time.sleep(30)\n")
    proc = subprocess.Popen([sys.executable, "-m", "stigmer.broker", "run", "--",
                             sys.executable, "-c", waiter], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 3 and f"got {int(signal.SIGTERM)}" in out


def test_on_a_terminal_the_command_gets_one_with_stdin_and_window_size(
        masked: tuple[Paths, dict[str, str]]) -> None:
    _, env = masked
    script = ("import os, signal, sys\n"
              "print('tty', sys.stdin.isatty(), sys.stdout.isatty(), flush=True)\n"
              "print('size', os.get_terminal_size().columns, flush=True)\n"
              "signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGWINCH])\n"
              "line = input('type: ')\n"
              "print('echo', line, os.environ['SECRET'], flush=True)\n"
              "while os.get_terminal_size().columns != 123:  # blocked before: none lost\n"
              "    signal.sigwait([signal.SIGWINCH])\n"
              "print('resized', os.get_terminal_size().columns, flush=True)\n")
    term = PtyProcess([sys.executable, "-m", "stigmer.broker", "run", "--", sys.executable,
                       "-c", script], env)
    term.resize(30, 100)
    term.read_until("type: ")
    term.write("hello there\r")
    term.read_until("echo hello there")
    term.resize(40, 123)  # the kernel sends SIGWINCH to `run`, which passes it on
    status, shown = term.wait()
    assert status == 0, shown
    assert "tty True True" in shown and "resized 123" in shown
    assert SECRET not in shown and "echo hello there <concealed by stigmer>" in shown


def test_ctrl_c_at_the_terminal_reaches_the_command(masked: tuple[Paths, dict[str, str]]
                                                    ) -> None:
    _, env = masked
    script = ("import time\n"
              "try:\n"
              "    print('waiting', flush=True); time.sleep(30)\n"
              "except KeyboardInterrupt:\n"
              "    print('interrupted', flush=True); raise SystemExit(5)\n")
    term = PtyProcess([sys.executable, "-m", "stigmer.broker", "run", "--", sys.executable,
                       "-c", script], env)
    term.read_until("waiting")
    term.write("\x03")  # Ctrl-C, through our raw terminal to the command's
    status, shown = term.wait()
    assert status == 5 and "interrupted" in shown, shown


def test_ctrl_c_reaches_the_command_when_the_suite_runs_in_the_background() -> None:
    """`make test &` from a non-interactive shell starts the suite with SIGINT ignored;
    the terminal the tests drive must still deliver Ctrl-C, as a person's does."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        term = PtyProcess([sys.executable, "-c", "import signal; "
                           "print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)"],
                          dict(os.environ))
    finally:
        signal.signal(signal.SIGINT, previous)
    status, shown = term.wait()
    assert status == 0 and shown.strip() == "False", shown


def test_a_missing_shell_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    """.ci/run installs fish and zsh: there a missing one must not pass as a skip."""
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="needed under CI=true"):
        need_program("no-such-shell-here")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        need_program("no-such-shell-here")


def _fed_in_chunks(masker: Masker, data: bytes, cuts: list[int]) -> bytes:
    """What ``masker`` makes of ``data`` fed in the pieces ``cuts`` marks, then flushed."""
    out = b""
    start = 0
    for cut in sorted({min(c, len(data)) for c in cuts}):
        out += masker.feed(data[start:cut])
        start = cut
    return out + masker.feed(data[start:]) + masker.flush()


@settings(max_examples=300, deadline=None)
@given(secrets=st.lists(st.text(alphabet="abc", min_size=1, max_size=6), min_size=1,
                        max_size=4),
       text=st.text(alphabet="abcx\n", max_size=80),
       cuts=st.lists(st.integers(min_value=0, max_value=80), max_size=10))
def test_masking_a_stream_in_any_chunks_equals_masking_it_whole(
        secrets: list[str], text: str, cuts: list[int]) -> None:
    import re

    from stigmer.broker.cli.masking import MASK, Masker

    ordered = sorted({s.encode() for s in secrets}, key=len, reverse=True)
    whole = re.sub(b"|".join(map(re.escape, ordered)), MASK.replace(b"\\", b"\\\\"),
                   text.encode())
    data = text.encode()
    out = _fed_in_chunks(Masker(secrets), data, cuts)
    assert out == whole


def test_a_masker_compiles_its_patterns_only_when_the_output_needs_them() -> None:
    """`run` starts two maskers before the command; the pattern of secrets with escapes
    between their bytes took 0.09 s to compile for ten secrets in all their forms, paid
    by every `run`, also of a command that writes nothing."""
    from stigmer.broker.cli.masking import MASK, Masker

    masker = Masker(["hunter2-secret"])
    assert masker.feed(b"plain output\n") == b"plain output\n"
    assert (masker._pattern, masker._escaped_anchors) == (None, None)
    assert masker.feed(b"a hunter2-secret\n") == b"a " + MASK + b"\n"
    assert masker._escaped_anchors is None  # no ESC yet
    assert masker.feed(b"\x1b[31mred\x1b[0m\n") == b"\x1b[31mred\x1b[0m\n"
    assert masker._escaped_anchors is not None


def test_a_secret_with_colour_escapes_inside_is_masked_and_the_colours_kept() -> None:
    from stigmer.broker.cli.masking import MASK, Masker

    masker = Masker(["hunter2-secret"])
    assert masker.feed(b"x hun\x1b[31mter2-se\x1b[0mcret y\n") == (
        b"x " + MASK + b"\x1b[31m\x1b[0m y\n")
    # split anywhere, an escape's own bytes included, it is the same
    stream = b"a \x1b[1;32mhunter2\x1b[0m-secret b hunter2-sec"
    out = b"".join(masker.feed(stream[i:i + 1]) for i in range(len(stream))) + masker.flush()
    assert out == b"a \x1b[1;32m" + MASK + b"\x1b[0m b hunter2-sec"
    assert Masker(["abc"]).feed(b"\x1b[31mred\x1b[0m") == b"\x1b[31mred\x1b[0m"


@settings(max_examples=300, deadline=None)
@given(secrets=st.lists(st.text(alphabet="abc", min_size=1, max_size=6), min_size=1,
                        max_size=3),
       text=st.lists(st.sampled_from(["a", "b", "c", "x", "\n", "\x1b[31m", "\x1b[0m",
                                      "\x1b[", "\x1b", "1;"]), max_size=40),
       cuts=st.lists(st.integers(min_value=0, max_value=120), max_size=10))
def test_masking_with_escapes_in_any_chunks_equals_masking_it_whole(
        secrets: list[str], text: list[str], cuts: list[int]) -> None:
    """With escapes about, the same: no secret is seen with its escapes taken out, and
    where the stream is cut does not change what comes out."""
    import re

    from stigmer.broker.cli.masking import MASK, Masker

    data = "".join(text).encode()
    one = Masker(secrets)
    whole = one.feed(data) + one.flush()
    out = _fed_in_chunks(Masker(secrets), data, cuts)
    assert out == whole
    visible = re.sub(rb"\x1b\[[0-?]*[ -/]*[@-~]", b"", out).replace(MASK, b"|")
    assert not any(s.encode() in visible for s in secrets)


def test_masking_output_full_of_a_secrets_first_byte_stays_fast() -> None:
    """A 64 KiB PEM-like secret in output full of '-' cost a slice per '-' (13 MiB/s
    against 12 GiB/s for other output); it is linear now."""
    from stigmer.broker.cli.masking import Masker

    secret = "-----BEGIN KEY-----\n" + "A" * 65000 + "\n-----END KEY-----"
    masker = Masker([secret])
    chunk = b"-" * (1 << 20)
    started = time.perf_counter()
    for _ in range(32):
        masker.feed(chunk)
    assert time.perf_counter() - started < 1.0  # before: 2.5 s; now about 0.01 s


PEM = ("-----BEGIN TEST KEY-----\nMIIEvQIBADANBgkqhkiG9w0B\nAQEFAASCBKcwggSjAgEAAoIB\n"
       "-----END TEST KEY-----")


@pytest.fixture
def pem(cli_broker: Paths) -> dict[str, str]:
    with Client(cli_broker.socket) as client:
        token = client.create_context("pem", runtime=variables({}, {"PEM": PEM,
                                                                    "SECRET": SECRET})).token
    return cli_env(cli_broker, STIGMER_EXECUTION_TOKEN=token)


def test_a_multi_line_secret_is_masked_on_a_terminal(pem: dict[str, str]) -> None:
    """The pty turns each \\n into \\r\\n before `run` reads it: a PEM key went out
    whole on a terminal."""
    term = PtyProcess([sys.executable, "-m", "stigmer.broker", "run", "--", sys.executable,
                       "-c", "import os; print('key', os.environ['PEM'], 'end', flush=True)"],
                      pem)
    status, shown = term.wait()
    assert status == 0, shown
    assert "MIIEvQ" not in shown and "key <concealed by stigmer> end" in shown


def test_a_secret_split_between_stdout_and_stderr_into_one_file_is_masked(
        pem: dict[str, str]) -> None:
    script = ("import os, sys, time\n"
              "s = os.environ['SECRET']\n"
              "sys.stdout.write('a ' + s[:6]); sys.stdout.flush(); time.sleep(0.2)\n"
              "sys.stderr.write(s[6:] + ' b\\n'); sys.stderr.flush()\n")
    result = subprocess.run([sys.executable, "-m", "stigmer.broker", "run", "--",
                             sys.executable, "-c", script], env=pem, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=60)
    assert result.returncode == 0
    assert result.stdout == "a <concealed by stigmer> b\n"


def test_a_secret_coloured_by_the_command_is_masked(pem: dict[str, str]) -> None:
    script = ("import os\n"
              "s = os.environ['SECRET']\n"
              "print(s[:4] + '\\x1b[31m' + s[4:9] + '\\x1b[0m' + s[9:], flush=True)\n")
    result = _run(pem, script)
    assert result.returncode == 0
    assert result.stdout == "<concealed by stigmer>\x1b[31m\x1b[0m\n"


# -------------------------------------------------------------------- --mount

READER = ("import json, os, sys, yaml\n"
          "path = sys.argv[1]\n"
          "target = os.readlink(path)\n"
          "text = open(path).read()\n"
          "try:\n"
          "    with open(path, 'r+') as f:  # truncating it is allowed (run does)\n"
          "        f.write('x')\n"
          "    writable = 'yes'\n"
          "except OSError:\n"
          "    writable = 'no'\n"
          "print(json.dumps({'arg': path, 'target': target, 'text': text, "
          "'writable': writable}))\n")


@pytest.mark.parametrize("fmt", ["env", "json", "yaml"])
def test_mount_gives_the_context_as_a_sealed_memory_file(masked: tuple[Paths, dict[str, str]],
                                                         fmt: str, short_dir: Path) -> None:
    import yaml

    _, env = masked
    result = subprocess.run([sys.executable, "-m", "stigmer.broker", "run", "--no-masking",
                             "--mount", f"/etc/agent.{fmt}={fmt}", "--", sys.executable, "-c",
                             READER, f"/etc/agent.{fmt}"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["arg"].startswith("/dev/fd/")  # substituted in the arguments
    assert seen["target"].startswith("/memfd:stigmer-mount:agent.")  # never on disk
    assert seen["writable"] == "no"  # sealed
    if fmt == "json":
        values = json.loads(seen["text"])
    elif fmt == "yaml":
        values = yaml.safe_load(seen["text"])
    else:
        file = short_dir / "mounted.env"
        file.write_text(seen["text"])
        values = read_env_file(str(file))
    assert values == {"PLAIN": "visible-value", "SECRET": SECRET}


def test_mount_replaces_whole_arguments_only(masked: tuple[Paths, dict[str, str]]) -> None:
    """The path used to be replaced as a substring: /cfg/a.bak became /dev/fd/N.bak."""
    _, env = masked
    result = subprocess.run([sys.executable, "-m", "stigmer.broker", "run", "--mount",
                             "/cfg/a=json", "--", sys.executable, "-c",
                             "import json, sys; print(json.dumps(sys.argv[1:]))", "/cfg/a",
                             "/cfg/a.bak", "--config=/cfg/a", "x/cfg/a", "--c=/cfg/a/b"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    fd, bak, option, inside, deeper = json.loads(result.stdout)
    assert fd.startswith("/dev/fd/") and option == f"--config={fd}"
    assert (bak, inside, deeper) == ("/cfg/a.bak", "x/cfg/a", "--c=/cfg/a/b")


@pytest.mark.parametrize("flags", [(), ("--no-masking",)], ids=["masked", "no-masking"])
def test_a_descendant_left_behind_reads_an_empty_mount(masked: tuple[Paths, dict[str, str]],
                                                       short_dir: Path,
                                                       flags: tuple[str, ...]) -> None:
    """The memfd outlived `run`: a background child read the whole context after the
    command and `run` had exited. `run` now empties it when the command exits."""
    _, env = masked
    out = short_dir / "late-read"
    leave_behind = f'(sleep 1; cat "$1" > {out}.part; mv {out}.part {out}) >/dev/null 2>&1 &'
    result = subprocess.run([sys.executable, "-m", "stigmer.broker", "run", *flags, "--mount",
                             "/cfg=env", "--", "sh", "-c", f'head -c 6 "$1"; {leave_behind}',
                             "sh", "/cfg"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "PLAIN="  # the command itself read the file
    deadline = time.monotonic() + 30
    while not out.exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert out.read_bytes() == b""


def test_mount_values_that_yaml_would_change_stay_strings(cli_broker: Paths) -> None:
    import yaml

    tricky = {"OCTAL": "01234", "TIME": "12:30", "BOOL": "yes", "NULL": "null", "F": "1.10"}
    with Client(cli_broker.socket) as client:
        token = client.create_context("tricky", runtime=variables(tricky)).token
    env = cli_env(cli_broker, STIGMER_EXECUTION_TOKEN=token)
    result = subprocess.run([sys.executable, "-m", "stigmer.broker", "run", "--mount",
                             "CFG=yaml", "--", "cat", "CFG"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout) == tricky


def test_a_bad_mount_is_a_usage_error_before_anything_runs(paths: Paths) -> None:
    result = run_cli(paths, "run", "--token", "stg_x", "--mount", "/x=toml", "--", "true")
    assert result.returncode == 2 and "PATH=FORMAT" in result.stderr


# ------------------------------------------------------- destructive commands confirm


def _term(paths: Paths, *args: str) -> PtyProcess:
    return PtyProcess([sys.executable, "-m", "stigmer.broker", *args], cli_env(paths))


def test_destructive_commands_ask_on_a_terminal(cli_broker: Paths) -> None:
    run_cli(cli_broker, "env", "set", "prod", "A=1", check=True)
    term = _term(cli_broker, "env", "delete", "prod")
    term.read_until("delete environment prod and its 1 variable? [y/N] ")
    term.write("n\r")
    status, shown = term.wait()
    assert status == 1 and "cancelled: nothing was changed" in shown
    assert run_cli(cli_broker, "env", "show", "prod").returncode == 0  # still there
    term = _term(cli_broker, "env", "delete", "prod")
    term.read_until("[y/N] ")
    term.write("y\r")
    assert term.wait()[0] == 0
    assert run_cli(cli_broker, "env", "show", "prod").returncode == 1

    token = run_cli(cli_broker, "context", "create", "c1", check=True).stdout.strip()
    term = _term(cli_broker, "context", "complete", "c1")
    term.read_until("revoke its 1 live token(s)? [y/N] ")
    term.write("\r")  # the default is no
    assert term.wait()[0] == 1
    assert run_cli(cli_broker, "context", "show", "c1").returncode == 0
    run_cli(cli_broker, "context", "release", "--token", token, check=True)

    term = _term(cli_broker, "key", "rotate")
    term.read_until("replace the master key")
    term.write("no\r")
    assert term.wait()[0] == 1


def test_without_a_terminal_destructive_commands_need_yes(cli_broker: Paths) -> None:
    run_cli(cli_broker, "env", "set", "prod", "A=1", check=True)
    run_cli(cli_broker, "context", "create", "c1", check=True)
    for args in (("env", "delete", "prod"), ("context", "complete", "c1"), ("key", "rotate")):
        result = run_cli(cli_broker, *args, input="y\n")  # a pipe is not someone answering
        assert result.returncode == 2, (args, result.stderr)
        assert "cannot be undone: confirm it with --yes" in result.stderr
    assert run_cli(cli_broker, "env", "delete", "prod", "-y").returncode == 0
    assert run_cli(cli_broker, "context", "complete", "c1", "-y").returncode == 0
    with Client(cli_broker.socket) as client:  # a context with no live token: not asked
        token = client.create_context("spent", max_uses=1).token
        client.fetch_context(token)
    assert run_cli(cli_broker, "context", "complete", "spent").returncode == 0


def test_short_flags_e_and_s(cli_broker: Paths) -> None:
    run_cli(cli_broker, "env", "set", "prod", "-s", "TOKEN", input="t0k\n", check=True)
    token = run_cli(cli_broker, "context", "create", "c1", "--environment", "prod",
                    "-e", "MODE=fast", "-s", "EXTRA=x", check=True).stdout.strip()
    result = run_cli(cli_broker, "context", "export", "--format", "json", "--token", token)
    assert json.loads(result.stdout) == {"TOKEN": "t0k", "MODE": "fast", "EXTRA": "x"}
