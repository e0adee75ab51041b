"""MCP client configurations: read one, resolve a server's placeholders, render one.

The format is the de-facto one of Claude Desktop, Cursor and others:
``{"mcpServers": {NAME: {"command": ..., "args": [...], "env": {...}}}}``. Other
keys (``disabled``, ``autoApprove``...) are kept as they are; a server without
``command`` (a remote ``url`` one) has no process to start, so it is neither
proxied nor rendered.

Rendering moves every literal ``env`` value into a broker environment, as a
secret, and leaves ``${.secrets.KEY}`` in its place; the client's config then
starts ``stigmer-broker mcp proxy`` for each server, which resolves them again.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..protocol.errors import InvalidArgument
from .inputs import read_text

if TYPE_CHECKING:
    from stigmer.client import ExecutionContext

__all__ = ["Move", "Rendered", "Server", "load_config", "render_config", "resolve_server"]

SERVERS_KEY = "mcpServers"


@dataclass(frozen=True)
class Server:
    """One stdio server of a config: what starts it."""

    name: str
    command: str
    args: list[str]
    env: dict[str, str]


def load_config(path: str, flag: str) -> dict[str, Any]:
    """The config in ``path``, checked; raise InvalidArgument naming what is wrong."""
    try:
        config = json.loads(read_text(path, flag))
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"{flag} {path}: not JSON (line {exc.lineno}: {exc.msg})"
                              ) from None
    servers = config.get(SERVERS_KEY) if isinstance(config, dict) else None
    if not isinstance(servers, dict):
        raise InvalidArgument(f'{flag} {path}: no "{SERVERS_KEY}" object (the format is '
                              f'{{"{SERVERS_KEY}": {{NAME: {{"command", "args", "env"}}}}}})')
    checked: dict[str, Any] = config
    for name, entry in servers.items():
        where = f'{flag} {path}: server "{name}"'
        if not isinstance(entry, dict):
            raise InvalidArgument(f"{where} is not an object")
        if "command" in entry and not isinstance(entry["command"], str):
            raise InvalidArgument(f'{where}: "command" must be a string')
        args = entry.get("args", [])
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise InvalidArgument(f'{where}: "args" must be a list of strings')
        env = entry.get("env", {})
        if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
            raise InvalidArgument(f'{where}: "env" must map names to strings')
    return checked


def server_of(config: Mapping[str, Any], name: str, path: str) -> Server:
    """The stdio server ``name`` of ``config``; raise InvalidArgument if there is none."""
    servers: dict[str, Any] = config[SERVERS_KEY]
    entry = servers.get(name)
    if entry is None:
        known = ", ".join(sorted(servers)) or "none"
        raise InvalidArgument(f"--config {path} has no server {name!r} (it has: {known})")
    if "command" not in entry:
        raise InvalidArgument(f"server {name!r} in {path} has no \"command\": only stdio "
                              "servers (a process to start) can be proxied")
    return Server(name, entry["command"], list(entry.get("args", [])),
                  dict(entry.get("env", {})))


def resolve_server(server: Server, context: ExecutionContext) -> Server:
    """``server`` with its placeholders filled from ``context``.

    Raises PlaceholderError naming every placeholder it cannot fill (names, never
    values), and InvalidArgument when a secret would land in the arguments, which
    every process on the host may read (/proc/PID/cmdline)."""
    from stigmer.client import PlaceholderError

    try:
        filled = context.resolve({"command": server.command, "args": server.args,
                                  "env": server.env})
    except PlaceholderError as exc:
        raise PlaceholderError(f"mcp server {server.name!r}: {exc.message}") from None
    secrets = context.secret_values()
    labels = ["command", *(f"args[{i}]" for i in range(len(server.args)))]
    leaking = [label for label, before, after in zip(
        labels, [server.command, *server.args], [filled["command"], *filled["args"]],
        strict=True) if any(s in after and s not in before for s in secrets)]
    if leaking:
        raise InvalidArgument(
            f"mcp server {server.name!r}: {', '.join(leaking)} would hold a secret, and "
            "argv is readable by every process on the host; pass it in "
            '"env", or give the server a file: put a PATH in "args" and add --mount '
            "PATH=FORMAT to mcp proxy (a sealed memory file, as run --mount)")
    return Server(server.name, filled["command"], filled["args"], filled["env"])


# ------------------------------------------------------------------- render


@dataclass(frozen=True)
class Move:
    """One value moved out of a config: the server, its env name, the broker key."""

    server: str
    variable: str
    key: str


@dataclass
class Rendered:
    """What :func:`render_config` makes: the config with placeholders (the proxy's), the
    client's config (every stdio server wrapped), and the values it moved out."""

    placeholders: dict[str, Any]
    client: dict[str, Any]
    moves: list[Move] = field(default_factory=list)
    values: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def render_config(config: Mapping[str, Any], proxy: list[str],
                  proxy_args: list[str]) -> Rendered:
    """Move every literal env value of ``config`` out, to a broker key named as the
    variable (``SERVER_VARIABLE`` when servers give one name different values), and
    wrap each stdio server: ``proxy[0] [*proxy[1:], --server NAME, *proxy_args]``.

    A value holding ``${`` already is a placeholder and stays. Raises InvalidArgument
    for a server that is already wrapped."""
    from ..manifests import check_var_name

    servers: dict[str, Any] = config[SERVERS_KEY]
    by_name: dict[str, set[str]] = {}
    for entry in servers.values():
        for variable, value in entry.get("env", {}).items():
            if "${" not in value:
                by_name.setdefault(variable, set()).add(value)
    rendered = Rendered(placeholders=json.loads(json.dumps(config)),
                        client=json.loads(json.dumps(config)))
    for name, entry in servers.items():
        if "command" not in entry:
            rendered.skipped.append(name)
            continue
        if _wrapped(entry):
            raise InvalidArgument(f"server {name!r} already runs stigmer-broker mcp proxy: "
                                  "render the config it reads (its --config) instead")
        env = rendered.placeholders[SERVERS_KEY][name].get("env", {})
        for variable, value in entry.get("env", {}).items():
            if "${" in value:
                continue
            key = variable if len(by_name[variable]) == 1 else _prefixed(name, variable)
            check_var_name(key, f"server {name!r}")
            if rendered.values.get(key, value) != value:
                raise InvalidArgument(f"server {name!r}: {variable} and another server's "
                                      f"variable both become {key}; rename one of them")
            rendered.values[key] = value
            rendered.moves.append(Move(name, variable, key))
            env[variable] = f"${{.secrets.{key}}}"
        wrapped = {k: v for k, v in entry.items() if k not in ("command", "args", "env")}
        wrapped.update(command=proxy[0], args=[*proxy[1:], "--server", name, *proxy_args])
        rendered.client[SERVERS_KEY][name] = wrapped
    return rendered


def _wrapped(entry: Mapping[str, Any]) -> bool:
    words = [entry["command"], *entry.get("args", [])]
    return (any(w.endswith(("stigmer-broker", "stigmer.broker")) for w in words)
            and any(words[i:i + 2] == ["mcp", "proxy"] for i in range(len(words))))


def _prefixed(server: str, variable: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", f"{server}_{variable}").upper()
