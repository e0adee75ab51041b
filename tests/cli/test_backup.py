"""Store backups: `backup` under write load, `restore` and its refusals, and a fleet's
pg_dump/pg_restore."""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import sqlite3
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Daemon, cli_env, run_cli
from postgres import Server, psql, with_database

from stigmer.broker.config import Paths
from stigmer.client import Client, Variable

PG_BIN = Path("/usr/lib/postgresql/15/bin")


@pytest.fixture
def store() -> None:
    """A backup is of the SQLite file; the fleet's store is tested with pg_dump below."""
    return None


def home_files(home: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(home.iterdir()) if p.is_file()}


def new_home(short_dir: Path, name: str, key_from: Paths | None = None) -> Paths:
    home = short_dir / name
    home.mkdir(mode=0o700)
    if key_from is not None:
        shutil.copy2(key_from.home / "master.key", home / "master.key")
    return Paths(home=home, socket=short_dir / f"{name}.sock")


def backup(paths: Paths, out: Path) -> dict[str, object]:
    proc = run_cli(paths, "backup", "--out", str(out), "--json", check=True)
    result: dict[str, object] = json.loads(proc.stdout)
    assert set(result) == {"file", "store", "bytes", "audit_head", "anchored"}  # README
    return result


def test_backup_under_write_load_keeps_every_acknowledged_write(
        cli_broker: Paths, short_dir: Path) -> None:
    acked: list[str] = []  # names whose environment and context were acknowledged
    stop = threading.Event()
    failures: list[BaseException] = []

    def write() -> None:
        try:
            with Client(cli_broker.socket) as client:
                n = 0
                while not stop.is_set():
                    name = f"load-{n}"
                    client.put_environment(name, {"V": Variable(value=str(n)),
                                                  "S": Variable(value=f"s{n}", is_secret=True)})
                    client.create_context(name, environments=[name])
                    acked.append(name)
                    n += 1
        except BaseException as exc:  # reported by the test, not lost in the thread
            failures.append(exc)

    writer = threading.Thread(target=write)
    writer.start()
    taken: list[tuple[Path, list[str], dict[str, object]]] = []
    try:
        while len(acked) < 20 and not failures:
            stop.wait(0.05)
        for k in range(3):
            before = list(acked)
            out = short_dir / f"b{k}.backup"
            taken.append((out, before, backup(cli_broker, out)))
            assert stat.S_IMODE(out.stat().st_mode) == 0o600
    finally:
        stop.set()
        writer.join()
    assert not failures, failures
    assert len(acked) > len(taken[0][1]), "the writes did not go on during the backups"

    for k, (out, before, info) in enumerate(taken):
        restored = new_home(short_dir, f"r{k}", key_from=cli_broker)
        proc = run_cli(restored, "restore", str(out), "--json")
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout)
        # the chain as the broker had committed it when the snapshot was taken
        assert result["audit_records"] == info["audit_head"]
        with Daemon(restored), Client(restored.socket) as client:
            assert set(before) <= {e.name for e in client.list_environments()}
            assert set(before) <= {c.execution_id for c in client.list_contexts()}
            assert client.get_environment(before[-1], reveal=True).data[
                "S"].value == f"s{before[-1].split('-')[1]}"
            verified = json.loads(run_cli(restored, "audit", "verify", "--json",
                                          check=True).stdout)
            assert verified["ok"] and verified["records"] >= info["audit_head"]


def test_backup_of_a_home_whose_broker_was_killed_keeps_its_wal(paths: Paths,
                                                                short_dir: Path) -> None:
    """Without a broker the same read-only copy reads the WAL a killed broker left."""
    with Daemon(paths) as daemon, Client(paths.socket) as client:
        for n in range(5):
            client.put_environment(f"e{n}", {"V": Variable(value=str(n))})
        daemon.kill()
    assert (paths.home / "local.db-wal").stat().st_size > 0
    out = short_dir / "killed.backup"
    backup(paths, out)
    restored = new_home(short_dir, "r", key_from=paths)
    run_cli(restored, "restore", str(out), check=True)
    with Daemon(restored), Client(restored.socket) as client:
        assert {e.name for e in client.list_environments()} == {f"e{n}" for n in range(5)}


def test_restore_refuses_while_a_broker_serves_the_home(cli_broker: Paths,
                                                         short_dir: Path) -> None:
    run_cli(cli_broker, "env", "set", "prod", "A=1", check=True)
    out = short_dir / "live.backup"
    backup(cli_broker, out)
    before = home_files(cli_broker.home)
    proc = run_cli(cli_broker, "restore", str(out), "--replace")
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "stop it first" in proc.stderr, proc.stderr
    assert home_files(cli_broker.home) == before


@pytest.fixture
def stopped(cli_broker: Paths, short_dir: Path) -> tuple[Paths, Path]:
    """A home with a store (its broker stopped) and a backup of it taken offline."""
    run_cli(cli_broker, "env", "set", "prod", "A=1", "--secret", "TOKEN", input="t0k3n\n",
            check=True)
    run_cli(cli_broker, "stop", check=True)
    out = short_dir / "offline.backup"
    info = backup(cli_broker, out)
    assert info["anchored"] == info["audit_head"]
    return cli_broker, out


def test_restore_refuses_an_existing_store_unless_replace(stopped: tuple[Paths, Path]) -> None:
    paths, out = stopped
    before = home_files(paths.home)
    proc = run_cli(paths, "restore", str(out))
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "--replace" in proc.stderr, proc.stderr
    assert home_files(paths.home) == before

    proc = run_cli(paths, "restore", str(out), "--replace", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert set(result) == {"file", "store", "key_id", "audit_records", "moved_aside"}
    aside = result["moved_aside"]
    # the old store and anchor are kept, byte for byte, under new names
    assert {Path(p).read_bytes() for p in aside} == {before["local.db"], before["audit.head"]}
    with Daemon(paths), Client(paths.socket) as client:
        assert client.get_environment("prod", reveal=True).data["TOKEN"].value == "t0k3n"


def test_restore_refuses_a_backup_the_key_does_not_open(stopped: tuple[Paths, Path],
                                                        short_dir: Path) -> None:
    paths, out = stopped
    other = new_home(short_dir, "other")
    (other.home / "master.key").write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    os.chmod(other.home / "master.key", 0o600)
    before = home_files(other.home)
    proc = run_cli(other, "restore", str(out))
    assert proc.returncode == 1
    with sqlite3.connect(paths.store) as db:
        key_id = db.execute("SELECT value FROM meta WHERE key = 'master_key_id'").fetchone()[0]
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert f"needs master key {key_id}" in proc.stderr and "key import" in proc.stderr
    assert home_files(other.home) == before


@pytest.mark.parametrize("tamper", [
    "DROP TRIGGER audit_no_update; UPDATE audit SET detail = 'edited' WHERE seq = 1",
    "UPDATE stigmer_backup SET anchor_seq = anchor_seq + 3",
], ids=["record-edited", "anchor-ahead"])
def test_restore_refuses_a_tampered_backup(stopped: tuple[Paths, Path], short_dir: Path,
                                           tamper: str) -> None:
    paths, out = stopped
    with sqlite3.connect(out) as db:
        db.executescript(tamper)
    fresh = new_home(short_dir, "fresh", key_from=paths)
    before = home_files(fresh.home)
    proc = run_cli(fresh, "restore", str(out))
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "audit chain does not verify" in proc.stderr
    assert home_files(fresh.home) == before


def test_backup_refusals(stopped: tuple[Paths, Path], short_dir: Path) -> None:
    paths, out = stopped
    kept = out.read_bytes()
    proc = run_cli(paths, "backup", "--out", str(out))
    assert proc.returncode == 2 and "exists" in proc.stderr and proc.stderr.count("\n") == 1
    assert out.read_bytes() == kept
    before = home_files(paths.home)
    proc = run_cli(paths, "restore", str(paths.key_file), "--replace")
    assert proc.returncode == 1 and "not a stigmer-broker store backup" in proc.stderr
    assert proc.stderr.count("\n") == 1
    assert home_files(paths.home) == before
    fleet = cli_env(paths, STIGMER_STORE_URL="postgresql://db.example/stigmer")
    for args in (("backup", "--out", str(short_dir / "x")), ("restore", str(out))):
        proc = run_cli(paths, *args, env=fleet)
        assert proc.returncode == 1 and "pg_dump" in proc.stderr, proc.stderr
        assert proc.stderr.count("\n") == 1
    assert not (short_dir / "x").exists()


@pytest.fixture
def roles(postgres: Server) -> Iterator[tuple[str, str]]:
    """A schema made by `fleet init`, with a control role of its own: (schema, role)."""
    suffix = secrets.token_hex(4)
    names = (f"f_{suffix}", f"ctl_{suffix}")
    yield names
    postgres.drop_schema(names[0])
    for role in (names[1], f"run_{suffix}"):
        psql(postgres.url(), f"DROP OWNED BY {role} CASCADE; DROP ROLE {role}", check=False)


def as_role(url: str, role: str) -> str:
    if "user=postgres" in url:
        return url.replace("user=postgres", f"user={role}")
    return url.replace("://postgres@", f"://{role}@", 1)


def test_fleet_store_survives_pg_dump_and_pg_restore(postgres: Server, roles: tuple[str, str],
                                                      paths: Paths, short_dir: Path) -> None:
    """The README's fleet backup: pg_dump of the schema, pg_restore into an empty database
    of the same cluster (so the roles exist); a control broker on it serves it all."""
    schema, control = roles
    run_cli(paths, "fleet", "init", "--store", postgres.url(), "--schema", schema,
            "--control-role", control, "--runner-role", control.replace("ctl_", "run_"),
            check=True)
    env = cli_env(paths, STIGMER_STORE_URL=as_role(postgres.url(search_path=schema), control))
    run_cli(paths, "start", env=env, check=True)
    try:
        for name in ("alpha", "beta", "gamma"):
            run_cli(paths, "env", "set", name, f"N={name}", "--secret", "S", input="x\n",
                    env=env, check=True)
        run_cli(paths, "context", "create", "exec-1", "--environment", "alpha", env=env,
                check=True)
        proc = run_cli(paths, "backup", "--out", str(short_dir / "no"), env=env)
        assert proc.returncode == 1 and "pg_dump" in proc.stderr
    finally:
        run_cli(paths, "stop", env=env, check=True)
    dump = short_dir / "fleet.dump"
    subprocess.run([PG_BIN / "pg_dump", "--format=custom", f"--schema={schema}",
                    f"--file={dump}", postgres.url()], check=True, timeout=120)
    database = "stigmer_restored_" + secrets.token_hex(4)
    psql(postgres.admin_url, f"CREATE DATABASE {database}")
    try:
        subprocess.run([PG_BIN / "pg_restore", "--exit-on-error",
                        f"--dbname={with_database(postgres.admin_url, database)}", dump],
                       check=True, timeout=120)
        restored = cli_env(paths, STIGMER_STORE_URL=as_role(
            with_database(postgres.admin_url, database, search_path=schema), control))
        run_cli(paths, "start", env=restored, check=True)
        try:
            listed = json.loads(run_cli(paths, "env", "list", "--json", env=restored,
                                        check=True).stdout)
            assert sorted(e["name"] for e in listed) == ["alpha", "beta", "gamma"]
            shown = json.loads(run_cli(paths, "env", "show", "beta", "--reveal", "--json",
                                       env=restored, check=True).stdout)
            assert shown["data"]["S"]["value"] == "x"
            run_cli(paths, "env", "set", "delta", "N=4", env=restored, check=True)  # writable
            verified = json.loads(run_cli(paths, "audit", "verify", "--json", env=restored,
                                          check=True).stdout)
            assert verified["ok"] and verified["records"] >= 5, verified
        finally:
            run_cli(paths, "stop", env=restored)
    finally:
        psql(postgres.admin_url, f"DROP DATABASE IF EXISTS {database} WITH (FORCE)",
             check=False)
