"""Mutable state of one simulator instance: config, statistics, caches and counters."""

import logging
from collections import OrderedDict

from simulator.config import SimulatorConfig
from simulator.faults import FaultInjector

logger = logging.getLogger("simulator")

REGION_HEADER = "x-simulator-region"
PROMPT_CACHE_ENTRIES = 4096


class Stats:
    """Request counters served by ``GET /_sim/stats``.

    ``by_status`` counts the status of every response that was sent, so a request whose
    client disconnected before the response started counts only in ``cancelled``.
    """

    def __init__(self) -> None:
        self.in_flight = 0
        self.reset()

    def reset(self) -> None:
        """Clear the counters. ``in_flight`` is a gauge of running requests and stays."""
        self.requests = 0
        self.cancelled = 0
        self.by_provider: dict[str, int] = {}
        self.by_model: dict[str, int] = {}
        self.by_status: dict[str, int] = {}

    def begin(self, provider: str) -> None:
        self.requests += 1
        self.in_flight += 1
        self.by_provider[provider] = self.by_provider.get(provider, 0) + 1

    def count_model(self, model: str) -> None:
        self.by_model[model] = self.by_model.get(model, 0) + 1

    def finish(self, status: int | None) -> None:
        self.in_flight -= 1
        if status is not None:
            key = str(status)
            self.by_status[key] = self.by_status.get(key, 0) + 1

    def snapshot(self) -> dict:
        return {
            "requests": self.requests,
            "in_flight": self.in_flight,
            "cancelled": self.cancelled,
            "by_provider": dict(self.by_provider),
            "by_model": dict(self.by_model),
            "by_status": dict(self.by_status),
        }


class PromptCache:
    """Prompt prefixes seen before, for Anthropic's cache usage fields.

    It keeps the most recently used ``capacity`` prefixes. A prefix that was evicted
    counts as a cache write again, as after the TTL of a real prompt cache.
    """

    def __init__(self, capacity: int = PROMPT_CACHE_ENTRIES) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[bytes, None] = OrderedDict()

    def record(self, key: bytes) -> bool:
        """Store ``key`` and return whether it was already stored."""
        if key in self._entries:
            self._entries.move_to_end(key)
            return True
        self._entries[key] = None
        if len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return False

    def clear(self) -> None:
        self._entries.clear()


class SimulatorState:
    """Everything the request handlers share."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.stats = Stats()
        self.faults = FaultInjector(config.seed)
        self.prompt_cache = PromptCache()
        self._next_id = 0

    def new_id(self, prefix: str) -> str:
        """Return a response id that is unique within this process."""
        self._next_id += 1
        return f"{prefix}sim{self._next_id:016x}"

    def response_headers(self) -> dict[str, str]:
        return {REGION_HEADER: self.config.region}

    def update_config(self, changes: dict) -> SimulatorConfig:
        """Validate ``changes`` against the current config and apply them.

        Raises pydantic.ValidationError for an unknown field or an invalid value.
        """
        merged = self.config.model_dump()
        merged.update(changes)
        config = SimulatorConfig.model_validate(merged)
        if config.seed != self.config.seed:
            self.faults.reseed(config.seed)
        self.config = config
        logger.info("simulator config changed: %s", changes)
        return config

    def reset(self) -> None:
        """Clear statistics and the prompt cache, and reseed the fault draws."""
        self.stats.reset()
        self.prompt_cache.clear()
        self.faults.reseed(self.config.seed)
