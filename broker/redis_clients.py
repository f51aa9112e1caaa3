"""Redis clients whose connection pools wait for a free connection instead of failing.

redis-py's default pool opens at most 100 connections and raises MaxConnectionsError
for the next caller. The API serves hundreds of requests at once and a worker runs
hundreds of greenlets, so a burst would fail requests that only had to wait a moment.
"""

from __future__ import annotations

import redis
import redis.asyncio as aioredis

# Seconds a caller waits for a free connection before the pool raises ConnectionError.
POOL_WAIT_S = 10.0


def sync_client(redis_url: str, max_connections: int) -> redis.Redis:
    """Return a client for threads and greenlets sharing at most ``max_connections``."""
    pool = redis.BlockingConnectionPool.from_url(
        redis_url, max_connections=max_connections, timeout=POOL_WAIT_S
    )
    # from_pool lets close() disconnect the pool too.
    return redis.Redis.from_pool(pool)


def async_client(redis_url: str, max_connections: int) -> aioredis.Redis:
    """Return an asyncio client whose tasks share at most ``max_connections``."""
    pool = aioredis.BlockingConnectionPool.from_url(
        redis_url, max_connections=max_connections, timeout=POOL_WAIT_S
    )
    return aioredis.Redis.from_pool(pool)
