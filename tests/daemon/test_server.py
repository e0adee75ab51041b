"""The daemon through its real socket: handshake, limits, refusals, socket safety."""

from __future__ import annotations

import functools
import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from conftest import (
    NOBODY,
    RunningBroker,
    cli_env,
    make_config,
    python_for_nobody,
    start_broker,
)

from stigmer.broker.config import Paths
from stigmer.broker.daemon.lifecycle import serve
from stigmer.broker.daemon.listen import AlreadyRunning
from stigmer.broker.protocol import (
    CLOSED,
    NEED_DATA,
    Connection,
    Error,
    FetchContext,
    GetStatus,
    Hello,
    IssueToken,
    Response,
    Role,
    Welcome,
)
from stigmer.broker.protocol.errors import (
    BrokerUnavailable,
    ErrorCode,
    StartupError,
)
from stigmer.client import AsyncClient, Client, variables

pytestmark = pytest.mark.anyio


def raw_exchange(path: Path, data: bytes, *, timeout: float = 5.0) -> tuple[list[Response], bool]:
    """Send raw bytes; return the replies and whether the server closed the connection."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(str(path))
    conn = Connection(Role.CLIENT)
    replies: list[Response] = []
    closed = False
    try:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)  # the server sees EOF once it has read everything
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                try:
                    chunk = sock.recv(65536)
                except (ConnectionResetError, TimeoutError):
                    closed = True
                    break
                conn.receive_data(chunk)
                continue
            if event is CLOSED:
                closed = True
                break
            assert isinstance(event, Response)
            replies.append(event)
    finally:
        sock.close()
    return replies, closed


def frames(*messages: object) -> bytes:
    client = Connection(Role.CLIENT)
    return b"".join(client.send(m) for m in messages)  # type: ignore[arg-type]


async def test_status_through_async_and_blocking_clients(broker: RunningBroker) -> None:
    async with AsyncClient(broker.socket) as client:
        status = await client.status()
    assert status.pid == os.getpid()
    assert status.socket == str(broker.socket)
    assert status.socket_mode == "0600"
    assert status.key_source.startswith("file")

    def blocking() -> int:
        with Client(broker.socket) as c:
            return c.status().requests

    assert await anyio.to_thread.run_sync(blocking) >= 2


async def test_socket_and_directory_are_private(broker: RunningBroker) -> None:
    assert stat.S_IMODE(os.lstat(broker.socket).st_mode) == 0o600
    assert stat.S_IMODE(os.lstat(broker.socket.parent).st_mode) == 0o700


async def test_request_before_hello_then_hello(broker: RunningBroker) -> None:
    replies, _ = await anyio.to_thread.run_sync(
        raw_exchange, broker.socket, frames(GetStatus(id=5), Hello(id=6, version=1),
                                            GetStatus(id=7)))
    assert isinstance(replies[0], Error)
    assert replies[0].code == ErrorCode.HANDSHAKE_REQUIRED
    assert replies[0].id == 5
    assert isinstance(replies[1], Welcome)
    assert replies[2].id == 7
    assert not isinstance(replies[2], Error)


async def test_unsupported_version(broker: RunningBroker) -> None:
    replies, _ = await anyio.to_thread.run_sync(
        raw_exchange, broker.socket, frames(Hello(id=1, version=9)))
    assert isinstance(replies[0], Error)
    assert replies[0].code == "unsupported_version"
    assert replies[0].supported_versions == [1]


@pytest.mark.parametrize("header", [2**32 - 1, 1024 * 1024 + 1])
async def test_oversized_frame_gets_error_and_close(broker: RunningBroker, header: int) -> None:
    data = header.to_bytes(4, "big") + b"\x00" * 100
    replies, closed = await anyio.to_thread.run_sync(raw_exchange, broker.socket, data)
    assert closed
    assert isinstance(replies[0], Error)
    assert replies[0].code == "resource_exhausted"
    async with AsyncClient(broker.socket) as client:  # still serving
        await client.status()


async def test_garbage_and_truncated_frames(broker: RunningBroker) -> None:
    replies, closed = await anyio.to_thread.run_sync(
        raw_exchange, broker.socket, (20).to_bytes(4, "big") + b"\xc1" * 20)
    assert closed
    assert isinstance(replies[0], Error)
    assert replies[0].code == "invalid_argument"
    replies, closed = await anyio.to_thread.run_sync(
        raw_exchange, broker.socket, frames(Hello(id=1, version=1))[:-3])
    assert closed
    async with AsyncClient(broker.socket) as client:
        await client.status()


async def test_slow_and_silent_clients_are_reaped(paths: Paths) -> None:
    config = make_config(paths, handshake_timeout=0.3, frame_timeout=0.3, idle_timeout=0.5)
    async with anyio.create_task_group() as tg:
        running = await start_broker(tg, config)
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        silent.connect(str(running.socket))
        trickle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        trickle.connect(str(running.socket))
        trickle.send(frames(Hello(id=1, version=1))[:3])
        with anyio.fail_after(5):
            for sock in (silent, trickle):
                sock.setblocking(False)
                while True:
                    try:
                        if sock.recv(100) == b"":
                            break
                    except BlockingIOError:
                        await anyio.sleep(0.05)
        silent.close()
        trickle.close()
        running.stop.set()


def _open_to_broker(sock: socket.socket) -> bool:
    """Whether the broker still holds this connection (it may have sent a reply)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


async def _wait_closed(sock: socket.socket) -> None:
    with anyio.fail_after(5):
        while _open_to_broker(sock):
            await anyio.sleep(0.02)


async def test_at_the_limit_the_unfinished_then_the_idlest_are_evicted(paths: Paths) -> None:
    """The issue's lock-out: stalled connections filled the limit and everyone else got
    resource_exhausted. Now a newcomer evicts the oldest connection without a Hello,
    then the one idle longest; an evicted client reconnects on its next call."""
    config = make_config(paths, max_connections=4)
    async with anyio.create_task_group() as tg:
        running = await start_broker(tg, config)

        def raw() -> socket.socket:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(running.socket))
            return s

        stalled_first = await anyio.to_thread.run_sync(raw)
        stalled_second = await anyio.to_thread.run_sync(raw)
        idlest = await AsyncClient(running.socket).__aenter__()
        recent = await AsyncClient(running.socket).__aenter__()
        await idlest.status()
        await recent.status()
        newcomers = []
        for stalled in (stalled_first, stalled_second):  # each one more than the limit
            newcomers.append(await AsyncClient(running.socket).__aenter__())
            await newcomers[-1].status()
            await _wait_closed(stalled)
        assert _open_to_broker(recent._sock.raw)  # type: ignore[union-attr]
        newcomers.append(await AsyncClient(running.socket).__aenter__())
        await newcomers[-1].status()  # none without Hello is left: the idlest goes
        assert idlest._sock is not None
        await _wait_closed(idlest._sock.raw)
        assert _open_to_broker(recent._sock.raw)  # type: ignore[union-attr]
        assert (await idlest.status()).connections == 4  # reconnected on its own
        for client in (idlest, recent, *newcomers):
            await client.aclose()
        stalled_first.close()
        stalled_second.close()
        running.stop.set()


async def test_second_daemon_is_refused_and_first_untouched(broker: RunningBroker) -> None:
    with pytest.raises(AlreadyRunning, match="already running"):
        await serve(broker.config)
    async with AsyncClient(broker.socket) as client:
        await client.status()


async def test_stale_socket_is_replaced(paths: Paths) -> None:
    paths.socket.parent.mkdir(mode=0o700, parents=True)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(paths.socket))
    stale.close()  # a socket file nobody listens on
    async with anyio.create_task_group() as tg:
        running = await start_broker(tg, make_config(paths))
        async with AsyncClient(running.socket) as client:
            await client.status()
        running.stop.set()
    assert not paths.socket.exists()  # removed at shutdown


@pytest.mark.parametrize("problem", ["loose", "symlink", "not_socket", "socket_symlink"])
async def test_hostile_socket_paths_are_refused(paths: Paths, short_dir: Path,
                                                problem: str) -> None:
    directory = paths.socket.parent
    if problem == "loose":
        directory.mkdir(mode=0o700)
        os.chmod(directory, 0o777)
    elif problem == "symlink":
        (short_dir / "elsewhere").mkdir(mode=0o700)
        directory.symlink_to(short_dir / "elsewhere")
    elif problem == "not_socket":
        directory.mkdir(mode=0o700)
        paths.socket.write_text("x")
    else:
        directory.mkdir(mode=0o700)
        paths.socket.symlink_to(short_dir / "target")
    before = os.lstat(directory)
    with pytest.raises(StartupError) as info:
        await serve(make_config(paths))
    assert str(directory) in str(info.value)
    after = os.lstat(directory)
    assert (before.st_mode, before.st_ino) == (after.st_mode, after.st_ino)  # not chmod-ed


async def test_socket_path_too_long(short_dir: Path) -> None:
    long = short_dir / ("x" * 120) / "b.sock"
    with pytest.raises(StartupError, match="over the 103-byte limit"):
        await serve(make_config(Paths(home=short_dir / "h", socket=long)))


async def test_client_refuses_untrusted_directory(broker: RunningBroker) -> None:
    os.chmod(broker.socket.parent, 0o777)
    try:
        with pytest.raises(BrokerUnavailable, match="mode 0777"):
            async with AsyncClient(broker.socket):
                pass
    finally:
        os.chmod(broker.socket.parent, 0o700)


async def test_client_unavailable_names_socket_and_fix(paths: Paths) -> None:
    with pytest.raises(BrokerUnavailable) as info:
        Client(paths.socket).connect()
    assert str(paths.socket) in info.value.message
    assert "stigmer-broker start" in info.value.message


async def test_peer_of_another_uid_is_refused_before_any_frame(broker: RunningBroker) -> None:
    # loosen the modes on purpose so that uid 65534 can reach the socket at all
    os.chmod(broker.socket.parent, 0o755)
    os.chmod(broker.socket.parent.parent, 0o755)
    os.chmod(broker.socket, 0o666)
    script = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect(sys.argv[1])\n"
        "try:\n"
        "    s.sendall(bytes.fromhex(sys.argv[2]))\n"
        "    data=s.recv(100)\n"
        "except (BrokenPipeError, ConnectionResetError):\n"  # closed before we wrote
        "    data=b''\n"
        "print('closed' if data==b'' else 'answered')\n"
    )
    hello = frames(Hello(id=1, version=1)).hex()
    python = python_for_nobody()
    result = await anyio.to_thread.run_sync(lambda: subprocess.run(
        [python, "-c", script, str(broker.socket), hello], user=NOBODY, group=NOBODY,
        extra_groups=[], capture_output=True, text=True, timeout=30))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "closed", result.stderr
    os.chmod(broker.socket.parent, 0o700)
    async with AsyncClient(broker.socket) as client:
        assert (await client.status()).requests >= 0


async def test_shutdown_survives_close_beating_cancellation(short_dir: Path) -> None:
    """A client connecting just as shutdown closes the listener wakes the pending accept
    after its socket is closed; anyio then raises ClosedResourceError there."""
    from stigmer.broker.config import Limits
    from stigmer.broker.daemon.listen import bind_unix_socket
    from stigmer.broker.daemon.server import Server
    from stigmer.broker.dispatch import Counters

    class NoRequests:
        def handle(self, request: object, peer: object) -> object:
            raise AssertionError("no request expected")

    for _ in range(20):
        bound = bind_unix_socket(short_dir / "run" / "race.sock")
        server = Server(bound.sock, NoRequests(), Limits(), Counters())  # type: ignore[arg-type]
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

        async def trigger(client: socket.socket = client, path: Path = bound.path) -> None:
            await anyio.sleep(0.01)
            client.connect(str(path))  # the listener turns readable ...
            await anyio.lowlevel.checkpoint()  # ... its reader fires, then shutdown closes it

        with anyio.fail_after(5):
            await server.serve(trigger)
        client.close()
        bound.remove()


@pytest.mark.parametrize(("body", "message"), [
    # invalid UTF-8 in the op, and in a field value
    (b"\x82\xa2op\xa5Hel\xff\xfe\xa2id\x01", "malformed message"),
    (b"\x83\xa2op\xa5Hello\xa2id\x01\xa7version\xa3\xff\xfe\xfd",
     "version must be a whole number, not text"),
    # an unknown field nested far deeper than any message
    (b"\x83\xa2op\xa5Hello\xa2id\x01\xa1x" + b"\x91" * 50000 + b"\x01", "unknown field x"),
])
async def test_malformed_frames_get_an_error_frame_and_no_traceback(
        broker: RunningBroker, body: bytes, message: str,
        caplog: pytest.LogCaptureFixture) -> None:
    data = len(body).to_bytes(4, "big") + body
    replies, closed = await anyio.to_thread.run_sync(raw_exchange, broker.socket, data)
    assert closed
    assert isinstance(replies[0], Error) and replies[0].code == "invalid_argument"
    assert message in replies[0].message
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    async with AsyncClient(broker.socket) as client:
        await client.status()


@pytest.mark.parametrize(("fields", "message"), [
    ({"op": "GetStatus", "a\nb": 1}, "unknown field a\\nb"),
    ({"op": "PutEnvironment", "name": "e", "data": {"A": {"val\nue": "x"}}},
     "unknown field val\\nue in data.*"),
])
async def test_a_field_name_with_a_newline_gets_an_error_frame_not_an_abort(
        broker: RunningBroker, fields: dict[str, object], message: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """Issue 23: 31 of 240k fuzzed frames aborted the connection with a traceback."""
    import msgspec

    from stigmer.broker.protocol import frame

    data = (frames(Hello(id=1, version=1)) + frame(msgspec.msgpack.encode({**fields, "id": 2}))
            + frames(GetStatus(id=3)))
    replies, _ = await anyio.to_thread.run_sync(raw_exchange, broker.socket, data)
    assert [type(r).__name__ for r in replies] == ["Welcome", "Error", "Status"]
    error = replies[1]
    assert isinstance(error, Error) and error.code == "invalid_argument" and error.id == 2
    assert error.message == message
    assert not [r for r in caplog.records if r.exc_info or r.levelname in ("ERROR", "CRITICAL")]


def test_the_open_file_limit_is_raised_and_sizes_the_connection_limit() -> None:
    script = (
        "import resource\n"
        "from stigmer.broker.config import Limits\n"
        "from stigmer.broker.daemon.hardening import raise_open_file_limit\n"
        "from stigmer.broker.daemon.lifecycle import _fit_to_open_files\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (200, hard))\n"
        "print(_fit_to_open_files(Limits()).max_connections)\n"
        "print(raise_open_file_limit() == resource.getrlimit(resource.RLIMIT_NOFILE)[0]"
        " == min(hard, 1 << 20))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    assert out == ["45", "True"]  # 200 files less the 64 kept for the store and logs, / 3


async def test_listings_come_in_pages_that_fit_a_frame(paths: Paths) -> None:
    """With ~12k live contexts `context list` failed with a 7.4 MB reply, and so did
    `audit --limit 10000`. Here frames are 64 KiB, so 1,200 contexts (and their audit
    records) are already more than one reply could carry."""
    config = make_config(paths, max_frame_size=64 * 1024)
    async with anyio.create_task_group() as tg:
        running = await start_broker(tg, config)
        async with AsyncClient(running.socket) as client:
            for n in range(1200):
                await client.create_context(f"exec-{n:05d}", runtime=variables({"A": "1"}))
            await client.put_environment("big", variables({"NOTE": "x"}))
            listed = await client.list_contexts()
            assert [c.execution_id for c in listed] == [f"exec-{n:05d}" for n in range(1200)]
            paged = [c.execution_id async for c in client.iter_contexts(page_size=7)]
            assert paged == [c.execution_id for c in listed]
            records = await client.audit(limit=1150)
            assert len(records) == 1150
            seqs = [r.seq for r in records]
            assert seqs == list(range(seqs[0], seqs[0] + 1150))  # the newest, oldest first
            assert records[-1].event == "environment.set"
            assert [e.name for e in await client.list_environments()] == ["big"]
        running.stop.set()
    env = cli_env(paths)
    async with anyio.create_task_group() as tg:
        running = await start_broker(tg, config)
        result = await anyio.to_thread.run_sync(lambda: subprocess.run(
            [sys.executable, "-m", "stigmer.broker", "context", "list", "--json"], env=env,
            capture_output=True, text=True, timeout=60))
        assert result.returncode == 0, result.stderr
        assert len(json.loads(result.stdout)) == 1200
        running.stop.set()


async def test_pipelined_requests_are_answered_in_order(broker: RunningBroker) -> None:
    """Requests sent at once, some answered from memory at once (Hello, a fetch, a bad
    token) and some in a task (status, an issue that writes): the replies come back in
    the order asked, each to its own id, and the end of stream closes after the last."""
    async with AsyncClient(broker.socket) as admin:
        token = (await admin.create_context("pipe", runtime=variables({"A": "1"}))).token
    asked = [Hello(id=1, version=1), FetchContext(id=2, token=token), GetStatus(id=3),
             FetchContext(id=4, token=token), IssueToken(id=5, execution_id="pipe"),
             FetchContext(id=6, token="stg_" + "x" * 43), GetStatus(id=7),
             FetchContext(id=8, token=token)]
    replies, closed = await anyio.to_thread.run_sync(raw_exchange, broker.socket,
                                                     frames(*asked))
    assert [r.id for r in replies] == [m.id for m in asked]
    kinds = [type(r).__name__ for r in replies]
    assert kinds == ["Welcome", "ContextFetched", "Status", "ContextFetched", "TokenIssued",
                     "Error", "Status", "ContextFetched"]
    assert closed


async def test_a_reply_that_cannot_be_encoded_costs_nothing_but_an_error_frame(
        short_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A reply answered in a task (not from memory) that cannot be encoded: the client
    gets an error frame for it, its connection and the server go on. It used to raise
    out of the task and take the whole server down with it."""
    from stigmer.broker.config import Limits
    from stigmer.broker.daemon.listen import bind_unix_socket
    from stigmer.broker.daemon.server import Server
    from stigmer.broker.dispatch import Counters, Later
    from stigmer.broker.protocol import Ok, Status

    class Unencodable:
        def handle(self, request: GetStatus, peer: object) -> object:
            if isinstance(request, Hello):
                return Welcome(id=1, version=1, server_version="t")
            return Later(functools.partial(self.answer, request))

        async def answer(self, request: GetStatus) -> Response:
            if request.id == 2:  # a lone surrogate: no UTF-8 for it
                return Status(id=2, version="\udcff", pid=1, uptime_s=0.0, socket="",
                              socket_mode="", store="", key_source="", started_by="",
                              environments=0, contexts=0, tokens=0, requests=0,
                              connections=0)
            return Ok(id=request.id)

    bound = bind_unix_socket(short_dir / "run" / "u.sock")
    server = Server(bound.sock, Unencodable(), Limits(), Counters())  # type: ignore[arg-type]
    stop = anyio.Event()
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(lambda task_status: server.serve(stop.wait, task_status=task_status))
            replies, _ = await anyio.to_thread.run_sync(
                raw_exchange, bound.path, frames(Hello(id=1, version=1), GetStatus(id=2),
                                                 GetStatus(id=3)))
            assert [type(r).__name__ for r in replies] == ["Welcome", "Error", "Ok"]
            assert isinstance(replies[1], Error) and replies[1].code == ErrorCode.INVALID_ARGUMENT
            assert "\udcff" not in replies[1].message
            stop.set()
    finally:
        bound.remove()
