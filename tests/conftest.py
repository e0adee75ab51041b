"""Shared fixtures: both event loops, short private paths, an in-process broker, the CLI."""

from __future__ import annotations

import contextlib
import fcntl
import grp
import os
import pwd
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from postgres import Server

from stigmer.broker.config import Config, Limits, Paths
from stigmer.broker.daemon.lifecycle import serve

# Subprocess brokers must never touch the machine's real keychain.
os.environ["PYTHON_KEYRING_BACKEND"] = "keyring.backends.fail.Keyring"


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    backend: tuple[str, dict[str, Any]] = request.param
    return backend


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A private directory under /tmp: tmp_path is often too long for AF_UNIX paths."""
    path = Path(tempfile.mkdtemp(prefix="sb-", dir="/tmp"))
    os.chmod(path, 0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def paths(short_dir: Path) -> Paths:
    return Paths(home=short_dir / "home", socket=short_dir / "run" / "b.sock")


def make_config(paths: Paths, store_url: str | None = None, **limits: Any) -> Config:
    return Config(paths=paths, limits=Limits(**limits), use_keyring=False,
                  store_url=store_url)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Server]:
    """The run's own PostgreSQL database (see tests/postgres.py)."""
    server = Server()
    yield server
    server.close()


@pytest.fixture
def store_url(postgres: Server) -> Iterator[str]:
    """A fresh, empty fleet store: a schema of its own in the run's database."""
    schema = postgres.new_schema()
    yield postgres.url(search_path=schema)
    postgres.drop_schema(schema)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest) -> str | None:
    """The behaviour suite runs against both backends: None is the embedded SQLite file,
    a URL a fresh PostgreSQL store."""
    if request.param == "sqlite":
        return None
    url: str = request.getfixturevalue("store_url")
    return url


class RunningBroker:
    """A broker served inside the test's event loop."""

    def __init__(self, config: Config, stop: anyio.Event) -> None:
        self.config = config
        self.stop = stop

    @property
    def socket(self) -> Path:
        return self.config.paths.socket


async def start_broker(tg: anyio.abc.TaskGroup, config: Config) -> RunningBroker:
    stop = anyio.Event()
    await tg.start(lambda task_status: serve(config, shutdown_trigger=stop.wait,
                                             task_status=task_status))
    return RunningBroker(config, stop)


@pytest.fixture
async def broker(paths: Paths, store: str | None) -> AsyncIterator[RunningBroker]:
    async with anyio.create_task_group() as tg:
        running = await start_broker(tg, make_config(paths, store))
        yield running
        running.stop.set()


#: the PostgreSQL store of each home a test's CLI broker serves (none: SQLite)
_STORES: dict[Path, str] = {}


def cli_env(paths: Paths, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STIGMER_")}
    env.update(STIGMER_HOME=str(paths.home), STIGMER_BROKER_SOCKET=str(paths.socket),
               PYTHON_KEYRING_BACKEND="keyring.backends.fail.Keyring")
    if paths.home in _STORES:  # as a user of a fleet host sets it once
        env["STIGMER_STORE_URL"] = _STORES[paths.home]
    env.update(extra)
    return env


def run_cli(paths: Paths, *args: str, input: str | None = None, check: bool = False,
            env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``stigmer-broker ARGS`` as a user would, in a fresh process."""
    proc = subprocess.run([sys.executable, "-m", "stigmer.broker", *args], input=input,
                          capture_output=True, text=True, env=env or cli_env(paths),
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}): {proc.stderr}")
    return proc


@pytest.fixture
def cli_broker(paths: Paths, store: str | None) -> Iterator[Paths]:
    """A broker started with `stigmer-broker start`, stopped afterwards."""
    if store is not None:
        _STORES[paths.home] = store
    run_cli(paths, "start", check=True)
    yield paths
    run_cli(paths, "stop")
    _STORES.pop(paths.home, None)


def need_program(name: str) -> None:
    """Skip a test whose program (a shell) is missing; under CI=true, where .ci/run
    installs it, fail instead: a skip there would pass silently."""
    if shutil.which(name) is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{name} is needed under CI=true (.ci/run installs it)")
        pytest.skip(f"{name} is not installed")


NOBODY = 65534


def python_for_nobody() -> str:
    """An interpreter that uid 65534 can run (the venv's may sit under a private /root)."""
    if os.getuid() != 0:
        pytest.skip("acting as another uid needs root")
    for candidate in (sys.executable, os.path.realpath(sys.executable), "/usr/bin/python3",
                      "/usr/local/bin/python3"):
        try:
            ok = subprocess.run([candidate, "-c", "pass"], user=NOBODY, capture_output=True,
                                timeout=30).returncode == 0
        except OSError:
            ok = False
        if ok:
            return candidate
    pytest.skip("no Python interpreter here that uid 65534 may execute")


def cli_for_nobody() -> list[str]:
    """The command line of `stigmer-broker` for uid 65534 (this checkout's packages added
    to an interpreter it may run); skips when that uid cannot import the checkout. Other
    users the tests create can run it too."""
    python = python_for_nobody()
    launcher = ("import site, sys, runpy; site.addsitedir(sys.argv.pop(1)); "
                "sys.argv[0] = 'stigmer-broker'; "
                "runpy.run_module('stigmer.broker', run_name='__main__')")
    command = [python, "-c", launcher, sysconfig.get_paths()["purelib"]]
    probe = subprocess.run([*command, "--version"], user=NOBODY, group=NOBODY, extra_groups=[],
                           capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"uid {NOBODY} cannot import this checkout: {probe.stderr.strip()[-200:]}")
    return command


class Daemon:
    """`stigmer-broker serve` in a child process, ready when started, its stderr kept."""

    def __init__(self, paths: Paths, *, env: dict[str, str] | None = None,
                 args: tuple[str, ...] = (), preexec: Any = None,
                 command: list[str] | None = None,
                 user: pwd.struct_passwd | None = None) -> None:
        self.paths = paths
        self.log = paths.home.parent / f"daemon-{os.getpid()}-{id(self)}.log"
        self.env = env or cli_env(paths)
        self.args = args
        self.preexec = preexec
        self.command = command or [sys.executable, "-m", "stigmer.broker"]
        self.user = user
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> Daemon:
        read_fd, write_fd = os.pipe()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.command, "serve", "--ready-fd", str(write_fd), *self.args],
                env=self.env, stdout=log, stderr=log, pass_fds=(write_fd,),
                preexec_fn=self.preexec, **as_user(self.user))
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as ready:
            import select

            if not select.select([ready], [], [], timeout)[0] or ready.read(6) != b"ready\n":
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"daemon did not start: {self.stderr()}")
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stderr(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self, timeout: float = 30) -> int:
        import signal as _signal

        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(_signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()


def ensure_group(name: str) -> int:
    """The gid of group ``name``, created (as a system group) when missing."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        subprocess.run(["groupadd", "--system", name], check=True, capture_output=True)
        return grp.getgrnam(name).gr_gid


def ensure_user(name: str, groups: list[str] | None = None) -> pwd.struct_passwd:
    """An ordinary user ``name`` (no home, no shell), created when missing, made a member
    of ``groups`` (each created when missing). Needs root and useradd: skips otherwise."""
    if os.getuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("creating users needs root and useradd")
    with _user_database_lock():  # test processes running side by side (pytest -n)
        for group in groups or []:
            ensure_group(group)
        try:
            pwd.getpwnam(name)
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/bin/false",
                            name], check=True, capture_output=True)
        if groups:
            subprocess.run(["usermod", "-a", "-G", ",".join(groups), name], check=True,
                           capture_output=True)
    return pwd.getpwnam(name)


@contextlib.contextmanager
def _user_database_lock() -> Iterator[None]:
    """One test process at a time adds users and groups (useradd fails on a name another
    process added after this one looked)."""
    with open("/run/stigmer-tests-users.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def as_user(user: pwd.struct_passwd | None) -> dict[str, Any]:
    """subprocess's keywords to run a command as ``user`` (None: as we are), with the
    groups the user database gives it, as a login would."""
    if user is None:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid,
            "extra_groups": os.getgrouplist(user.pw_name, user.pw_gid)}


class UserBroker:
    """`stigmer-broker serve` run by an ordinary user, as users run it: its home and socket
    under a directory that user owns (other users may reach it; the broker makes its own
    home and socket directory private), started through an interpreter every user may run
    (:func:`cli_for_nobody`, as /root is private). :meth:`cli` runs the CLI as the owner
    or as any other user."""

    def __init__(self, owner: pwd.struct_passwd, base: Path, *, args: tuple[str, ...] = ()
                 ) -> None:
        self.owner = owner
        root = base / owner.pw_name
        root.mkdir()
        os.chown(root, owner.pw_uid, owner.pw_gid)
        os.chmod(root, 0o755)
        os.chmod(base, 0o755)  # short_dir is private to root
        self.paths = Paths(home=root / "home", socket=root / "run" / "b.sock")
        self.env = {**cli_env(self.paths), "HOME": str(root)}
        self.command = cli_for_nobody()
        self.daemon = Daemon(self.paths, env=self.env, args=args, command=self.command,
                             user=owner)

    @property
    def socket(self) -> Path:
        return self.paths.socket

    def cli(self, *args: str, user: pwd.struct_passwd | None = None, check: bool = False,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``stigmer-broker ARGS`` as ``user`` (default: the owner), with the broker's
        home and socket in its environment, plus ``env``."""
        proc = subprocess.run([*self.command, *args], env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=60,
                              **as_user(user or self.owner))
        if check and proc.returncode != 0:
            raise AssertionError(f"{args} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def __enter__(self) -> UserBroker:
        self.daemon.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.daemon.__exit__(*exc)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class PtyProcess:
    """A command on a new pseudo-terminal (its controlling tty), driven as a person at a
    terminal would drive it: read what it shows, type, resize the window, signal it."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        import pty

        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # pragma: no cover - the child
            # a person's terminal delivers Ctrl-C: a suite started in the background from a
            # non-interactive shell (`make test &`) has SIGINT ignored, and exec keeps that
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.execve(argv[0], argv, env)  # noqa: S606
        self.output = b""

    def read_until(self, text: str, timeout: float = 30) -> str:
        """Read until ``text`` has appeared; return everything read so far."""
        import select

        deadline = time.monotonic() + timeout
        while text.encode() not in self.output:
            assert time.monotonic() < deadline, f"no {text!r} in {self.output!r}"
            ready, _, _ = select.select([self.fd], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:
                    chunk = b""
                assert chunk, f"the terminal closed before {text!r}: {self.output!r}"
                self.output += chunk
        return self.output.decode(errors="replace")

    def write(self, data: str) -> None:
        os.write(self.fd, data.encode())

    def resize(self, rows: int, cols: int) -> None:
        import fcntl
        import struct
        import termios

        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("4H", rows, cols, 0, 0))

    def wait(self, timeout: float = 30) -> tuple[int, str]:
        """Read to the end; return (exit status, everything it showed)."""
        import select

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.fd], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                self.output += chunk
        os.close(self.fd)
        _, status = os.waitpid(self.pid, 0)
        return os.waitstatus_to_exitcode(status), self.output.decode(errors="replace")
