"""Shared circuit breakers and region liveness, kept in Redis for every process to see.

A target is one provider in one region (``deepseek.hk``). Its circuit opens after
``FAILURE_THRESHOLD`` failures within ``FAILURE_WINDOW_S``; while open, the router and
the workers send it nothing. After ``OPEN_COOLDOWN_S`` the circuit is half-open: one
worker at a time may send a probe. A success closes it; a failure opens it again.

A region is alive while at least one of its workers refreshes the region's key.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
import redis.asyncio as aioredis

logger = logging.getLogger(__name__)

# Failures (5xx, timeouts, refused connections) that open a circuit, and the window
# in seconds they must fall within.
FAILURE_THRESHOLD = 5
FAILURE_WINDOW_S = 30
# Seconds a circuit stays open before a probe may test the target again.
OPEN_COOLDOWN_S = 10
# Seconds one probe may take before another worker may probe instead.
PROBE_TIMEOUT_S = 30
# Seconds a region's lane counts as alive after the last heartbeat of a worker of it.
REGION_ALIVE_TTL_S = 15


def target_name(provider: str, region: str) -> str:
    return f"{provider}.{region}"


def _key(target: str, part: str) -> str:
    return f"broker:circuit:{target}:{part}"


def region_alive_key(region: str, lane: str) -> str:
    """Return the key that the workers consuming a region's lane keep alive.

    Per lane, because a region may run a pool per lane: a live batch pool must not
    make the region look alive to interactive calls whose pool died.
    """
    return f"broker:region-alive:{region}:{lane}"


class CircuitBreaker:
    """The worker side: ask before a call, report after it (synchronous Redis)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def state(self, target: str) -> str:
        """Return ``closed``, ``open`` or ``half_open``."""
        return state_from(*self.client.mget(state_keys(target)))

    def allow(self, target: str) -> bool:
        """Return whether a call to ``target`` may go out now (taking the probe if half-open)."""
        state = self.state(target)
        if state == "closed":
            return True
        if state == "open":
            return False
        return self.take_probe(target)

    def take_probe(self, target: str) -> bool:
        """Return whether this caller may send the half-open circuit's one probe."""
        return bool(self.client.set(_key(target, "probe"), b"1", nx=True, ex=PROBE_TIMEOUT_S))

    def record_success(self, target: str) -> None:
        if self.client.exists(_key(target, "tripped")):
            logger.info("circuit %s closed after a successful probe", target)
        self.client.delete(_key(target, "tripped"), _key(target, "failures"), _key(target, "probe"))

    def record_failure(self, target: str) -> None:
        failures_key = _key(target, "failures")
        pipe = self.client.pipeline(transaction=False)
        pipe.incr(failures_key)
        pipe.expire(failures_key, FAILURE_WINDOW_S, nx=True)
        pipe.exists(_key(target, "tripped"))
        failures, _, tripped = pipe.execute()
        if failures >= FAILURE_THRESHOLD or tripped:
            self._trip(target)

    def _trip(self, target: str) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.set(_key(target, "open"), b"1", ex=OPEN_COOLDOWN_S)
        pipe.set(_key(target, "tripped"), b"1")
        pipe.delete(_key(target, "failures"), _key(target, "probe"))
        pipe.execute()
        logger.warning("circuit %s opened for %d s", target, OPEN_COOLDOWN_S)

    def first_usable(self, route: list[dict[str, Any]], indexes: list[int]) -> int | None:
        """Return the first of ``indexes`` whose route target is usable now, or None."""
        if not indexes:
            return None
        targets = [(route[i]["provider"], route[i]["region"]) for i in indexes]
        unavailable = self.unavailable(targets, route[indexes[0]].get("lane", "interactive"))
        for index, target in zip(indexes, targets, strict=True):
            if target not in unavailable:
                return index
        return None

    def unavailable(self, targets: list[tuple[str, str]], lane: str) -> set[tuple[str, str]]:
        """Return the (provider, region) pairs that are open or whose region has no worker
        consuming ``lane``."""
        return _unavailable(targets, self.client.mget(_lookup_keys(targets, lane)))


def state_keys(target: str) -> list[str]:
    """Return the keys whose values ``state_from`` turns into a circuit's state, so a
    caller can read them in a pipeline with other commands."""
    return [_key(target, "open"), _key(target, "tripped")]


def state_from(is_open: bytes | None, tripped: bytes | None) -> str:
    """Return ``closed``, ``open`` or ``half_open`` from the values of ``state_keys``."""
    if is_open:
        return "open"
    return "half_open" if tripped else "closed"


def _lookup_keys(targets: list[tuple[str, str]], lane: str) -> list[str]:
    regions = sorted({region for _, region in targets})
    return [_key(target_name(p, r), "open") for p, r in targets] + [
        region_alive_key(region, lane) for region in regions
    ]


def _unavailable(
    targets: list[tuple[str, str]], values: list[bytes | None]
) -> set[tuple[str, str]]:
    regions = sorted({region for _, region in targets})
    alive = {region for region, value in zip(regions, values[len(targets) :], strict=True) if value}
    return {
        target
        for target, is_open in zip(targets, values[: len(targets)], strict=True)
        if is_open or target[1] not in alive
    }


async def unavailable_targets(
    client: aioredis.Redis, targets: list[tuple[str, str]], lane: str
) -> set[tuple[str, str]]:
    """Return the unavailable targets of a route plan with one MGET (the API's side of
    ``CircuitBreaker.unavailable``)."""
    if not targets:
        return set()
    return _unavailable(targets, await client.mget(_lookup_keys(targets, lane)))
