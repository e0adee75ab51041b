"""Master key backup: `key export` and `key import`, passphrases typed at a real terminal."""

from __future__ import annotations

import base64
import json
import os
import pty
import select
import shutil
import stat
import sys
import time
from pathlib import Path

import anyio
import pytest
from conftest import cli_env, run_cli

from stigmer.broker.config import Paths
from stigmer.broker.store.backup import SCRYPT_N, BackupError, read_backup, write_backup
from stigmer.broker.store.crypto import new_key
from stigmer.broker.store.keys import KeyFile

PASSPHRASE = "correct horse battery staple"


def in_pty(paths: Paths, *args: str, answers: list[tuple[str, str]],
           timeout: float = 120, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run `stigmer-broker ARGS` on a new pseudo-terminal (its controlling tty, where
    getpass asks), typing each answer after its prompt appears; return (status, output)."""
    env = env or cli_env(paths)
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        os.execve(sys.executable, [sys.executable, "-m", "stigmer.broker", *args], env)  # noqa: S606
    output, searched, pending = b"", 0, list(answers)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
            if pending and (at := output.find(pending[0][0].encode(), searched)) >= 0:
                searched = at + len(pending[0][0])
                os.write(fd, pending.pop(0)[1].encode() + b"\n")
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")


def export(paths: Paths, out: Path, first: str = PASSPHRASE,
           second: str = PASSPHRASE) -> tuple[int, str]:
    return in_pty(paths, "key", "export", "--out", str(out),
                  answers=[("passphrase: ", first), ("passphrase again: ", second)])


def import_(paths: Paths, backup: Path, passphrase: str = PASSPHRASE) -> tuple[int, str]:
    return in_pty(paths, "key", "import", str(backup), answers=[("passphrase: ", passphrase)])


@pytest.fixture
def store() -> None:
    """These tests move one home's SQLite file beside its key; a fleet's key moves the same
    way, its store stays where it is."""
    return None


@pytest.fixture
def exported(cli_broker: Paths, short_dir: Path) -> tuple[Paths, Path]:
    run_cli(cli_broker, "env", "set", "prod", "--secret", "API_KEY", input="s3cr3t-value\n",
            check=True)
    run_cli(cli_broker, "stop", check=True)
    backup = short_dir / "key.backup"
    status, output = export(cli_broker, backup)
    assert status == 0, output
    assert "exported to" in output and PASSPHRASE not in output  # no echo
    return cli_broker, backup


def test_the_backup_is_private_versioned_and_holds_no_key_in_the_clear(
        exported: tuple[Paths, Path]) -> None:
    paths, backup = exported
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    doc = json.loads(backup.read_text())
    assert doc["format"] == "stigmer-broker key backup" and doc["version"] == 1
    assert doc["kdf"]["name"] == "scrypt" and doc["kdf"]["n"] >= 2**17
    assert doc["cipher"] == "AES-256-GCM"
    assert paths.key_file.read_text().strip() not in backup.read_text()


def test_import_into_a_new_home_opens_the_old_store(exported: tuple[Paths, Path],
                                                     short_dir: Path) -> None:
    old, backup = exported
    new = Paths(home=short_dir / "restored", socket=short_dir / "run2" / "b.sock")
    new.home.mkdir(mode=0o700)
    shutil.copy2(old.store, new.store)  # the store from a backup, the key from ours
    status, output = import_(new, backup)
    assert status == 0, output
    assert new.key_file.read_text() == old.key_file.read_text()
    run_cli(new, "start", check=True)
    try:
        shown = json.loads(run_cli(new, "env", "show", "prod", "--reveal", "--json",
                                   check=True).stdout)
        assert shown["data"]["API_KEY"]["value"] == "s3cr3t-value"
    finally:
        run_cli(new, "stop")
    empty = Paths(home=short_dir / "fresh", socket=short_dir / "run3" / "b.sock")
    status, output = import_(empty, backup)  # no store yet: the key of a new home
    assert status == 0 and empty.key_file.read_text() == old.key_file.read_text(), output


def test_import_is_refused_where_the_store_has_another_key(exported: tuple[Paths, Path],
                                                            short_dir: Path) -> None:
    _, backup = exported
    other = Paths(home=short_dir / "other", socket=short_dir / "run4" / "b.sock")
    run_cli(other, "start", check=True)  # a store and key of its own
    run_cli(other, "stop", check=True)
    before = other.key_file.read_text()
    status, output = import_(other, backup)
    assert status == 1 and "nothing was changed" in output, output
    assert "passphrase" not in output  # refused before asking
    assert other.key_file.read_text() == before


def test_wrong_passphrase_and_tampering_are_refused(exported: tuple[Paths, Path],
                                                    short_dir: Path) -> None:
    _, backup = exported
    target = Paths(home=short_dir / "t", socket=short_dir / "run5" / "b.sock")
    status, output = import_(target, backup, "not the passphrase at all")
    assert status == 1 and "wrong passphrase" in output, output
    assert not target.key_file.exists()
    doc = json.loads(backup.read_text())
    doc["kdf"]["n"] = 2**14  # cheaper to guess: must not open
    tampered = short_dir / "tampered.backup"
    tampered.write_text(json.dumps(doc))
    status, output = import_(target, tampered)
    assert status == 1 and "wrong passphrase, or the file was changed" in output, output
    tampered.write_text("{not json")
    result = run_cli(target, "key", "import", str(tampered))
    assert result.returncode == 1 and "not a stigmer-broker key backup" in result.stderr
    assert not target.key_file.exists()


def test_export_mistakes_write_nothing(cli_broker: Paths, short_dir: Path) -> None:
    out = short_dir / "k.backup"
    status, output = export(cli_broker, out, second="something else entirely")
    assert status == 2 and "the passphrases differ" in output and not out.exists(), output
    status, output = export(cli_broker, out, first="short", second="short")
    assert status == 2 and "shorter than 12" in output and not out.exists(), output
    out.write_text("keep me")
    status, output = export(cli_broker, out)
    assert status == 2 and "the file exists" in output and out.read_text() == "keep me"


def test_start_serve_and_status_say_when_the_key_has_no_backup(paths: Paths,
                                                                short_dir: Path) -> None:
    started = run_cli(paths, "start")
    assert started.returncode == 0
    hint = "has no backup since it was made or rotated: `stigmer-broker key export"
    assert hint in started.stderr and "file (" in started.stderr
    assert hint in paths.log_file.read_text()  # the daemon (serve) said it too
    status = run_cli(paths, "status")
    assert "key backup   none since the key was made or rotated" in status.stdout
    assert hint in status.stderr
    assert json.loads(run_cli(paths, "status", "--json").stdout)["key_backed_up_at"] is None
    check = run_cli(paths, "status", "--check")  # a new key has days to be exported
    assert check.returncode == 0 and check.stdout.startswith("healthy (pid ")
    check = run_cli(paths, "status", "--check", "--key-backup-days", "0")  # no backup: degraded
    lines = check.stdout.splitlines()
    assert check.returncode == 1 and len(lines) == 1
    assert lines[0].startswith("key backup: ") and hint in lines[0]
    assert export(paths, short_dir / "k.backup")[0] == 0
    status = run_cli(paths, "status")
    assert hint not in status.stderr and "key backup   20" in status.stdout
    assert json.loads(run_cli(paths, "status", "--json").stdout)["key_backed_up_at"] > 0
    check = run_cli(paths, "status", "--check")
    assert check.returncode == 0 and check.stdout.startswith("healthy (pid ")
    run_cli(paths, "key", "rotate", "--yes", check=True)  # a new key: no backup of it yet
    assert hint in run_cli(paths, "status").stderr
    check = run_cli(paths, "status", "--check", "--json", "--key-backup-days", "0")
    assert check.returncode == 1
    assert [line.split(":")[0] for line in json.loads(check.stdout)["problems"]] == [
        "key backup"]
    run_cli(paths, "stop", check=True)


def test_an_imported_key_counts_as_backed_up(exported: tuple[Paths, Path],
                                             short_dir: Path) -> None:
    """The key came from a backup: status does not say it has none."""
    old, backup = exported
    new = Paths(home=short_dir / "restored", socket=short_dir / "run2" / "b.sock")
    new.home.mkdir(mode=0o700)
    shutil.copy2(old.store, new.store)
    assert import_(new, backup)[0] == 0
    started = run_cli(new, "start", check=True)
    try:
        assert "no backup" not in started.stderr
        status = run_cli(new, "status", check=True)
        assert "no backup" not in status.stderr and "key backup   20" in status.stdout
    finally:
        run_cli(new, "stop")


def test_a_key_handed_in_is_not_nagged_about_and_cannot_be_rotated(paths: Paths) -> None:
    """A key from STIGMER_ENCRYPTION_KEY is backed up where it comes from: neither start
    nor status warns, and `key rotate` refuses at once, pointing at this home's key file."""
    env = cli_env(paths, STIGMER_ENCRYPTION_KEY=base64.b64encode(new_key()).decode())
    started = run_cli(paths, "start", env=env, check=True)
    try:
        assert "no backup" not in started.stderr
        assert "no backup" not in paths.log_file.read_text()
        status = run_cli(paths, "status", env=env, check=True)
        assert status.stderr == ""
        assert "key backup   not tracked: the key is handed in" in status.stdout
        rotate = run_cli(paths, "key", "rotate", "--yes", env=env)
        assert rotate.returncode == 1
        assert rotate.stderr.count("\n") == 1 and "rotating" not in rotate.stderr
        assert '"${STIGMER_HOME:-$HOME/.stigmer}/master.key"' in rotate.stderr
    finally:
        run_cli(paths, "stop", env=env)


# ---------------------------------------------------------------- crafted backups


def crafted(short_dir: Path, name: str, **kdf: object) -> Path:
    """A backup of a fresh key (scrypt at the cheapest n), its KDF parameters then set."""
    doc = json.loads(write_backup(new_key(), PASSPHRASE, n=2))
    doc["kdf"].update(kdf)
    path = short_dir / name
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("kdf", [
    {"n": 2**20, "r": 32, "p": 16},  # 143 s and 4.2 GB, as the probe found
    {"n": 2**19},                    # 512 MiB
    {"n": 2**17, "r": 64},           # 1 GiB through r
    {"n": 2**17, "p": 64},           # 64 times the work through p
])
def test_kdf_parameters_out_of_bounds_are_refused_before_scrypt_runs(
        short_dir: Path, monkeypatch: pytest.MonkeyPatch, kdf: dict[str, int]) -> None:
    def scrypt_ran(*args: object, **kwargs: object) -> None:
        raise AssertionError("scrypt ran on a crafted backup")

    text = crafted(short_dir, "crafted.backup", **kdf).read_text()
    monkeypatch.setattr("cryptography.hazmat.primitives.kdf.scrypt.Scrypt", scrypt_ran)
    with pytest.raises(BackupError, match="KDF parameters are out of bounds"):
        read_backup(text, PASSPHRASE, "crafted.backup")


def test_what_key_export_writes_is_within_bounds(short_dir: Path) -> None:
    key = new_key()
    assert read_backup(write_backup(key, PASSPHRASE), PASSPHRASE, "ours") == key
    text = crafted(short_dir, "margin.backup", n=2 * SCRYPT_N).read_text()  # the margin
    with pytest.raises(BackupError, match="wrong passphrase"):  # read, not refused
        read_backup(text, PASSPHRASE, "margin.backup")


@pytest.mark.parametrize(("kdf", "message"), [
    ({"n": 2**20, "r": 32, "p": 16}, "KDF parameters are out of bounds"),
    ({"n": True}, "KDF parameters (n, r, p) are not whole numbers"),
    ({"r": True}, "KDF parameters (n, r, p) are not whole numbers"),
    ({"p": 1.0}, "KDF parameters (n, r, p) are not whole numbers"),
    ({"n": "131072"}, "KDF parameters (n, r, p) are not whole numbers"),
    ({"n": 3}, "KDF parameters are out of bounds"),  # scrypt wants a power of two
    ({"n": 0}, "KDF parameters are out of bounds"),
    ({"r": -8}, "KDF parameters are out of bounds"),
])
def test_key_import_refuses_bad_kdf_parameters_in_one_line(
        paths: Paths, short_dir: Path, kdf: dict[str, object], message: str) -> None:
    backup = crafted(short_dir, "crafted.backup", **kdf)
    # a passphrase on stdin: the old code went on to scrypt (a traceback for n=true); no
    # passphrase where the parameters are too costly, so the old code stopped at once
    result = run_cli(paths, "key", "import", str(backup),
                     input=None if "bounds" in message else PASSPHRASE + "\n")
    assert result.returncode == 1, result.stderr
    assert message in result.stderr and str(backup) in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1
    assert not paths.key_file.exists()


# -------------------------------------------------------------- replaced keys kept


def test_every_replaced_key_is_kept_even_when_the_clock_stands_still(
        short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Four imports in a row once kept only the last replaced key: the moved-aside name
    had a one-second granularity and the move overwrote."""
    from stigmer.broker.cli.keys import _install_key

    paths = Paths(home=short_dir / "h", socket=short_dir / "run" / "b.sock")
    keys = [new_key() for _ in range(4)]
    KeyFile(paths.key_file).write_now(keys[0])
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", "keyring.backends.fail.Keyring")
    monkeypatch.delenv("STIGMER_ENCRYPTION_KEY", raising=False)
    monkeypatch.setattr(time, "time", lambda: 1_800_000_000.0)
    monkeypatch.setattr(time, "time_ns", lambda: 1_800_000_000_000_000_000)
    kept = [anyio.run(_install_key, paths, key)[1] for key in keys[1:]]
    assert len(set(kept)) == 3 and all(kept)
    for old, name in zip(keys, kept, strict=False):
        assert KeyFile(Path(name)).read_now() == old  # 0600, ours: it reads
    assert KeyFile(paths.key_file).read_now() == keys[-1]
    assert sorted(p.name for p in paths.home.iterdir()) == sorted(
        ["master.key", *(Path(name).name for name in kept)])


# ------------------------------------------------------------------ a fleet host


def test_key_import_and_export_on_a_fleet_host_check_the_shared_store(
        short_dir: Path, store_url: str) -> None:
    """On a fleet host the store is the PostgreSQL one (STIGMER_STORE_URL), not a
    local.db that does not exist: a key that does not open it is refused."""
    control = Paths(home=short_dir / "control", socket=short_dir / "rc" / "b.sock")
    fleet = {"STIGMER_STORE_URL": store_url}
    run_cli(control, "start", env=cli_env(control, **fleet), check=True)
    run_cli(control, "stop", env=cli_env(control, **fleet), check=True)
    fleet_key = KeyFile(control.key_file).read_now()
    assert fleet_key is not None
    host = Paths(home=short_dir / "host", socket=short_dir / "rh" / "b.sock")
    wrong, right = short_dir / "wrong.backup", short_dir / "right.backup"
    wrong.write_text(write_backup(new_key(), PASSPHRASE, n=2))
    right.write_text(write_backup(fleet_key, PASSPHRASE, n=2))

    result = run_cli(host, "key", "import", str(wrong), input=PASSPHRASE + "\n",
                     env=cli_env(host, **fleet))
    assert result.returncode == 1 and "nothing was changed" in result.stderr, result.stderr
    assert not host.key_file.exists()
    result = run_cli(host, "key", "import", str(right), "--json", input=PASSPHRASE + "\n",
                     env=cli_env(host, **fleet))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["store_opens"] is True
    assert KeyFile(host.key_file).read_now() == fleet_key
    assert not host.store.exists()  # the check read the shared store, and made no local one

    KeyFile(host.key_file).write_now(new_key())  # export refuses a key that is not the fleet's
    result = run_cli(host, "key", "export", "--out", str(short_dir / "out.backup"),
                     env=cli_env(host, **fleet))
    assert result.returncode == 1 and "does not open the store" in result.stderr, result.stderr
    assert not (short_dir / "out.backup").exists()


def test_export_takes_the_key_from_the_key_command(paths: Paths, short_dir: Path) -> None:
    """A home whose key a command prints: `key export` (and `restore`, `key import`) run
    the command as the broker would."""
    import base64
    import shlex

    key = new_key()
    (short_dir / "k.txt").write_text(base64.b64encode(key).decode())
    command = shlex.join([sys.executable, "-c", "import sys; print(open(sys.argv[1]).read())",
                          str(short_dir / "k.txt")])
    env = cli_env(paths, STIGMER_KEY_COMMAND=command)
    run_cli(paths, "start", env=env, check=True)
    run_cli(paths, "stop", env=env, check=True)
    backup = short_dir / "k.backup"
    status, output = in_pty(paths, "key", "export", "--out", str(backup), env=env,
                            answers=[("passphrase: ", PASSPHRASE),
                                     ("passphrase again: ", PASSPHRASE)])
    assert status == 0, output
    assert read_backup(backup.read_text(), PASSPHRASE, "backup") == key
    assert not paths.key_file.exists()
