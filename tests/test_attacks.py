"""Hostile local clients: fuzzing, floods, slow and vanishing peers, token guessing, tampering.

Expected every time: a clear error or a closed connection, and the daemon keeps serving
everyone else.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import msgspec
import pytest
from conftest import (
    NOBODY,
    Daemon,
    cli_env,
    cli_for_nobody,
    make_config,
    open_fds,
    python_for_nobody,
    run_cli,
    start_broker,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sealed import open_sealed

from stigmer.broker.config import Paths
from stigmer.broker.daemon.startup import compose
from stigmer.broker.dispatch import Counters, Dispatcher
from stigmer.broker.local.peer import Peer, PeerCredentials
from stigmer.broker.protocol import (
    REQUEST_TYPES,
    Connection,
    FetchContext,
    Hello,
    Request,
    Response,
    Role,
    State,
    frame,
)
from stigmer.broker.protocol.errors import BrokerError, ProtocolError
from stigmer.client import AsyncClient, Client, Unauthenticated, variables

pytestmark = pytest.mark.slow

PEER = Peer(credentials=PeerCredentials(uid=0, gid=0, pid=1), admin=True)
RUNNER = Peer(credentials=PeerCredentials(uid=1000, gid=1000, pid=2), admin=False)

# ------------------------------------------------------------- dispatcher fuzzing

OPS = [t.__name__ for t in REQUEST_TYPES] + ["Nope", "", "Status"]
leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**63, max_value=2**64 - 1),
                 st.floats(allow_nan=True), st.text(max_size=40), st.binary(max_size=20),
                 st.sampled_from(["dev", "exec-1", "A", "stg_x", "bad name", "x" * 300]))
values = st.recursive(leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=12)
field_names = st.sampled_from(["id", "name", "data", "keys", "reveal", "execution_id",
                               "env_spec", "environments", "runtime", "ttl_s", "token_ttl_s",
                               "max_uses", "token", "limit", "version", "client", "value",
                               "is_secret", "extra"])
bodies = st.builds(lambda op, fields: {"op": op, **fields}, st.sampled_from(OPS),
                   st.dictionaries(field_names, values, max_size=6))


@pytest.fixture(scope="module")
def live_service() -> Iterator[tuple[anyio.from_thread.BlockingPortal, Dispatcher]]:
    import shutil
    import tempfile

    home = Path(tempfile.mkdtemp(prefix="sbf-", dir="/tmp"))
    with anyio.from_thread.start_blocking_portal() as portal:
        sealed = portal.call(lambda: open_sealed(home / "local.db"))
        config = make_config(Paths(home=home, socket=home / "s.sock"))
        broker = portal.call(lambda: compose(config, sealed.store, sealed.vault, Counters(),
                                             socket_path=config.paths.socket,
                                             request_shutdown=lambda: None))
        yield portal, broker.dispatcher
        portal.call(broker.maintenance.close)
        portal.call(sealed.close)
    shutil.rmtree(home, ignore_errors=True)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies, st.booleans(), st.integers(min_value=1, max_value=64))
def test_fuzz_dispatcher(live_service: tuple[anyio.from_thread.BlockingPortal, Dispatcher],
                         body: dict[str, Any], admin: bool, chunk: int) -> None:
    portal, service = live_service
    try:
        raw = msgspec.msgpack.encode(body)
    except (OverflowError, TypeError):
        return
    conn = Connection(Role.SERVER)
    conn.state = State.READY
    wire = frame(raw)
    try:
        for i in range(0, len(wire), chunk):
            conn.receive_data(wire[i:i + chunk])
        event = conn.next_event()
    except BrokerError:
        return  # a protocol error: the server answers it and closes
    assert isinstance(event, Request)  # a whole frame in: a request, never NEED_DATA
    try:
        reply = portal.call(service.answer, event, PEER if admin else RUNNER)
    except BrokerError:
        return
    assert isinstance(reply, Response)
    assert reply.id == event.id


def test_deeply_nested_msgpack_is_refused_not_recursed() -> None:
    conn = Connection(Role.SERVER)
    body = b"\x82\xa2op\xa5Hello\xa2id" + b"\x91" * 200_000 + b"\xc0"
    conn.receive_data(frame(body))
    # issue 26: a request without a readable id closes (ProtocolError), no longer
    # invalid_argument on a connection kept open
    with pytest.raises(ProtocolError, match="id must be a whole number, not a list"):
        conn.next_event()


# -------------------------------------------------------------- through the socket


def connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    deadline = time.monotonic() + 10
    try:
        while True:
            try:
                s.connect(str(path))
                return s
            except BlockingIOError:  # the backlog is full for a moment: as the client does
                assert time.monotonic() < deadline
                time.sleep(0.005)
    except BaseException:
        s.close()
        raise


HELLO = Connection(Role.CLIENT).send(Hello(id=1, version=1))


@pytest.mark.anyio
async def test_a_client_that_asks_and_never_reads_is_cut_off(paths: Paths) -> None:
    """Thousands of fetches sent at once and no reply read: the broker stops reading
    once the replies fill the socket and its write buffer, cuts the connection when
    the replies have not been taken within frame_timeout, and serves others meanwhile."""
    config = make_config(paths, frame_timeout=1.0)
    async with anyio.create_task_group() as tg:
        running = await start_broker(tg, config)
        async with AsyncClient(running.socket) as admin:
            token = (await admin.create_context("x", runtime=variables(
                {f"K{i}": "v" * 100 for i in range(30)}))).token
        hog = await anyio.to_thread.run_sync(connect, running.socket)
        conn = Connection(Role.CLIENT)
        asks = HELLO + b"".join(conn.send(FetchContext(id=n, token=token))
                                for n in range(2, 20002))  # 20,000 replies: ~80 MB

        def flood() -> int:
            hog.settimeout(0.5)
            sent = 0
            try:
                while sent < len(asks):  # until the broker stops reading, or cuts us off
                    sent += hog.send(asks[sent:sent + 65536])
            except (TimeoutError, OSError):
                pass
            return sent

        try:
            sent = await anyio.to_thread.run_sync(flood)
            assert sent < len(asks)  # the broker stopped reading: it did not buffer it all
            async with AsyncClient(running.socket) as other:  # served meanwhile
                assert len(await other.fetch_context(token)) == 30
            with anyio.fail_after(10):
                while True:
                    async with AsyncClient(running.socket) as c:
                        if (await c.status()).connections == 1:  # the hog is gone
                            break
                    await anyio.sleep(0.2)
        finally:
            hog.close()
        running.stop.set()


@pytest.mark.anyio
async def test_slow_and_idle_clients_are_reaped_while_runners_work(paths: Paths) -> None:
    config = make_config(paths, handshake_timeout=1.0, frame_timeout=1.0, idle_timeout=1.5,
                         max_connections=512)
    async with anyio.create_task_group() as tg:
        running = await start_broker(tg, config)
        async with AsyncClient(running.socket) as admin:
            token = (await admin.create_context("x", runtime=variables({"A": "1"}))).token
        trickle: list[socket.socket] = []
        silent: list[socket.socket] = []
        for _ in range(150):  # connect from a thread: the broker runs in this event loop
            trickle.append(await anyio.to_thread.run_sync(connect, running.socket))
            silent.append(await anyio.to_thread.run_sync(connect, running.socket))
        for s in silent:
            s.sendall(HELLO)
        stop = threading.Event()

        def trickler() -> None:
            i = 0
            while not stop.is_set():
                for s in trickle:
                    try:
                        s.send(HELLO[i % len(HELLO):i % len(HELLO) + 1])
                    except OSError:
                        pass
                i += 1
                time.sleep(0.2)

        def runner() -> int:
            done = 0
            deadline = time.monotonic() + 4
            while time.monotonic() < deadline:
                with Client(running.socket) as c:
                    assert c.fetch_context(token)["A"] == "1"
                done += 1
            return done

        thread = threading.Thread(target=trickler)
        thread.start()
        try:
            fetched = await anyio.to_thread.run_sync(runner)
            assert fetched > 10
            with anyio.fail_after(10):
                while True:
                    async with AsyncClient(running.socket) as c:
                        if (await c.status()).connections == 1:
                            break
                    await anyio.sleep(0.2)
        finally:
            stop.set()
            thread.join()
            for s in trickle + silent:
                s.close()
        running.stop.set()


def test_connection_flood_past_the_limit(paths: Paths) -> None:
    """Past max_connections (1024 by default) the oldest unfinished connections are
    evicted; the admin's greeted one keeps working, and every fd comes back."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 4096), hard), hard))
    try:
        _flood(paths)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _flood(paths: Paths) -> None:
    with Daemon(paths) as daemon, Client(paths.socket) as admin:
        admin.status()
        time.sleep(0.3)
        baseline = open_fds(daemon.pid)
        flood: list[socket.socket] = []
        try:
            for _ in range(1024 + 40):
                flood.append(connect(paths.socket))
            for s in flood[:40]:  # the oldest without a Hello made room for the rest
                assert s.recv(65536) == b""
            assert admin.status().connections == 1024
        finally:
            for s in flood:
                s.close()
        deadline = time.monotonic() + 10
        while open_fds(daemon.pid) != baseline and time.monotonic() < deadline:
            time.sleep(0.1)
        assert open_fds(daemon.pid) == baseline
        assert admin.status().connections == 1
        assert "Traceback" not in daemon.stderr()


def test_open_file_limit_is_survived(paths: Paths) -> None:
    import resource

    def low_nofile() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))

    with Daemon(paths, preexec=low_nofile) as daemon, Client(paths.socket) as admin:
        flood = []
        try:
            for _ in range(120):
                flood.append(connect(paths.socket))
            time.sleep(0.5)
            try:
                assert admin.status().pid == daemon.pid  # still answers its open connection
            except BrokerError as exc:
                raise AssertionError(daemon.stderr()) from exc
        finally:
            for s in flood:
                s.close()
        deadline = time.monotonic() + 15
        while True:
            try:
                with Client(paths.socket, timeout=2) as fresh:
                    fresh.status()
                break
            except BrokerError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert "Traceback" not in daemon.stderr()


def test_clients_vanishing_mid_reply_and_mid_request(paths: Paths) -> None:
    with Daemon(paths) as daemon:
        with Client(paths.socket) as admin:
            token = admin.create_context(
                "x", runtime=variables({f"K{i}": "v" * 1000 for i in range(200)})).token
        fetch = Connection(Role.CLIENT)
        request = fetch.send(Hello(id=1, version=1)) + fetch.send(FetchContext(id=2, token=token))
        for _ in range(100):
            s = connect(paths.socket)
            s.sendall(request)
            s.close()  # the ~200 KB reply has nowhere to go
        for _ in range(100):
            s = connect(paths.socket)
            s.sendall(request[: len(request) - 7])
            s.close()
        deadline = time.monotonic() + 10
        while True:
            with Client(paths.socket) as c:
                if c.status().connections == 1:
                    break
            assert time.monotonic() < deadline
            time.sleep(0.1)
        log = daemon.stderr()
        assert "Traceback" not in log and " ERROR " not in log, log


def test_token_guessing_is_cut_short_and_looks_the_same(paths: Paths) -> None:
    with Daemon(paths):
        with Client(paths.socket) as admin:
            token = admin.create_context("x", runtime=variables({"A": "1"})).token
        messages = set()
        with Client(paths.socket) as guesser:
            for i in range(3):
                with pytest.raises(Unauthenticated) as info:
                    guesser.fetch_context(f"stg_guess{i}")
                messages.add(info.value.message)
            with pytest.raises(BrokerError):
                guesser.fetch_context("stg_guess3")  # the connection was cut
        for i in range(300):
            with Client(paths.socket) as guesser:
                for j in range(3):
                    with pytest.raises(Unauthenticated) as info:
                        guesser.fetch_context(token[:-4] + f"{i:02d}{j:02d}")
                    messages.add(info.value.message)
            if i % 50 == 0:
                with Client(paths.socket) as runner:
                    assert runner.fetch_context(token)["A"] == "1"
        assert len(messages) == 1


def test_directory_of_another_user_is_refused(paths: Paths) -> None:
    if os.getuid() != 0:
        pytest.skip("creating a directory owned by another user needs root")
    paths.socket.parent.mkdir(mode=0o700)
    os.chown(paths.socket.parent, 65534, 65534)
    result = run_cli(paths, "serve", timeout=30)
    assert result.returncode == 1
    assert f"refusing socket directory {paths.socket.parent}" in result.stderr
    assert "owned by uid 65534" in result.stderr
    assert os.stat(paths.socket.parent).st_uid == 65534  # untouched


def test_swapped_context_rows_fail_alone(paths: Paths) -> None:
    with Daemon(paths), Client(paths.socket) as admin:
        a = admin.create_context("a", runtime=variables({}, {"S": "secret-a"})).token
        b = admin.create_context("b", runtime=variables({}, {"S": "secret-b"})).token
    with sqlite3.connect(paths.home / "local.db") as db:
        sealed_b = db.execute("SELECT sealed FROM contexts WHERE execution_id='b'").fetchone()[0]
        db.execute("UPDATE contexts SET sealed = ? WHERE execution_id = 'a'", (sealed_b,))
    with Daemon(paths) as daemon, Client(paths.socket) as runner:
        with pytest.raises(BrokerError) as info:  # the row fails its MAC before opening:
            runner.fetch_context(a)               # its tokens open nothing
        assert info.value.code == "unauthenticated"
        assert "secret-b" not in info.value.message
        assert runner.fetch_context(b)["S"] == "secret-b"
        assert "context of execution 'a' failed its integrity check" in daemon.stderr()
        assert "Traceback" not in daemon.stderr()


_STALLER = """
import socket, sys
path, hello, count = sys.argv[1], bytes.fromhex(sys.argv[2]), int(sys.argv[3])
held = []
for n in range(count):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        if n % 2:
            s.sendall(hello)  # half say Hello and idle, half never finish it
    except OSError:
        continue
    held.append(s)
print("holding", flush=True)
sys.stdin.readline()
alive = 0
for s in held:  # open: nothing (more) to read yet; closed: the end after any reply
    try:
        while s.recv(65536, socket.MSG_DONTWAIT):
            pass
    except BlockingIOError:
        alive += 1
    except OSError:
        pass
print(alive, flush=True)
"""


@pytest.mark.anyio
async def test_stalled_peers_cannot_lock_out_the_owner_or_the_runners(paths: Paths) -> None:
    """300 stalled connections from a runner-group uid and 300 from the owner's own uid,
    renewed as they are evicted: the owner's status and a runner's fetches still get
    through, fetch p99 well under a second, and the runner uid holds at most its cap."""
    import grp

    from stigmer.broker.config import Config

    python = python_for_nobody()
    base = make_config(paths, max_connections=256, max_connections_per_uid=64)
    config = Config(paths=base.paths, limits=base.limits, use_keyring=False,
                    allow_group=grp.getgrgid(NOBODY).gr_name)
    async with anyio.create_task_group() as tg:
        running = await start_broker(tg, config)
        os.chmod(paths.socket.parent.parent, 0o755)
        async with AsyncClient(running.socket) as admin:
            token = (await admin.create_context("x", runtime=variables({"A": "1"}))).token
        staller = await anyio.to_thread.run_sync(lambda: subprocess.Popen(
            [python, "-c", _STALLER, str(running.socket), HELLO.hex(), "300"], user=NOBODY,
            group=NOBODY, extra_groups=[], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True))
        assert staller.stdout is not None and staller.stdin is not None
        assert await anyio.to_thread.run_sync(staller.stdout.readline) == "holding\n"
        own: list[socket.socket] = []
        for n in range(300):  # the owner's uid has no per-uid cap: these hit the global one
            s = await anyio.to_thread.run_sync(connect, running.socket)
            if n % 2:
                s.sendall(HELLO)
            own.append(s)

        def runner() -> list[float]:
            latencies = []
            for _ in range(200):
                started = time.perf_counter()
                with Client(running.socket) as c:  # a new connection each time: the worst
                    assert c.fetch_context(token)["A"] == "1"
                latencies.append(time.perf_counter() - started)
            return latencies

        latencies = sorted(await anyio.to_thread.run_sync(runner))
        p99 = latencies[int(len(latencies) * 0.99) - 1]
        assert p99 < 0.5, f"fetch p99 {p99 * 1000:.0f} ms"
        async with AsyncClient(running.socket) as admin:
            assert (await admin.status()).connections <= 256
        alive = await anyio.to_thread.run_sync(
            lambda: staller.communicate("\n", timeout=30)[0])
        assert int(alive.split()[-1]) <= 64
        for s in own:
            s.close()
        running.stop.set()


# ----------------------------------------------------------------- connection churn

CHURN_OWNER, CHURNER, CHURN_RUNNER = "stgdown", "stgdchurn", "stgdrun"
CHURN_GROUP = "stgdgrp"  # serve --allow-group: the owner, the churner and the runner

# connect, half-close, repeat, as fast as the broker lets it (a blocking connect waits in
# the kernel while the listen backlog is full, then takes the first free place)
_CHURNER = r"""
import socket, sys, time
path, end = sys.argv[1], time.monotonic() + float(sys.argv[2])
print("churning", flush=True)
while time.monotonic() < end:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        s.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    s.close()
"""

# a runner as the README's Python example has it, blocking or async: connect, fetch,
# close, timed each time
_TIMED_FETCHES = r"""
import asyncio, json, site, sys, time
site.addsitedir(sys.argv[1])
from stigmer.client import AsyncClient, Client
path, token, samples, budget = sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
latencies, end = [], time.monotonic() + budget
async def fetch_async():
    async with AsyncClient(path, timeout=30) as client:
        return await client.fetch_context(token)
while len(latencies) < samples and time.monotonic() < end:
    started = time.perf_counter()
    if sys.argv[6] == "async":
        context = asyncio.run(fetch_async())
    else:
        with Client(path, timeout=30) as client:
            context = client.fetch_context(token)
    assert context["A"] == "1"
    latencies.append(time.perf_counter() - started)
print(json.dumps(latencies))
"""


def _churn_users() -> dict[str, Any]:
    import grp
    import pwd
    import shutil

    if os.getuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("creating users needs root and useradd")
    try:
        grp.getgrnam(CHURN_GROUP)
    except KeyError:
        subprocess.run(["groupadd", "--system", CHURN_GROUP], check=True, capture_output=True)
    users = {}
    for name in (CHURN_OWNER, CHURNER, CHURN_RUNNER):
        try:
            pwd.getpwnam(name)
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/bin/false",
                            name], check=True, capture_output=True)
        subprocess.run(["usermod", "-a", "-G", CHURN_GROUP, name], check=True,
                       capture_output=True)
        user = pwd.getpwnam(name)
        users[name] = {"user": user.pw_uid, "group": user.pw_gid,
                       "extra_groups": os.getgrouplist(name, user.pw_gid)}
    return users


def _percentile(latencies: list[float], fraction: float) -> float:
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


@pytest.mark.parametrize("client", ["blocking", "async"])
@pytest.mark.parametrize(("churners", "p99_limit"), [(1, 0.25), (8, 1.0)])
def test_connection_churn_does_not_starve_a_runner(short_dir: Path, churners: int,
                                                   p99_limit: float, client: str) -> None:
    """Issue 23: one group member connecting and half-closing in a loop pushed a runner's
    connect+fetch to a p50 of 3.3 s. The broker runs as an ordinary user, the churners as
    another member of its runner group, the runner as a third. The runner's 150
    connect+fetches must all finish within 20 s, their p99 under a second against eight
    churning processes (the target) and under a quarter second against one (the target
    is 100 ms: measured 25-95 ms on a loaded 2-core machine, so the margin is for that)."""
    users = _churn_users()
    cli = cli_for_nobody()
    python, site_dir = cli[0], cli[3]
    owner = users[CHURN_OWNER]
    os.chown(short_dir, owner["user"], owner["group"])
    os.chmod(short_dir, 0o755)  # the runners reach the socket's directory through it
    paths = Paths(home=short_dir / "home", socket=short_dir / "run" / "b.sock")
    env = cli_env(paths)
    log = short_dir / "daemon.log"
    read_fd, write_fd = os.pipe()
    with open(log, "wb") as out:
        daemon = subprocess.Popen([*cli, "serve", "--allow-group", CHURN_GROUP, "--ready-fd",
                                   str(write_fd)], env=env, stdout=out, stderr=out,
                                  pass_fds=(write_fd,), **owner)
    os.close(write_fd)
    procs: list[subprocess.Popen[str]] = []
    try:
        with os.fdopen(read_fd, "rb") as ready:
            assert ready.read(6) == b"ready\n", log.read_text()
        created = subprocess.run([*cli, "context", "create", "churn", "-e", "A=1",
                                  "--token-ttl", "1h", "--json"], env=env,
                                 capture_output=True, text=True, timeout=60, **owner)
        assert created.returncode == 0, created.stderr
        token = json.loads(created.stdout)["token"]
        for _ in range(churners):
            procs.append(subprocess.Popen([python, "-c", _CHURNER, str(paths.socket), "120"],
                                          stdout=subprocess.PIPE, text=True,
                                          **users[CHURNER]))
        for churner in procs:
            assert churner.stdout is not None and churner.stdout.readline() == "churning\n"
        time.sleep(1.0)  # the backlog fills
        timed = subprocess.run([python, "-c", _TIMED_FETCHES, site_dir, str(paths.socket),
                                token, "150", "20", client], capture_output=True, text=True,
                               timeout=120, **users[CHURN_RUNNER])
        assert timed.returncode == 0, timed.stderr
        latencies: list[float] = json.loads(timed.stdout)
        assert all(churner.poll() is None for churner in procs)  # churning all along
        p50, p99 = _percentile(latencies, 0.5), _percentile(latencies, 0.99)
        print(f"{churners} churner(s), {client} client: {len(latencies)} fetches, "
              f"p50 {p50 * 1000:.1f} ms, "
              f"p99 {p99 * 1000:.1f} ms")
        assert len(latencies) == 150 and p99 < p99_limit, \
            f"{len(latencies)} fetches in 20 s, p50 {p50:.3f} s, p99 {p99:.3f} s"
    finally:
        for churner in procs:
            churner.kill()
            churner.communicate()
        daemon.terminate()
        daemon.wait(timeout=30)
    assert "Traceback" not in log.read_text()
