"""Rate limits kept in Redis: per API key in the API, per provider region in the workers.

Per API key (``check``), two limits apply to every request: requests per minute and
tokens per minute. A request costs one request and its worst-case token count (the
hold's prompt bound plus its maximum output tokens, computed by the caller). One Lua
script reads both counters, decides and increments them, so concurrent API processes
never admit more than a limit allows, and a denied request consumes nothing.

Algorithm: a sliding window counter, also called a fixed window with carry. Each
counter keeps the count of the current fixed window and of the one before it. The
usage at time ``t`` is estimated as ``previous * (1 - elapsed / window) + current``,
which assumes the previous window's requests were spread evenly. Properties:

- Within one fixed window the counter never admits more than the limit.
- A burst at the end of one window still weighs on the next one, so a client that
  spends its whole quota at once waits until enough of it has decayed.
- Over an arbitrary 60 s span that straddles two windows, adversarial timing can
  admit up to about twice the limit (a full window's worth just before the boundary,
  then the decayed carry after it). For evenly spread traffic the estimate equals the
  true count of the last window's length.
- Memory is one small hash per key and limit, whatever the rate.

The clock is the Redis server's (``TIME``), so API processes on different hosts agree
on window boundaries. Tests may pass ``now`` instead.

Per provider region (``ProviderGate``, synchronous Redis for the gevent workers), two
caps apply to upstream calls: calls in flight and calls started per second. Slots in
flight are members of a sorted set scored by their lease expiry, so the slots of a
worker that crashed without releasing them come back when their leases run out.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript, Script

from broker.errors import RateLimited

logger = logging.getLogger(__name__)

# Length of the per-key rate limit window in seconds: the "per minute" of RPM and TPM.
DEFAULT_WINDOW_S = 60.0

# KEYS[1]: request counter, KEYS[2]: token counter (hashes: window, current, previous).
# ARGV: now in ms (-1: the server clock), window in ms, request limit, token limit
# (0 turns a limit off) and the request's token cost.
# Returns {allowed, requests current, requests previous, tokens current,
# tokens previous, ms elapsed in the window}; counts include this request if allowed.
_CHECK_LUA = """
local now = tonumber(ARGV[1])
if now < 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local window = tonumber(ARGV[2])
local index = math.floor(now / window)
local elapsed = now - index * window
local weight = (window - elapsed) / window
local limits = {tonumber(ARGV[3]), tonumber(ARGV[4])}
local costs = {1, tonumber(ARGV[5])}
local current = {0, 0}
local previous = {0, 0}
local allowed = 1
for i = 1, 2 do
  if limits[i] > 0 then
    local stored = redis.call('HMGET', KEYS[i], 'window', 'current', 'previous')
    local at = tonumber(stored[1])
    if at == index then
      current[i] = tonumber(stored[2]) or 0
      previous[i] = tonumber(stored[3]) or 0
    elseif at == index - 1 then
      previous[i] = tonumber(stored[2]) or 0
    end
    if previous[i] * weight + current[i] + costs[i] > limits[i] then
      allowed = 0
    end
  end
end
if allowed == 1 then
  for i = 1, 2 do
    if limits[i] > 0 then
      current[i] = current[i] + costs[i]
      redis.call('HSET', KEYS[i], 'window', index, 'current', current[i],
                 'previous', previous[i])
      redis.call('PEXPIRE', KEYS[i], 2 * window)
    end
  end
end
return {allowed, current[1], previous[1], current[2], previous[2], elapsed}
"""


@dataclass(frozen=True)
class Limits:
    """Per-key limits; ``None`` turns a limit off."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    # Tests shorten the window; the limits then count per window instead of per minute.
    window_s: float = DEFAULT_WINDOW_S

    def __post_init__(self) -> None:
        for name in ("requests_per_minute", "tokens_per_minute"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, not {value!r}")
        if self.window_s < 0.001:
            raise ValueError(f"window_s must be at least 0.001 s, not {self.window_s!r}")

    @property
    def enabled(self) -> bool:
        return self.requests_per_minute is not None or self.tokens_per_minute is not None


@dataclass(frozen=True)
class Decision:
    """Outcome of one ``check``: whether to admit the request, and the header values.

    Fields of a limit that is off are ``None``. ``retry_after_s`` is 0 when the request
    is allowed, and ``None`` when it can never be allowed because its token cost alone
    exceeds the token limit.
    """

    allowed: bool
    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_s: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float | None = None
    retry_after_s: float | None = 0.0
    requested_tokens: int = 0

    @property
    def too_large(self) -> bool:
        """Whether the request's token cost alone exceeds the token limit."""
        return not self.allowed and self.retry_after_s is None

    def headers(self) -> dict[str, str]:
        """Return OpenAI's ``x-ratelimit-*`` headers, plus ``retry-after`` when denied.

        ``retry-after-ms`` is added next to ``retry-after`` because the official
        ``openai`` Python SDK prefers it when it schedules a retry.
        """
        headers: dict[str, str] = {}
        if self.limit_requests is not None:
            headers["x-ratelimit-limit-requests"] = str(self.limit_requests)
            headers["x-ratelimit-remaining-requests"] = str(self.remaining_requests)
            headers["x-ratelimit-reset-requests"] = format_duration(self.reset_requests_s or 0)
        if self.limit_tokens is not None:
            headers["x-ratelimit-limit-tokens"] = str(self.limit_tokens)
            headers["x-ratelimit-remaining-tokens"] = str(self.remaining_tokens)
            headers["x-ratelimit-reset-tokens"] = format_duration(self.reset_tokens_s or 0)
        if not self.allowed and self.retry_after_s is not None:
            headers["retry-after"] = str(max(1, math.ceil(self.retry_after_s)))
            headers["retry-after-ms"] = str(max(1, math.ceil(self.retry_after_s * 1000)))
        return headers


ALLOW_ALL = Decision(allowed=True)


def format_duration(seconds: float) -> str:
    """Format a duration as OpenAI's rate limit headers do: ``20ms``, ``1s``, ``6m0s``.

    The format is Go's ``time.Duration`` string at millisecond precision, rounded up.
    """
    millis = max(0, math.ceil(seconds * 1000 - 1e-6))
    if millis == 0:
        return "0s"
    if millis < 1000:
        return f"{millis}ms"
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    whole, fraction = divmod(millis, 1000)
    text = f"{whole}.{fraction:03d}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    if minutes:
        return f"{minutes}m{text}"
    return text


def request_key(key_id: str) -> str:
    # The braces make a hash tag, so Redis Cluster keeps a key's two counters together.
    return f"broker:ratelimit:{{{key_id}}}:requests"


def token_key(key_id: str) -> str:
    return f"broker:ratelimit:{{{key_id}}}:tokens"


# One script object serves every client: it is called with ``client=`` each time.
_check_script: AsyncScript | None = None


def _script(client: aioredis.Redis) -> AsyncScript:
    global _check_script
    if _check_script is None:
        _check_script = client.register_script(_CHECK_LUA)
    return _check_script


async def check(
    redis: aioredis.Redis,
    key_id: str,
    limits: Limits,
    tokens: int,
    *,
    now: float | None = None,
) -> Decision:
    """Admit or deny one request of API key ``key_id``, counting it only if admitted.

    ``tokens`` is the request's worst-case token count. ``now`` (seconds) replaces the
    Redis server clock. Raises ``redis.exceptions.RedisError`` if Redis fails.
    """
    if tokens < 0:
        raise ValueError(f"tokens must not be negative, not {tokens}")
    if not limits.enabled:
        return ALLOW_ALL
    window_ms = max(1, round(limits.window_s * 1000))
    now_ms = -1 if now is None else int(now * 1000)
    raw = await _script(redis)(
        keys=[request_key(key_id), token_key(key_id)],
        args=[
            now_ms,
            window_ms,
            limits.requests_per_minute or 0,
            limits.tokens_per_minute or 0,
            tokens,
        ],
        client=redis,
    )
    allowed, req_current, req_previous, tok_current, tok_previous, elapsed_ms = (
        int(value) for value in raw
    )
    requests = _LimitState(
        limits.requests_per_minute, 1, req_current, req_previous, elapsed_ms, window_ms
    )
    token_state = _LimitState(
        limits.tokens_per_minute, tokens, tok_current, tok_previous, elapsed_ms, window_ms
    )
    retry_after_s: float | None = 0.0
    if not allowed:
        waits = [requests.wait_s(), token_state.wait_s()]
        retry_after_s = None if None in waits else max(w for w in waits if w is not None)
    return Decision(
        allowed=bool(allowed),
        limit_requests=requests.limit,
        remaining_requests=requests.remaining(),
        reset_requests_s=requests.reset_s(),
        limit_tokens=token_state.limit,
        remaining_tokens=token_state.remaining(),
        reset_tokens_s=token_state.reset_s(),
        retry_after_s=retry_after_s,
        requested_tokens=tokens,
    )


@dataclass(frozen=True)
class _LimitState:
    """One counter as the script left it, with the arithmetic behind the headers."""

    limit: int | None
    cost: int
    current: int
    previous: int
    elapsed_ms: int
    window_ms: int

    def _usage(self) -> float:
        weight = (self.window_ms - self.elapsed_ms) / self.window_ms
        return self.previous * weight + self.current

    def remaining(self) -> int | None:
        if self.limit is None:
            return None
        return max(0, math.floor(self.limit - self._usage()))

    def reset_s(self) -> float | None:
        """Return the seconds until the estimated usage decays to zero."""
        if self.limit is None:
            return None
        if self.current > 0:
            return (2 * self.window_ms - self.elapsed_ms) / 1000
        if self.previous > 0:
            return (self.window_ms - self.elapsed_ms) / 1000
        return 0.0

    def wait_s(self) -> float | None:
        """Return the seconds until ``cost`` more fits, or None if it never fits.

        The usage decays linearly while the previous window's share shrinks, then
        restarts from the current count when the next window begins.
        """
        if self.limit is None or self._usage() + self.cost <= self.limit:
            return 0.0
        if self.cost > self.limit:
            return None
        window = self.window_ms
        room = self.limit - self.current - self.cost
        if room >= 0 and self.previous > 0:
            # Within this window: previous * (1 - t / window) <= room.
            fits_at_ms = window * (1 - room / self.previous)
            if fits_at_ms <= window:
                return max(0.0, fits_at_ms - self.elapsed_ms) / 1000
        # In the next window the current count becomes the carry:
        # current * (1 - t / window) + cost <= limit.
        fits_at_ms = window * (1 - (self.limit - self.cost) / self.current)
        return (window - self.elapsed_ms + max(0.0, fits_at_ms)) / 1000


def rate_limited_error(decision: Decision) -> RateLimited:
    """Build the 429 for a denied decision, carrying its headers."""
    if decision.too_large:
        message = (
            f"The request's worst-case size of {decision.requested_tokens} tokens exceeds "
            f"this key's limit of {decision.limit_tokens} tokens per minute. Lower "
            "max_tokens or shorten the prompt."
        )
    else:
        message = (
            "Rate limit reached for this API key "
            f"(requests per minute: {_limit_text(decision.limit_requests)}, "
            f"tokens per minute: {_limit_text(decision.limit_tokens)}). "
            f"Retry after {format_duration(decision.retry_after_s or 0)}."
        )
    return RateLimited(message, headers=decision.headers())


def _limit_text(limit: int | None) -> str:
    return "no limit" if limit is None else str(limit)


# --- Worker side: per provider-region caps --------------------------------------------

# KEYS[1]: slots in flight (sorted set, score: lease expiry in ms).
# KEYS[2]: call starts of the last second (sorted set, score: start time in ms).
# ARGV: slot id, lease in ms, max concurrency, calls per second (0 turns a cap off).
# Returns {1, 0} when granted, else {0, ms until a start frees up} or {0, -1} when the
# concurrency cap is full and only a release can free a slot.
_ACQUIRE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])
local max_concurrency = tonumber(ARGV[3])
local rps = tonumber(ARGV[4])
if max_concurrency > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  if redis.call('ZCARD', KEYS[1]) >= max_concurrency then
    return {0, -1}
  end
end
if rps > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 1000)
  if redis.call('ZCARD', KEYS[2]) >= rps then
    local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    return {0, math.max(1, tonumber(oldest[2]) + 1000 - now)}
  end
  redis.call('ZADD', KEYS[2], now, ARGV[1])
  redis.call('PEXPIRE', KEYS[2], 2000)
end
if max_concurrency > 0 then
  redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
  if redis.call('PTTL', KEYS[1]) < lease then
    redis.call('PEXPIRE', KEYS[1], lease)
  end
end
return {1, 0}
"""

# KEYS[1]: slots in flight. ARGV: slot id, lease in ms. Returns 1 if the slot was held.
_RENEW_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])
local renewed = redis.call('ZADD', KEYS[1], 'XX', 'CH', now + lease, ARGV[1])
if renewed == 1 and redis.call('PTTL', KEYS[1]) < lease then
  redis.call('PEXPIRE', KEYS[1], lease)
end
return renewed
"""

# Seconds a slot stays taken without a release. It must exceed the longest upstream
# call, or a slow call's slot is handed to another call while it still runs.
DEFAULT_LEASE_S = 300.0
# Bounds of the pause between tries while waiting for a free slot, in seconds.
MIN_POLL_S = 0.01
MAX_POLL_S = 0.2

PROVIDER_LIMIT_FIELDS = ("max_concurrency", "rps")


@dataclass(frozen=True)
class ProviderLimit:
    """Caps of one provider region; ``None`` turns a cap off."""

    max_concurrency: int | None = None
    # Calls started per rolling second; whole numbers only.
    rps: int | None = None


def parse_provider_limits(raw: Mapping[str, Mapping[str, Any]]) -> dict[str, ProviderLimit]:
    """Check the ``provider_limits`` setting and convert it to ``ProviderLimit`` values.

    Keys are ``provider.region``, ``provider`` or ``*.region``, as in
    ``base_url_overrides``. Raises ValueError naming the first invalid entry.
    """
    parsed: dict[str, ProviderLimit] = {}
    for key, fields in raw.items():
        if not isinstance(fields, Mapping):
            raise ValueError(
                f"provider_limits[{key!r}] must be an object like "
                '{"max_concurrency": 200, "rps": 50}'
            )
        unknown = sorted(set(fields) - set(PROVIDER_LIMIT_FIELDS))
        if unknown:
            raise ValueError(
                f"provider_limits[{key!r}] has unknown field {unknown[0]!r}; "
                f"the fields are {', '.join(PROVIDER_LIMIT_FIELDS)}"
            )
        values: dict[str, int | None] = {}
        for name in PROVIDER_LIMIT_FIELDS:
            value = fields.get(name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(
                    f"provider_limits[{key!r}].{name} must be a positive integer, not {value!r}"
                )
            values[name] = value
        parsed[key] = ProviderLimit(**values)
    return parsed


@dataclass(frozen=True)
class Slot:
    """A granted permission to call a target; pass it to ``ProviderGate.release``."""

    target: str
    slot_id: str
    # Whether the slot occupies a place in the target's concurrency cap.
    counted: bool


class ProviderGate:
    """Caps calls in flight and calls per second for each provider region.

    Every target (``openai.us``) has its own counters, also when its caps come from a
    ``provider`` or ``*.region`` entry. Targets without an entry are not capped and
    cost no Redis call.
    """

    def __init__(
        self,
        client: redis.Redis,
        limits: Mapping[str, ProviderLimit],
        lease_s: float = DEFAULT_LEASE_S,
    ) -> None:
        self.client = client
        self.limits = dict(limits)
        self.lease_ms = max(1, round(lease_s * 1000))
        self._acquire: Script = client.register_script(_ACQUIRE_LUA)
        self._renew: Script = client.register_script(_RENEW_LUA)

    def limit_for(self, target: str) -> ProviderLimit | None:
        """Return the caps of ``provider.region``: the most specific entry wins."""
        provider, _, region = target.partition(".")
        for key in (target, provider, f"*.{region}"):
            if key in self.limits:
                return self.limits[key]
        return None

    def acquire(self, target: str) -> Slot | None:
        """Take a slot for one call to ``target`` now, or return None if a cap is full."""
        slot, _ = self._try(target)
        return slot

    def acquire_wait(self, target: str, timeout_s: float) -> Slot | None:
        """Take a slot, waiting up to ``timeout_s`` seconds; None if none came free."""
        deadline = time.monotonic() + timeout_s
        pause_s = MIN_POLL_S
        while True:
            slot, wait_s = self._try(target)
            if slot is not None:
                return slot
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                return None
            if wait_s is None:
                # Only a release frees a slot, and releases are not announced: poll with
                # a growing, jittered pause so waiting workers do not retry in step.
                sleep_s = pause_s * random.uniform(0.5, 1.0)
                pause_s = min(MAX_POLL_S, pause_s * 2)
            else:
                sleep_s = wait_s
            time.sleep(min(sleep_s, remaining_s))

    def release(self, slot: Slot) -> None:
        """Give a slot back; releasing it twice, or after its lease ran out, is harmless."""
        if slot.counted:
            self.client.zrem(slots_key(slot.target), slot.slot_id)

    def renew(self, slot: Slot) -> bool:
        """Extend a slot's lease for a call that runs long; False if it was lost."""
        if not slot.counted:
            return True
        return bool(self._renew(keys=[slots_key(slot.target)], args=[slot.slot_id, self.lease_ms]))

    def in_flight(self, target: str) -> int:
        """Return the slots of ``target`` whose lease has not run out."""
        seconds, micros = self.client.time()
        now_ms = seconds * 1000 + micros // 1000
        return int(self.client.zcount(slots_key(target), f"({now_ms}", "+inf"))

    def _try(self, target: str) -> tuple[Slot | None, float | None]:
        """Return a slot, or None and the seconds to wait (None: until a release)."""
        limit = self.limit_for(target)
        slot_id = f"{os.getpid()}-{os.urandom(8).hex()}"
        if limit is None:
            return Slot(target, slot_id, counted=False), 0.0
        granted, wait_ms = self._acquire(
            keys=[slots_key(target), starts_key(target)],
            args=[slot_id, self.lease_ms, limit.max_concurrency or 0, limit.rps or 0],
        )
        if int(granted):
            return Slot(target, slot_id, counted=limit.max_concurrency is not None), 0.0
        wait_ms = int(wait_ms)
        return None, (None if wait_ms < 0 else wait_ms / 1000)


def slots_key(target: str) -> str:
    return f"broker:gate:{{{target}}}:slots"


def starts_key(target: str) -> str:
    return f"broker:gate:{{{target}}}:starts"
