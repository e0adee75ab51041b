"""The metrics endpoint: what a scrape shows (read with prometheus_client's own parser),
what it must never show, the addresses it refuses, and that it goes when the broker does."""

from __future__ import annotations

import contextlib
import functools
import grp
import math
import os
import pwd
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
from conftest import (
    as_user,
    cli_env,
    ensure_user,
    make_config,
    python_for_nobody,
    run_cli,
    start_broker,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from stigmer.broker.config import MetricsAddress, Paths, parse_metrics_address
from stigmer.broker.daemon.lifecycle import serve
from stigmer.broker.protocol import Connection, GetStatus, Hello, Role
from stigmer.broker.protocol.errors import StartupError
from stigmer.client import AsyncClient, PermissionDenied, Unauthenticated, variables

#: every family the issue asks for, by the name the parser gives it
FAMILIES = {
    "stigmer_broker_requests": "counter",
    "stigmer_broker_fetch_seconds": "histogram",
    "stigmer_broker_live_contexts": "gauge",
    "stigmer_broker_live_tokens": "gauge",
    "stigmer_broker_live_grants": "gauge",
    "stigmer_broker_connections": "gauge",
    "stigmer_broker_evictions": "counter",
    "stigmer_broker_connections_refused": "counter",
    "stigmer_broker_denials": "counter",
    "stigmer_broker_store_write_seconds": "histogram",
    "stigmer_broker_store_commit_seconds": "histogram",
    "stigmer_broker_store_commit_writes": "histogram",
    "stigmer_broker_audit_buffered_records": "gauge",
    "stigmer_broker_audit_oldest_buffered_age_seconds": "gauge",
    "stigmer_broker_fleet_store_age_seconds": "gauge",
    "stigmer_broker_fleet_last_notice_age_seconds": "gauge",
    "stigmer_broker_key_backup_age_seconds": "gauge",
    "stigmer_broker_key_age_seconds": "gauge",
}

#: what the broker is handed in this test; not one of these may reach a scrape
SENTINEL_ENV = "sentinel-env-q7x"
SENTINEL_EXECUTION = "sentinel-exec-q7x"
SENTINEL_GRANTED = "sentinel-granted-q7x"
SENTINEL_VARIABLE = "SENTINEL_VAR_Q7X"
SENTINEL_VALUE = "sentinel-value-q7x-secret"


def free_port() -> int:
    """A loopback port nothing listens on now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def scrape(address: MetricsAddress) -> str:
    """GET the endpoint as a scraper does (HTTP/1.0: the server closes after its answer)."""
    if address.path is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(str(address.path))
    else:
        sock = socket.create_connection((address.host, address.port), timeout=10)
    with sock:
        sock.sendall(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head
    return body.decode()


def samples(text: str) -> dict[str, list[Sample]]:
    """Each family's samples, by family name, as prometheus_client parses the text."""
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def value(found: dict[str, list[Sample]], family: str, sample: str | None = None,
          **labels: str) -> float:
    """The value of the one sample of ``family`` (named ``sample``) with ``labels``."""
    name = sample or family
    matching = [s.value for s in found[family]
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matching) == 1, (family, name, labels, found[family])
    return matching[0]


def has(found: dict[str, list[Sample]], family: str, sample: str, **labels: str) -> bool:
    return any(s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
               for s in found.get(family, ()))


async def scrape_when(address: MetricsAddress, op: str, outcome: str) -> str:
    """A scrape once the count of ``op`` answered with ``outcome`` shows (the per-request
    figures are published once a second)."""
    with anyio.fail_after(30):
        while True:
            text = await anyio.to_thread.run_sync(scrape, address)
            if has(samples(text), "stigmer_broker_requests", "stigmer_broker_requests_total",
                   op=op, outcome=outcome):
                return text
            await anyio.sleep(0.1)


def endpoint_gone(address: MetricsAddress) -> bool:
    if address.path is not None:
        return not os.path.lexists(address.path)
    try:
        socket.create_connection((address.host, address.port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.fixture(params=["unix", "tcp"])
def metrics_address(request: pytest.FixtureRequest, short_dir: Path) -> MetricsAddress:
    if request.param == "unix":
        return parse_metrics_address(f"unix:{short_dir}/m/metrics.sock")
    return parse_metrics_address(f"tcp:127.0.0.1:{free_port()}")


@pytest.mark.anyio
async def test_a_scrape_shows_every_family_and_no_name_or_value(
        paths: Paths, store: str | None, metrics_address: MetricsAddress) -> None:
    config = make_config(paths, store)._replace(metrics=metrics_address)
    async with anyio.create_task_group() as tg:
        broker = await start_broker(tg, config)
        async with AsyncClient(broker.socket) as client:
            await client.put_environment(SENTINEL_ENV, variables(
                {}, {SENTINEL_VARIABLE: SENTINEL_VALUE}))
            created = await client.create_context(SENTINEL_EXECUTION,
                                                  environments=[SENTINEL_ENV])
            # an exe: grant: the process is attested in a task (a user: one is matched
            # from the connection, on the fast path)
            await client.create_context(SENTINEL_GRANTED, environments=[SENTINEL_ENV],
                                        runners=[f"exe:{os.path.realpath(sys.executable)}"])
            assert (await client.fetch_context(created.token))[SENTINEL_VARIABLE] \
                == SENTINEL_VALUE
            assert (await client.fetch_context(execution_id=SENTINEL_GRANTED))[
                SENTINEL_VARIABLE] == SENTINEL_VALUE
        async with AsyncClient(broker.socket) as refused:
            with pytest.raises(Unauthenticated):
                await refused.fetch_context("stg_" + "A" * 43)
            with pytest.raises(PermissionDenied):
                await refused.fetch_context(execution_id="sentinel-nothing-q7x")
        async with AsyncClient(broker.socket) as client:
            await client.status()  # a connection open while the scrape reads
            text = await scrape_when(metrics_address, "GetStatus", "ok")  # sampled after it
            found = samples(text)
            broker.stop.set()
    assert endpoint_gone(metrics_address)

    types = {family.name: family.type for family in text_string_to_metric_families(text)}
    assert {name: types.get(name) for name in FAMILIES} == FAMILIES
    assert "sentinel" not in text.lower()
    assert created.token not in text
    assert SENTINEL_VARIABLE.lower() not in text.lower()

    requests = "stigmer_broker_requests"
    assert value(found, requests, f"{requests}_total", op="FetchContext", outcome="ok") == 2
    assert value(found, requests, f"{requests}_total", op="FetchContext",
                 outcome="unauthenticated") == 1
    assert value(found, requests, f"{requests}_total", op="FetchContext",
                 outcome="permission_denied") == 1
    fetch = "stigmer_broker_fetch_seconds"
    assert value(found, fetch, f"{fetch}_count", path="fast") >= 1  # the token's
    assert value(found, fetch, f"{fetch}_count", path="task") >= 1  # the grant's (attested)
    denials = "stigmer_broker_denials"
    assert value(found, denials, f"{denials}_total", cause="token") == 1
    assert value(found, denials, f"{denials}_total", cause="grant") == 1
    assert value(found, denials, f"{denials}_total", cause="uid") == 0
    assert value(found, "stigmer_broker_connections", kind="owner") == 1
    assert value(found, "stigmer_broker_connections", kind="runner_group") == 0
    assert value(found, "stigmer_broker_live_contexts") == 2
    assert value(found, "stigmer_broker_live_tokens") == 1
    assert value(found, "stigmer_broker_live_grants") == 1
    commits = "stigmer_broker_store_commit_seconds"
    assert value(found, commits, f"{commits}_count") >= 3
    writes = "stigmer_broker_store_write_seconds"
    assert value(found, writes, f"{writes}_count") >= 3
    assert value(found, "stigmer_broker_key_backup_age_seconds") == math.inf
    assert 0 <= value(found, "stigmer_broker_key_age_seconds") < 3600  # a new store's key
    assert value(found, "stigmer_broker_fleet_store_age_seconds") >= 0
    # every label is one of a fixed set: a request's class, a wire code, an enumeration
    labels = {(k, v) for family in found.values() for s in family for k, v in s.labels.items()
              if k not in ("op", "outcome", "le")}
    assert labels <= {("path", "fast"), ("path", "task"), ("kind", "owner"),
                      ("kind", "runner_group"), ("kind", "other"), ("cause", "token"),
                      ("cause", "grant"), ("cause", "admin_only"), ("cause", "uid"),
                      ("cause", "auth_failures")}


@pytest.mark.anyio
async def test_a_fleet_broker_reports_the_last_notice_it_heard(paths: Paths,
                                                               store_url: str) -> None:
    address = parse_metrics_address(f"tcp:127.0.0.1:{free_port()}")
    config = make_config(paths, store_url)._replace(metrics=address)
    notice = "stigmer_broker_fleet_last_notice_age_seconds"
    async with anyio.create_task_group() as tg:
        broker = await start_broker(tg, config)
        found = samples(await anyio.to_thread.run_sync(scrape, address))
        assert value(found, notice) == math.inf  # none heard yet
        async with AsyncClient(broker.socket) as client:
            await client.create_context("ends", runtime=variables({"A": "1"}, {}))
            await client.complete_context("ends")  # a notice to the fleet, ours included
        with anyio.fail_after(30):
            while value(found, notice) == math.inf:
                await anyio.sleep(0.1)
                found = samples(await anyio.to_thread.run_sync(scrape, address))
        assert value(found, "stigmer_broker_fleet_store_age_seconds") < config.stale_after_s
        broker.stop.set()


@pytest.mark.anyio
async def test_the_unix_socket_is_private_and_its_directory_must_be(short_dir: Path,
                                                                    paths: Paths) -> None:
    address = parse_metrics_address(f"unix:{short_dir}/m/metrics.sock")
    assert address.path is not None
    async with anyio.create_task_group() as tg:
        broker = await start_broker(tg, make_config(paths)._replace(metrics=address))
        assert stat.S_IMODE(os.lstat(address.path).st_mode) == 0o600
        assert stat.S_IMODE(os.lstat(address.path.parent).st_mode) == 0o700
        broker.stop.set()
    assert not os.path.lexists(address.path)

    os.chmod(address.path.parent, 0o755)
    with pytest.raises(StartupError, match=r"refusing metrics socket directory .*0755"):
        await serve(make_config(paths)._replace(metrics=address))


@pytest.mark.anyio
async def test_a_metrics_socket_in_use_is_refused(short_dir: Path, paths: Paths) -> None:
    address = parse_metrics_address(f"unix:{short_dir}/b.sock")
    other = Paths(home=short_dir / "other", socket=short_dir / "b.sock")  # listens there
    async with anyio.create_task_group() as tg:
        broker = await start_broker(tg, make_config(other))
        with pytest.raises(StartupError, match="in use by another process"):
            await serve(make_config(paths)._replace(metrics=address))
        broker.stop.set()


@pytest.mark.anyio
async def test_a_port_in_use_is_refused_in_one_plain_line(paths: Paths) -> None:
    """The error quoted Python's bind tuple (a new user's probe)."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        address = parse_metrics_address(f"tcp:127.0.0.1:{taken.getsockname()[1]}")
        with pytest.raises(StartupError) as info:
            await serve(make_config(paths)._replace(metrics=address))
    assert str(info.value).endswith(": Address already in use; choose another port")
    assert "(" not in str(info.value)


@pytest.mark.anyio
async def test_idle_connections_to_the_endpoint_hold_no_scrape_up(
        paths: Paths, metrics_address: MetricsAddress) -> None:
    """One scrape at a time: each client that connected and said nothing held every
    scrape up for the 5 s timeout (a new user's probe: three idle connections, and a
    10 s scrape gave up). Each scrape has a thread of its own now."""
    config = make_config(paths)._replace(metrics=metrics_address)
    async with anyio.create_task_group() as tg:
        broker = await start_broker(tg, config)
        with contextlib.ExitStack() as idle:
            for _ in range(3):
                if metrics_address.path is not None:
                    sock = idle.enter_context(socket.socket(socket.AF_UNIX))
                    sock.connect(str(metrics_address.path))
                else:
                    idle.enter_context(socket.create_connection(
                        (metrics_address.host, metrics_address.port)))
            await anyio.sleep(0.2)  # accepted, and each now waits for its request
            with anyio.fail_after(4):  # one idle connection alone used to take 5 s
                text = await anyio.to_thread.run_sync(scrape, metrics_address)
        assert "stigmer_broker_requests" in text
        broker.stop.set()


#: a stdlib-only peer any user can run: sends the frames given in hex, prints what comes back
PEER = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX); s.settimeout(20)
data = b""
try:
    s.connect(sys.argv[1]); s.sendall(bytes.fromhex(sys.argv[2])); s.shutdown(socket.SHUT_WR)
    while chunk := s.recv(65536):
        data += chunk
except OSError:
    pass
print(data.hex())
"""


def as_peer(path: Path, user: pwd.struct_passwd, *, extra_group: str = "") -> None:
    """Ask ``path`` for the broker's status on a fresh connection, as ``user`` (with
    ``extra_group`` added to its process, whatever the group database says)."""
    client = Connection(Role.CLIENT)
    frames = client.send(Hello(id=1, version=1)) + client.send(GetStatus(id=2))
    identity = as_user(user)
    if extra_group:
        identity["extra_groups"] = [*identity["extra_groups"], grp.getgrnam(extra_group).gr_gid]
    subprocess.run([python_for_nobody(), "-c", PEER, str(path), frames.hex()], check=True,
                   capture_output=True, timeout=60, **identity)


@pytest.mark.anyio
async def test_runner_group_peers_are_counted_by_cause_not_by_uid(paths: Paths,
                                                                  short_dir: Path) -> None:
    member = ensure_user("stgmrun", ["stgmetrics"])
    outsider = ensure_user("stgmout")
    address = parse_metrics_address(f"tcp:127.0.0.1:{free_port()}")
    config = make_config(paths)._replace(metrics=address, allow_group="stgmetrics")
    async with anyio.create_task_group() as tg:
        broker = await start_broker(tg, config)
        os.chmod(short_dir, 0o755)  # so the runners can reach the socket's directory
        await anyio.to_thread.run_sync(as_peer, broker.socket, member)  # an owner's request
        # reaches the socket (a process that kept the group after it left it) but is not
        # in the group: refused before a byte
        await anyio.to_thread.run_sync(functools.partial(as_peer, broker.socket, outsider,
                                                         extra_group="stgmetrics"))
        text = await scrape_when(address, "GetStatus", "permission_denied")
        broker.stop.set()
    found = samples(text)
    denials = "stigmer_broker_denials"
    assert value(found, denials, f"{denials}_total", cause="admin_only") == 1
    assert value(found, denials, f"{denials}_total", cause="uid") == 1
    requests = "stigmer_broker_requests"
    assert value(found, requests, f"{requests}_total", op="GetStatus",
                 outcome="permission_denied") == 1
    assert value(found, "stigmer_broker_connections", kind="runner_group") == 0  # gone
    for user in (member, outsider):
        assert str(user.pw_uid) not in {v for f in found.values() for s in f
                                        for v in s.labels.values()}
        assert user.pw_name not in text


@pytest.mark.anyio
async def test_evictions_are_counted(paths: Paths) -> None:
    address = parse_metrics_address(f"tcp:127.0.0.1:{free_port()}")
    config = make_config(paths, max_connections=2)._replace(metrics=address)
    async with anyio.create_task_group() as tg:
        broker = await start_broker(tg, config)
        silent = [await anyio.connect_unix(broker.socket) for _ in range(2)]  # never greet
        async with AsyncClient(broker.socket) as client:  # evicts the oldest silent one
            await client.status()
            found = samples(await anyio.to_thread.run_sync(scrape, address))
            assert value(found, "stigmer_broker_evictions", "stigmer_broker_evictions_total") \
                == 1
            assert value(found, "stigmer_broker_connections", kind="owner") == 2
        for stream in silent:
            await stream.aclose()
        broker.stop.set()


@pytest.fixture
def no_metrics_thread() -> Iterator[None]:
    yield
    assert not [t for t in threading.enumerate() if t.name == "stigmer-metrics"]


@pytest.mark.anyio
@pytest.mark.usefixtures("no_metrics_thread")
async def test_without_metrics_nothing_listens(paths: Paths) -> None:
    async with anyio.create_task_group() as tg:
        broker = await start_broker(tg, make_config(paths))
        assert not [t for t in threading.enumerate() if t.name == "stigmer-metrics"]
        async with AsyncClient(broker.socket) as client:
            await client.status()
        broker.stop.set()


@pytest.mark.parametrize(("text", "reason"), [
    ("tcp:0.0.0.0:9464", "not a loopback address"),
    ("tcp:10.1.2.3:9464", "not a loopback address"),
    ("tcp:[::]:9464", "not a loopback address"),
    ("tcp::::9464", "not a loopback address"),
    ("tcp:localhost:9464", "not an IP address"),
    ("tcp:metrics.example.com:9464", "not an IP address"),
    ("tcp:127.0.0.1", "give a port"),
    ("tcp:127.0.0.1:0", "give a port"),
    ("tcp:127.0.0.1:70000", "give a port"),
    ("unix:metrics.sock", "absolute path"),
    ("unix:/" + "x" * 120, "limit of Unix sockets"),
    ("http://127.0.0.1:9464", "give unix:PATH or tcp:127.0.0.1:PORT"),
])
def test_addresses_beyond_loopback_or_a_socket_are_refused(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason) as caught:
        parse_metrics_address(text)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(("text", "shown"), [
    ("tcp:127.0.0.1:9464", "tcp:127.0.0.1:9464"),
    ("tcp:127.8.9.10:1", "tcp:127.8.9.10:1"),
    ("tcp:[::1]:9464", "tcp:[::1]:9464"),
    ("unix:/run/user/1000/stigmer/metrics.sock", "unix:/run/user/1000/stigmer/metrics.sock"),
])
def test_loopback_and_socket_addresses_are_taken(text: str, shown: str) -> None:
    assert str(parse_metrics_address(text)) == shown


def test_the_cli_refuses_a_public_address_as_a_usage_error(paths: Paths) -> None:
    for args, env in ((["serve", "--metrics", "tcp:0.0.0.0:9464"], {}),
                      (["start", "--metrics", "tcp:localhost:9464"], {}),
                      (["serve"], {"STIGMER_METRICS": "tcp:[::]:9464"}),
                      (["start", "--metrics", ""], {})):  # not "no metrics", silently
        proc = run_cli(paths, *args, env=cli_env(paths, **env))
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, lines
        assert ("STIGMER_METRICS" if env else "--metrics") in lines[0]
        assert "Traceback" not in proc.stderr
    assert not paths.home.exists()  # refused before anything started


def test_serve_reads_stigmer_metrics_once_and_the_flag_wins(
        paths: Paths, monkeypatch: pytest.MonkeyPatch) -> None:
    from stigmer.broker import cli
    from stigmer.broker.config import Config
    from stigmer.broker.daemon import lifecycle

    seen: list[tuple[MetricsAddress | None, bool]] = []

    def fake_run(config: Config, **kwargs: object) -> None:
        seen.append((config.metrics, "STIGMER_METRICS" in os.environ))

    monkeypatch.setattr(lifecycle, "run", fake_run)
    base = ["--home", str(paths.home), "--socket", str(paths.socket), "serve"]
    assert cli.main(base) == 0
    monkeypatch.setenv("STIGMER_METRICS", "tcp:127.0.0.1:9464")
    assert cli.main(base) == 0
    monkeypatch.setenv("STIGMER_METRICS", "tcp:127.0.0.1:9464")
    assert cli.main([*base, "--metrics", "unix:/run/m.sock"]) == 0
    assert seen == [(None, False), (MetricsAddress(host="127.0.0.1", port=9464), False),
                    (MetricsAddress(path=Path("/run/m.sock")), False)]


def test_start_passes_metrics_to_the_daemon(paths: Paths, short_dir: Path) -> None:
    address = parse_metrics_address(f"unix:{short_dir}/m/metrics.sock")
    run_cli(paths, "start", "--metrics", str(address), check=True)
    try:
        while not has(samples(scrape(address)), "stigmer_broker_requests",  # published
                      "stigmer_broker_requests_total", op="GetStatus", outcome="ok"):
            time.sleep(0.1)  # the test's timeout bounds it
    finally:
        run_cli(paths, "stop", check=True)
    assert endpoint_gone(address)
