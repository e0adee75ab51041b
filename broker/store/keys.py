"""Where the master key comes from: four sources behind one interface, and their checks.

Sources, in order, first that has a key wins: :class:`EnvKey`
(``STIGMER_ENCRYPTION_KEY`` or a systemd credential, handed in by the CLI, base64
of 32 bytes) > :class:`CommandKey` (what a command prints, ``--key-command``) >
:class:`Keychain` (the OS keychain through ``keyring``, service ``stigmer``,
name ``master-key``) > :class:`KeyFile` (``HOME/master.key``, base64, 0600).
Each is a :class:`KeySource`, as keyring's backends share one interface, and
:func:`key_sources` builds the list. When several sources have a key they must
agree, and the key must open the store, checked on what :func:`.backend.peek_store`
read before the store is opened for writing (:func:`find_master_key`). When none
has one and the store is new, 32 random bytes are generated and kept in the
first source that can store a key (:func:`new_master_key`), once the store opens.

keyring is blocking and may talk to D-Bus: every call to it goes through
:class:`Keychain`, which runs it in a worker thread and turns keyring's errors
into :class:`KeySourceError` or "no keychain". A key command runs without a shell,
in a worker thread, within :data:`KEY_COMMAND_TIMEOUT`; its output goes into a
buffer of fixed size that is wiped once the key is decoded, and no error quotes it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import enum
import itertools
import os
import select
import signal
import stat
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import anyio.to_thread

from ..protocol.errors import StartupError
from .backend import StoreError, StorePeek
from .crypto import KEY_SIZE, SealError, key_id_of, new_key, unwrap_data_key
from .files import fsync_path

__all__ = [
    "ENV_KEY_ROTATION_HELP", "ENV_ORIGIN", "KEYRING_SERVICE", "KEYRING_USERNAME",
    "KEY_COMMAND_TIMEOUT", "CommandKey", "EnvKey", "KeyFile", "KeySource", "KeySourceError",
    "KeySourceKind", "Keychain", "MasterKey",
    "check_key_id", "check_opens", "decode_key", "encode_key", "find_master_key",
    "key_sources", "new_master_key",
]

KEYRING_SERVICE = "stigmer"
KEYRING_USERNAME = "master-key"


#: where a key handed in comes from, unless the CLI says otherwise
ENV_ORIGIN = "STIGMER_ENCRYPTION_KEY"

ENV_KEY_ROTATION_HELP = (
    "the master key comes from STIGMER_ENCRYPTION_KEY, which the broker cannot change. To "
    "rotate: stop the broker, save the key to the home's key file (umask 077; printf '%s\\n' "
    "\"$STIGMER_ENCRYPTION_KEY\" > \"${STIGMER_HOME:-$HOME/.stigmer}/master.key\"), start the "
    "broker without the variable, then run `stigmer-broker key rotate`")


class KeySourceError(StartupError):
    """A master-key source is unusable; the message names it and the fix."""


class KeySourceKind(enum.Enum):
    """The kinds of place a master key can come from."""

    ENV = "env"
    COMMAND = "command"
    KEYCHAIN = "keychain"
    FILE = "file"


class KeySource(Protocol):
    """One place a master key can be read from (and, for most, written to)."""

    kind: KeySourceKind

    def describe(self) -> str:
        """Return where the key is, for people (``file (/home/u/.stigmer/master.key)``)."""
        ...

    async def read(self) -> bytes | None:
        """Return the key, or None when this source holds none. Raises KeySourceError."""
        ...

    async def write(self, key: bytes) -> None:
        """Store ``key`` durably, replacing the old one. Raises KeySourceError."""
        ...


@dataclasses.dataclass(frozen=True, slots=True)
class MasterKey:
    """The master key and the source it came from. Its repr never shows the key."""

    key: bytes = dataclasses.field(repr=False)
    source: KeySource

    @property
    def id(self) -> str:
        return key_id_of(self.key)

    def describe(self) -> str:
        return self.source.describe()


def decode_key(text: str, where: str) -> bytes:
    """Return the 32 bytes that base64 ``text`` holds. Raises KeySourceError naming ``where``."""
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise KeySourceError(
            f"the master key in {where} is not valid base64; it must be base64 of 32 random "
            "bytes (e.g. `head -c32 /dev/urandom | base64`)") from None
    if len(key) != KEY_SIZE:
        raise KeySourceError(
            f"the master key in {where} is {len(key)} bytes; it must be exactly {KEY_SIZE} "
            "bytes, base64-encoded")
    return key


def encode_key(key: bytes) -> str:
    return base64.b64encode(key).decode("ascii")


class EnvKey:
    """A key handed in from outside, as the CLI read it: ``STIGMER_ENCRYPTION_KEY`` or a
    systemd credential (``LoadCredential=``); read-only."""

    kind = KeySourceKind.ENV

    def __init__(self, text: str, origin: str = ENV_ORIGIN) -> None:
        self._text = text
        self.origin = origin

    def __repr__(self) -> str:
        return f"EnvKey(origin={self.origin!r})"

    def describe(self) -> str:
        if self.origin == ENV_ORIGIN:
            return f"env ({ENV_ORIGIN})"
        return self.origin

    async def read(self) -> bytes | None:
        return decode_key(self._text, self.origin)

    async def write(self, key: bytes) -> None:
        if self.origin == ENV_ORIGIN:
            raise KeySourceError(ENV_KEY_ROTATION_HELP)
        raise KeySourceError(
            f"the master key comes from the {self.origin}, which the broker cannot change. "
            "To rotate: stop the broker, copy the key into the key file (mode 0600), start "
            "the broker without the credential, run `stigmer-broker key rotate`, then load "
            "the new key file as the credential")


#: how long a key command may run before the start is refused
KEY_COMMAND_TIMEOUT = 30.0
#: the most a key command may print: a key is 44 characters of base64 and a newline
_KEY_COMMAND_OUTPUT = 4096


class CommandKey:
    """A key a command prints on its standard output (``--key-command``: ``op read``,
    ``systemd-creds decrypt``, a KMS or TPM tool), run at start without a shell; read-only.

    Only the command's name (``argv[0]``) is ever shown: its arguments may say where a
    secret lives. Its standard error is discarded and its output is never quoted, since
    either may hold the key.
    """

    kind = KeySourceKind.COMMAND

    def __init__(self, argv: Sequence[str], *, timeout: float = KEY_COMMAND_TIMEOUT) -> None:
        if not argv:
            raise ValueError("a key command needs at least the program")
        self.argv = tuple(argv)
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"CommandKey({self.argv[0]!r})"

    def describe(self) -> str:
        return f"command ({self.argv[0]})"

    async def read(self) -> bytes | None:
        return await anyio.to_thread.run_sync(self.read_now)

    def read_now(self) -> bytes:
        """Run the command and return the key it printed. Raises KeySourceError."""
        output = bytearray(_KEY_COMMAND_OUTPUT + 1)  # never grows, so never copied
        try:
            size = self._run(output)
            return self._decode(memoryview(output)[:size])
        finally:
            output[:] = bytes(len(output))  # same length: overwritten in place

    def _run(self, output: bytearray) -> int:
        """Run the command with its stdout into ``output``; return how many bytes it
        printed. Raises KeySourceError when it cannot run, fails, prints too much or
        outlives :attr:`timeout` (then it is killed, with whatever it started)."""
        name = f"the key command `{self.argv[0]}`"
        read_fd, write_fd = os.pipe()
        try:
            proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=write_fd,
                                    stderr=subprocess.DEVNULL, close_fds=True,
                                    start_new_session=True)
        except OSError as exc:
            os.close(read_fd)
            fix = ("make it executable (chmod +x) or run it through its interpreter"
                   if isinstance(exc, PermissionError) else
                   "give the program's full path, or put it on the broker's PATH")
            raise KeySourceError(f"{name} could not be run: {exc.strerror}; {fix}") from None
        finally:
            os.close(write_fd)
        deadline = time.monotonic() + self.timeout
        view = memoryview(output)
        size = 0
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise subprocess.TimeoutExpired(self.argv, self.timeout)
                if not select.select([read_fd], [], [], remaining)[0]:
                    continue
                count = os.readv(read_fd, [view[size:]])
                if count == 0:
                    break
                size += count
                if size > _KEY_COMMAND_OUTPUT:
                    raise KeySourceError(
                        f"{name} printed more than {_KEY_COMMAND_OUTPUT} bytes; it must "
                        f"print only the master key, base64 of {KEY_SIZE} bytes")
            status = proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            raise KeySourceError(
                f"{name} did not finish within {self.timeout:g} s and was stopped; run it "
                "yourself to see what it waits for (a prompt, a lock, the network)") from None
        finally:
            os.close(read_fd)
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if status != 0:
            how = f"was killed by signal {-status}" if status < 0 else \
                f"exited with status {status}"
            raise KeySourceError(f"{name} {how}; run it yourself to see why (the broker "
                                 "shows none of its output)")
        return size

    def _decode(self, printed: memoryview) -> bytes:
        """The key that base64 ``printed`` holds, read in place (surrounding whitespace
        allowed). Raises KeySourceError, never quoting ``printed``."""
        start, end = 0, len(printed)
        while start < end and printed[start] in _WHITESPACE:
            start += 1
        while end > start and printed[end - 1] in _WHITESPACE:
            end -= 1
        where = f"the output of the key command `{self.argv[0]}`"
        if start == end:
            raise KeySourceError(f"the key command `{self.argv[0]}` printed nothing; it must "
                                 f"print the master key, base64 of {KEY_SIZE} bytes")
        try:
            key = binascii.a2b_base64(printed[start:end], strict_mode=True)
        except (binascii.Error, ValueError):
            raise KeySourceError(
                f"{where} is not a master key: it must print base64 of {KEY_SIZE} random "
                "bytes and nothing else") from None
        if len(key) != KEY_SIZE:
            raise KeySourceError(f"the master key in {where} is {len(key)} bytes; it must "
                                 f"be exactly {KEY_SIZE} bytes, base64-encoded")
        return key

    async def write(self, key: bytes) -> None:
        raise KeySourceError(
            f"the master key comes from {self.describe()}, which the broker cannot change. "
            "To rotate: stop the broker, save the key the command prints to the key file "
            "(mode 0600), start the broker without --key-command, run `stigmer-broker key "
            "rotate`, then keep the new key file's key where the command reads it")


_WHITESPACE = frozenset(b" \t\r\n")


class KeyFile:
    """The key file: private, ours, not a symlink; written atomically."""

    kind = KeySourceKind.FILE

    def __init__(self, path: Path) -> None:
        self.path = path

    def __repr__(self) -> str:
        return f"KeyFile({str(self.path)!r})"

    def describe(self) -> str:
        return f"file ({self.path})"

    async def read(self) -> bytes | None:
        return self.read_now()

    async def write(self, key: bytes) -> None:
        await anyio.to_thread.run_sync(self.write_now, key)

    def read_now(self) -> bytes | None:
        """Return the key, None when there is no file. Raises KeySourceError."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(st.st_mode):
            raise KeySourceError(f"refusing key file {self.path}: it is a symbolic link; "
                                 "replace it with the file itself")
        if not stat.S_ISREG(st.st_mode):
            raise KeySourceError(f"refusing key file {self.path}: it is not a regular file")
        if st.st_uid != os.getuid():
            raise KeySourceError(f"refusing key file {self.path}: it is owned by uid "
                                 f"{st.st_uid}; it must be yours")
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise KeySourceError(
                f"refusing key file {self.path}: mode {stat.S_IMODE(st.st_mode):04o} lets "
                f"others read it; run `chmod 600 {self.path}`")
        fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            raw = f.read(4096)
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            text = "\0"
        return decode_key(text, f"key file {self.path}")

    def write_now(self, key: bytes) -> None:
        """Replace the key file atomically; private from its first byte, durable on return."""
        directory = self.path.parent
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = directory / f".{self.path.name}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        _create_key_file(tmp, key)
        os.replace(tmp, self.path)
        fsync_path(directory)

    def keep_aside(self, key: bytes) -> Path:
        """Save ``key`` (the one this file holds, about to be replaced) in a new 0600 file
        beside it, and return that file. Its name says when, to the nanosecond, and is
        never one that exists: nothing is overwritten, however fast keys are replaced."""
        for attempt in itertools.count():
            suffix = f"-{attempt}" if attempt else ""  # the same nanosecond (a coarse clock)
            aside = self.path.with_name(f"{self.path.name}.replaced-{time.time_ns()}{suffix}")
            try:
                _create_key_file(aside, key)
            except FileExistsError:
                continue
            fsync_path(aside.parent)
            return aside
        raise AssertionError("unreachable")  # pragma: no cover - count() never ends


def _create_key_file(path: Path, key: bytes) -> None:
    """Create ``path`` holding ``key``, private from its first byte and synced; raises
    FileExistsError rather than touch a file that exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, (encode_key(key) + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)


class Keychain:
    """The OS keychain through keyring, each call in a worker thread."""

    kind = KeySourceKind.KEYCHAIN

    def __init__(self, backend: Any) -> None:
        self._backend = backend
        self.name = f"{type(backend).__module__}.{type(backend).__name__}"

    def __repr__(self) -> str:
        return f"Keychain({self.name!r})"

    @classmethod
    async def find(cls) -> Keychain | None:
        """Return the usable keychain, or None when there is none (or only a plaintext one)."""
        backend = await anyio.to_thread.run_sync(_usable_backend)
        return None if backend is None else cls(backend)

    def describe(self) -> str:
        return f"keychain ({self.name})"

    async def read(self) -> bytes | None:
        try:
            text = await anyio.to_thread.run_sync(
                self._backend.get_password, KEYRING_SERVICE, KEYRING_USERNAME)
        except Exception as exc:  # keyring backends raise anything; translate once here
            raise KeySourceError(
                f"the keychain ({self.name}) could not be read: {type(exc).__name__}; unlock "
                "it, or set PYTHON_KEYRING_BACKEND=keyring.backends.fail.Keyring to use the "
                "key file") from None
        if text is None:
            return None
        return decode_key(text, f"the keychain ({self.name})")

    async def write(self, key: bytes) -> None:
        try:
            await anyio.to_thread.run_sync(
                self._backend.set_password, KEYRING_SERVICE, KEYRING_USERNAME, encode_key(key))
        except Exception as exc:
            raise KeySourceError(
                f"the keychain ({self.name}) refused the master key: {type(exc).__name__}"
            ) from None


def _usable_backend() -> Any:
    """keyring's backend when it is a real keychain; None for fail/null/plaintext ones."""
    try:
        import keyring
        import keyring.backend
    except Exception:
        return None
    try:
        backend = keyring.get_keyring()
    except Exception:
        return None
    candidates = list(getattr(backend, "backends", None) or [backend])
    real = [b for b in candidates if _is_real(b)]
    return backend if real else None


def _is_real(backend: Any) -> bool:
    module = type(backend).__module__
    if module.startswith("keyrings.alt") or module in (
            "keyring.backends.fail", "keyring.backends.null", "keyring.backends.chainer"):
        return False
    try:
        return float(backend.priority) > 0
    except Exception:
        return False


async def key_sources(*, env_key: str | None, key_file: Path, use_keychain: bool,
                      env_key_origin: str = ENV_ORIGIN, key_command: Sequence[str] = (),
                      key_command_timeout: float = KEY_COMMAND_TIMEOUT) -> list[KeySource]:
    """Return the sources to consult, in order: the key handed in (the variable or a
    systemd credential), the key command, the keychain, the file."""
    sources: list[KeySource] = []
    if env_key is not None:
        sources.append(EnvKey(env_key, env_key_origin))
    if key_command:
        sources.append(CommandKey(key_command, timeout=key_command_timeout))
    keychain = await Keychain.find() if use_keychain else None
    if keychain is not None:
        sources.append(keychain)
    sources.append(KeyFile(key_file))
    return sources


async def find_master_key(sources: Sequence[KeySource], *,
                          store: StorePeek) -> MasterKey | None:
    """Return the master key from the first source that has one, proven to open ``store``
    (:func:`check_opens`) before the store is opened for writing; None when no source
    has a key and the store is new (:func:`new_master_key` makes one once it is open).

    Raises KeySourceError: a source is unusable, sources disagree, the existing store
    has no key anywhere, or the key is not the store's; StoreError: the store's data
    keys do not open under a key with its id (tampered or damaged).
    """
    found: list[MasterKey] = []
    for source in sources:
        key = await source.read()
        if key is not None:
            found.append(MasterKey(key, source))
    if len({m.key for m in found}) > 1:
        names = " and ".join(m.describe() for m in found)
        raise KeySourceError(
            f"the master key sources disagree: {names} hold different keys; keep the one "
            "that opens your store and remove the others")
    if not found:
        if store.key_ids:
            where = ", ".join(s.describe() for s in sources)
            raise KeySourceError(
                f"no master key found for the existing store (key id "
                f"{sorted(store.key_ids)[0]}) in {where}; restore the key file or "
                f"STIGMER_ENCRYPTION_KEY, or the keychain entry "
                f"'{KEYRING_SERVICE}/{KEYRING_USERNAME}'")
        return None
    check_opens(found[0].key, found[0].describe(), store)
    return found[0]


async def new_master_key(sources: Sequence[KeySource]) -> MasterKey:
    """Make a master key for a new store and keep it in the first source that can store
    one. Raises KeySourceError."""
    writable = [s for s in sources
                if s.kind not in (KeySourceKind.ENV, KeySourceKind.COMMAND)]
    if not writable:
        raise KeySourceError("no master key source can store a new key")
    key = new_key()
    await writable[0].write(key)
    return MasterKey(key, writable[0])


def check_key_id(key_id: str, where: str, accepted: frozenset[str]) -> None:
    """Raise KeySourceError unless ``key_id`` (of the key from ``where``) is one the store
    accepts; a new store (nothing accepted) takes any key."""
    if accepted and key_id not in accepted:
        raise KeySourceError(
            f"the master key from {where} does not open the store (its key id is {key_id}, "
            f"the store's is {sorted(accepted)[0]}); use the key the store was created with")


def check_opens(key: bytes, where: str, store: StorePeek) -> None:
    """Raise unless ``key`` (from ``where``) opens ``store``: its id is one of the store's
    key check values (KeySourceError) and it unwraps every data key, through the wraps of
    an unfinished rotation when it is that rotation's new key (StoreError)."""
    key_id = key_id_of(key)
    check_key_id(key_id, where, store.key_ids)
    rotated = key_id == store.pending_id and key_id != store.master_id
    for data_key_id, wrapped, wrapped_next in store.data_keys:
        try:
            unwrap_data_key(key, key_id, data_key_id,
                            (wrapped_next if rotated else wrapped) or b"")
        except SealError:
            raise StoreError(
                f"data key {data_key_id} in {store.where} does not open under the master key "
                f"from {where}, though the store accepts its id; the store was tampered with "
                "or damaged: restore it from a backup") from None
