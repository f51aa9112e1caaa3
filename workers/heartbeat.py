"""Worker liveness in Redis: one key per worker process, refreshed while it runs."""

from __future__ import annotations

import logging
import os
import socket
import threading

import redis

from broker.circuits import REGION_ALIVE_TTL_S, region_alive_key

logger = logging.getLogger(__name__)

# Seconds between refreshes, and the key's lifetime: three missed beats mark it dead.
HEARTBEAT_INTERVAL_S = 5.0
HEARTBEAT_TTL_S = 15


def worker_identity() -> str:
    """Return ``<node name>#<pid>``: unique even when a restarted worker reuses its name."""
    return f"{_node_name or socket.gethostname()}#{os.getpid()}"


def set_node_name(name: str) -> None:
    global _node_name
    _node_name = name


_node_name: str | None = None


def heartbeat_key(pool: str, hostname: str) -> str:
    return f"broker:workers:{pool}:{hostname}"


def holder_alive(client: redis.Redis, holder: bytes | str) -> bool:
    """Return whether the worker named by a lease value ``<pool>|<node name>`` is alive."""
    text = holder.decode() if isinstance(holder, bytes) else holder
    pool, _, node = text.partition("|")
    return bool(client.exists(heartbeat_key(pool, node)))


def live_workers(client: redis.Redis, pool: str) -> list[str]:
    """Return the hostnames of the live workers of ``pool`` (a region, or ``billing``)."""
    prefix = heartbeat_key(pool, "")
    return sorted(key.decode()[len(prefix) :] for key in client.scan_iter(f"{prefix}*"))


def start_heartbeat(
    redis_url: str,
    pool: str,
    hostname: str | None = None,
    region: str | None = None,
    lanes: tuple[str, ...] = (),
) -> threading.Event:
    """Refresh this worker's key (and the alive keys of its region's ``lanes``) until the
    returned event is set."""
    client = redis.Redis.from_url(redis_url)
    key = heartbeat_key(pool, hostname or socket.gethostname())
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            try:
                pipe = client.pipeline(transaction=False)
                pipe.set(key, "1", ex=HEARTBEAT_TTL_S)
                for lane in lanes if region else ():
                    pipe.set(region_alive_key(region, lane), "1", ex=REGION_ALIVE_TTL_S)
                pipe.execute()
            except redis.RedisError as exc:
                logger.warning("heartbeat %s could not be written: %s", key, exc)
            stop.wait(HEARTBEAT_INTERVAL_S)
        client.delete(key)

    threading.Thread(target=beat, name="heartbeat", daemon=True).start()
    return stop
