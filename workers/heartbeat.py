"""Worker liveness in Redis: one key per worker process, refreshed while it runs."""

from __future__ import annotations

import logging
import socket
import threading

import redis

logger = logging.getLogger(__name__)

# Seconds between refreshes, and the key's lifetime: three missed beats mark it dead.
HEARTBEAT_INTERVAL_S = 5.0
HEARTBEAT_TTL_S = 15


def heartbeat_key(pool: str, hostname: str) -> str:
    return f"broker:workers:{pool}:{hostname}"


def live_workers(client: redis.Redis, pool: str) -> list[str]:
    """Return the hostnames of the live workers of ``pool`` (a region, or ``billing``)."""
    prefix = heartbeat_key(pool, "")
    return sorted(key.decode()[len(prefix) :] for key in client.scan_iter(f"{prefix}*"))


def start_heartbeat(redis_url: str, pool: str, hostname: str | None = None) -> threading.Event:
    """Refresh this worker's key until the returned event is set."""
    client = redis.Redis.from_url(redis_url)
    key = heartbeat_key(pool, hostname or socket.gethostname())
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            try:
                client.set(key, "1", ex=HEARTBEAT_TTL_S)
            except redis.RedisError as exc:
                logger.warning("heartbeat %s could not be written: %s", key, exc)
            stop.wait(HEARTBEAT_INTERVAL_S)
        client.delete(key)

    threading.Thread(target=beat, name="heartbeat", daemon=True).start()
    return stop
