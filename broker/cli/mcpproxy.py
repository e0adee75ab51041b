"""`mcp proxy`'s relay: the real MCP server behind us, its messages masked on the way out.

Theory of operation. MCP's stdio transport is one JSON-RPC message per line.
The server runs in a session of its own (so that whatever it starts goes with
it), and three threads copy:

* client -> server: our stdin to its stdin, as it is (the client holds no
  secret). When our stdin closes, its stdin closes; a server still running
  :data:`GRACE_S` seconds later is terminated, as the SDK's own client does.
* server -> client: each line is parsed, every string in it (keys included,
  and a number whose digits hold a secret, except the message's ``id``) is
  masked, and a message where something was masked goes out re-serialized on
  one line (one with nothing to mask, as it came): every message stays valid
  JSON. A line that is not JSON is masked as bytes and passed on:
  the protocol forbids it, but dropping it would hide a broken server from the
  client that has to report it.
* server's stderr -> ours: masked as a byte stream (clients keep it in logs).

The main thread waits. The broker cannot tell us yet that a context ended (no
push in the protocol), so every ``check_every`` seconds, and at the context's
expiry, it fetches the context again: a refusal (completed, released, expired,
its token revoked) stops the server. A broker that does not answer is not a
refusal: the server keeps running and the next check asks again.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from typing import IO, Any

from .child import write_all
from .masking import MASK, Masker

__all__ = ["GRACE_S", "JsonMasker", "relay"]

#: how long a server may take to exit once its stdin closed, and once terminated
GRACE_S = 2.0
_CHUNK = 1 << 16
_MASK_TEXT = MASK.decode()


class JsonMasker:
    """Mask one newline-delimited JSON-RPC message at a time, keeping it valid JSON."""

    __slots__ = ("_bytes", "_patterns", "_raw", "_text")

    def __init__(self, patterns: Iterable[str]) -> None:
        ordered = sorted(set(patterns), key=len, reverse=True)
        self._patterns = ordered
        self._text = re.compile("|".join(map(re.escape, ordered))) if ordered else None
        self._raw = (re.compile(b"|".join(re.escape(p.encode()) for p in ordered))
                     if ordered else None)
        self._bytes = Masker(ordered)

    def line(self, line: bytes) -> bytes:
        """Return ``line`` (one message and its newline) with every pattern masked."""
        if self._raw is None:
            return line
        if b"\\" not in line and self._raw.search(line) is None:
            return line  # no pattern, and no escape that could spell one: the common case
        try:
            message = json.loads(line, parse_constant=_not_json)
            masked = self._value(message, top=isinstance(message, dict))
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            return self._bytes.feed(line) + self._bytes.flush()
        if masked == message:
            return line  # nothing to mask: the server's own bytes, not re-serialized
        end = b"\n" if line.endswith(b"\n") else b""
        return json.dumps(masked, ensure_ascii=False, separators=(",", ":")).encode() + end

    def _string(self, text: str) -> str:
        assert self._text is not None
        # a substring test per pattern runs at C speed; the regular expression tries every
        # pattern at every position, so it runs only on a string that holds one
        if any(p in text for p in self._patterns):
            return self._text.sub(_MASK_TEXT, text)
        return text

    def _value(self, value: Any, top: bool = False) -> Any:
        if isinstance(value, str):
            return self._string(value)
        if isinstance(value, dict):
            # The message's own numeric id is kept as it is: the client matches replies by
            # it, and a reply's id is one the client chose. A string id is masked like any
            # string (a request the server sends, sampling say, carries an id it chose).
            return {self._string(k): v if top and k == "id" and not isinstance(v, str)
                    else self._value(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._value(v) for v in value]
        if isinstance(value, int | float) and not isinstance(value, bool):
            digits = json.dumps(value)
            return _MASK_TEXT if self._string(digits) != digits else value
        return value


def _not_json(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def relay(argv: list[str], env: dict[str, str], patterns: Iterable[str], *,
          pass_fds: tuple[int, ...], alive: Callable[[], bool], check_every: float,
          expires_at: float) -> tuple[int, bool]:
    """Run ``argv`` as the MCP server, relaying our stdin and stdout to it, masked.

    Return (exit status, whether it was stopped because the context ended); the
    status of a death by signal N is 128+N. Raises OSError when it cannot start."""
    patterns = set(patterns)
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, pass_fds=pass_fds, start_new_session=True)
    assert proc.stdin is not None
    assert proc.stdout is not None
    assert proc.stderr is not None
    wake = threading.Event()
    client_gone = threading.Event()
    finished = threading.Event()

    def to_server(target: IO[bytes]) -> None:
        try:
            while data := os.read(0, _CHUNK):
                target.write(data)
                target.flush()
        except OSError:
            pass  # the server is gone: its exit ends the relay
        finally:
            with contextlib.suppress(OSError):
                target.close()
            client_gone.set()
            wake.set()

    def from_server(source: IO[bytes]) -> None:
        masker = JsonMasker(patterns)
        for line in iter(source.readline, b""):
            write_all(1, masker.line(line))

    def errors(source: IO[bytes]) -> None:
        masker = Masker(patterns)
        while data := os.read(source.fileno(), _CHUNK):
            write_all(2, masker.feed(data))
        write_all(2, masker.flush())

    def reap() -> None:
        proc.wait()
        finished.set()
        wake.set()

    threads = [threading.Thread(target=to_server, args=(proc.stdin,), daemon=True),
               threading.Thread(target=from_server, args=(proc.stdout,), daemon=True),
               threading.Thread(target=errors, args=(proc.stderr,), daemon=True),
               threading.Thread(target=reap, daemon=True)]
    for thread in threads:
        thread.start()
    saved = {s: signal.signal(s, lambda signum, _: _signal_group(proc.pid, signum))
             for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    ended = False
    try:
        next_check = time.monotonic() + check_every
        expiry_due = True  # one check when the context expires, then the usual ones
        while not finished.is_set():
            timeout = next_check - time.monotonic()
            if expiry_due:
                timeout = min(timeout, expires_at - time.time() + 0.05)
            wake.wait(max(0.0, timeout))
            wake.clear()
            if finished.is_set():
                break
            if client_gone.is_set():
                _stop(proc.pid, finished, grace=GRACE_S)
                break
            expired = expiry_due and time.time() >= expires_at
            if expired or time.monotonic() >= next_check:
                expiry_due = expiry_due and not expired
                next_check = time.monotonic() + check_every
                if not alive():
                    ended = True
                    _stop(proc.pid, finished, grace=0.0)
                    break
        finished.wait()
        for thread in threads[1:3]:  # the rest of its output, unless a grandchild holds it
            thread.join(GRACE_S)
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
    code = proc.returncode
    return (128 - code if code < 0 else code), ended


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _stop(pgid: int, finished: threading.Event, grace: float) -> None:
    """Give the server ``grace`` seconds to exit, then SIGTERM its group, then SIGKILL."""
    if grace and finished.wait(grace):
        return
    _signal_group(pgid, signal.SIGTERM)
    if not finished.wait(GRACE_S):
        _signal_group(pgid, signal.SIGKILL)

