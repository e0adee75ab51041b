"""Running under a service manager: unit files, socket activation, sd_notify, launchd."""

from __future__ import annotations

import os
import plistlib
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from conftest import cli_env, make_config, run_cli, start_broker

from stigmer.broker.config import Paths
from stigmer.broker.daemon.install import LAUNCHD, SYSTEMD, render
from stigmer.broker.daemon.systemd import SystemdError, systemd_unit, watchdog_interval
from stigmer.client import Client

EXEC = "/opt/stigmer venv/bin/stigmer-broker"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def rendered(tmp: Path) -> dict[str, str]:
    files = render(SYSTEMD, exec_path=EXEC, home=Path("/home/u/.stigmer"), user_home=tmp)
    return {f.path.name: f.content for f in files}


def test_socket_unit(short_dir: Path) -> None:
    unit = parse_unit(rendered(short_dir)["stigmer-broker.socket"])
    assert unit["Socket"]["ListenStream"] == ["%t/stigmer/broker.sock"]
    assert unit["Socket"]["SocketMode"] == ["0600"]
    assert unit["Socket"]["DirectoryMode"] == ["0700"]
    assert unit["Install"]["WantedBy"] == ["sockets.target"]


def test_service_unit(short_dir: Path) -> None:
    service = parse_unit(rendered(short_dir)["stigmer-broker.service"])["Service"]
    assert service["Type"] == ["notify"]
    assert service["ExecStart"] == [f'"{EXEC}" serve --home /home/u/.stigmer '
                                    "--socket %t/stigmer/broker.sock"]
    expected = {"NoNewPrivileges": "yes", "PrivateTmp": "yes", "ProtectSystem": "strict",
                "ReadWritePaths": "/home/u/.stigmer", "RestrictAddressFamilies": "AF_UNIX",
                "LockPersonality": "yes", "RestrictRealtime": "yes",
                "SystemCallArchitectures": "native", "UMask": "0077", "LimitCORE": "0",
                "Restart": "on-failure", "WatchdogSec": "30"}
    for key, value in expected.items():
        assert service[key] == [value], key


def test_systemd_analyze_verify(short_dir: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    for name, text in rendered(short_dir).items():
        (short_dir / name).write_text(text.replace(f'"{EXEC}"', sys.executable))
    runtime = short_dir / "xdg"
    runtime.mkdir(mode=0o700)
    result = subprocess.run(
        [analyze, "--user", "verify", str(short_dir / "stigmer-broker.socket"),
         str(short_dir / "stigmer-broker.service")], capture_output=True, text=True,
        env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)}, timeout=60)
    if "Failed to initialize manager" in result.stderr:
        pytest.skip(f"systemd-analyze cannot run here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    assert "Unknown" not in result.stderr and "rror" not in result.stderr, result.stderr


def test_plist(short_dir: Path) -> None:
    files = render(LAUNCHD, exec_path="/opt/a&b/stigmer-broker", home=Path("/Users/u/.stigmer"),
                   user_home=short_dir)
    assert files[0].path == short_dir / "Library/LaunchAgents/dev.stigmer.broker.plist"
    plist = plistlib.loads(files[0].content.encode())
    assert plist["Label"] == "dev.stigmer.broker"
    assert plist["ProgramArguments"] == ["/opt/a&b/stigmer-broker", "serve", "--home",
                                         "/Users/u/.stigmer"]
    # restarted when it fails, not when `stigmer-broker stop` ends it cleanly
    assert plist["KeepAlive"] == {"SuccessfulExit": False} and plist["RunAtLoad"] is True
    assert plist["StandardErrorPath"] == "/Users/u/.stigmer/broker.log"


def test_service_install_and_uninstall(paths: Paths, short_dir: Path) -> None:
    env = cli_env(paths, HOME=str(short_dir), XDG_CONFIG_HOME=str(short_dir / "cfg"))
    printed = run_cli(paths, "service", "install", "--systemd", "--print", env=env)
    assert printed.returncode == 0 and "Type=notify" in printed.stdout
    assert not (short_dir / "cfg").exists()
    done = run_cli(paths, "service", "install", "--systemd", env=env)
    assert done.returncode == 0, done.stderr
    assert "systemctl --user enable --now stigmer-broker.socket" in done.stdout
    unit = short_dir / "cfg/systemd/user/stigmer-broker.service"
    assert f"--home {paths.home}" in unit.read_text()
    assert paths.home.is_dir()
    mac = run_cli(paths, "service", "install", "--launchd", env=env)
    assert "launchctl bootstrap gui/" in mac.stdout
    assert (short_dir / "Library/LaunchAgents/dev.stigmer.broker.plist").exists()
    gone = run_cli(paths, "service", "uninstall", "--systemd", env=env)
    assert gone.returncode == 0 and not unit.exists()


def test_unit_name_from_cgroup() -> None:
    text = "0::/user.slice/user-1000.slice/user@1000.service/app.slice/stigmer-broker.service\n"
    assert systemd_unit(text) == "stigmer-broker.service"
    assert systemd_unit("0::/user.slice/user-1000.slice/session-2.scope\n") == "session-2.scope"
    assert systemd_unit("0::/\n") == ""


# ------------------------------------------------------------ socket activation


def listening_socket(path: Path) -> socket.socket:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(16)
    return sock


def activate(paths: Paths, fd: int, *, listen_pid: str | None = None) -> subprocess.Popen[str]:
    """Start `serve` as systemd would: the socket as fd 3, LISTEN_PID = its own pid."""
    script = (
        "import os, sys\n"
        f"os.dup2({fd}, 3)\n"
        f"os.close({fd})\n" if fd != 3 else "import os, sys\n"
    ) + (
        "os.environ['LISTEN_FDS'] = '1'\n"
        f"os.environ['LISTEN_PID'] = {listen_pid!r} or str(os.getpid())\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'stigmer.broker', 'serve'])\n"
    )
    return subprocess.Popen([sys.executable, "-c", script], pass_fds=(fd,),
                            env=cli_env(paths), text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def wait_for(paths: Paths, proc: subprocess.Popen[str]) -> None:
    import time

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited: {proc.communicate()[1]}")
        try:
            with Client(paths.socket) as client:
                client.status()
            return
        except Exception:
            time.sleep(0.05)
    raise AssertionError("daemon did not answer")


def test_socket_activation_serves_like_a_bound_socket(paths: Paths) -> None:
    sock = listening_socket(paths.socket)
    proc = activate(paths, sock.fileno())
    sock.close()  # the daemon holds it now, as systemd would
    try:
        wait_for(paths, proc)
        status = run_cli(paths, "status", "--json", check=True)
        assert '"started_by": "socket-activated"' in status.stdout
        run_cli(paths, "env", "set", "e", "A=1", check=True)
        token = run_cli(paths, "context", "create", "x", "--environment", "e",
                        check=True).stdout.strip()
        with Client(paths.socket) as client:
            assert client.fetch_context(token)["A"] == "1"
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert paths.socket.exists()  # systemd's socket stays for the next activation


def test_wrong_listen_pid_is_refused(paths: Paths) -> None:
    sock = listening_socket(paths.socket)
    proc = activate(paths, sock.fileno(), listen_pid="1")
    sock.close()
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "LISTEN_PID is 1" in err and "Traceback" not in err


def test_non_socket_fd_3_is_refused(paths: Paths, short_dir: Path) -> None:
    with open(short_dir / "plain.txt", "w") as f:
        proc = activate(paths, f.fileno())
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "fd 3 is not a socket" in err and "Traceback" not in err


def test_datagram_fd_3_is_refused(paths: Paths, short_dir: Path) -> None:
    dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dgram.bind(str(short_dir / "d.sock"))
    proc = activate(paths, dgram.fileno())
    dgram.close()
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and "SOCK_DGRAM" in err


def test_sd_notify_ready_only_when_serving_and_stopping(paths: Paths, short_dir: Path) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(short_dir / "notify.sock"))
    notify.settimeout(30)
    env = cli_env(paths, NOTIFY_SOCKET=str(short_dir / "notify.sock"))
    proc = subprocess.Popen([sys.executable, "-m", "stigmer.broker", "serve"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        message = notify.recv(4096).decode()
        assert "READY=1" in message.splitlines()
        with Client(paths.socket) as client:  # the socket answers as soon as READY arrives
            client.status()
        proc.send_signal(signal.SIGTERM)
        stopping = notify.recv(4096).decode()
        assert "STOPPING=1" in stopping.splitlines()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        notify.close()
    assert proc.returncode == 0


# ------------------------------------------------------------ watchdog


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 42) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, 42) is None
    for bad in ("0", "-5", "soon"):
        with pytest.raises(SystemdError, match="WATCHDOG_USEC"):
            watchdog_interval({"WATCHDOG_USEC": bad})


def test_sd_notify_watchdog_arrives_while_serving(paths: Paths, short_dir: Path) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(short_dir / "notify.sock"))
    notify.settimeout(30)
    env = cli_env(paths, NOTIFY_SOCKET=str(short_dir / "notify.sock"),
                  WATCHDOG_USEC="100000", WATCHDOG_PID="")  # PID: set below, as systemd does
    script = ("import os, sys\n"
              "os.environ['WATCHDOG_PID'] = str(os.getpid())\n"
              "os.execv(sys.executable, [sys.executable, '-m', 'stigmer.broker', 'serve'])\n")
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        messages = [notify.recv(4096).decode() for _ in range(6)]
        assert any("READY=1" in m.splitlines() for m in messages)
        assert sum(m == "WATCHDOG=1" for m in messages) >= 4, messages
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
        notify.close()
    assert proc.returncode == 0, err


def test_sd_notify_watchdog_for_another_pid_is_not_sent(paths: Paths, short_dir: Path) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(short_dir / "notify.sock"))
    notify.settimeout(30)
    env = cli_env(paths, NOTIFY_SOCKET=str(short_dir / "notify.sock"),
                  WATCHDOG_USEC="100000", WATCHDOG_PID="1")
    proc = subprocess.Popen([sys.executable, "-m", "stigmer.broker", "serve"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "READY=1" in notify.recv(4096).decode().splitlines()
        proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in notify.recv(4096).decode().splitlines()  # no WATCHDOG between
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        notify.close()


def _drain(sock: socket.socket) -> list[bytes]:
    got = []
    while True:
        try:
            got.append(sock.recv(4096))
        except BlockingIOError:
            return got


@pytest.mark.anyio
async def test_watchdog_is_fed_by_the_event_loop_and_stops_while_it_is_blocked(
        paths: Paths, short_dir: Path) -> None:
    import time

    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(short_dir / "notify.sock"))
    notify.setblocking(False)
    config = make_config(paths)._replace(notify_socket=str(short_dir / "notify.sock"),
                                         watchdog_s=0.01)

    async def watchdogs(count: int) -> None:
        seen = 0
        while seen < count:
            await anyio.wait_readable(notify)
            seen += _drain(notify).count(b"WATCHDOG=1")

    try:
        async with anyio.create_task_group() as tg:
            running = await start_broker(tg, config)
            with anyio.fail_after(30):
                await watchdogs(3)  # arriving, again and again, while the loop runs
            _drain(notify)
            time.sleep(0.2)  # noqa: ASYNC251 - the loop wedged on purpose: twenty intervals
            assert _drain(notify) == []  # and nothing was sent: systemd would restart us
            with anyio.fail_after(30):
                await watchdogs(2)  # the loop runs again: so does the keep-alive
            running.stop.set()
    finally:
        notify.close()
