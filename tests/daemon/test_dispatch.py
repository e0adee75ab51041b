"""The dispatcher's one entry: what memory answers is answered at once, with no system
call and no attestation; everything else comes back as a ``Later``, past the same
permission check."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from sealed import open_sealed

from stigmer.broker.config import Config, Paths
from stigmer.broker.contexts import Fetch
from stigmer.broker.contexts.index import Attest, Match
from stigmer.broker.daemon.attest import ProcessPin
from stigmer.broker.daemon.startup import compose
from stigmer.broker.dispatch import Counters, Dispatcher, Later
from stigmer.broker.local.peer import Attestation, Peer, PeerCredentials, peer_credentials
from stigmer.broker.protocol import (
    ContextCreated,
    ContextFetchedRaw,
    CreateContext,
    FetchContext,
    GetStatus,
    Hello,
    PutEnvironment,
    Variable,
    Welcome,
)
from stigmer.broker.protocol.errors import PermissionDenied

pytestmark = pytest.mark.anyio

OWNER = Peer(PeerCredentials(uid=os.getuid(), gid=os.getgid(), pid=os.getpid()), admin=True)

#: what may not happen while a request is answered inside data_received: any audited
#: I/O (Python's runtime audit events), and any use of the peer's /proc pin
_SILENT: list[str] | None = None


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if _SILENT is not None and not event.startswith(("object.", "sys._getframe",
                                                      "code.__new__", "builtins.id")):
        _SILENT.append(event)


sys.addaudithook(_hook)  # audit hooks cannot be removed; this one is off until asked


@contextlib.contextmanager
def no_system_calls() -> Iterator[list[str]]:
    """Record every audited event (open, socket, subprocess, os.* ...) meanwhile."""
    global _SILENT
    seen: list[str] = []
    _SILENT = seen
    try:
        yield seen
    finally:
        _SILENT = None


class Untouchable:
    """A peer process that must not be attested on the fast path."""

    def attest(self) -> Attestation:
        raise AssertionError("attested inside data_received")

    def held(self) -> contextlib.AbstractContextManager[None]:
        raise AssertionError("attested inside data_received")


@pytest.fixture
async def dispatcher(short_dir: Path) -> AsyncIterator[Dispatcher]:
    paths = Paths(home=short_dir, socket=short_dir / "b.sock")
    sealed = await open_sealed(paths.store)
    try:
        broker = await compose(Config(paths=paths), sealed.store, sealed.vault, Counters(),
                               socket_path=paths.socket, request_shutdown=lambda: None)
        yield broker.dispatcher
        await broker.maintenance.close()
    finally:
        await sealed.close()


async def _create(dispatcher: Dispatcher, execution_id: str, **fields: Any) -> ContextCreated:
    reply = await dispatcher.answer(CreateContext(
        id=1, execution_id=execution_id, runtime={"K": Variable(value="v", is_secret=True)},
        **fields), OWNER)
    assert isinstance(reply, ContextCreated)
    return reply


async def test_what_memory_answers_is_answered_at_once_with_no_system_call(
        dispatcher: Dispatcher) -> None:
    """A fetch by an unbounded token, and the handshake: answered in the call, with no
    audited event (no open, no socket, no subprocess) and the peer never attested."""
    token = (await _create(dispatcher, "free")).token
    runner = Peer(OWNER.credentials, admin=False, process=Untouchable())
    with no_system_calls() as seen:
        fetched = dispatcher.handle(FetchContext(id=2, token=token), runner)
        welcome = dispatcher.handle(Hello(id=3, version=1), runner)
    assert seen == []
    assert isinstance(fetched, ContextFetchedRaw) and fetched.execution_id == "free"
    assert isinstance(welcome, Welcome)


async def test_what_must_wait_says_so_without_doing_it(dispatcher: Dispatcher) -> None:
    """A bounded token (its use is counted in the store first), a grant (the process is
    attested: /proc, perhaps a binary's hash) and any other request: a Later, and
    nothing of the waiting done in the call."""
    bounded = (await _create(dispatcher, "bounded", max_uses=1)).token
    await _create(dispatcher, "granted", runners=[f"user:{os.getuid()}"])
    untouchable = Peer(OWNER.credentials, admin=True, process=Untouchable())
    requests = (FetchContext(id=2, token=bounded), FetchContext(id=3, execution_id="granted"),
                GetStatus(id=4))
    with no_system_calls() as seen:
        replies = [dispatcher.handle(request, untouchable) for request in requests]
    assert seen == []
    assert all(isinstance(reply, Later) for reply in replies), replies


async def test_a_grant_is_attested_in_the_later_not_in_the_call(
        dispatcher: Dispatcher) -> None:
    """With a real pin of this process: the call reads nothing of /proc (an attestation
    reads it, and may hash a 100 MB binary); awaiting the Later attests and serves."""
    await _create(dispatcher, "granted", runners=[f"user:{os.getuid()}"])
    ours, theirs = socket.socketpair()
    with ours, theirs:
        creds = peer_credentials(ours)
        pin = ProcessPin(ours, creds)
        runner = Peer(creds, admin=False, process=pin)
        with no_system_calls() as seen:
            later = dispatcher.handle(FetchContext(id=2, execution_id="granted"), runner)
        assert seen == [] and isinstance(later, Later)
        fetched = await later.answer()
        assert isinstance(fetched, ContextFetchedRaw) and fetched.execution_id == "granted"
        pin.close()


async def test_the_permission_check_is_passed_on_both_paths(dispatcher: Dispatcher) -> None:
    """A runner-group peer's admin request is refused in the call itself, before any
    Later exists; its fetches are not."""
    token = (await _create(dispatcher, "free")).token
    runner = Peer(OWNER.credentials, admin=False, process=Untouchable())
    for request in (PutEnvironment(id=2, name="x", data={}), GetStatus(id=3)):
        with pytest.raises(PermissionDenied):
            dispatcher.handle(request, runner)
    assert isinstance(dispatcher.handle(FetchContext(id=4, token=token), runner),
                      ContextFetchedRaw)


def test_a_pin_closed_while_a_worker_reads_through_it_stays_open_until_it_is_done() -> None:
    """The connection may go while its attestation runs in a worker thread; the /proc
    handles must not close (and their numbers be reused for other files) under it."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        pin = ProcessPin(ours, peer_credentials(ours))
        with pin.held():
            pin.close()  # the connection is lost meanwhile
            assert pin.attest().binary().path == os.path.realpath(sys.executable)
        with pytest.raises(LookupError), pin.held():
            pass
        with pytest.raises(LookupError):
            pin.attest()


async def test_a_grant_that_changed_while_the_process_was_matched_is_matched_again(
        dispatcher: Dispatcher) -> None:
    """The process is matched outside the index (in the task), so the grant may change
    meanwhile (completed, and created again with other runners): a match against the
    old selectors must not open the new context."""
    await _create(dispatcher, "granted", runners=[f"user:{os.getuid()}"])
    index = dispatcher.contexts.index
    fetch = Fetch(OWNER, execution_id="granted")
    need = index.fetch(fetch)
    assert isinstance(need, Attest)
    fetch.matched = Match(need.runners, need.runners[0])  # it matched the grant as it was
    grant = index.by_execution["granted"].grant
    assert grant is not None
    grant.runners = ("user:4242",)  # ... which then changed
    assert index.fetch(fetch) == Attest(("user:4242",))
