"""Real PostgreSQL servers for the fleet tests: the one STIGMER_TEST_POSTGRES_URL names, or
a throwaway cluster of our own (initdb into a temporary directory, Unix socket only, run
as an unprivileged user when the tests run as root).

Every test run works in a database of its own, named uniquely, dropped at the end;
each test in a schema of its own inside it (the URL's ``search_path``).
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path

import pytest

URL_VARIABLE = "STIGMER_TEST_POSTGRES_URL"


def missing(reason: str) -> None:
    """Skip the fleet tests, loudly; under CI a missing PostgreSQL fails them."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"PostgreSQL is needed under CI=true: {reason}")
    pytest.skip(f"FLEET TESTS SKIPPED: {reason}; set {URL_VARIABLE} or install PostgreSQL")


def with_database(url: str, database: str, **params: str) -> str:
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query))
    query.update(params)
    return f"{parts.scheme}://{parts.netloc}/{database}?{urllib.parse.urlencode(query)}"


def psql(url: str, sql: str, *, check: bool = True) -> str:
    """Run ``sql`` through psql (the client ships with the server), in the URL's
    ``search_path`` (which asyncpg takes from a URL, and libpq does not)."""
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query))
    schema = query.pop("search_path", None)
    if schema:
        url = f"{parts.scheme}://{parts.netloc}{parts.path}?{urllib.parse.urlencode(query)}"
        sql = f"SET search_path TO {schema}; {sql}"
    proc = subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-At", "-d", url,
                           "-c", sql], capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"psql failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


class Cluster:
    """A PostgreSQL cluster of our own, on a Unix socket in a short private directory."""

    def __init__(self) -> None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        initdb = shutil.which("initdb") or (found[-1] if found else None)
        if initdb is None or shutil.which("psql") is None:
            missing("no PostgreSQL server binaries (initdb) here")
        assert initdb is not None
        self.bin = Path(initdb).parent
        self.dir = Path(tempfile.mkdtemp(prefix="pg-", dir="/tmp"))
        self.data = self.dir / "data"
        self.user: str | None = None
        if os.getuid() == 0:  # postgres refuses to run as root
            try:
                self.user = pwd.getpwnam("postgres").pw_name
            except KeyError:
                missing("the tests run as root and there is no postgres user to run it as")
            entry = pwd.getpwnam("postgres")
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U",
                  "postgres", "--no-sync", "-E", "UTF8", "--locale", "C")
        self.url = f"postgresql:///postgres?host={self.dir}&user=postgres"
        self.start()

    def _run(self, *argv: str) -> None:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                              user=self.user)
        if proc.returncode != 0:
            raise AssertionError(f"{argv[0]} failed: {proc.stderr.strip()[-500:]}")

    def _ctl(self, *argv: str) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), *argv)

    def start(self) -> None:
        options = f"-k {self.dir} -c listen_addresses='' -c fsync=off -c max_connections=200"
        self._ctl("-o", options, "-l", str(self.dir / "log"), "-w", "start")

    def stop(self) -> None:
        self._ctl("-m", "fast", "-w", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def remove(self) -> None:
        try:
            self._ctl("-m", "immediate", "-w", "stop")
        except AssertionError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


class Server:
    """Where the tests' databases live: a given URL or a cluster of our own."""

    def __init__(self) -> None:
        self.cluster: Cluster | None = None
        url = os.environ.get(URL_VARIABLE)
        if not url:
            self.cluster = Cluster()
            url = self.cluster.url
        self.admin_url = url
        self.database = "stigmer_test_" + secrets.token_hex(6)
        try:
            psql(url, f"CREATE DATABASE {self.database}")
        except AssertionError as exc:
            missing(f"cannot create a database with {URL_VARIABLE}: {exc}")

    def url(self, **params: str) -> str:
        return with_database(self.admin_url, self.database, **params)

    def new_schema(self) -> str:
        schema = "t_" + secrets.token_hex(6)
        psql(self.url(), f"CREATE SCHEMA {schema}")
        return schema

    def drop_schema(self, schema: str) -> None:
        psql(self.url(), f"DROP SCHEMA IF EXISTS {schema} CASCADE", check=False)

    def close(self) -> None:
        for _ in range(50):  # a broker's pool may still be closing its connections
            proc = subprocess.run(
                ["psql", "-X", "-q", "-d", self.admin_url, "-c",
                 f"DROP DATABASE IF EXISTS {self.database} WITH (FORCE)"],
                capture_output=True, text=True, timeout=60)
            if proc.returncode == 0:
                break
            time.sleep(0.1)
        if self.cluster is not None:
            self.cluster.remove()
