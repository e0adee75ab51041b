"""`run --mount PATH=FORMAT`: the context as a file that never touches disk.

The file is a memfd, sealed against writes and growth, passed to the command as
an open descriptor; an argument that is ``PATH``, or ends in ``=PATH`` (as
``--config=PATH``), becomes ``/dev/fd/N``; ``PATH`` inside a longer argument
(``PATH.bak``) is left alone. Where there is no memfd (macOS), a pipe stands in
for it (then the file can be read once, and holds at most a pipe's buffer, 64 KiB).

The descriptor is a plain inherited fd: every process the command starts gets it
too, and `run` cannot take it back from them. What bounds that is time: the
memfd is not sealed against shrinking, so when the command exits `run` truncates
it to nothing (:func:`empty_mount`), and a descendant still holding it (a
daemon the command left running) then reads an empty file. What such a process
read while the command ran, it keeps. The price: the command can truncate the
file too (emptying it for itself and its descendants), though never change a
byte of it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Mapping, Sequence

from ..protocol.errors import InvalidArgument
from .common import UsageError
from .shellquote import render

__all__ = ["FORMATS", "Mount", "empty_mount", "open_mount", "parse_mount", "substitute"]

FORMATS = ("env", "json", "yaml")
_PIPE_BUFFER = 65536


class Mount:
    """One ``--mount``: the placeholder path, the format, and once opened, its fd."""

    __slots__ = ("fd", "fmt", "path")

    def __init__(self, path: str, fmt: str) -> None:
        self.path = path
        self.fmt = fmt
        self.fd = -1


def parse_mount(text: str) -> Mount:
    path, sep, fmt = text.rpartition("=")
    if not sep or not path or fmt not in FORMATS:
        raise UsageError(f"--mount {text!r}: write PATH=FORMAT, FORMAT one of "
                         f"{', '.join(FORMATS)} (e.g. --mount /etc/agent.json=json)")
    return Mount(path, fmt)


def content(variables: Mapping[str, str], fmt: str) -> bytes:
    """The variables in ``fmt``: env (as `context export --format dotenv` writes them),
    json (one object) or yaml (one mapping, every value a quoted string)."""
    if fmt == "env":
        return render(variables, "dotenv").encode()
    if fmt == "json":
        return (json.dumps(dict(variables), indent=2, sort_keys=True, ensure_ascii=False)
                + "\n").encode()
    import yaml

    return yaml.safe_dump(dict(sorted(variables.items())), default_style='"',
                          allow_unicode=True, sort_keys=True).encode()


def open_mount(mount: Mount, variables: Mapping[str, str]) -> int:
    """Create the mount's descriptor (inheritable, at offset 0); return it."""
    data = content(variables, mount.fmt)
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create(f"stigmer-mount:{os.path.basename(mount.path)}",
                             os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        # not F_SEAL_SHRINK: empty_mount truncates it when the command is done
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW
                    | fcntl.F_SEAL_SEAL)
        os.lseek(fd, 0, os.SEEK_SET)
    else:  # pragma: no cover - platforms without memfd
        if len(data) > _PIPE_BUFFER:
            raise InvalidArgument(f"--mount {mount.path}: {len(data)} bytes do not fit a pipe "
                                  "on this platform; use a smaller context")
        fd, write_end = os.pipe()
        os.write(write_end, data)
        os.close(write_end)
    os.set_inheritable(fd, True)
    mount.fd = fd
    return fd


def empty_mount(mount: Mount) -> None:
    """Truncate the mount's memfd to nothing and close it (the command has exited): any
    descendant still holding it reads an empty file from now on."""
    if mount.fd < 0:
        return
    with contextlib.suppress(OSError):  # a pipe (no memfd) cannot be truncated
        os.ftruncate(mount.fd, 0)
    os.close(mount.fd)
    mount.fd = -1


def substitute(command: Sequence[str], mounts: Sequence[Mount]) -> list[str]:
    """The command with every argument that is a mount's PATH, or ends in ``=PATH``,
    given ``/dev/fd/N`` instead; PATH inside a longer argument is left alone."""
    by_path = {mount.path: f"/dev/fd/{mount.fd}" for mount in mounts}
    out = []
    for arg in command:
        option, sep, value = arg.partition("=")
        if arg in by_path:
            arg = by_path[arg]
        elif sep and value in by_path:
            arg = f"{option}={by_path[value]}"
        out.append(arg)
    return out
