"""Long-lived clients outlive their connections: a restart, the idle timeout and the cut
after bad tokens each close the socket, and the next call works on a fresh one.

Before the fix, the sans-IO connection was kept when the socket was replaced, and
every call after the first failure raised ``ProtocolError: client cannot receive
Welcome in state ready``, forever.
"""

from __future__ import annotations

import anyio
import anyio.to_thread
import pytest
from conftest import Daemon, RunningBroker, make_config, start_broker

from stigmer.broker.config import Paths
from stigmer.client import AsyncClient, BrokerUnavailable, Client, NotFound, Unauthenticated


def test_both_clients_survive_a_broker_restart(paths: Paths) -> None:
    daemon = Daemon(paths).start()
    try:
        with Client(paths.socket) as client:
            client.status()
            daemon.stop()
            daemon.start()
            assert client.status().pid == daemon.pid  # retried once, transparently

        async def twin() -> None:
            async with AsyncClient(paths.socket) as client:
                await client.status()
                await anyio.to_thread.run_sync(lambda: (daemon.stop(), daemon.start()))
                assert (await client.status()).pid == daemon.pid

        anyio.run(twin)
    finally:
        daemon.stop()


@pytest.mark.anyio
async def test_both_clients_survive_the_idle_timeout(paths: Paths) -> None:
    async with anyio.create_task_group() as tg:
        broker = await start_broker(tg, make_config(paths, idle_timeout=0.3))
        async with AsyncClient(broker.socket) as client:
            await client.status()
            await anyio.sleep(1.0)  # the broker closes the idle connection meanwhile
            assert (await client.list_environments()) == []

        def blocking() -> int:
            with Client(broker.socket) as client:
                client.status()
                import time

                time.sleep(1.0)
                return client.status().pid

        assert await anyio.to_thread.run_sync(blocking) > 0
        broker.stop.set()


@pytest.mark.anyio
async def test_both_clients_reconnect_after_the_cut_for_bad_tokens(
        broker: RunningBroker) -> None:
    async with AsyncClient(broker.socket) as admin:
        token = (await admin.create_context("cut")).token
    async with AsyncClient(broker.socket) as client:
        for _ in range(3):  # the third failure closes the connection
            with pytest.raises(Unauthenticated):
                await client.fetch_context("stg_not-a-token")
        assert (await client.fetch_context(token)).execution_id == "cut"

    def blocking() -> str:
        with Client(broker.socket) as client:
            for _ in range(3):
                with pytest.raises(Unauthenticated):
                    client.fetch_context("stg_not-a-token")
            return client.fetch_context(token).execution_id

    assert await anyio.to_thread.run_sync(blocking) == "cut"


@pytest.mark.anyio
async def test_a_write_is_not_repeated_on_a_closed_connection(broker: RunningBroker) -> None:
    async with AsyncClient(broker.socket) as client:
        for _ in range(3):
            with pytest.raises(Unauthenticated):
                await client.fetch_context("stg_not-a-token")
        with pytest.raises(BrokerUnavailable):  # the broker had already cut the connection
            await client.create_context("maybe")
        with pytest.raises(NotFound):  # and the create was not sent again behind our back
            await client.get_context("maybe")

