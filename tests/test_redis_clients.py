"""Redis clients under bursts larger than their pools, against a private redis-server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from harness import RedisServer, start_redis

from broker.redis_clients import async_client, sync_client

POOL_SIZE = 4
CALLERS = 60


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    server = start_redis(tmp_path / "redis")
    yield server
    server.process.terminate()
    server.process.wait(10)


def test_async_burst_waits_for_connections(server: RedisServer) -> None:
    async def burst() -> list[object]:
        client = async_client(server.url, POOL_SIZE)

        async def publish(number: int) -> object:
            async with client.pipeline(transaction=True) as pipe:
                pipe.set(f"marker:{number}", b"1", ex=60)
                pipe.lpush("queue", b"message")
                return await pipe.execute()

        try:
            return await asyncio.gather(
                *(publish(n) for n in range(CALLERS)), return_exceptions=True
            )
        finally:
            await client.aclose()

    results = asyncio.run(burst())

    assert [r for r in results if isinstance(r, BaseException)] == []
    with server.client() as check:
        assert check.llen("queue") == CALLERS


def test_sync_burst_waits_for_connections(server: RedisServer) -> None:
    client = sync_client(server.url, POOL_SIZE)

    def push(number: int) -> int:
        pipe = client.pipeline(transaction=False)
        pipe.set(f"marker:{number}", b"1", ex=60)
        pipe.lpush("queue", b"message")
        return pipe.execute()[1]

    with ThreadPoolExecutor(CALLERS) as threads:
        lengths = list(threads.map(push, range(CALLERS)))
    client.close()

    assert sorted(lengths) == list(range(1, CALLERS + 1))
