"""Fleet benchmarks: brokers on one PostgreSQL store, each figure against a floor measured in
the same run (a local SQLite-backed fetch; a bare asyncpg ``SELECT 1`` round trip).

Uses ``STIGMER_BENCH_POSTGRES_URL`` (default: the local server on 127.0.0.1:5432, database
``test``), in a schema of its own that it drops afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path
from typing import Any

#: bench/run.py's broker(home, sock, key=..., store_url=...)
Broker = Callable[..., AbstractContextManager[dict[str, str]]]
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"


def _sql(url: str, statement: str) -> None:
    async def run() -> None:
        import asyncpg

        conn = await asyncpg.connect(url)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(run())


def _select1(url: str, count: int) -> list[int]:
    async def run() -> list[int]:
        import asyncpg

        conn = await asyncpg.connect(url)
        try:
            out = []
            for _ in range(count):
                t0 = time.perf_counter_ns()
                await conn.fetchval("SELECT 1")
                out.append(time.perf_counter_ns() - t0)
            return out
        finally:
            await conn.close()

    return asyncio.run(run())


@contextmanager
def _host(broker: Broker, root: Path, name: str, key: str, url: str | None) -> Iterator[Path]:
    """A broker standing for one host: its own home and socket."""
    home, sock = root / name / "home", root / name / "run" / "b.sock"
    (root / name).mkdir(mode=0o700, parents=True)
    with broker(home, sock, key=key, store_url=url):
        yield sock


def _p(values_ns: list[int], q: float) -> float:
    ordered = sorted(values_ns)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] / 1000


def fleet_rows(tmp: Path, broker: Broker, *, smoke: bool) -> dict[str, Any]:
    """The fleet rows of bench/results.json (empty, with the reason, without PostgreSQL)."""
    from stigmer.client import Client, Unauthenticated, variables

    admin = os.environ.get("STIGMER_BENCH_POSTGRES_URL", DEFAULT_URL)
    schema = "bench_" + secrets.token_hex(4)
    try:
        _sql(admin, f"CREATE SCHEMA {schema}")
    except Exception as exc:
        return {"skipped": f"no PostgreSQL at {admin}: {type(exc).__name__}"}
    url = admin + ("&" if "?" in admin else "?") + f"search_path={schema}"
    key = base64.b64encode(os.urandom(32)).decode()
    n = 200 if smoke else 5000
    trials = 20 if smoke else 500
    misses = 20 if smoke else 500
    creates = 10 if smoke else 200
    runtime = variables({f"SETTING_{i:02d}": "v" * 90 for i in range(20)},
                        {f"SECRET_{i:02d}": "s" * 90 for i in range(10)})
    rows: dict[str, Any] = {}
    try:
        with ExitStack() as stack:
            local = stack.enter_context(_host(broker, tmp / "fleet", "local", key, None))
            socks = [stack.enter_context(_host(broker, tmp / "fleet", name, key, url))
                     for name in ("a", "b", "c", "d")]
            a, b = Client(socks[0]), Client(socks[1])
            loc = Client(local)
            stack.enter_context(a)
            stack.enter_context(b)
            stack.enter_context(loc)
            token = a.create_context("cached", runtime=runtime, ttl_s=3600,
                                     token_ttl_s=3600).token
            local_token = loc.create_context("cached", runtime=runtime, ttl_s=3600,
                                             token_ttl_s=3600).token
            for _ in range(200):
                b.fetch_context(token)
                loc.fetch_context(local_token)
            lat: dict[str, list[int]] = {"local": [], "fleet": []}
            for _ in range(10):  # alternating rounds: the machine is noisy
                for name, client, tok in (("local", loc, local_token), ("fleet", b, token)):
                    for _ in range(n // 10):
                        t0 = time.perf_counter_ns()
                        client.fetch_context(tok)
                        lat[name].append(time.perf_counter_ns() - t0)
            rows["fetch_cached"] = {"local_sqlite_p50_us": _p(lat["local"], 0.5),
                                    "fleet_cached_p50_us": _p(lat["fleet"], 0.5)}
            rows["ratio_fleet_cached_vs_local_p50"] = (_p(lat["fleet"], 0.5)
                                                       / _p(lat["local"], 0.5))

            # first fetch on a broker that did not create the context
            tokens = [a.create_context(f"miss-{i}", runtime=runtime, ttl_s=3600,
                                       token_ttl_s=3600).token for i in range(misses)]
            first = []
            for tok in tokens:
                t0 = time.perf_counter_ns()
                b.fetch_context(tok)
                first.append(time.perf_counter_ns() - t0)
            select1 = _select1(admin, misses)
            rows["fetch_miss"] = {"first_fetch_p50_us": _p(first, 0.5),
                                  "select_1_p50_us": _p(select1, 0.5),
                                  "cached_fetch_p50_us": _p(lat["fleet"], 0.5)}
            rows["miss_minus_select1_minus_cached_p50_us"] = (
                _p(first, 0.5) - _p(select1, 0.5) - _p(lat["fleet"], 0.5))

            # revocation: complete on A until refused on B
            propagation = []
            for i in range(trials):
                tok = a.create_context(f"rev-{i}", runtime=runtime, ttl_s=3600,
                                       token_ttl_s=3600).token
                b.fetch_context(tok)  # cached on B
                t0 = time.perf_counter_ns()
                a.complete_context(f"rev-{i}")
                while True:
                    try:
                        b.fetch_context(tok)
                    except Unauthenticated:
                        break
                propagation.append(time.perf_counter_ns() - t0)
            rows["revocation_ms"] = {"p50": _p(propagation, 0.5) / 1000,
                                     "p99": _p(propagation, 0.99) / 1000, "trials": trials}

            # context creates per second with 1, 2 and 4 brokers writing at once
            rates: dict[str, float] = {}
            errors = 0
            for writers in (1, 2, 4):
                done = [0] * writers

                def write(k: int, writers: int = writers, done: list[int] = done) -> None:
                    nonlocal errors
                    with Client(socks[k]) as c:
                        for j in range(creates):
                            try:
                                c.create_context(f"w{writers}-{k}-{j}", runtime=runtime,
                                                 ttl_s=3600)
                                done[k] += 1
                            except Exception:
                                errors += 1

                threads = [threading.Thread(target=write, args=(k,)) for k in range(writers)]
                start = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                rates[f"{writers}_brokers"] = sum(done) / (time.perf_counter() - start)
            rows["creates_per_s"] = {**rates, "errors": errors}
    finally:
        _sql(admin, f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    return rows
