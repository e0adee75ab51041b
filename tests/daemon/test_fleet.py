"""Fleet mode: several brokers (standing for hosts, each with its own home and socket) on
one real PostgreSQL store.

The tests that stop and restart PostgreSQL do it to a cluster of their own; the others
work in a fresh schema of the run's database (tests/postgres.py).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import re
import secrets
import subprocess
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest
from conftest import Daemon, RunningBroker, cli_env, make_config, run_cli, start_broker
from postgres import URL_VARIABLE, Cluster, Server, psql, with_database

from stigmer.broker.config import Config, Paths
from stigmer.broker.daemon.lifecycle import serve
from stigmer.broker.local.paths import redact_url
from stigmer.broker.protocol.errors import StartupError
from stigmer.broker.store.backend import STORE_DEADLINE
from stigmer.broker.store.notices import ContextEnded, Hearing, MasterKeyRotated, Notice, encode
from stigmer.broker.store.postgres import MIGRATIONS
from stigmer.client import (
    AsyncClient,
    BrokerError,
    Client,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    Variable,
)

pytestmark = pytest.mark.anyio

KEY = base64.b64encode(bytes(range(32))).decode()
OTHER_KEY = base64.b64encode(bytes(range(1, 33))).decode()


def host(root: Path, name: str) -> Paths:
    (root / name).mkdir(mode=0o700, exist_ok=True)
    return Paths(home=root / name / "home", socket=root / name / "run" / "b.sock")


def fleet_config(root: Path, name: str, url: str, key: str = KEY) -> Config:
    return make_config(host(root, name), url)._replace(env_key=key)


class Fleet:
    """Brokers A, B, C... served in the test's event loop, all on one store."""

    def __init__(self, tg: anyio.abc.TaskGroup, root: Path, url: str) -> None:
        self.tg = tg
        self.root = root
        self.url = url
        self.brokers: dict[str, RunningBroker] = {}

    async def add(self, name: str, url: str | None = None) -> RunningBroker:
        running = await start_broker(self.tg, fleet_config(self.root, name, url or self.url))
        self.brokers[name] = running
        return running

    def client(self, name: str) -> AsyncClient:
        return AsyncClient(self.brokers[name].socket)

    def stop(self) -> None:
        for running in self.brokers.values():
            running.stop.set()


@pytest.fixture
async def fleet(short_dir: Path, store_url: str) -> AsyncIterator[Fleet]:
    async with anyio.create_task_group() as tg:
        fleet = Fleet(tg, short_dir, store_url)
        yield fleet
        fleet.stop()


async def seed(client: AsyncClient, execution_id: str = "exec-1", **kw: object) -> str:
    await client.put_environment("prod", {"API_KEY": Variable(value="s3cret", is_secret=True),
                                          "REGION": Variable(value="eu", is_secret=False)})
    created = await client.create_context(execution_id, environments=["prod"], **kw)  # type: ignore[arg-type]
    return created.token


async def refused_within(client: AsyncClient, token: str, seconds: float) -> float:
    """Fetch until the token is refused; return how long that took."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        try:
            await client.fetch_context(token)
        except Unauthenticated:
            return time.monotonic() - start
        await anyio.sleep(0.005)
    raise AssertionError(f"still served after {seconds} s")


async def test_created_on_a_is_fetched_on_b_and_c(fleet: Fleet) -> None:
    for name in "abc":
        await fleet.add(name)
    async with fleet.client("a") as a:
        token = await seed(a)
    for name in "bc":
        async with fleet.client(name) as client:
            context = await client.fetch_context(token)
            assert dict(context) == {"API_KEY": "s3cret", "REGION": "eu"}
            assert (await client.get_context("exec-1")).execution_id == "exec-1"
            assert [c.execution_id for c in await client.list_contexts()] == ["exec-1"]
            assert [e.name for e in await client.list_environments()] == ["prod"]


async def test_a_cached_fetch_does_not_touch_the_database(fleet: Fleet,
                                                          store_url: str) -> None:
    await fleet.add("a")
    await fleet.add("b")
    async with fleet.client("a") as a:
        token = await seed(a)
    async with fleet.client("b") as b:
        await b.fetch_context(token)  # the miss: looked up once
        before = _statements(store_url)
        for _ in range(20):
            await b.fetch_context(token)
        assert _statements(store_url) == before


def _statements(url: str) -> int:
    """Statements PostgreSQL ran on tokens and contexts (pg_stat counters of the schema)."""
    out = psql(url, "SELECT pg_stat_force_next_flush(); SELECT coalesce(sum(seq_scan + "
               "coalesce(idx_scan, 0)), 0) FROM pg_stat_user_tables WHERE schemaname = "
               "current_schema() AND relname IN ('tokens', 'contexts')")
    return int(out.splitlines()[-1])


async def test_completed_on_a_is_refused_on_b(fleet: Fleet) -> None:
    await fleet.add("a")
    await fleet.add("b")
    async with fleet.client("a") as a, fleet.client("b") as b:
        token = await seed(a)
        await b.fetch_context(token)  # cached on B
        await a.complete_context("exec-1")
        assert await refused_within(b, token, 2.0) < 1.0
        # and the runner's own release on B reaches A
        token = (await a.create_context("exec-2", environments=["prod"])).token
        await a.fetch_context(token)
        await b.release_context(token)
        await refused_within(a, token, 2.0)


#: what another login may NOTIFY on the fleet's channel: not JSON, the notices of
#: before they were typed, a kind no one knows, a notice missing or mistyping a field
GARBAGE = ["not json", "ctx 1 exec-1", "key 0123456789abcdef", '{"type": "nope"}',
           '{"type": "ctx", "execution_id": "exec-1"}',
           '{"type": "ctx", "row_id": "1", "execution_id": "exec-1"}', "[]", ""]


async def test_garbage_on_the_channel_is_ignored_and_logged_once(
        fleet: Fleet, store_url: str, caplog: pytest.LogCaptureFixture) -> None:
    await fleet.add("a")
    await fleet.add("b")
    schema = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(store_url).query))["search_path"]
    async with fleet.client("a") as a, fleet.client("b") as b:
        token = await seed(a)
        await b.fetch_context(token)  # cached on B
        with caplog.at_level(logging.WARNING, logger="stigmer.broker.store.notices"):
            psql(store_url, "; ".join(f"SELECT pg_notify('stigmer:{schema}', '{payload}')"
                                      for payload in GARBAGE))
            await b.fetch_context(token)  # still served: nothing was revoked
            # both listeners survived: a real notice still reaches B
            await a.complete_context("exec-1")
            assert await refused_within(b, token, 2.0) < 1.0
        lines = [r.getMessage() for r in caplog.records
                 if r.name == "stigmer.broker.store.notices"]
        # one line per broker, however many were dropped (rate-limited), naming no payload
        assert len(lines) == 2, lines
        # a revocation in a form B cannot read (a broker of another version): the row is
        # gone from the store and B, which cannot tell, drops its cache
        token = await seed(a, execution_id="exec-2")
        await b.fetch_context(token)  # cached on B
        psql(store_url, "DELETE FROM tokens WHERE context_id IN (SELECT id FROM contexts "
             "WHERE execution_id = 'exec-2'); DELETE FROM contexts WHERE execution_id = "
             f"'exec-2'; SELECT pg_notify('stigmer:{schema}', 'ctx 2 exec-2')")
        assert await refused_within(b, token, 3.0) < 2.0
        assert all("malformed notification" in line for line in lines)
        assert not any("exec-1" in line or "nope" in line for line in lines)


def test_notices_round_trip_and_the_drop_log_is_rate_limited(
        caplog: pytest.LogCaptureFixture) -> None:
    heard: list[Notice] = []
    now = [0.0]
    hearing = Hearing(heard.append, quiet_for=60.0, clock=lambda: now[0])
    sent: list[Notice] = [ContextEnded(7, "exec-7"), MasterKeyRotated("0123456789abcdef")]
    with caplog.at_level(logging.WARNING, logger="stigmer.broker.store.notices"):
        for payload in GARBAGE:
            hearing(payload)
        now[0] = 59.0
        hearing("not json")
        for notice in sent:
            hearing(encode(notice))
        now[0] = 61.0
        hearing("not json")
    assert heard == sent
    assert [r.getMessage().split(" malformed")[0] for r in caplog.records] == [
        "ignored 1", f"ignored {len(GARBAGE) - 1 + 2}"]  # the rest, and the two after


async def test_an_expired_context_is_not_shown_by_another_broker(fleet: Fleet) -> None:
    await fleet.add("a")
    await fleet.add("b")
    async with fleet.client("a") as a, fleet.client("b") as b:
        await seed(a, ttl_s=1.0)
        await anyio.sleep(1.1)
        with pytest.raises(NotFound):
            await b.get_context("exec-1")


async def test_max_uses_is_exact_across_brokers(fleet: Fleet) -> None:
    for name in "abc":
        await fleet.add(name)
    async with fleet.client("a") as a:
        token = await seed(a, max_uses=5)
    granted = 0
    refused = 0

    async def fetcher(name: str) -> None:
        nonlocal granted, refused
        async with fleet.client(name) as client:
            for _ in range(3):
                try:
                    await client.fetch_context(token)
                    granted += 1
                except Unauthenticated:
                    refused += 1

    async with anyio.create_task_group() as tg:
        for name in "abc":
            for _ in range(8):
                tg.start_soon(fetcher, name)
    assert (granted, refused) == (5, 3 * 8 * 3 - 5)
    async with fleet.client("b") as b:
        assert (await b.get_context("exec-1")).tokens == []  # used up, so not listed


async def test_brokers_migrating_a_fresh_database_at_once(short_dir: Path,
                                                          store_url: str) -> None:
    async with anyio.create_task_group() as tg:
        fleet = Fleet(tg, short_dir, store_url)
        async with anyio.create_task_group() as starting:
            for name in "abcd":
                starting.start_soon(fleet.add, name)
        assert psql(store_url, "SELECT string_agg(version::text, ',') FROM stigmer_schema") \
            == ",".join(str(n) for n in range(1, len(MIGRATIONS) + 1))
        assert psql(store_url, "SELECT count(*) FROM data_keys") == "1"
        async with fleet.client("d") as d:
            token = await seed(d)
        async with fleet.client("a") as a:
            assert (await a.fetch_context(token))["API_KEY"] == "s3cret"
        fleet.stop()


async def test_a_broker_with_another_key_is_refused(fleet: Fleet, short_dir: Path) -> None:
    await fleet.add("a")
    with pytest.raises(StartupError, match="does not open the store"):
        await serve(fleet_config(short_dir, "b", fleet.url, OTHER_KEY))


async def test_a_newer_schema_is_refused_naming_both_versions(fleet: Fleet,
                                                              short_dir: Path) -> None:
    await fleet.add("a")
    psql(fleet.url, "INSERT INTO stigmer_schema(version) VALUES (99)")
    with pytest.raises(StartupError, match=f"version 99, newer than this broker knows "
                                           f"\\({len(MIGRATIONS)}\\)"):
        await serve(fleet_config(short_dir, "b", fleet.url))


async def test_audit_chain_stays_one_with_concurrent_writers(fleet: Fleet) -> None:
    for name in "abc":
        await fleet.add(name)

    async def writer(name: str) -> None:
        async with fleet.client(name) as client:
            for n in range(10):
                await client.put_environment(f"{name}{n}", {"V": Variable(value="x")})

    async with anyio.create_task_group() as tg:
        for name in "abc":
            tg.start_soon(writer, name)
    for name in "abc":
        async with fleet.client(name) as client:
            verified = await client.verify_audit()
            assert verified.ok, verified.reason
            assert verified.records >= 30


async def test_the_password_is_never_shown(short_dir: Path, postgres: Server,
                                           store_url: str) -> None:
    sentinel = "PW-SENTINEL-" + secrets.token_hex(4)
    url = store_url.replace("://", f"://postgres:{sentinel}@", 1) if "@" not in store_url \
        else store_url.replace("@", f":{sentinel}@", 1)
    assert redact_url(url) != url and sentinel not in redact_url(url)
    paths = host(short_dir, "a")
    env = cli_env(paths, STIGMER_STORE_URL=url, STIGMER_ENCRYPTION_KEY=KEY)
    with Daemon(paths, env=env) as daemon:
        status = run_cli(paths, "status", "--json", env=env, check=True)
        assert json.loads(status.stdout)["store"].startswith("postgresql://")
        assert sentinel not in status.stdout
        with open(f"/proc/{daemon.pid}/cmdline", "rb") as f:  # noqa: ASYNC230
            assert sentinel.encode() not in f.read()
    assert sentinel not in daemon.stderr()


def test_a_bad_store_url_is_a_usage_error(paths: Paths) -> None:
    result = run_cli(paths, "serve", "--store", "mysql://x/y")
    assert result.returncode == 2
    assert "must be a postgresql:// URL" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_cli(paths, "serve", "--stale-after", "5s")
    assert result.returncode == 2 and "give --store too" in result.stderr


def test_an_unreachable_store_is_one_clear_line(paths: Paths) -> None:
    result = run_cli(paths, "serve", "--store", "postgresql://nobody:pw@127.0.0.1:1/x")
    assert result.returncode != 0
    assert "cannot reach the store postgresql://nobody@127.0.0.1:1/x" in result.stderr
    assert "pw" not in result.stderr.replace("PostgreSQL", "")
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------ the two roles


@pytest.fixture
def roles(postgres: Server) -> Iterator[tuple[str, str, str]]:
    """A schema made by `fleet init` with roles of its own; (schema, control, runner)."""
    suffix = secrets.token_hex(4)
    names = (f"f_{suffix}", f"ctl_{suffix}", f"run_{suffix}")
    yield names
    schema, control, runner = names
    postgres.drop_schema(schema)
    for role in (control, runner):
        psql(postgres.url(), f"DROP OWNED BY {role} CASCADE; DROP ROLE {role}", check=False)


def _as(postgres: Server, role: str) -> str:
    url = postgres.url()
    if "user=postgres" in url:
        return url.replace("user=postgres", f"user={role}")
    return url.replace("://postgres@", f"://{role}@", 1)


async def test_a_runner_host_role_fetches_and_is_refused_writes(
        short_dir: Path, postgres: Server, roles: tuple[str, str, str]) -> None:
    schema, control, runner = roles
    paths = host(short_dir, "admin")
    init = run_cli(paths, "fleet", "init", "--store", postgres.url(), "--schema", schema,
                   "--control-role", control, "--runner-role", runner)
    assert init.returncode == 0, init.stderr
    async with anyio.create_task_group() as tg:
        fleet = Fleet(tg, short_dir, "")
        await fleet.add("control", _as(postgres, control))
        await fleet.add("runner", _as(postgres, runner))
        async with fleet.client("control") as a, fleet.client("runner") as b:
            token = await seed(a, max_uses=2)
            assert (await b.fetch_context(token))["REGION"] == "eu"  # counted on B
            await b.fetch_context(token)
            with pytest.raises(Unauthenticated):
                await a.fetch_context(token)  # two uses, fleet-wide
            for attempt in (b.put_environment("x", {"V": Variable(value="1")}),
                            b.create_context("e2", environments=["prod"]),
                            b.complete_context("exec-1")):
                with pytest.raises(PermissionDenied, match="serves fetches only"):
                    await attempt
            # a read it may not do is not called a change
            with pytest.raises(PermissionDenied, match=r"may not do that: it serves fetches "
                               r"only \(it cannot read environments"):
                await b.list_environments()
            assert (await b.verify_audit()).ok
            status = await b.status()
            assert (status.environments, status.store_problem) == (1, "")
        fleet.stop()


async def test_the_printed_sql_makes_a_store_brokers_open(
        short_dir: Path, postgres: Server, roles: tuple[str, str, str]) -> None:
    schema, control, runner = roles
    sql = run_cli(host(short_dir, "x"), "fleet", "init", "--print-sql", "--schema", schema,
                  "--control-role", control, "--runner-role", runner, check=True).stdout
    subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", postgres.url()],  # noqa: ASYNC221
                   input=sql, text=True, check=True, capture_output=True)
    async with anyio.create_task_group() as tg:
        fleet = Fleet(tg, short_dir, "")
        await fleet.add("control", _as(postgres, control))
        async with fleet.client("control") as a:
            await seed(a)
        fleet.stop()


async def _init_roles(short_dir: Path, postgres: Server, roles: tuple[str, str, str]) -> None:
    schema, control, runner = roles
    init = run_cli(host(short_dir, "admin"), "fleet", "init", "--store", postgres.url(),
                   "--schema", schema, "--control-role", control, "--runner-role", runner)
    assert init.returncode == 0, init.stderr


@contextlib.asynccontextmanager
async def _control_and_runner(short_dir: Path, postgres: Server, roles: tuple[str, str, str]
                              ) -> AsyncIterator[tuple[Fleet, str, str]]:
    """A fleet as `fleet init` makes it: a control broker and a runner broker, each logged
    in with its own role; yields the fleet and the two roles' URLs."""
    _schema, control, runner = roles
    await _init_roles(short_dir, postgres, roles)
    as_control, as_runner = _as(postgres, control), _as(postgres, runner)
    async with anyio.create_task_group() as tg:
        fleet = Fleet(tg, short_dir, "")
        await fleet.add("control", as_control)
        await fleet.add("runner", as_runner)
        yield fleet, as_control, as_runner
        fleet.stop()


def _refused(url: str, sql: str) -> str:
    """Run ``sql``, which the database must refuse; return what it said."""
    proc = subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-At", "-d", url,
                           "-c", sql], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0, f"the database accepted {sql!r}"
    return proc.stderr


_GARBAGE = ("INSERT INTO audit VALUES (9223372036854775807, 0, 'fetch', 'granted', '', '', "
            "NULL, NULL, '', 'garbage')")


async def test_the_runner_role_cannot_stop_or_break_the_audit(
        short_dir: Path, postgres: Server, roles: tuple[str, str, str]) -> None:
    """A runner-role login inserting a record numbered 2**63 - 1 stopped every flush of the
    fleet for good, and no role could remove it; a garbage record made verify (so also
    retention) fail for good. Now the store numbers the record, verify names it and the
    operator quarantines it through the daemon; the chain goes on past it."""
    async with (
        _control_and_runner(short_dir, postgres, roles) as (fleet, _, as_runner),
        fleet.client("control") as a, fleet.client("runner") as b,
    ):
        token = await seed(a)
        psql(as_runner, _GARBAGE)
        bad = int(psql(as_runner, "SELECT seq FROM audit WHERE hash = 'garbage'"))
        assert bad < 1000  # the store's number, not the inserter's
        assert "permission denied" in _refused(as_runner, "DELETE FROM audit")
        await b.fetch_context(token)  # audited on B, after the bad record
        await a.put_environment("x", {"V": Variable(value="1")})
        verified = await a.verify_audit()
        assert (verified.ok, verified.first_broken) == (False, bad), verified
        assert f"record {bad} does not match its link" in verified.reason
        with pytest.raises(BrokerError, match="only the record it names"):
            await a.quarantine_audit(bad + 1)
        with pytest.raises(PermissionDenied):
            await b.quarantine_audit(bad)
        paths = fleet.brokers["control"].config.paths
        quarantine = await anyio.to_thread.run_sync(  # the broker answers in this loop
            lambda: run_cli(paths, "audit", "quarantine", str(bad), env=cli_env(paths)))
        assert quarantine.returncode == 0, quarantine.stderr
        for client in (a, b):
            verified = await client.verify_audit()
            assert verified.ok, verified.reason
        assert psql(as_runner, "SELECT hash FROM audit_quarantine") == "garbage"
        await b.fetch_context(token)
        assert (await b.verify_audit()).ok
        records = await a.audit(None, 1000)
        assert max(r.seq for r in records) < 1000


async def test_an_audit_insert_waits_for_the_lock_a_broker_appends_under(
        short_dir: Path, postgres: Server, roles: tuple[str, str, str]) -> None:
    """The store numbers a record under the "audit" lock every append holds: an insert
    by another login waits until the broker's append has committed, so it can never
    take the number a broker's link was made for."""
    _schema, control, runner = roles
    await _init_roles(short_dir, postgres, roles)
    as_runner = _as(postgres, runner)
    async with anyio.create_task_group() as tg:
        fleet = Fleet(tg, short_dir, "")
        await fleet.add("control", _as(postgres, control))
        async with fleet.client("control") as a:
            await seed(a)
        fleet.stop()
    from stigmer.broker.store.postgres import PostgresStore

    opened = await PostgresStore.open(as_runner)
    try:
        async with opened.write() as db:
            await db.lock("audit")  # as a broker's append does
            refused = await anyio.to_thread.run_sync(lambda: _refused(
                as_runner, f"SET statement_timeout = '300ms'; {_GARBAGE}"))
            assert "statement timeout" in refused
    finally:
        await opened.close()
    psql(as_runner, _GARBAGE)  # once the lock is free, it goes in, numbered by the store
    assert int(psql(as_runner, "SELECT max(seq) FROM audit")) < 1000


async def test_a_saved_use_count_written_back_by_the_runner_role_is_refused(
        short_dir: Path, postgres: Server, roles: tuple[str, str, str]) -> None:
    """Writing back a saved (uses, mac) pair reset a bound: a max-uses-2 token was served
    4 times."""
    async with (
        _control_and_runner(short_dir, postgres, roles) as (fleet, _, as_runner),
        fleet.client("control") as a, fleet.client("runner") as b,
    ):
        token = await seed(a, max_uses=2)
        saved = psql(as_runner, "SELECT uses || ',' || encode(mac, 'hex') FROM tokens")
        uses, mac = saved.split(",")
        served = 0
        for _ in range(2):
            await b.fetch_context(token)
            served += 1
        assert "never goes down" in _refused(
            as_runner, f"UPDATE tokens SET uses = {uses}, mac = '\\x{mac}'")
        for client in (a, b):
            with pytest.raises(Unauthenticated):
                await client.fetch_context(token)
        assert served == 2


def _rows(url: str, table: str) -> str:
    return psql(url, f"SELECT coalesce(json_agg(t), '[]') FROM {table} t")


def _write_back(url: str, table: str, rows: str) -> None:
    psql(url, f"INSERT INTO {table} SELECT * FROM json_populate_recordset(NULL::{table}, "
              f"$rows${rows}$rows$)")


async def test_a_completed_context_written_back_by_the_control_login_is_not_served(
        short_dir: Path, postgres: Server, roles: tuple[str, str, str]) -> None:
    """Anyone with the control role's login (no key needed) re-inserting a completed
    context's saved rows made every broker serve the revoked context again."""
    async with (
        _control_and_runner(short_dir, postgres, roles) as (fleet, as_control, as_runner),
        fleet.client("control") as a, fleet.client("runner") as b,
    ):
        token = await seed(a)
        await b.fetch_context(token)
        contexts, tokens = _rows(as_control, "contexts"), _rows(as_control, "tokens")
        await a.complete_context("exec-1")
        await refused_within(b, token, 2.0)
        _write_back(as_control, "contexts", contexts)
        _write_back(as_control, "tokens", tokens)
        await fleet.add("fresh", as_runner)  # nothing cached: the store is asked
        async with fleet.client("fresh") as c:
            for client in (a, b, c):
                with pytest.raises(Unauthenticated):
                    await client.fetch_context(token)
                with pytest.raises(NotFound):
                    await client.get_context("exec-1")
        assert psql(as_control, "WITH d AS (DELETE FROM tombstones RETURNING 1) "
                                "SELECT count(*) FROM d") == "0"  # kept while it matters
        assert "permission denied" in _refused(as_control, "UPDATE tombstones SET "
                                                           "expires_at = 0")
        assert "permission denied" in _refused(as_runner, "DELETE FROM tombstones")


#: migration 1's audit guard, as it shipped: migration 2 replaced it
_SCHEMA_1_AUDIT_GUARD = re.search(  # type: ignore[union-attr]
    r"CREATE FUNCTION stigmer_audit_guard\(\).*?END \$\$;", MIGRATIONS[0], re.S
).group(0).replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)


async def _contexts_as_before_versions(url: str, short_dir: Path) -> None:
    """Context rows as a broker before migration 3 wrote them: no environment versions,
    their MACs without (what dropping the column in :func:`_as_schema_1` needs)."""
    from stigmer.broker.store.backend import open_store
    from stigmer.broker.store.crypto import Row
    from stigmer.broker.store.keys import EnvKey, MasterKey, decode_key
    from stigmer.broker.store.vault import Vault

    store = await open_store(url, short_dir / "unused.db")
    try:
        vault = await Vault.unlock(store, MasterKey(decode_key(KEY, "KEY"), EnvKey(KEY)))
        async with store.write() as db:
            for row in await db.fetchall("SELECT id, execution_id, created_at, expires_at, "
                                         "keys, sealed FROM contexts"):
                await db.execute("UPDATE contexts SET mac = ?, environments = NULL WHERE "
                                 "id = ?", (vault.mac(Row.context(*row)), row[0]))
    finally:
        await store.close()


def _as_schema_1(url: str) -> None:
    """Take out what migrations 2 and 3 added: the store is then as version 1 left it."""
    psql(url, "DROP TABLE environment_versions; ALTER TABLE contexts DROP COLUMN "
              "environments; DELETE FROM stigmer_schema WHERE version = 3")
    psql(url, "DROP TRIGGER audit_seq ON audit; DROP FUNCTION stigmer_audit_seq(); "
              "DROP TRIGGER tokens_uses_guard ON tokens; DROP FUNCTION stigmer_uses_guard(); "
              "DROP TABLE tombstones; DROP FUNCTION stigmer_tombstone_guard(); "
              f"{_SCHEMA_1_AUDIT_GUARD}; DROP TABLE audit_quarantine; "
              "DELETE FROM stigmer_schema WHERE version = 2")
    assert len(MIGRATIONS) == 3  # a new migration must be undone here too


async def test_a_schema_1_fleet_migrates_to_the_last_and_its_roles_keep_working(
        short_dir: Path, postgres: Server, roles: tuple[str, str, str]) -> None:
    schema, control, runner = roles
    await _init_roles(short_dir, postgres, roles)
    as_control, as_runner = _as(postgres, control), _as(postgres, runner)
    owner = postgres.url(search_path=schema)
    async with anyio.create_task_group() as tg:
        fleet = Fleet(tg, short_dir, "")
        await fleet.add("control", as_control)
        async with fleet.client("control") as a:
            token = await seed(a, max_uses=3)
        fleet.stop()
    await _contexts_as_before_versions(owner, short_dir)
    _as_schema_1(owner)
    async with anyio.create_task_group() as tg:
        fleet = Fleet(tg, short_dir, "")
        await fleet.add("owner", owner)  # the schema's owner migrates it
        assert psql(owner, "SELECT max(version) FROM stigmer_schema") == str(len(MIGRATIONS))
        await fleet.add("control", as_control)
        await fleet.add("runner", as_runner)  # granted on the new tables as on contexts
        async with fleet.client("control") as a, fleet.client("runner") as b:
            assert (await b.fetch_context(token))["API_KEY"] == "s3cret"
            await a.complete_context("exec-1")
            assert psql(as_runner, "SELECT count(*) FROM tombstones") == "1"
            assert (await b.verify_audit()).ok
            # granted on environment history as on environments (migration 3)
            await a.put_environment("prod", {"REGION": Variable(value="us")})
            assert [v.version for v in (await a.environment_history("prod"))[1]] == [2, 1]
            await a.rollback_environment("prod", 1)
            assert (await a.get_environment("prod")).data["REGION"].value == "eu"
        fleet.stop()


# ------------------------------------------------------------ database outages


class BlackHole:
    """A TCP proxy in front of the PostgreSQL server that can stop forwarding without
    closing anything: a database that hangs (black-holed), not one that refuses."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.listening_port = 0
        self._flowing = anyio.Event()
        self._flowing.set()

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        self.listening_port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with listener:
            task_status.started()
            await listener.serve(self._forward)

    def hang(self) -> None:
        self._flowing = anyio.Event()

    def resume(self) -> None:
        self._flowing.set()

    async def _forward(self, client: anyio.abc.SocketStream) -> None:
        with contextlib.suppress(OSError, anyio.BrokenResourceError,
                                 anyio.ClosedResourceError):
            async with client, await anyio.connect_tcp(self.host, self.port) as server, \
                    anyio.create_task_group() as tg:
                tg.start_soon(self._pipe, client, server, tg.cancel_scope)
                tg.start_soon(self._pipe, server, client, tg.cancel_scope)

    async def _pipe(self, source: anyio.abc.SocketStream, sink: anyio.abc.SocketStream,
                    both: anyio.CancelScope) -> None:
        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError,
                                 anyio.ClosedResourceError, OSError):
            while True:
                data = await source.receive()
                await self._flowing.wait()
                await sink.send(data)
        both.cancel()


@pytest.mark.slow  # it waits out the store's 10 s deadline, twice
async def test_a_hung_database_answers_unavailable_within_the_deadline(
        short_dir: Path, store_url: str) -> None:
    """A black-holed database (not a refused one) made a cache miss and a bounded fetch
    wait 65 s for `unavailable`. Every store call now has a deadline well under the
    client's timeout; the broker stays up and serves again once the database is back."""
    parts = urllib.parse.urlsplit(store_url)
    if not parts.hostname or parts.hostname.startswith("/"):
        pytest.skip("the hung-database test needs PostgreSQL over TCP "
                    f"({URL_VARIABLE}=postgresql://...@127.0.0.1:5432/...)")
    async with anyio.create_task_group() as tg:
        proxy = BlackHole(parts.hostname, parts.port or 5432)
        await tg.start(proxy.serve)
        # sslmode=disable: with the default `prefer`, asyncpg (0.32) leaves the future of
        # an SSL negotiation that a deadline cancelled to fail later, unretrieved, and the
        # test runner reports that as this test's error (MagicStack/asyncpg#1211, #1310).
        # The deadline is what is tested here, not TLS.
        query = "&".join(filter(None, (parts.query, "sslmode=disable")))
        proxied = urllib.parse.urlunsplit(parts._replace(
            netloc=f"{parts.username or 'postgres'}@127.0.0.1:{proxy.listening_port}",
            query=query))
        fleet = Fleet(tg, short_dir, store_url)
        await fleet.add("a")
        await fleet.add("b", proxied)
        async with fleet.client("a") as a, fleet.client("b") as b:
            token = await seed(a)
            bounded = (await a.create_context("exec-2", environments=["prod"],
                                              max_uses=5)).token
            await b.fetch_context(bounded)  # cached on B; each use is counted in the store
            proxy.hang()
            for what in (token, bounded):  # a cache miss, a bounded use
                started = time.monotonic()
                with pytest.raises(Unavailable):
                    await b.fetch_context(what)
                took = time.monotonic() - started
                assert took < STORE_DEADLINE + 2, took
            assert b.timeout >= STORE_DEADLINE * 3  # well under the client's timeout
            proxy.resume()
            deadline = time.monotonic() + 60
            while True:  # back, with no restart
                try:
                    assert (await b.fetch_context(token))["API_KEY"] == "s3cret"
                    break
                except Unavailable:
                    assert time.monotonic() < deadline
                    await anyio.sleep(0.2)
            assert (await b.fetch_context(bounded))["API_KEY"] == "s3cret"
            while (await b.status()).store_problem:  # the listener too, with its backoff
                assert time.monotonic() < deadline
                await anyio.sleep(0.2)
        fleet.stop()
        tg.cancel_scope.cancel()  # the proxy


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A cluster of our own, to stop and restart."""
    own = Cluster()
    yield own
    own.remove()


@pytest.fixture
def cluster_url(cluster: Cluster) -> Iterator[str]:
    database = "stigmer_outage_" + secrets.token_hex(4)
    psql(cluster.url, f"CREATE DATABASE {database}")
    yield with_database(cluster.url, database)
    if not _running(cluster):  # a test that stopped it and failed
        cluster.start()
    psql(cluster.url, f"DROP DATABASE IF EXISTS {database} WITH (FORCE)", check=False)


def _running(cluster: Cluster) -> bool:
    return os.path.exists(cluster.dir / ".s.PGSQL.5432")


@pytest.mark.slow
def test_cached_fetches_are_served_within_the_window_then_refused(
        short_dir: Path, cluster: Cluster, cluster_url: str) -> None:
    paths = host(short_dir, "a")
    env = cli_env(paths, STIGMER_STORE_URL=cluster_url, STIGMER_ENCRYPTION_KEY=KEY)
    with Daemon(paths, env=env, args=("--stale-after", "3s")) as daemon:
        with Client(paths.socket) as client:
            client.put_environment("prod", {"K": Variable(value="v", is_secret=True)})
            token = client.create_context("e1", environments=["prod"]).token
            client.fetch_context(token)
            cluster.stop()
            stopped = time.monotonic()
            assert client.fetch_context(token)["K"] == "v"  # from the cache, in the window
            started = time.monotonic()
            with pytest.raises(Unavailable, match="unreachable"):
                client.put_environment("x", {"V": Variable(value="1")})
            assert time.monotonic() - started < 2.0  # a write fails at once
            status = run_cli(paths, "status", env=env)
            assert "unreachable" in status.stdout, status.stdout
            while time.monotonic() - stopped < 4.0:
                time.sleep(0.2)
            with pytest.raises(Unavailable, match="staleness window"):
                client.fetch_context(token)
            cluster.start()
            deadline = time.monotonic() + 20
            while True:  # back with no restart: the listener reconnects with backoff
                try:
                    assert client.fetch_context(token)["K"] == "v"
                    break
                except Unavailable:
                    assert time.monotonic() < deadline, daemon.stderr()
                    time.sleep(0.2)
            client.put_environment("x", {"V": Variable(value="1")})
        assert daemon.proc is not None and daemon.proc.poll() is None


@pytest.mark.slow
def test_restarting_postgres_under_load_loses_no_acknowledged_write(
        short_dir: Path, cluster: Cluster, cluster_url: str) -> None:
    pa, pb = host(short_dir, "a"), host(short_dir, "b")
    env_a = cli_env(pa, STIGMER_STORE_URL=cluster_url, STIGMER_ENCRYPTION_KEY=KEY)
    env_b = cli_env(pb, STIGMER_STORE_URL=cluster_url, STIGMER_ENCRYPTION_KEY=KEY)
    with Daemon(pa, env=env_a) as a, Daemon(pb, env=env_b) as b:
        pids = (a.pid, b.pid)
        acknowledged: dict[str, str] = {}
        failures = 0
        with Client(pa.socket) as ca, Client(pb.socket) as cb:
            ca.put_environment("prod", {"K": Variable(value="v", is_secret=True)})
            restarted = False
            n = 0
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                n += 1
                try:
                    token = ca.create_context(f"e{n}", environments=["prod"]).token
                    acknowledged[f"e{n}"] = token
                    cb.fetch_context(token)
                except Unavailable:
                    failures += 1
                if n == 20 and not restarted:
                    cluster.restart()
                    restarted = True
                if restarted and len(acknowledged) >= 60:
                    break
            assert len(acknowledged) >= 60, (failures, a.stderr())
            for execution_id, token in acknowledged.items():
                assert cb.fetch_context(token).execution_id == execution_id
        assert (a.pid, b.pid) == pids and a.proc is not None and a.proc.poll() is None
        assert b.proc is not None and b.proc.poll() is None
