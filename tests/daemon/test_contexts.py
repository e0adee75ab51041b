"""Execution contexts: merge rules, tokens, lifetimes, group access, audit, placeholders."""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from conftest import NOBODY, make_config, python_for_nobody, start_broker
from hypothesis import given, settings
from hypothesis import strategies as st
from sealed import Sealed, open_sealed

from stigmer.broker.audit import Audit
from stigmer.broker.config import Config, Paths
from stigmer.broker.contexts import Contexts, Created
from stigmer.broker.environments import Environments
from stigmer.broker.local.peer import Peer, PeerCredentials
from stigmer.broker.merge import merge
from stigmer.broker.protocol import (
    Connection,
    CreateContext,
    Error,
    FetchContext,
    Hello,
    ListEnvironments,
    Response,
    Role,
    SpecEntry,
    Variable,
)
from stigmer.broker.protocol.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unauthenticated,
)
from stigmer.client import AsyncClient, ExecutionContext, PlaceholderError

pytestmark = pytest.mark.anyio
PEER = Peer(credentials=PeerCredentials(uid=0, gid=0, pid=1), admin=True)

# ------------------------------------------------------------------ merge (pure)

names = st.sampled_from(["A", "B", "C", "D", "E"])
variables = st.dictionaries(names, st.builds(Variable, value=st.text(max_size=5),
                                             is_secret=st.booleans()), max_size=5)
specs = st.dictionaries(names, st.builds(SpecEntry, value=st.none() | st.text(max_size=5),
                                         is_secret=st.booleans()), max_size=5)


def reference_merge(spec: dict[str, SpecEntry], envs: list[dict[str, Variable]],
                    runtime: dict[str, Variable]) -> dict[str, tuple[str, bool, str]] | list[str]:
    """The rules, written as plainly as possible."""
    layers: list[tuple[str, dict[str, Variable]]] = [
        ("spec", {k: Variable(value=e.value, is_secret=e.is_secret)
                  for k, e in spec.items() if e.value is not None})]
    layers += [(f"environment:e{i}", env) for i, env in enumerate(envs)]
    layers.append(("runtime", runtime))
    out: dict[str, tuple[str, bool, str]] = {}
    for key in {k for _, layer in layers for k in layer} | set(spec):
        setters = [(src, layer[key]) for src, layer in layers if key in layer]
        if not setters:
            continue
        source, winner = setters[-1]
        secret = any(v.is_secret for _, v in setters) or (key in spec and spec[key].is_secret)
        out[key] = (winner.value, secret, source)
    missing = sorted(k for k in spec if k not in out)
    return missing if missing else out


@settings(max_examples=400, deadline=None)
@given(specs, st.lists(variables, max_size=4), variables)
def test_merge_matches_the_reference_model(spec: dict[str, SpecEntry],
                                           envs: list[dict[str, Variable]],
                                           runtime: dict[str, Variable]) -> None:
    expected = reference_merge(spec, envs, runtime)
    layers = [(f"e{i}", env) for i, env in enumerate(envs)]
    if isinstance(expected, list):
        with pytest.raises(FailedPrecondition) as info:
            merge(spec, layers, runtime)
        assert ", ".join(expected) in info.value.message
        return
    merged = merge(spec, layers, runtime)
    got = {k: (v.value, v.is_secret, merged.provenance[k]) for k, v in merged.variables.items()}
    assert got == expected


# ----------------------------------------------------- contexts with a fake clock


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def parts(short_dir: Path) -> AsyncIterator[tuple[Contexts, Environments, Clock, Sealed]]:
    vault = await open_sealed(short_dir / "local.db",
                             key_file=short_dir / "master.key")
    clock = Clock()
    envs = vault.environments()
    audit = Audit(vault.store, vault.vault, clock=clock)
    contexts = Contexts(vault.store, vault.vault, envs, audit, clock=clock)
    await contexts.load()
    yield contexts, envs, clock, vault
    await audit.flush()
    await vault.close()


def create(execution_id: str = "exec-1", **kw: Any) -> CreateContext:
    return CreateContext(id=1, execution_id=execution_id, **kw)


def tok(created: Created) -> str:
    """The first token of a context created with one."""
    assert created.token is not None
    return created.token.token


async def test_the_design_story(parts: tuple[Contexts, Environments, Clock, Sealed]) -> None:
    contexts, envs, _clock, _ = parts
    await envs.put("base", {"LOG_LEVEL": Variable(value="info"),
                            "TIMEOUT": Variable(value="30s")})
    await envs.put("prod", {"LOG_LEVEL": Variable(value="warn"),
                            "GITHUB_TOKEN": Variable(value="ghp_x", is_secret=True)})
    spec = {"LOG_LEVEL": SpecEntry(value="debug"), "GITHUB_TOKEN": SpecEntry(is_secret=True),
            "MODEL": SpecEntry(value="small")}
    created = await contexts.create(create(env_spec=spec, environments=["base", "prod"],
                                           runtime={"MODEL": Variable(value="large")}), PEER)
    assert tok(created).startswith("stg_") and len(tok(created)) == 47
    provenance = {k.key: k.source for k in created.keys}
    assert provenance == {"LOG_LEVEL": "environment:prod", "TIMEOUT": "environment:base",
                          "GITHUB_TOKEN": "environment:prod", "MODEL": "runtime"}
    fetched = await contexts.fetch(tok(created), PEER)
    assert {k: v.value for k, v in fetched.variables().items()} == {
        "LOG_LEVEL": "warn", "TIMEOUT": "30s", "GITHUB_TOKEN": "ghp_x", "MODEL": "large"}
    # frozen at creation
    await envs.put("prod", {"LOG_LEVEL": Variable(value="error")})
    assert (await contexts.fetch(tok(created), PEER)).variables()["LOG_LEVEL"].value == "warn"
    await contexts.complete("exec-1", PEER)
    with pytest.raises(Unauthenticated):
        await contexts.fetch(tok(created), PEER)


async def test_creation_errors(parts: tuple[Contexts, Environments, Clock, Sealed]) -> None:
    contexts, _envs, _, _ = parts
    with pytest.raises(NotFound, match="'nope'"):
        await contexts.create(create(environments=["nope"]), PEER)
    with pytest.raises(FailedPrecondition, match="A, B"):
        await contexts.create(create(env_spec={"B": SpecEntry(), "A": SpecEntry(),
                                               "C": SpecEntry(value="c")}), PEER)
    await contexts.create(create(), PEER)
    with pytest.raises(AlreadyExists):
        await contexts.create(create(), PEER)


async def test_every_token_failure_looks_the_same(
        parts: tuple[Contexts, Environments, Clock, Sealed]) -> None:
    contexts, _, clock, _ = parts
    short = await contexts.create(create("short", token_ttl_s=60), PEER)
    once = await contexts.create(create("once", max_uses=1), PEER)
    gone = await contexts.create(create("gone"), PEER)
    await contexts.complete("gone", PEER)
    await contexts.fetch(tok(once), PEER)  # counted in the store before it returns
    clock.now += 61
    messages = set()
    for token in (tok(short), tok(once), tok(gone), "stg_unknown", "x"):
        with pytest.raises(Unauthenticated) as info:
            await contexts.fetch(token, PEER)
        messages.add(info.value.message)
    assert len(messages) == 1


async def test_tokens_open_only_their_context(
        parts: tuple[Contexts, Environments, Clock, Sealed]) -> None:
    contexts, _, _, _ = parts
    a = await contexts.create(create("a", runtime={"V": Variable(value="a")}), PEER)
    b = await contexts.create(create("b", runtime={"V": Variable(value="b")}), PEER)
    extra, _ = await contexts.issue("a", 60, None, PEER)
    assert (await contexts.fetch(tok(a), PEER)).variables()["V"].value == "a"
    assert (await contexts.fetch(tok(b), PEER)).variables()["V"].value == "b"
    assert (await contexts.fetch(extra.token, PEER)).execution_id == "a"


async def test_expired_contexts_are_swept_and_restart_keeps_live_ones(short_dir: Path) -> None:
    clock = Clock()

    async def open_parts() -> tuple[Sealed, Contexts, Audit]:
        vault = await open_sealed(short_dir / "local.db",
                                 key_file=short_dir / "master.key")
        audit = Audit(vault.store, vault.vault, clock=clock)
        contexts = Contexts(vault.store, vault.vault, vault.environments(), audit, clock=clock)
        await contexts.load()
        return vault, contexts, audit

    vault, contexts, audit = await open_parts()
    await contexts.create(create("short", ttl_s=30), PEER)
    long = await contexts.create(create("long", ttl_s=3600, token_ttl_s=3600), PEER)
    assert await contexts.live_counts() == (2, 2)
    clock.now += 31
    assert await contexts.live_counts() == (1, 1)
    await contexts.sweep()
    await audit.flush()
    assert await vault.store.read_one("SELECT count(*) FROM contexts") == 1
    await vault.close()
    vault, contexts, audit = await open_parts()
    try:
        assert (await contexts.fetch(tok(long), PEER)).execution_id == "long"
        events = [r.event for r in (await audit.list(None, 100))[0]]
        assert "context.expired" in events
    finally:
        await audit.flush()
        await vault.close()


async def test_uses_survive_a_restart(short_dir: Path) -> None:
    async def open_parts() -> tuple[Sealed, Contexts, Audit]:
        vault = await open_sealed(short_dir / "local.db",
                                 key_file=short_dir / "master.key")
        audit = Audit(vault.store, vault.vault)
        contexts = Contexts(vault.store, vault.vault, vault.environments(), audit)
        await contexts.load()
        return vault, contexts, audit

    vault, contexts, audit = await open_parts()
    created = await contexts.create(create(max_uses=2), PEER)
    for _ in range(2):  # a bounded use is durable before the fetch returns
        await contexts.fetch(tok(created), PEER)
    await vault.close()
    vault, contexts, audit = await open_parts()
    try:
        with pytest.raises(Unauthenticated):
            await contexts.fetch(tok(created), PEER)
    finally:
        await audit.flush()
        await vault.close()


async def test_tampered_context_fails_alone(short_dir: Path,
                                            parts: tuple[Contexts, Environments, Clock, Sealed]
                                            ) -> None:
    contexts, _, _, vault = parts
    a = await contexts.create(create("a", runtime={"S": Variable(value="a", is_secret=True)}),
                              PEER)
    b = await contexts.create(create("b", runtime={"S": Variable(value="b", is_secret=True)}),
                              PEER)
    sealed_b = await vault.store.read_one("SELECT sealed FROM contexts WHERE execution_id='b'")
    contexts.index.by_execution["a"].sealed = sealed_b  # what a swapped row loads as
    from stigmer.broker.protocol.errors import Internal

    with pytest.raises(Internal, match="'a' cannot be opened"):
        await contexts.fetch(tok(a), PEER)
    assert (await contexts.fetch(tok(b), PEER)).variables()["S"].value == "b"


async def test_audit_chain_detects_tampering(short_dir: Path,
                                             parts: tuple[Contexts, Environments, Clock, Sealed]
                                             ) -> None:
    contexts, _, _, _vault = parts
    created = await contexts.create(create(), PEER)
    for _ in range(3):
        await contexts.fetch(tok(created), PEER)
    audit = contexts._audit
    verified = await audit.verify()
    assert verified.records == 3 and verified.ok  # created, issued, the three fetches counted
    records = (await audit.list(None, 10))[0]
    assert (records[2].event, records[2].detail) == ("fetch", "count=3")
    with sqlite3.connect(short_dir / "local.db") as db:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute("UPDATE audit SET outcome = 'denied' WHERE seq = 2")
        db.execute("DROP TRIGGER audit_no_update")
        db.execute("UPDATE audit SET outcome = 'denied' WHERE seq = 2")
    verified = await audit.verify()
    assert verified.first_broken == 2 and "record 2" in verified.reason
    records = (await audit.list(None, 100))[0]
    assert all(tok(created) not in msgspec.json.encode(r).decode() for r in records)


# ------------------------------------------------------- through the real socket


async def test_async_client_fetch_and_release(broker: Any) -> None:
    async with AsyncClient(broker.socket) as client:
        await client.put_environment("e", {"S": Variable(value="v", is_secret=True)})
        created = await client.create_context("x", environments=["e"])
        ctx = await client.fetch_context(created.token)
        assert ctx["S"] == "v" and ctx.is_secret("S") and ctx.execution_id == "x"
        await client.release_context(created.token)
        with pytest.raises(Unauthenticated):
            await client.fetch_context(created.token)


async def test_repeated_bad_tokens_close_the_connection(broker: Any) -> None:
    async with AsyncClient(broker.socket) as client:
        for _ in range(3):
            with pytest.raises(Unauthenticated):
                await client.fetch_context("stg_wrong")
        with pytest.raises(NotFound):  # cut: the next request goes out on a new connection
            await client.issue_token("nothing")
        await client.status()
    async with AsyncClient(broker.socket) as other:  # others are unaffected
        await other.status()


def _exchange_as_nobody(python: str, path: Path, messages: list[Any]) -> list[Response]:
    client = Connection(Role.CLIENT)
    wire = b"".join(client.send(m) for m in messages).hex()
    script = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(sys.argv[1])\n"
        "s.sendall(bytes.fromhex(sys.argv[2])); s.shutdown(socket.SHUT_WR)\n"
        "data=b''\n"
        "while True:\n    chunk=s.recv(65536)\n    if not chunk: break\n    data+=chunk\n"
        "print(data.hex())\n")
    out = subprocess.run([python, "-c", script, str(path), wire], user=NOBODY, group=NOBODY,
                         extra_groups=[], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    conn = Connection(Role.CLIENT)
    conn.receive_data(bytes.fromhex(out.stdout.strip()))
    conn.receive_data(b"")
    replies = []
    while isinstance(event := conn.next_event(), Response):
        replies.append(event)
    return replies


async def test_runner_group_may_fetch_and_nothing_else(paths: Paths) -> None:
    python = python_for_nobody()
    import grp

    group = grp.getgrgid(NOBODY).gr_name  # nobody's primary group (nogroup)
    base = make_config(paths)
    config = Config(paths=base.paths, limits=base.limits, allow_group=group, use_keyring=False)
    async with anyio.create_task_group() as tg:
        running = await start_broker(tg, config)
        os.chmod(paths.socket.parent.parent, 0o755)  # the test's temp dir, so nobody can reach
        assert oct(os.stat(paths.socket).st_mode & 0o777) == "0o660"
        assert oct(os.stat(paths.socket.parent).st_mode & 0o777) == "0o750"
        async with AsyncClient(running.socket) as client:
            created = await client.create_context(
                "grp", runtime={"S": Variable(value="for-runner", is_secret=True)})
        replies = await anyio.to_thread.run_sync(
            _exchange_as_nobody, python, paths.socket,
            [Hello(id=1, version=1), FetchContext(id=2, token=created.token),
             ListEnvironments(id=3), CreateContext(id=4, execution_id="evil")])
        assert replies[1].variables["S"].value == "for-runner"  # type: ignore[attr-defined]
        for reply in replies[2:]:
            assert isinstance(reply, Error) and reply.code == "permission_denied"
        running.stop.set()


# ------------------------------------------------------------ the client's view


CTX = ExecutionContext("e1", 0.0, {"URL": Variable(value="https://x"),
                                   "KEY": Variable(value="sk-live-123", is_secret=True),
                                   "EMPTY": Variable(value="", is_secret=True)})


def test_context_mapping_and_repr() -> None:
    assert CTX["URL"] == "https://x" and "KEY" in CTX and len(CTX) == 3
    assert sorted(CTX) == ["EMPTY", "KEY", "URL"]
    assert CTX.is_secret("KEY") and not CTX.is_secret("URL")
    assert CTX.as_env()["KEY"] == "sk-live-123"
    assert "sk-live-123" not in repr(CTX) and "sk-live-123" not in str(CTX)
    assert "https://x" in repr(CTX)
    with pytest.raises(TypeError):
        CTX["URL"] = "y"  # type: ignore[index]


def test_placeholders() -> None:
    config = {"mcp": {"url": "${URL}/v1", "headers": ["Bearer ${.secrets.KEY}"],
                      "literal": "$${URL} stays", "n": 3}}
    assert CTX.resolve(config) == {"mcp": {"url": "https://x/v1",
                                           "headers": ["Bearer sk-live-123"],
                                           "literal": "${URL} stays", "n": 3}}
    with pytest.raises(PlaceholderError) as info:
        CTX.resolve(["${NOPE}", "${.secrets.URL}", "${ALSO_NOPE}", "${bad name}"])
    message = info.value.message
    assert "NOPE is not set" in message and "ALSO_NOPE is not set" in message
    assert "URL is not a secret" in message and "malformed placeholder" in message
    assert isinstance(info.value, InvalidArgument)


def test_log_filter_masks_secrets_and_token(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("runner-test")
    handler = logging.StreamHandler()
    secret_filter = CTX.log_filter(also=["stg_token_value"])
    caplog.handler.addFilter(secret_filter)
    try:
        with caplog.at_level(logging.INFO, logger="runner-test"):
            logger.info("calling with %s and %s", CTX["KEY"], "stg_token_value")
            try:
                raise ValueError(f"bad key {CTX['KEY']}")
            except ValueError:
                logger.exception("failed")
    finally:
        caplog.handler.removeFilter(secret_filter)
        handler.close()
    assert "sk-live-123" not in caplog.text and "stg_token_value" not in caplog.text
    assert "***" in caplog.text


async def test_counted_fetches_keep_the_log_in_order(
        parts: tuple[Contexts, Environments, Clock, Sealed]) -> None:
    contexts, _, _, _ = parts
    a = await contexts.create(create("a"), PEER)
    await contexts.create(create("b"), PEER)
    await contexts.fetch(tok(a), PEER)
    await contexts.fetch(tok(a), PEER)
    with pytest.raises(Unauthenticated):
        await contexts.fetch("stg_wrong", RUNNER_PEER)
    await contexts.complete("b", PEER)
    await contexts.fetch(tok(a), PEER)
    records = (await contexts._audit.list(None, 100))[0]
    tail = [(r.event, r.outcome, r.execution_id, r.detail) for r in records[4:]]
    assert tail == [("fetch", "granted", "a", "count=2"), ("fetch", "denied", "", ""),
                    ("token.revoked", "ok", "b", ""), ("context.completed", "ok", "b", ""),
                    ("fetch", "granted", "a", "")]
    assert (await contexts._audit.verify()).ok


RUNNER_PEER = Peer(credentials=PeerCredentials(uid=1000, gid=1000, pid=77), admin=False)
