"""Master-key sources and every refusal, with an in-memory keychain."""

from __future__ import annotations

import base64
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import keyring
import pytest
from memkeyring import BrokenKeyring, MemoryKeyring, PlaintextKeyring

from stigmer.broker.store.backend import StorePeek
from stigmer.broker.store.crypto import new_key
from stigmer.broker.store.keys import (
    KEYRING_SERVICE,
    KEYRING_USERNAME,
    CommandKey,
    KeyFile,
    KeySourceError,
    KeySourceKind,
    MasterKey,
    find_master_key,
    key_sources,
    new_master_key,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def memory_keychain() -> Iterator[MemoryKeyring]:
    previous = keyring.get_keyring()
    backend = MemoryKeyring()
    keyring.set_keyring(backend)
    yield backend
    keyring.set_keyring(previous)


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


async def load(home: Path, env_key: str | None = None, *, keychain: bool = False,
               ids: frozenset[str] = frozenset(), command: tuple[str, ...] = (),
               command_timeout: float = 30.0) -> MasterKey:
    """The key as a start finds it (a new one for a new store) for a store with ``ids``."""
    sources = await key_sources(env_key=env_key, key_file=home / "master.key",
                                use_keychain=keychain, key_command=command,
                                key_command_timeout=command_timeout)
    store = StorePeek("test store", master_id=min(ids, default=None))
    return await find_master_key(sources, store=store) or await new_master_key(sources)


async def test_generates_key_file_when_no_keychain(short_dir: Path) -> None:
    master = await load(short_dir)
    assert master.source.kind is KeySourceKind.FILE
    path = short_dir / "master.key"
    assert (os.stat(path).st_mode & 0o777) == 0o600
    assert KeyFile(path).read_now() == master.key
    again = await load(short_dir, ids=frozenset({master.id}))
    assert again.key == master.key


async def test_key_file_private_under_umask_000(short_dir: Path) -> None:
    old = os.umask(0)
    try:
        await load(short_dir)
    finally:
        os.umask(old)
    assert (os.stat(short_dir / "master.key").st_mode & 0o777) == 0o600


async def test_generates_into_real_keychain(short_dir: Path,
                                            memory_keychain: MemoryKeyring) -> None:
    master = await load(short_dir, keychain=True)
    assert master.source.kind is KeySourceKind.KEYCHAIN
    assert (KEYRING_SERVICE, KEYRING_USERNAME) in memory_keychain.entries
    assert not (short_dir / "master.key").exists()


async def test_plaintext_keyring_is_not_a_keychain(short_dir: Path) -> None:
    previous = keyring.get_keyring()
    keyring.set_keyring(PlaintextKeyring())
    try:
        master = await load(short_dir, keychain=True)
    finally:
        keyring.set_keyring(previous)
    assert master.source.kind is KeySourceKind.FILE


async def test_broken_keychain_is_a_clear_error(short_dir: Path) -> None:
    previous = keyring.get_keyring()
    keyring.set_keyring(BrokenKeyring())
    try:
        with pytest.raises(KeySourceError, match="could not be read"):
            await load(short_dir, keychain=True)
    finally:
        keyring.set_keyring(previous)


async def test_env_key_wins_and_is_checked(short_dir: Path) -> None:
    key = new_key()
    master = await load(short_dir, b64(key))
    assert master.source.kind is KeySourceKind.ENV
    assert master.key == key
    assert not (short_dir / "master.key").exists()


@pytest.mark.parametrize(("value", "message"), [
    ("not base64!!", "not valid base64"),
    (base64.b64encode(b"short").decode(), "must be exactly 32"),
    (base64.b64encode(b"x" * 33).decode(), "must be exactly 32"),
])
async def test_bad_env_keys(short_dir: Path, value: str, message: str) -> None:
    with pytest.raises(KeySourceError, match=message) as info:
        await load(short_dir, value)
    assert value not in str(info.value)


async def test_sources_that_disagree_are_refused(short_dir: Path,
                                                 memory_keychain: MemoryKeyring) -> None:
    KeyFile(short_dir / "master.key").write_now(new_key())
    with pytest.raises(KeySourceError, match="disagree"):
        await load(short_dir, b64(new_key()))
    memory_keychain.set_password(KEYRING_SERVICE, KEYRING_USERNAME, b64(new_key()))
    with pytest.raises(KeySourceError, match="disagree"):
        await load(short_dir, keychain=True)


async def test_agreeing_sources_are_fine(short_dir: Path) -> None:
    key = new_key()
    KeyFile(short_dir / "master.key").write_now(key)
    assert (await load(short_dir, b64(key))).source.kind is KeySourceKind.ENV


@pytest.mark.parametrize("problem", ["mode", "symlink", "owner", "size"])
async def test_key_file_refusals(short_dir: Path, problem: str) -> None:
    path = short_dir / "master.key"
    KeyFile(path).write_now(new_key())
    if problem == "mode":
        os.chmod(path, 0o640)
        match = "chmod 600"
    elif problem == "symlink":
        real = short_dir / "real.key"
        path.rename(real)
        path.symlink_to(real)
        match = "symbolic link"
    elif problem == "owner":
        if os.getuid() != 0:
            pytest.skip("changing a file's owner needs root")
        os.chown(path, 65534, -1)
        match = "owned by uid 65534"
    else:
        path.write_text(b64(b"y" * 16) + "\n")
        os.chmod(path, 0o600)
        match = "exactly 32"
    with pytest.raises(KeySourceError, match=match):
        await load(short_dir)


async def test_wrong_key_for_existing_store(short_dir: Path) -> None:
    with pytest.raises(KeySourceError, match="does not open the store"):
        await load(short_dir, b64(new_key()), ids=frozenset({"0123456789abcdef"}))


async def test_no_key_for_existing_store_is_not_regenerated(short_dir: Path) -> None:
    with pytest.raises(KeySourceError, match="no master key found"):
        await load(short_dir, ids=frozenset({"0123456789abcdef"}))
    assert not (short_dir / "master.key").exists()


# ------------------------------------------------------------------ key command

#: a key only the command knows: it must never appear in an error, a repr or a log
SENTINEL = new_key()


def printing(code: str) -> tuple[str, ...]:
    """A key command: this Python, running ``code`` (no shell anywhere)."""
    return (sys.executable, "-c", code)


def prints(text: str, status: int = 0) -> tuple[str, ...]:
    return printing(f"import sys; sys.stdout.write({text!r}); sys.exit({status})")


async def test_key_command_gives_the_key(short_dir: Path) -> None:
    master = await load(short_dir, command=prints(b64(SENTINEL) + "\n"))
    assert master.key == SENTINEL
    assert master.source.kind is KeySourceKind.COMMAND
    assert master.describe() == f"command ({sys.executable})"
    assert b64(SENTINEL) not in repr(master) and b64(SENTINEL) not in repr(master.source)
    assert not (short_dir / "master.key").exists()  # read-only: nothing is written
    again = await load(short_dir, command=prints(b64(SENTINEL)), ids=frozenset({master.id}))
    assert again.key == SENTINEL


async def test_key_command_runs_without_a_shell(short_dir: Path) -> None:
    marker = short_dir / "expanded"
    command = (*printing(f"import sys; sys.stdout.write({b64(SENTINEL)!r})"),
               f"$(touch {marker})")
    assert (await load(short_dir, command=command)).key == SENTINEL
    assert not marker.exists()


async def test_failing_key_command_is_one_line_without_its_output(short_dir: Path) -> None:
    with pytest.raises(KeySourceError) as info:
        await load(short_dir, command=printing(
            f"import sys; print({b64(SENTINEL)!r}); print({b64(SENTINEL)!r}, file=sys.stderr);"
            " sys.exit(3)"))
    message = str(info.value)
    assert message.startswith(f"the key command `{sys.executable}` exited with status 3")
    assert "\n" not in message and b64(SENTINEL) not in message


async def test_missing_key_command_is_named(short_dir: Path) -> None:
    with pytest.raises(KeySourceError, match="`/nonexistent/op` could not be run"):
        await load(short_dir, command=("/nonexistent/op", "read", "op://v/k"))


async def test_a_key_command_that_is_not_executable_is_told_so(short_dir: Path) -> None:
    """A new user's probe: it was told to give the program's full path, which it was."""
    script = short_dir / "key.sh"
    script.write_text("#!/bin/sh\necho nothing\n")
    script.chmod(0o644)
    with pytest.raises(KeySourceError, match=r"could not be run: Permission denied; make "
                                             r"it executable \(chmod \+x\)"):
        await load(short_dir, command=(str(script),))


async def test_hung_key_command_times_out_and_is_stopped(short_dir: Path) -> None:
    pid_file = short_dir / "pid"
    command = printing(f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid()));"
                       f" print({b64(SENTINEL)!r}, flush=True); time.sleep(600)")
    with pytest.raises(KeySourceError) as info:
        await load(short_dir, command=command, command_timeout=0.5)
    message = str(info.value)
    assert "did not finish within 0.5 s" in message and b64(SENTINEL) not in message
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):  # killed and reaped, not left behind
        os.kill(pid, 0)


async def test_key_command_that_leaves_a_child_holding_its_output_times_out(
        short_dir: Path) -> None:
    """The command exits, but what it started keeps stdout open: the timeout still holds."""
    command = printing("import os, time\nif os.fork() == 0: time.sleep(600)\n")
    with pytest.raises(KeySourceError, match=r"did not finish within 0\.5 s"):
        await load(short_dir, command=command, command_timeout=0.5)


@pytest.mark.parametrize(("printed", "message"), [
    ("sentinel-" + "x" * 40 + "\n", "is not a master key"),
    (b64(SENTINEL)[:-4] + " " + b64(SENTINEL)[-4:], "is not a master key"),
    (b64(SENTINEL) + "\n" + b64(SENTINEL) + "\n", "is not a master key"),
    (" \n", "printed nothing"),
    (b64(SENTINEL[:16]), "is 16 bytes"),
    (b64(SENTINEL) * 100, "printed more than 4096 bytes"),
], ids=["not-base64", "split-by-a-space", "two-keys", "blank", "16-bytes", "too-long"])
async def test_key_command_output_that_is_not_a_key(short_dir: Path, printed: str,
                                                     message: str) -> None:
    with pytest.raises(KeySourceError, match=message) as info:
        await load(short_dir, command=prints(printed))
    assert b64(SENTINEL) not in str(info.value) and "sentinel" not in str(info.value)
    assert b64(SENTINEL)[:8] not in str(info.value)


async def test_key_command_output_buffer_is_wiped(monkeypatch: pytest.MonkeyPatch) -> None:
    buffers: list[bytearray] = []
    real_run = CommandKey._run

    def keep(self: CommandKey, output: bytearray) -> int:
        buffers.append(output)
        return real_run(self, output)

    monkeypatch.setattr(CommandKey, "_run", keep)
    assert CommandKey(prints(b64(SENTINEL))).read_now() == SENTINEL
    assert len(buffers) == 1 and not any(buffers[0])


async def test_key_command_key_that_does_not_open_the_store_is_refused_as_any(
        short_dir: Path) -> None:
    ids = frozenset({"0123456789abcdef"})
    with pytest.raises(KeySourceError) as from_env:
        await load(short_dir, b64(SENTINEL), ids=ids)
    with pytest.raises(KeySourceError) as from_command:
        await load(short_dir, command=prints(b64(SENTINEL)), ids=ids)
    assert str(from_command.value) == str(from_env.value).replace(
        "env (STIGMER_ENCRYPTION_KEY)", f"command ({sys.executable})")
    assert "does not open the store" in str(from_command.value)


async def test_key_command_and_key_file_must_agree(short_dir: Path) -> None:
    KeyFile(short_dir / "master.key").write_now(new_key())
    with pytest.raises(KeySourceError, match="disagree"):
        await load(short_dir, command=prints(b64(SENTINEL)))


async def test_key_from_a_command_is_not_rotated_by_the_broker(short_dir: Path) -> None:
    source = CommandKey(prints(b64(SENTINEL)))
    with pytest.raises(KeySourceError, match="without --key-command"):
        await source.write(new_key())
    with pytest.raises(KeySourceError, match="no master key source can store"):
        await new_master_key([source])
