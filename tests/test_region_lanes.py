"""Region liveness per lane, on a real Redis: a region may run a worker pool per lane."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from harness import RedisServer
from support import wait_for

from broker.circuits import CircuitBreaker, region_alive_key
from workers.heartbeat import start_heartbeat

# A database number of the tests' private Redis that no other test uses.
REDIS_DB = 10
TARGETS = [("openai", "us"), ("openai", "hk")]


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    url = f"redis://127.0.0.1:{redis_server.port}/{REDIS_DB}"
    yield url
    with redis.Redis.from_url(url) as client:
        client.flushdb()


def _route(lane: str) -> list[dict[str, str]]:
    return [{"provider": p, "region": r, "lane": lane} for p, r in TARGETS]


def test_batch_pool_keeps_only_batch_alive(redis_url: str) -> None:
    us_batch = start_heartbeat(redis_url, "us", "us-batch@test", region="us", lanes=("batch",))
    hk_both = start_heartbeat(
        redis_url, "hk", "hk@test", region="hk", lanes=("interactive", "batch")
    )
    client = redis.Redis.from_url(redis_url)
    try:
        wait_for(
            lambda: (
                client.exists(region_alive_key("us", "batch"), region_alive_key("hk", "batch")) == 2
            ),
            what="the heartbeats",
        )
        breaker = CircuitBreaker(client)

        assert breaker.unavailable(TARGETS, "batch") == set()
        assert breaker.unavailable(TARGETS, "interactive") == {("openai", "us")}
        assert client.exists(region_alive_key("us", "interactive")) == 0
        # An interactive job whose region has only a batch pool moves to hk.
        assert breaker.first_usable(_route("interactive"), [0, 1]) == 1
        assert breaker.first_usable(_route("batch"), [0, 1]) == 0
    finally:
        us_batch.set()
        hk_both.set()
        client.close()
