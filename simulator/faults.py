"""Fault injection and simulated latency.

Faults are drawn per request from a seeded RNG, so a fixed sequence of requests meets
the same faults on every run. The ``x-simulator-fault`` request header forces one.
"""

import asyncio
import random

from starlette.types import Receive

FAULT_HEADER = "x-simulator-fault"

FAULT_NONE = "none"
FAULT_RATE_LIMIT = "429"
FAULT_SERVER_ERROR = "500"
FAULT_OVERLOADED = "overloaded"
FAULT_TIMEOUT = "timeout"
FORCEABLE_FAULTS = (
    FAULT_RATE_LIMIT,
    FAULT_SERVER_ERROR,
    FAULT_OVERLOADED,
    FAULT_TIMEOUT,
    FAULT_NONE,
)


class InvalidFaultHeader(ValueError):
    """The x-simulator-fault header names no known fault."""

    def __init__(self, value: str) -> None:
        super().__init__(
            f"invalid {FAULT_HEADER} header value {value!r}: "
            f"expected one of {', '.join(FORCEABLE_FAULTS)}"
        )


class FaultInjector:
    """Seeded draws of faults and latency jitter.

    Faults and jitter use separate RNGs, so turning jitter on does not change which
    requests fail.
    """

    def __init__(self, seed: int) -> None:
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        self._fault_rng = random.Random(f"faults:{seed}")
        self._jitter_rng = random.Random(f"jitter:{seed}")

    def choose(
        self,
        forced: str | None,
        rate_429: float,
        rate_500: float,
        rate_timeout: float,
        overloaded_share: float = 0.0,
    ) -> str:
        """Return the fault for one request.

        ``forced`` is the x-simulator-fault header value, if any. Otherwise one draw
        picks 429, then 500, then timeout, each with its rate, so when the rates add up
        to more than 1 the earlier faults take the whole range. ``overloaded_share`` is
        the share of the 500 faults that become overloaded errors instead.

        Raises InvalidFaultHeader when ``forced`` names no known fault.
        """
        if forced is not None:
            fault = forced.strip().lower()
            if fault not in FORCEABLE_FAULTS:
                raise InvalidFaultHeader(forced)
            return fault
        if rate_429 <= 0 and rate_500 <= 0 and rate_timeout <= 0:
            return FAULT_NONE
        draw = self._fault_rng.random()
        if draw < rate_429:
            return FAULT_RATE_LIMIT
        if draw < rate_429 + rate_500:
            if overloaded_share > 0 and self._fault_rng.random() < overloaded_share:
                return FAULT_OVERLOADED
            return FAULT_SERVER_ERROR
        if draw < rate_429 + rate_500 + rate_timeout:
            return FAULT_TIMEOUT
        return FAULT_NONE

    def latency_seconds(self, latency_ms: int, jitter_ms: int) -> float:
        """Return a latency of ``latency_ms`` plus or minus up to ``jitter_ms``, in s."""
        if jitter_ms <= 0:
            return latency_ms / 1000
        delay_ms = latency_ms + self._jitter_rng.uniform(-jitter_ms, jitter_ms)
        return max(0.0, delay_ms) / 1000


async def wait_for_disconnect(receive: Receive) -> None:
    """Return when the client disconnects.

    Call it only after the request body has been read, because it drops body messages.
    """
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def sleep_unless_disconnected(receive: Receive, seconds: float) -> bool:
    """Sleep for ``seconds`` and return True if the client disconnected meanwhile.

    The sleep ends as soon as the client disconnects.
    """
    if seconds <= 0:
        return False
    watcher = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        done, _ = await asyncio.wait((watcher,), timeout=seconds)
    finally:
        watcher.cancel()
    return bool(done)
