from __future__ import annotations

import uuid
from typing import Any

import pytest

from statekit.stores import Store
from statekit.stores.redis import RedisStore
from statekit.testing import RedisServer

from .store_contract import SharedStoreContract


class TestRedisStore(SharedStoreContract):
    @pytest.fixture(autouse=True)
    def _server(self, redis_server: RedisServer) -> None:
        self.server = redis_server

    def make_store(self) -> Store:
        return RedisStore(self.server.url, prefix=f"t{uuid.uuid4().hex[:6]}")


def test_async_events_use_the_asyncio_client_and_never_block_the_loop(
    redis_server: RedisServer,
) -> None:
    import asyncio

    import redis.asyncio as aioredis

    from statekit import SessionState, StateEngine

    async def main() -> tuple[list[int], int, bool]:
        client = aioredis.Redis.from_url(redis_server.url)
        evalsha = client.evalsha
        sent = 0

        def counted(*args: Any) -> Any:
            nonlocal sent
            sent += 1
            return evalsha(*args)

        client.evalsha = counted  # type: ignore[method-assign,assignment]
        store = RedisStore(
            redis_server.url, async_client=client, prefix=f"a{uuid.uuid4().hex[:6]}"
        )
        engine = StateEngine(store, app="shop")
        log: SessionState[list[int]] = engine.session_state("log", [])
        sid = engine.open_session()
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0)

        async def writer(i: int) -> None:
            async with engine.aevent(sid) as ev:
                ev[log].append(i)

        tick_task = asyncio.create_task(ticker())
        await asyncio.wait_for(asyncio.gather(*(writer(i) for i in range(30))), 30)
        stop.set()
        await tick_task
        used_async = sent >= 60  # each event's load and commit
        values = log.get(sid)
        engine.shutdown()
        store.close()
        await client.aclose()
        return values, ticks, used_async

    values, ticks, used_async = asyncio.run(main())
    assert sorted(values) == list(range(30))
    assert used_async  # loads and commits went through the asyncio client
    assert ticks > 30  # the loop kept running while events waited on Redis
