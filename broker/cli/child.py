"""Running `run`'s command with its output masked, as if it ran directly.

On a terminal the command gets a pseudo-terminal of its own (so it sees a tty,
its colours and line editing work): our terminal goes raw, keystrokes (Ctrl-C
included) pass through to it, window size changes follow it (SIGWINCH), and
what it prints comes back masked (a secret's line breaks in the pty's ``\r\n``
form too). Otherwise its stdout and stderr are pipes, each masked on its way to
ours, and its stdin is ours; when our stdout and stderr are one file (``2>&1``),
it gets one pipe for both, so that a secret written half to each is masked as
the whole it becomes there. Into two different files, each half lands alone and
neither holds the secret; a reader that later merges two such streams (a CI
runner reading two pipes) could join the halves: that case is not masked. Nor
is what the command writes to /dev/tty when our stdout is not a terminal: to
stand in between, `run` would have to take the terminal's input from the rest
of the pipeline (``run ... | less``). On a pty, its /dev/tty is the pty.
SIGINT, SIGTERM, SIGHUP
and SIGQUIT sent to us are passed on; the command's exit status is ours, and its
death by signal N is 128+N, as a shell reports it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pty
import select
import signal
import struct
import sys
import termios
import tty
from collections.abc import Mapping, Sequence

from .masking import Masker, terminal_forms

__all__ = ["run_masked", "run_waiting", "write_all"]

_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
_CHUNK = 1 << 20


def run_masked(command: Sequence[str], env: Mapping[str, str], secrets: set[str]) -> int:
    """Run ``command`` with every value of ``secrets`` masked in its output; return the
    exit status to exit with. Raises OSError (e.g. FileNotFoundError) when it cannot
    start, before anything ran."""
    if sys.stdout.isatty() and sys.stdin.isatty():
        return _on_a_pty(command, env, secrets)
    return _through_pipes(command, env, secrets)


def run_waiting(command: Sequence[str], env: Mapping[str, str]) -> int:
    """Run ``command`` unmasked on our own stdin, stdout and stderr, staying its parent
    (so that `run` can clean up after it); return the exit status to exit with. Raises
    OSError when it cannot start, before anything ran."""
    report_read, report_write = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        _exec_or_report(command, env, report_write)
    os.close(report_write)
    _started(report_read, pid)
    handlers = _forward_signals(pid)
    _terminal_signals_reach_it()
    while True:
        try:
            _, wait_status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    _restore(handlers)
    return _status(wait_status)


def _terminal_signals_reach_it() -> None:
    if sys.stdin.isatty():
        # A Ctrl-C on our terminal reaches the command directly (it is in our process
        # group): passing SIGINT on as well would deliver it twice.
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _status(wait_status: int) -> int:
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


def _exec_or_report(command: Sequence[str], env: Mapping[str, str], report: int) -> None:
    """In the child: exec, or send errno through ``report`` and exit 127."""
    try:
        os.execvpe(command[0], list(command), dict(env))  # noqa: S606 - the user's command
    except OSError as exc:
        os.write(report, str(exc.errno or errno.ENOENT).encode())
    os._exit(127)


def _started(report_read: int, pid: int) -> None:
    """Raise the OSError the child could not exec with (after reaping it)."""
    data = b""
    while chunk := os.read(report_read, 64):
        data += chunk
    os.close(report_read)
    if data:
        os.waitpid(pid, 0)
        code = int(data)
        raise OSError(code, os.strerror(code))


def _forward_signals(pid: int) -> dict[int, object]:
    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    return {s: signal.signal(s, forward) for s in _FORWARDED}


def _restore(handlers: dict[int, object]) -> None:
    for signum, handler in handlers.items():
        signal.signal(signum, handler)  # type: ignore[arg-type]


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except InterruptedError:
            continue


def _on_a_pty(command: Sequence[str], env: Mapping[str, str], secrets: set[str]) -> int:
    report_read, report_write = os.pipe2(os.O_CLOEXEC)
    pid, master = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(report_read)
        _exec_or_report(command, env, report_write)
    os.close(report_write)
    try:
        _started(report_read, pid)
    except OSError:
        os.close(master)
        raise
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()

    def copy_size(*_: object) -> None:
        with contextlib.suppress(OSError):
            size = fcntl.ioctl(stdout, termios.TIOCGWINSZ, struct.pack("4H", 0, 0, 0, 0))
            fcntl.ioctl(master, termios.TIOCSWINSZ, size)

    copy_size()
    handlers = _forward_signals(pid)
    handlers[signal.SIGWINCH] = signal.signal(signal.SIGWINCH, copy_size)
    saved = termios.tcgetattr(stdin)
    masker = Masker(terminal_forms(secrets))
    try:
        # TCSANOW, not setraw's default TCSAFLUSH: keys typed before the command started
        # (type-ahead) reach it instead of being thrown away
        tty.setraw(stdin, termios.TCSANOW)
        readers = [master, stdin]
        while master in readers:
            try:
                ready, _, _ = select.select(readers, [], [])
            except InterruptedError:
                continue
            if master in ready:
                try:
                    data = os.read(master, _CHUNK)
                except OSError:  # EIO: every holder of the pty's other end is gone
                    data = b""
                if not data:
                    readers.remove(master)
                else:
                    write_all(stdout, masker.feed(data))
            if stdin in ready:
                data = os.read(stdin, _CHUNK)
                if data:
                    write_all(master, data)
                else:
                    readers.remove(stdin)
        write_all(stdout, masker.flush())
    finally:
        termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        _restore(handlers)
        os.close(master)
    _, wait_status = os.waitpid(pid, 0)
    return _status(wait_status)


def _same_file(fd: int, other: int) -> bool:
    a, b = os.fstat(fd), os.fstat(other)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _through_pipes(command: Sequence[str], env: Mapping[str, str], secrets: set[str]) -> int:
    stdout, stderr = sys.stdout.fileno(), sys.stderr.fileno()
    out_read, out_write = os.pipe2(os.O_CLOEXEC)
    if _same_file(stdout, stderr):
        # One destination (2>&1, one log file): one pipe and one masker, so that a secret
        # written half to stdout and half to stderr is seen whole, as it will land.
        err_read, err_write = out_read, out_write
    else:
        err_read, err_write = os.pipe2(os.O_CLOEXEC)
    reads = sorted({out_read, err_read})
    for fd in reads:  # fewer, larger reads: the masking runs per read
        with contextlib.suppress(OSError, AttributeError):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _CHUNK)
    report_read, report_write = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.dup2(out_write, 1)
        os.dup2(err_write, 2)
        _exec_or_report(command, env, report_write)
    for fd in {out_write, err_write, report_write}:
        os.close(fd)
    try:
        _started(report_read, pid)
    except OSError:
        for fd in reads:
            os.close(fd)
        raise
    handlers = _forward_signals(pid)
    _terminal_signals_reach_it()
    # (with one pipe, the second entry replaces the first: it all goes to stdout)
    maskers = {err_read: (Masker(secrets), stderr), out_read: (Masker(secrets), stdout)}
    try:
        readers = list(reads)
        while readers:
            try:
                ready, _, _ = select.select(readers, [], [])
            except InterruptedError:
                continue
            for fd in ready:
                masker, target = maskers[fd]
                data = os.read(fd, _CHUNK)
                if data:
                    write_all(target, masker.feed(data))
                else:
                    readers.remove(fd)
                    write_all(target, masker.flush())
    finally:
        for fd in reads:
            os.close(fd)
    _, wait_status = os.waitpid(pid, 0)
    _restore(handlers)
    return _status(wait_status)
