"""The store's promises under probes from outside: one daemon per home, no committed write
reported as failed, durable use counts, and the master key kept from processes it must
never reach. Each test failed on the code before its fix."""

from __future__ import annotations

import base64
import json
import os
import signal
import stat
import time
from pathlib import Path

import anyio
import pytest
from conftest import Daemon, RunningBroker, cli_env, run_cli

from stigmer.broker.config import Paths
from stigmer.client import AsyncClient, Client, Unauthenticated, variables

SENTINEL_KEY = base64.b64encode(b"K" * 32).decode()


def _other_socket(paths: Paths) -> Paths:
    """The same home reached through another socket (another $XDG_RUNTIME_DIR, say)."""
    other = paths.socket.parent.parent / "run2" / "b.sock"
    return paths._replace(socket=other)


def test_a_second_daemon_on_the_same_home_is_refused_and_names_the_first(
        paths: Paths) -> None:
    run_cli(paths, "start", check=True)
    try:
        first_pid = json.loads(run_cli(paths, "status", "--json", check=True).stdout)["pid"]
        other = _other_socket(paths)
        second = run_cli(other, "start")
        assert second.returncode == 1, second.stdout
        assert f"pid {first_pid}" in second.stderr
        assert f"STIGMER_BROKER_SOCKET={paths.socket}" in second.stderr
        assert "Traceback" not in second.stderr
        assert not other.socket.exists()

        status = run_cli(other, "status")  # the "wrong" socket finds the daemon via the home
        assert status.returncode == 0, status.stderr
        assert f"pid {first_pid}" in status.stdout
        assert f"listens on {paths.socket}" in status.stderr
    finally:
        run_cli(paths, "stop")


@pytest.mark.slow
@pytest.mark.anyio
async def test_creates_under_fetch_load_never_fail_after_committing(
        broker: RunningBroker) -> None:
    async with AsyncClient(broker.socket) as admin:
        await admin.put_environment("e", variables({"A": "1"}, {"S": "x"}))
        token = (await admin.create_context("hot", environments=["e"])).token
    stop = anyio.Event()
    fetched = 0

    async def fetcher() -> None:
        nonlocal fetched
        async with AsyncClient(broker.socket) as client:
            while not stop.is_set():
                await client.fetch_context(token)
                fetched += 1

    tokens: list[str] = []
    async with anyio.create_task_group() as tg:
        for _ in range(8):
            tg.start_soon(fetcher)
        async with AsyncClient(broker.socket) as creator:
            for n in range(2000):  # every create answers, and with its token
                tokens.append((await creator.create_context(f"x-{n}", ttl_s=600)).token)
        stop.set()
    assert len(set(tokens)) == 2000 and fetched > 0
    async with AsyncClient(broker.socket) as client:
        verified = await client.verify_audit()
        assert verified.ok, verified.reason
        await client.fetch_context(tokens[-1])


@pytest.mark.slow
def test_a_max_uses_token_stays_used_across_a_crash(paths: Paths) -> None:
    for _ in range(5):
        with Daemon(paths) as daemon:
            with Client(paths.socket) as client:
                token = client.create_context(f"once-{time.monotonic_ns()}",
                                              max_uses=1).token
                client.fetch_context(token)
            daemon.kill()  # SIGKILL right after the one allowed fetch was answered
        with Daemon(paths), Client(paths.socket) as client, \
                pytest.raises(Unauthenticated):
            client.fetch_context(token)


def test_run_keeps_the_master_key_and_token_from_the_command(cli_broker: Paths) -> None:
    token = run_cli(cli_broker, "context", "create", "keyless", "--env", "A=1",
                    check=True).stdout.strip()
    env = cli_env(cli_broker, STIGMER_ENCRYPTION_KEY=SENTINEL_KEY,
                  STIGMER_EXECUTION_TOKEN=token)
    result = run_cli(cli_broker, "run", "--", "env", env=env, check=True)
    assert "A=1" in result.stdout.splitlines()
    assert SENTINEL_KEY not in result.stdout
    assert token not in result.stdout


def test_start_hands_the_env_key_over_outside_the_daemons_environment(paths: Paths) -> None:
    if os.getuid() != 0:
        pytest.skip("reading a non-dumpable daemon's environ needs root")
    env = cli_env(paths, STIGMER_ENCRYPTION_KEY=SENTINEL_KEY)
    run_cli(paths, "start", env=env, check=True)
    try:
        status = json.loads(run_cli(paths, "status", "--json", env=env, check=True).stdout)
        assert status["key_source"].startswith("env")
        environ = Path(f"/proc/{status['pid']}/environ").read_bytes()
        assert b"STIGMER_ENCRYPTION_KEY" not in environ
        assert SENTINEL_KEY.encode() not in environ
        cmdline = Path(f"/proc/{status['pid']}/cmdline").read_bytes()
        assert SENTINEL_KEY.encode() not in cmdline
    finally:
        run_cli(paths, "stop", env=env)


def test_start_does_not_follow_a_planted_log_symlink(paths: Paths, short_dir: Path) -> None:
    os.makedirs(paths.home, mode=0o700)
    target = short_dir / "victim.txt"
    target.write_text("untouched\n")
    (paths.home / "broker.log").symlink_to(target)
    result = run_cli(paths, "start")
    assert result.returncode == 1
    assert "symbolic link" in result.stderr and "Traceback" not in result.stderr
    assert target.read_text() == "untouched\n"
    assert not paths.socket.exists()


def test_start_checks_the_home_before_writing_into_it(paths: Paths) -> None:
    os.makedirs(paths.home, mode=0o700)
    os.chmod(paths.home, 0o777)
    result = run_cli(paths, "start")
    assert result.returncode == 1
    assert "refusing broker home" in result.stderr
    assert not (paths.home / "broker.log").exists()


def test_a_killed_daemon_leaves_no_lock_behind(paths: Paths) -> None:
    with Daemon(paths) as daemon:
        os.kill(daemon.pid, signal.SIGKILL)
        assert daemon.proc is not None
        daemon.proc.wait()
    with Daemon(paths), Client(paths.socket) as client:
        assert client.status().pid > 0


# ------------------------------------------------------------ audit growth (item 6)


@pytest.mark.anyio
async def test_denied_requests_of_every_kind_are_counted_not_written_one_by_one(
        short_dir: Path) -> None:
    from sealed import open_sealed

    from stigmer.broker.config import Config
    from stigmer.broker.daemon.startup import compose
    from stigmer.broker.dispatch import Counters
    from stigmer.broker.local.peer import Peer, PeerCredentials
    from stigmer.broker.protocol import PutEnvironment, ReleaseContext
    from stigmer.broker.protocol.errors import PermissionDenied
    from stigmer.broker.protocol.errors import Unauthenticated as Denied

    paths = Paths(home=short_dir, socket=short_dir / "b.sock")
    sealed = await open_sealed(paths.store)
    try:
        dispatcher = (await compose(Config(paths=paths), sealed.store, sealed.vault,
                                    Counters(), socket_path=paths.socket,
                                    request_shutdown=lambda: None)).dispatcher
        runner = Peer(credentials=PeerCredentials(uid=1000, gid=1000, pid=77), admin=False)
        for n in range(2000):  # a runner-group member hammering with bad requests
            with pytest.raises(Denied):
                await dispatcher.answer(ReleaseContext(id=n + 1, token="stg_bad"), runner)
            with pytest.raises(PermissionDenied):
                await dispatcher.answer(PutEnvironment(id=n + 1, name="x", data={}), runner)
        await dispatcher.audit.flush()
        records = (await dispatcher.audit.list(None, 100))[0]
        assert [(r.event, r.outcome, r.detail) for r in records] == [
            ("context.released", "denied", "count=2000"),
            ("request", "denied", "op=PutEnvironment count=2000")]
    finally:
        await sealed.close()


@pytest.mark.anyio
async def test_swept_contexts_give_their_space_back(short_dir: Path) -> None:
    from sealed import open_sealed

    sealed = await open_sealed(short_dir / "local.db")
    store = sealed.store
    try:
        big = os.urandom(4000).hex()
        async with store.write() as db:
            for n in range(2000):
                await db.execute("INSERT INTO meta(key, value) VALUES (?, ?)", (f"k{n}", big))
        pages = int(await store.read_one("PRAGMA page_count"))
        async with store.write() as db:
            await db.execute("DELETE FROM meta WHERE key LIKE 'k%'")
        assert await store.reclaim() > 1000  # that many pages were free...
        assert int(await store.read_one("PRAGMA freelist_count")) < 16  # ...and now are not
        assert int(await store.read_one("PRAGMA page_count")) < pages // 4
    finally:
        await sealed.close()


@pytest.mark.parametrize("value", ["1h", "0s", "soon"])
def test_audit_retention_must_be_a_day_or_more(paths: Paths, value: str) -> None:
    result = run_cli(paths, "serve", "--audit-retention", value)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "--audit-retention" in result.stderr
    assert not paths.store.exists()


def test_the_service_takes_the_key_from_a_systemd_credential(paths: Paths,
                                                             short_dir: Path) -> None:
    credentials = short_dir / "creds"
    credentials.mkdir(mode=0o700)
    (credentials / "stigmer-master-key").write_text(SENTINEL_KEY + "\n")
    env = cli_env(paths, CREDENTIALS_DIRECTORY=str(credentials))
    with Daemon(paths, env=env) as daemon:
        status = json.loads(run_cli(paths, "status", "--json", check=True).stdout)
        assert status["key_source"] == "systemd credential stigmer-master-key"
        environ = Path(f"/proc/{daemon.pid}/environ").read_bytes()
        assert SENTINEL_KEY.encode() not in environ
    # the store took that key: the same key from the variable opens it, another does not
    with Daemon(paths, env=cli_env(paths, STIGMER_ENCRYPTION_KEY=SENTINEL_KEY)):
        pass
    other = base64.b64encode(b"O" * 32).decode()
    result = run_cli(paths, "serve", env=cli_env(paths, STIGMER_ENCRYPTION_KEY=other))
    assert result.returncode == 1 and "Traceback" not in result.stderr


# ------------------------------------------------------------------ the daemon's log


def test_the_log_escapes_what_a_peer_controls() -> None:
    import logging

    from stigmer.broker.daemon.logs import OneLineFormatter

    record = logging.LogRecord("stigmer.broker", logging.INFO, __file__, 1,
                               "protocol error from pid %s: %s", (7, "op 'x'\n2026-01-01 "
                               "ERROR forged line \x1b[2J"), None)
    line = OneLineFormatter("%(message)s").format(record)
    assert "\n" not in line and "\x1b" not in line
    assert "\\n2026-01-01 ERROR forged line \\x1b[2J" in line


def test_a_flood_of_one_cause_is_capped() -> None:
    import logging

    from stigmer.broker.daemon.logs import PerCause

    cap = PerCause(burst=20, window=0.2)

    def rec(n: int) -> logging.LogRecord:
        return logging.LogRecord("b", logging.INFO, __file__, 1, "bad frame from pid %s",
                                 (n,), None)

    passed = sum(cap.filter(rec(n)) for n in range(10_000))
    assert passed == 20
    other = logging.LogRecord("b", logging.INFO, __file__, 1, "another cause", (), None)
    assert cap.filter(other)  # other causes are not held back
    time.sleep(0.25)
    late = rec(0)
    assert cap.filter(late) and "9980 more like it" in late.getMessage()


def test_a_daemon_flooded_by_bad_peers_keeps_its_log_small(paths: Paths) -> None:
    import socket

    with Daemon(paths) as daemon:
        for _ in range(400):  # each sends a frame the daemon logs a protocol error about
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(str(paths.socket))
                body = b"\x82\xa2op\xa5Hel\xff\xfe\xa2id\x01"
                s.sendall(len(body).to_bytes(4, "big") + body)
                s.recv(4096)
        lines = daemon.stderr().splitlines()
    assert len(lines) < 80, len(lines)


def test_the_log_file_rotates_at_its_cap_and_stays_private(short_dir: Path) -> None:
    import logging

    from stigmer.broker.daemon.logs import configure

    log_file = short_dir / "broker.log"
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure(verbose=False, log_file=log_file, max_bytes=4096, backups=2)
        for n in range(2000):
            logging.getLogger("stigmer.broker").info(f"cause {n}: {'x' * 40}")  # one each
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:], level = saved
        root.setLevel(level)
    files = sorted(p.name for p in short_dir.iterdir())
    assert files == ["broker.log", "broker.log.1", "broker.log.2"]
    for name in files:
        st = (short_dir / name).stat()
        assert st.st_size <= 4096 and stat.S_IMODE(st.st_mode) == 0o600


def test_start_logs_to_a_rotating_broker_log(paths: Paths) -> None:
    run_cli(paths, "start", check=True)
    try:
        run_cli(paths, "status", check=True)
        cmdline = Path(f"/proc/{json.loads(run_cli(paths, 'status', '--json').stdout)['pid']}"
                       "/cmdline").read_bytes().split(b"\0")
        assert b"--log-file" in cmdline
    finally:
        run_cli(paths, "stop", check=True)
    assert "serving on" in paths.log_file.read_text()
    assert stat.S_IMODE(paths.log_file.stat().st_mode) == 0o600


def test_serve_refuses_a_log_file_symlink(paths: Paths, short_dir: Path) -> None:
    target = short_dir / "elsewhere"
    target.write_text("")
    paths.home.mkdir(mode=0o700, exist_ok=True)
    (paths.home / "planted.log").symlink_to(target)
    result = run_cli(paths, "serve", "--log-file", str(paths.home / "planted.log"))
    assert result.returncode == 1 and "symbolic link" in result.stderr
    assert "Traceback" not in result.stderr and target.read_text() == ""


@pytest.mark.anyio
async def test_audit_retention_runs_once_per_interval(short_dir: Path) -> None:
    """It ran on every flush after the first cut (its next time was set to now), each run
    verifying the whole chain."""
    from sealed import open_sealed

    from stigmer.broker.config import Config
    from stigmer.broker.daemon.startup import compose
    from stigmer.broker.dispatch import Counters

    sealed = await open_sealed(short_dir / "local.db")
    config = Config(paths=Paths(home=short_dir, socket=short_dir / "s"), use_keyring=False)
    maintenance = (await compose(config, sealed.store, sealed.vault, Counters(),
                                 socket_path=config.paths.socket,
                                 request_shutdown=lambda: None)).maintenance
    cuts = 0

    async def counted() -> None:
        nonlocal cuts
        cuts += 1

    maintenance.retain = counted  # type: ignore[method-assign]
    try:
        with anyio.move_on_after(0.5):
            await maintenance.run(flush_interval=0.01, retention_interval=3600)
    finally:
        await sealed.close()
    assert cuts == 1
