"""`mcp proxy` and `mcp render`, driven by the official MCP Python SDK.

The server (tests/cli/mcp_server.py) and the client are the SDK's: nobody here wrote the
protocol they speak. The server answers with its secrets in every encoded form; the
client must see only masks, and every message it receives must be valid JSON-RPC.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import cli_env, run_cli
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp import types as mcp_types

from stigmer.broker.cli.maskforms import mask_patterns
from stigmer.broker.cli.masking import MASK
from stigmer.broker.cli.mcpproxy import JsonMasker
from stigmer.broker.config import Paths
from stigmer.client import Client, variables

from .mcp_server import forms

SERVER = str(Path(__file__).with_name("mcp_server.py"))
MASKED = MASK.decode()
TOKEN = 'sentinel-Tok/en+=?x"y\\z-4e1b'
PEM = ("-----BEGIN SENTINEL KEY-----\nMIIsentinelLineOne0123456789\n"
       "MIIsentinelLineTwo9876543210\n-----END SENTINEL KEY-----")
SHORT = "abc"  # under the minimum length: not masked, and `mcp proxy` says so by name
PLAIN = "plain-visible-value"
SECRETS = {"MCPT_TOKEN": TOKEN, "MCPT_PEM": PEM, "MCPT_SHORT": SHORT}


@pytest.fixture
def store() -> None:
    """SQLite is enough here: nothing of this touches the store's code."""
    return None


@pytest.fixture
def token(cli_broker: Paths) -> str:
    with Client(cli_broker.socket) as client:
        created = client.create_context("mcp-run", runtime=variables(
            {"MCPT_PLAIN": PLAIN}, SECRETS))
    assert created.token
    return created.token


def write_config(path: Path, servers: dict[str, Any]) -> Path:
    path.write_text(json.dumps({"mcpServers": servers}))
    return path


def echo_server(env: dict[str, str], *args: str) -> dict[str, Any]:
    return {"command": sys.executable, "args": [SERVER, *args], "env": env}


PLACEHOLDERS = {"MCPT_TOKEN": "${.secrets.MCPT_TOKEN}", "MCPT_PEM": "${.secrets.MCPT_PEM}",
                "MCPT_SHORT": "${.secrets.MCPT_SHORT}", "MCPT_PLAIN": "${MCPT_PLAIN}"}


def proxy_argv(config: Path, name: str = "echo", *extra: str) -> list[str]:
    return [sys.executable, "-m", "stigmer.broker", "mcp", "proxy", "--server", name,
            "--config", str(config), *extra]


def digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


async def call_reveal(params: StdioServerParameters, errlog: Path) -> dict[str, Any]:
    """Call the server's tool through the SDK's client; return what it answered."""
    received: list[object] = []

    async def handler(message: object) -> None:
        received.append(message)

    with errlog.open("w") as log:
        async with stdio_client(params, errlog=log) as (read, write), \
                ClientSession(read, write, message_handler=handler) as session:
            await session.initialize()
            result = await session.call_tool("reveal", {})
    # the SDK hands a line that is not a JSON-RPC message to the handler as an exception
    assert not [m for m in received if isinstance(m, Exception)], received
    assert not result.is_error
    block = result.content[0]
    assert isinstance(block, mcp_types.TextContent)
    answer: dict[str, Any] = json.loads(block.text)
    return answer


def assert_masked_in_every_form(answer: dict[str, Any]) -> None:
    for key in ("MCPT_TOKEN", "MCPT_PEM"):
        for form, value in forms(SECRETS[key]).items():
            seen = answer["forms"][key][form]
            assert seen != value and MASKED in seen, (key, form, seen)
    assert answer["forms"]["MCPT_PLAIN"]["raw"] == PLAIN  # plain values stay
    assert answer["forms"]["MCPT_SHORT"]["raw"] == SHORT  # under the minimum length


def test_json_masking_keeps_every_message_valid_json() -> None:
    secret = 'tok"en\\sentinel'
    masker = JsonMasker(mask_patterns([secret]))
    message = {"jsonrpc": "2.0", "id": 7, "result": {
        secret: [secret, {"deep": f"pre {secret} post"}, 12345678],
        "escaped": "\\u0074ok", "text": json.dumps({"env": {"K": secret}})}}
    line = json.dumps(message).encode() + b"\n"
    # a server may spell any character as \\uXXXX: still masked, since we mask decoded text
    spelled = line.replace(b"tok", b"\\u0074ok")
    for raw in (line, spelled):
        out = masker.line(raw)
        assert out.endswith(b"\n") and out.count(b"\n") == 1
        decoded = json.loads(out)
        assert decoded["id"] == 7
        assert secret not in json.dumps(decoded) and "sentinel" not in out.decode()
    numbers = JsonMasker(mask_patterns(["12345678"]))
    out = json.loads(numbers.line(b'{"id": 12345678, "result": {"n": 12345678}}\n'))
    assert out == {"id": 12345678, "result": {"n": MASK.decode()}}
    # not JSON: masked as bytes, passed on
    assert numbers.line(b"oops 12345678\n") == b"oops " + MASK + b"\n"
    # a request the server sends carries an id it chose: a string id is masked too
    sampling = json.loads(masker.line(json.dumps(
        {"jsonrpc": "2.0", "id": f"req-{secret}", "method": "sampling/createMessage"}
    ).encode() + b"\n"))
    assert "sentinel" not in json.dumps(sampling) and sampling["id"].startswith("req-")


@pytest.mark.anyio
async def test_sdk_client_through_proxy_sees_only_masks_and_the_server_got_the_values(
        cli_broker: Paths, token: str, short_dir: Path) -> None:
    config = write_config(short_dir / "servers.json", {"echo": echo_server(
        PLACEHOLDERS, "--context-file", "/stigmer/ctx.json")})
    params = StdioServerParameters(
        command=sys.executable,
        args=proxy_argv(config, "echo", "--mount", "/stigmer/ctx.json=json")[1:],
        env=cli_env(cli_broker, STIGMER_EXECUTION_TOKEN=token))
    answer = await call_reveal(params, short_dir / "proxy.err")
    # the server got the real values, in its environment and in the sealed file
    assert answer["digests"] == {k: digest(v) for k, v in
                                 {**SECRETS, "MCPT_PLAIN": PLAIN}.items()}
    fd_arg = answer["argv"][2]
    assert fd_arg.startswith("/dev/fd/")
    assert answer["file_digests"][fd_arg]["MCPT_TOKEN"] == digest(TOKEN)
    assert_masked_in_every_form(answer)
    stderr = (short_dir / "proxy.err").read_text()
    assert "not masked, shorter than 6 characters: MCPT_SHORT" in stderr
    assert "log: MCPT_TOKEN=" + MASKED in stderr  # the server's own log, masked too
    for value in (TOKEN, *PEM.splitlines()[1:3]):
        assert value not in stderr


def test_every_message_is_valid_json_rpc_and_no_value_is_in_argv(
        cli_broker: Paths, token: str, short_dir: Path) -> None:
    config = write_config(short_dir / "servers.json", {"echo": echo_server(PLACEHOLDERS)})
    with subprocess.Popen(proxy_argv(config), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE,
                          env=cli_env(cli_broker, STIGMER_EXECUTION_TOKEN=token)) as proxy:
        talk_to(proxy)


def talk_to(proxy: subprocess.Popen[bytes]) -> None:
    assert proxy.stdin is not None
    assert proxy.stdout is not None

    def send(message: dict[str, Any]) -> None:
        assert proxy.stdin is not None
        proxy.stdin.write(json.dumps({"jsonrpc": "2.0", **message}).encode() + b"\n")
        proxy.stdin.flush()

    def receive() -> bytes:
        assert proxy.stdout is not None
        line = proxy.stdout.readline()
        # each line the client reads is one JSON-RPC message, by the SDK's own schema
        mcp_types.jsonrpc_message_adapter.validate_json(line)
        return line

    send({"id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "raw", "version": "1"}}})
    lines = [receive()]
    send({"method": "notifications/initialized"})
    send({"id": 2, "method": "tools/call", "params": {"name": "reveal", "arguments": {}}})
    lines.append(receive())
    reply = json.loads(lines[-1])
    answer = json.loads(reply["result"]["content"][0]["text"])
    assert reply["id"] == 2
    assert_masked_in_every_form(answer)
    raw = b"".join(lines)
    for value in (TOKEN, PEM, TOKEN.encode().hex()):
        assert value.encode() not in raw
    # argv: neither the proxy's nor the server's holds a value (the server still runs)
    for pid in (proxy.pid, answer["pid"]):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert TOKEN.encode() not in cmdline and b"sentinel" not in cmdline
    proxy.stdin.close()  # the client goes: the server is stopped, the proxy exits
    assert proxy.wait(timeout=30) == 0
    assert not Path(f"/proc/{answer['pid']}").exists()


def test_unresolved_placeholders_refuse_to_start_naming_every_one(
        cli_broker: Paths, token: str, short_dir: Path) -> None:
    marker = short_dir / "started"
    config = write_config(short_dir / "servers.json", {"touch": {
        "command": "/bin/sh", "args": ["-c", f"touch {marker}"],
        "env": {"A": "${.secrets.MISSING_ONE}", "B": "${MISSING_TWO}",
                "C": "${.secrets.MCPT_PLAIN}", "D": "${.secrets.MCPT_TOKEN}"}}})
    result = subprocess.run(proxy_argv(config, "touch"), capture_output=True, text=True,
                            timeout=60, env=cli_env(cli_broker, STIGMER_EXECUTION_TOKEN=token))
    assert result.returncode == 1
    message = result.stderr.strip()
    assert message.count("\n") == 0
    for part in ("'touch'", "MISSING_ONE is not set", "MISSING_TWO is not set",
                 "MCPT_PLAIN is not a secret"):
        assert part in message
    assert TOKEN not in message and PLAIN not in message
    assert not marker.exists()


def test_a_secret_in_args_is_refused_with_the_reason(cli_broker: Paths, token: str,
                                                     short_dir: Path) -> None:
    config = write_config(short_dir / "servers.json", {"echo": echo_server(
        {}, "--token", "${.secrets.MCPT_TOKEN}", "--name", "${MCPT_PLAIN}")})
    result = subprocess.run(proxy_argv(config), capture_output=True, text=True, timeout=60,
                            env=cli_env(cli_broker, STIGMER_EXECUTION_TOKEN=token))
    assert result.returncode == 1
    assert "args[2]" in result.stderr and "args[4]" not in result.stderr
    assert "argv is readable" in result.stderr and "--mount" in result.stderr
    assert TOKEN not in result.stderr


@pytest.mark.parametrize("end", ["completed", "expired"])
def test_the_end_of_the_context_stops_the_server(cli_broker: Paths, short_dir: Path,
                                                 end: str) -> None:
    """Completed: found by the next check (--check-every). Expired: checked at the expiry
    itself, long before the first check (the default, 10 s) would come."""
    ttl = 5.0 if end == "expired" else 3600.0
    created_at = time.monotonic()
    with Client(cli_broker.socket) as client:
        token = client.create_context("mcp-end", runtime=variables(
            {"MCPT_PLAIN": PLAIN}, SECRETS), ttl_s=ttl).token
    assert token
    config = write_config(short_dir / "servers.json", {"echo": echo_server(PLACEHOLDERS)})
    extra = ["--check-every", "0.2s"] if end == "completed" else []
    with subprocess.Popen([*proxy_argv(config), *extra],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=cli_env(cli_broker, STIGMER_EXECUTION_TOKEN=token)) as proxy:
        server = wait_until_up(proxy)
        started = time.monotonic()
        if end == "completed":
            run_cli(cli_broker, "context", "complete", "mcp-end", "--yes", check=True)
        status = proxy.wait(timeout=30)  # stdin still open: only the context's end stops it
        if end == "completed":
            assert time.monotonic() - started < 10
        else:
            assert time.monotonic() - created_at < ttl + 3.5
        assert status == 1
        assert proxy.stderr is not None
        assert "the context ended" in proxy.stderr.read().decode()
    assert not Path(f"/proc/{server}").exists()


def wait_until_up(proxy: subprocess.Popen[bytes]) -> str:
    """Initialize the server through the proxy; return the server's pid."""
    assert proxy.stdin is not None
    assert proxy.stdout is not None
    proxy.stdin.write(b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{'
                      b'"protocolVersion":"2025-06-18","capabilities":{},'
                      b'"clientInfo":{"name":"raw","version":"1"}}}\n')
    proxy.stdin.flush()
    assert json.loads(proxy.stdout.readline())["id"] == 1
    children = Path(f"/proc/{proxy.pid}/task/{proxy.pid}/children").read_text().split()
    assert len(children) == 1
    return children[0]

REALISTIC: dict[str, dict[str, Any]] = {
    "github": {"command": sys.executable, "args": [SERVER, "--toolsets", "repos"],
               "env": {"MCPT_GITHUB_TOKEN": "ghp_sentinelGithubToken0123456789",
                       "MCPT_API_KEY": "sentinel-key-for-github-77"},
               "disabled": False, "autoApprove": ["reveal"]},
    "postgres": {"command": sys.executable, "args": [SERVER],
                 "env": {"MCPT_DATABASE_URL": "postgresql://app:sentinel-pg-pass@db/app",
                         "MCPT_API_KEY": "sentinel-key-for-postgres-88",
                         "MCPT_PLAIN": "${MCPT_PLAIN}"}},
    "remote": {"url": "https://mcp.example.invalid/sse"},
}
MOVED = {"MCPT_GITHUB_TOKEN": "ghp_sentinelGithubToken0123456789",
         "GITHUB_MCPT_API_KEY": "sentinel-key-for-github-77",
         "MCPT_DATABASE_URL": "postgresql://app:sentinel-pg-pass@db/app",
         "POSTGRES_MCPT_API_KEY": "sentinel-key-for-postgres-88"}


@pytest.mark.anyio
async def test_render_round_trips_a_realistic_multi_server_config(
        cli_broker: Paths, short_dir: Path) -> None:
    source = write_config(short_dir / "servers.json", REALISTIC)
    out = short_dir / "client.json"
    dry = run_cli(cli_broker, "mcp", "render", str(source), "--into", "mcp", "--out", str(out),
                  "--dry-run", check=True)
    assert "github: MCPT_API_KEY -> mcp/GITHUB_MCPT_API_KEY (secret)" in dry.stdout
    assert "would leave remote as it is" in dry.stdout
    assert json.loads(source.read_text())["mcpServers"] == REALISTIC  # changed nothing
    assert not out.exists()
    for value in MOVED.values():
        assert value not in dry.stdout + dry.stderr

    run_cli(cli_broker, "mcp", "render", str(source), "--into", "mcp", "--out", str(out),
            check=True)
    rendered = json.loads(out.read_text())["mcpServers"]
    kept = json.loads(source.read_text())["mcpServers"]
    with Client(cli_broker.socket) as client:
        env = client.get_environment("mcp", reveal=True)
        created = client.create_context("mcp-render", environments=["mcp"], runtime=variables(
            {"MCPT_PLAIN": PLAIN}, {}))
    assert {k: v.value for k, v in env.data.items()} == MOVED
    assert all(v.is_secret for v in env.data.values())
    assert kept["postgres"]["env"]["MCPT_API_KEY"] == "${.secrets.POSTGRES_MCPT_API_KEY}"
    assert rendered["remote"] == REALISTIC["remote"]
    assert rendered["github"]["autoApprove"] == ["reveal"]
    assert rendered["github"]["disabled"] is False
    assert "env" not in rendered["github"]
    # no value in any file: the two configs, nor anywhere in the broker's home (sealed)
    files = [source, out, *(p for p in cli_broker.home.rglob("*") if p.is_file())]
    for path in files:
        data = path.read_bytes()
        for value in MOVED.values():
            assert value.encode() not in data, (path, value)
    # the round trip: each wrapped server, started as the client's config says, gets the
    # values it had before
    for name in ("github", "postgres"):
        entry = rendered[name]
        assert [entry["command"], *entry["args"]] == [
            sys.executable, "-m", "stigmer.broker", "mcp", "proxy", "--server", name,
            "--config", str(source), "--socket", str(cli_broker.socket)]
        assert created.token
        answer = await call_reveal(StdioServerParameters(
            command=entry["command"], args=entry["args"],
            env={"STIGMER_EXECUTION_TOKEN": created.token,
                 "PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring"}),
            short_dir / f"{name}.err")
        original = REALISTIC[name]["env"]
        assert answer["digests"] == {k: digest(PLAIN if v == "${MCPT_PLAIN}" else v)
                                     for k, v in original.items()}
        assert answer["argv"][1:] == REALISTIC[name]["args"][1:]
        for form in answer["forms"]["MCPT_API_KEY"].values():
            assert "sentinel-key" not in form


def test_render_refuses_what_it_cannot_do(cli_broker: Paths, short_dir: Path) -> None:
    source = write_config(short_dir / "servers.json", REALISTIC)
    same = run_cli(cli_broker, "mcp", "render", str(source), "--into", "mcp", "--out",
                   str(source))
    assert same.returncode == 2 and "--out must differ from FILE" in same.stderr
    broken = short_dir / "broken.json"
    broken.write_text('{"servers": {}}')
    result = run_cli(cli_broker, "mcp", "render", str(broken), "--into", "mcp", "--out", "-")
    assert result.returncode == 1 and 'no "mcpServers" object' in result.stderr
    assert "Traceback" not in result.stderr
    dry = json.loads(run_cli(cli_broker, "mcp", "render", str(source), "--into", "mcp",
                             "--out", "-", "--dry-run", "--json", check=True).stdout)
    assert dry["dry_run"] is True and dry["skipped"] == ["remote"]
    assert {"server": "github", "variable": "MCPT_API_KEY",
            "key": "GITHUB_MCPT_API_KEY"} in dry["moves"]
    missing = run_cli(cli_broker, "mcp", "proxy", "--server", "nope", "--config", str(source))
    assert missing.returncode == 1
    assert "has no server 'nope' (it has: github, postgres, remote)" in missing.stderr
