"""Faults: SIGKILL mid-write, a full disk, many writers at once, restarts under load,
and a daemon whose memory its own user cannot read. Every acknowledged write survives."""

from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import NOBODY, Daemon, cli_env, cli_for_nobody, run_cli

from stigmer.broker.config import Paths
from stigmer.client import (
    BrokerError,
    BrokerUnavailable,
    Client,
    ResourceExhausted,
    Variable,
    variables,
)

pytestmark = pytest.mark.slow


def integrity_ok(db: Path) -> bool:
    with sqlite3.connect(db) as conn:
        return bool(conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok")


def test_sigkill_while_writing_loses_no_acknowledged_write(paths: Paths) -> None:
    rng = random.Random(20261122)
    acked_vars: dict[str, dict[str, str]] = {}
    acked_contexts: dict[str, str] = {}
    rounds = 100
    previous: tuple[dict[str, dict[str, str]], dict[str, str]] = ({}, {})
    for r in range(rounds):
        daemon = Daemon(paths).start()
        # everything the previous round acknowledged is there and opens
        with Client(paths.socket) as check:
            for env, expected in previous[0].items():
                got = check.get_environment(env, reveal=True).data
                assert {k: got[k].value for k in expected} == expected, (r, env)
            for execution_id, token in previous[1].items():
                assert check.fetch_context(token).execution_id == execution_id
        round_vars: dict[str, dict[str, str]] = {}
        round_contexts: dict[str, str] = {}
        stop = threading.Event()

        def writer(w: int, r: int = r, round_vars: dict[str, dict[str, str]] = round_vars,
                   round_contexts: dict[str, str] = round_contexts,
                   stop: threading.Event = stop) -> None:
            try:
                with Client(paths.socket, timeout=5) as c:
                    i = 0
                    while not stop.is_set():
                        if (i + w) % 3:
                            env, key, value = (f"env-{r % 7}", f"K{r}_{w}_{i}",
                                               f"v-{r}-{w}-{i}")
                            c.put_environment(env, {key: Variable(value=value, is_secret=True)})
                            round_vars.setdefault(env, {})[key] = value
                        else:
                            execution_id = f"exec-{r}-{w}-{i}"
                            created = c.create_context(execution_id, runtime=variables(
                                {}, {"S": f"s-{r}-{w}-{i}"}), token_ttl_s=86400)
                            round_contexts[execution_id] = created.token
                        i += 1
            except BrokerError:
                return  # the daemon died mid-request: that write was never acknowledged

        # several writers at once: their writes share commits (group commit), and a kill
        # lands in the middle of a group as often as between two
        threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(rng.uniform(0.0, 0.15))
        daemon.kill()
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        for env, kv in round_vars.items():
            acked_vars.setdefault(env, {}).update(kv)
        acked_contexts.update(round_contexts)
        previous = (round_vars, round_contexts)
    with Daemon(paths), Client(paths.socket) as check:
        for env, expected in acked_vars.items():
            got = check.get_environment(env, reveal=True).data
            assert {k: got[k].value for k in expected} == expected
        for execution_id, token in acked_contexts.items():
            ctx = check.fetch_context(token)
            assert ctx.execution_id == execution_id and ctx["S"].startswith("s-")
    assert integrity_ok(paths.home / "local.db")
    assert sum(len(v) for v in acked_vars.values()) > rounds  # the test did write


def test_disk_full_is_a_clear_error_and_loses_nothing(paths: Paths, short_dir: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = short_dir / "fs"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs",
                             str(mount)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        small = Paths(home=mount / "home", socket=paths.socket)
        with Daemon(small, env=cli_env(small)) as daemon, Client(small.socket) as c:
            c.put_environment("kept", {"S": Variable(value="before-full", is_secret=True)})
            filler = mount / "filler"
            # take (nearly) all the space that is left; unbuffered, so that closing it has
            # no remainder to write (which would fail like the write that filled it)
            with open(filler, "wb", buffering=0) as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                except OSError:
                    pass
            refusal: ResourceExhausted | None = None
            for i in range(200):  # the first write that does not fit is refused
                try:
                    c.put_environment("big", {f"K{i}": Variable(value="x" * 20000)})
                except ResourceExhausted as exc:
                    refusal = exc
                    break
            assert refusal is not None
            assert "disk holding the broker's store is full" in refusal.message
            assert "Free some space" in refusal.message
            assert c.status().pid == daemon.pid  # still up, still answering
            filler.unlink()
            c.put_environment("after", {"A": Variable(value="fine")})
            assert c.get_environment("kept", reveal=True).data["S"].value == "before-full"
            assert c.get_environment("after").data["A"].value == "fine"
            assert "Traceback" not in daemon.stderr()
        assert integrity_ok(small.home / "local.db")
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_many_cli_writers_and_runners_at_once(paths: Paths) -> None:
    with Daemon(paths):
        token = run_cli(paths, "context", "create", "busy", "--env", "A=1",
                        check=True).stdout.strip()
        stop = threading.Event()
        failures: list[str] = []

        def runner() -> None:
            while not stop.is_set():
                try:
                    with Client(paths.socket) as c:
                        c.fetch_context(token)
                except BrokerError as exc:
                    failures.append(exc.message)

        threads = [threading.Thread(target=runner) for _ in range(2)]
        for t in threads:
            t.start()
        writers = [subprocess.Popen(
            [sys.executable, "-m", "stigmer.broker", "env", "set", "shared",
             *[f"W{w}_{k}=v{k}" for k in range(20)]], env=cli_env(paths),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in range(12)]
        outputs = [w.communicate(timeout=120) for w in writers]
        stop.set()
        for t in threads:
            t.join()
        assert all(w.returncode == 0 for w in writers), outputs
        assert not any("locked" in err for _out, err in outputs)
        assert failures == []
        data = json.loads(run_cli(paths, "env", "show", "shared", "--json", check=True).stdout)
        assert len(data["data"]) == 12 * 20  # no lost update


def test_restart_under_load(paths: Paths) -> None:
    daemon = Daemon(paths).start()
    with Client(paths.socket) as c:
        token = c.create_context("survivor", runtime=variables({"A": "1"})).token
    outcomes: list[str] = []
    stop = threading.Event()

    def runner() -> None:
        while not stop.is_set():
            try:
                with Client(paths.socket, timeout=5) as c:
                    assert c.fetch_context(token)["A"] == "1"
                outcomes.append("ok")
            except BrokerUnavailable:
                outcomes.append("unavailable")
            except BrokerError as exc:  # shown by the assertion below, not lost in a thread
                outcomes.append(f"{type(exc).__name__}: {exc.message}")
            time.sleep(0.005)

    thread = threading.Thread(target=runner)
    thread.start()
    try:
        time.sleep(0.3)
        assert daemon.stop() == 0, daemon.stderr()[-4000:]
        time.sleep(0.3)
        daemon = Daemon(paths).start()
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join()
        daemon.stop()
    assert set(outcomes) == {"ok", "unavailable"}
    first_gap = outcomes.index("unavailable")
    assert "ok" in outcomes[first_gap:]  # recovered, with the context still there


def test_daemon_memory_and_environ_are_closed_to_its_own_user(short_dir: Path) -> None:
    cli = cli_for_nobody()
    python = cli[0]
    os.chmod(short_dir, 0o711)
    home = short_dir / "nobody"
    home.mkdir(mode=0o700)
    os.chown(home, NOBODY, NOBODY)
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home),
           "PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring",
           "SENTINEL_IN_ENVIRON": "visible-if-dumpable"}
    daemon = subprocess.Popen([*cli, "serve", "--home",
                               str(home / "h"), "--socket", str(home / "run" / "b.sock")],
                              user=NOBODY, group=NOBODY, extra_groups=[], env=env,
                              stderr=subprocess.PIPE, text=True)
    control = subprocess.Popen([python, "-c", "import time; time.sleep(60)"], user=NOBODY,
                               group=NOBODY, extra_groups=[], env=env)
    try:
        deadline = time.monotonic() + 30
        while not (home / "run" / "b.sock").exists():
            assert daemon.poll() is None, daemon.communicate()[1]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        reader = ("import sys\n"
                  "for what in ('environ', 'mem', 'maps'):\n"
                  "    try:\n"
                  "        open(f'/proc/{sys.argv[1]}/{what}', 'rb').read(64)\n"
                  "        print(what, 'readable')\n"
                  "    except OSError as exc:\n"
                  "        print(what, type(exc).__name__)\n")

        def read_as_nobody(pid: int) -> str:
            return subprocess.run([python, "-c", reader, str(pid)], user=NOBODY, group=NOBODY,
                                  extra_groups=[], capture_output=True, text=True,
                                  timeout=30).stdout

        assert "environ readable" in read_as_nobody(control.pid)  # the test can tell
        seen = read_as_nobody(daemon.pid)
        assert "environ PermissionError" in seen and "mem PermissionError" in seen, seen
        limits = Path(f"/proc/{daemon.pid}/limits").read_text()
        core = next(line for line in limits.splitlines() if line.startswith("Max core"))
        assert core.split()[4:6] == ["0", "0"], core
    finally:
        control.kill()
        control.wait(timeout=30)
        daemon.terminate()
        daemon.communicate(timeout=30)
        shutil.rmtree(home, ignore_errors=True)
