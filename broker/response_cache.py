"""Exact-match cache of chat completion responses, kept in Redis per account.

When the cache applies (``cache_enabled``):

- The header ``x-broker-cache`` (``true`` or ``false``) decides if present, else the
  body field ``"cache"`` (a boolean) decides. The broker removes that field before the
  request reaches a provider (``pop_cache_flag``).
- Without either, a request is cached when it requests one deterministic completion:
  ``temperature`` is explicitly 0 and ``n`` is absent or 1. A ``seed`` does not
  matter, because at temperature 0 the most likely token wins whatever the seed. With
  ``n`` above 1 the client wants several different samples, which one stored
  completion cannot supply. The caller may turn this default off
  (``deterministic=False``).
  NOTE: providers do not promise identical output at temperature 0, so a hit returns
  one valid completion, which may differ from what a new call would return.

Key: ``broker:response-cache:<account_id>:<sha256>``. The hash covers the canonical
request, which is the body as JSON with sorted keys, without the fields in
``IGNORED_FIELDS``, and with whole-number floats written as integers (``0.0`` and
``0`` give the same key). ``region`` and ``region_pin`` are ignored because every
region serves the same model. ``models`` and ``fallbacks`` stay in the key because
they change which model may serve the request. Accounts never share entries.

Stored value: the OpenAI response body (usage included), the cost in micro-dollars
the original job was charged, and when it was stored. Entries expire after
``response_cache_ttl_s`` seconds (default 3600). Responses larger than
``MAX_ENTRY_BYTES`` are not stored.

Billing: a hit runs no job and calls no provider. The caller charges it
``response_cache_price_ppm`` parts per million of the original cost, rounded up to a
whole micro-dollar (``hit_cost_micro_usd``), so the default of 0 makes hits free. The
caller sends the header ``x-broker-cache: hit`` with the body from ``hit_response``,
whose ``usage.prompt_tokens_details.cached_tokens`` equals ``usage.prompt_tokens``, as
OpenAI reports prompt tokens served from its own cache.

Redis errors never fail a request: a lookup that fails is a miss, a store that fails
is skipped, and both are logged.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import time
from collections.abc import Mapping
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from broker.errors import InvalidRequest

logger = logging.getLogger(__name__)

CACHE_HEADER = "x-broker-cache"
CACHE_FIELD = "cache"
# Value of the ``x-broker-cache`` response header on a hit.
HIT = "hit"
# Body fields that do not change the completion, so the key leaves them out.
IGNORED_FIELDS = frozenset(
    {
        "stream",
        "stream_options",
        "user",
        "metadata",
        CACHE_FIELD,
        "region",
        "region_pin",
        "drop_params",
    }
)
# Version of the canonical form; changing it starts a new key space.
KEY_VERSION = "v1"
# Largest serialized entry stored, in bytes, so a few huge responses cannot fill Redis.
MAX_ENTRY_BYTES = 1024 * 1024
PPM = 1_000_000

_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


def pop_cache_flag(body: dict[str, Any]) -> bool | None:
    """Remove the body's ``"cache"`` field and return it; None when absent.

    Raises InvalidRequest if the field is not a boolean.
    """
    if CACHE_FIELD not in body:
        return None
    value = body.pop(CACHE_FIELD)
    if not isinstance(value, bool):
        raise InvalidRequest(
            f"Invalid value for '{CACHE_FIELD}': expected true or false, got {value!r}.",
            param=CACHE_FIELD,
            code="invalid_value",
        )
    return value


def cache_enabled(
    headers: Mapping[str, str],
    body: Mapping[str, Any],
    body_flag: bool | None = None,
    *,
    deterministic: bool = True,
) -> bool:
    """Return whether to look up and store this request (rules in the module docstring).

    ``body_flag`` is what ``pop_cache_flag`` returned. Raises InvalidRequest for an
    ``x-broker-cache`` header that is neither true nor false.
    """
    header = headers.get(CACHE_HEADER)
    if header is not None:
        value = header.strip().lower()
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
        raise InvalidRequest(
            f"The {CACHE_HEADER} header must be 'true' or 'false', not {header!r}.",
            param=CACHE_HEADER,
        )
    if body_flag is not None:
        return body_flag
    if not deterministic:
        return False
    temperature = body.get("temperature")
    n = body.get("n")
    return (
        isinstance(temperature, int | float)
        and not isinstance(temperature, bool)
        and temperature == 0
        and n in (None, 1)
    )


def _canonical(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _canonical(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_canonical(item) for item in value]
    return value


def canonical_request(body: Mapping[str, Any]) -> bytes:
    """Return the bytes the cache key hashes: the body in its canonical JSON form."""
    kept = {key: value for key, value in body.items() if key not in IGNORED_FIELDS}
    return orjson.dumps(_canonical(kept), option=orjson.OPT_SORT_KEYS)


def cache_key(account_id: str, body: Mapping[str, Any]) -> str:
    digest = hashlib.sha256(KEY_VERSION.encode() + b"\n" + canonical_request(body)).hexdigest()
    return f"broker:response-cache:{account_id}:{digest}"


async def lookup(
    redis: aioredis.Redis, account_id: str, body: Mapping[str, Any]
) -> dict[str, Any] | None:
    """Return the stored entry for this account's request, or None on a miss.

    The entry has ``response`` (the OpenAI body), ``usage``, ``cost_micro_usd`` (of the
    original job, None if unknown) and ``stored_at`` (Unix seconds).
    """
    key = cache_key(account_id, body)
    try:
        raw = await redis.get(key)
    except RedisError as exc:
        logger.warning("response cache lookup failed for account %s: %s", account_id, exc)
        return None
    if raw is None:
        return None
    try:
        entry = orjson.loads(raw)
    except orjson.JSONDecodeError:
        logger.warning("response cache entry %s is not valid JSON; treating it as a miss", key)
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("response"), dict):
        logger.warning("response cache entry %s has no response; treating it as a miss", key)
        return None
    return entry


async def store(
    redis: aioredis.Redis,
    account_id: str,
    body: Mapping[str, Any],
    response: Mapping[str, Any],
    ttl_s: float,
    *,
    cost_micro_usd: int | None = None,
) -> bool:
    """Store a successful response for ``ttl_s`` seconds; returns whether it was stored.

    Nothing is stored when ``ttl_s`` is below one second, when the entry is larger than
    ``MAX_ENTRY_BYTES``, or when Redis fails.
    """
    ttl_ms = int(ttl_s * 1000)
    if ttl_ms < 1000:
        return False
    entry = {
        "response": response,
        "usage": response.get("usage"),
        "cost_micro_usd": cost_micro_usd,
        "stored_at": time.time(),
    }
    raw = orjson.dumps(entry)
    if len(raw) > MAX_ENTRY_BYTES:
        logger.info(
            "response of %d bytes for account %s is too large for the response cache",
            len(raw),
            account_id,
        )
        return False
    try:
        await redis.set(cache_key(account_id, body), raw, px=ttl_ms)
    except RedisError as exc:
        logger.warning("response cache store failed for account %s: %s", account_id, exc)
        return False
    return True


def hit_response(entry: Mapping[str, Any]) -> dict[str, Any]:
    """Return the response body to send for a hit, with every prompt token marked cached."""
    response = copy.deepcopy(dict(entry["response"]))
    usage = response.get("usage")
    if isinstance(usage, dict):
        prompt_tokens = usage.get("prompt_tokens") or 0
        details = usage.get("prompt_tokens_details")
        if not isinstance(details, dict):
            details = {}
        details["cached_tokens"] = prompt_tokens
        usage["prompt_tokens_details"] = details
    return response


def hit_cost_micro_usd(original_cost_micro_usd: int | None, price_ppm: int) -> int:
    """Return what a hit costs: ``price_ppm`` millionths of the original cost, rounded up."""
    if not original_cost_micro_usd or price_ppm <= 0:
        return 0
    return -(-original_cost_micro_usd * price_ppm // PPM)


def replay_chunks(response: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Return a stored completion as ``chat.completion.chunk`` objects, for a streamed hit.

    Each choice gets one chunk with its whole message, then one with its finish
    reason. A last chunk without choices carries the usage, as OpenAI sends it when
    ``stream_options.include_usage`` is set.
    """
    base = {
        "id": response.get("id"),
        "object": "chat.completion.chunk",
        "created": response.get("created"),
        "model": response.get("model"),
    }
    if response.get("system_fingerprint") is not None:
        base["system_fingerprint"] = response["system_fingerprint"]
    chunks: list[dict[str, Any]] = []
    for choice in response.get("choices") or []:
        message = choice.get("message") or {}
        delta: dict[str, Any] = {"role": message.get("role", "assistant")}
        for field in ("content", "refusal"):
            if message.get(field) is not None:
                delta[field] = message[field]
        if message.get("tool_calls"):
            delta["tool_calls"] = [
                {"index": index, **call} for index, call in enumerate(message["tool_calls"])
            ]
        index = choice.get("index", 0)
        first = {"index": index, "delta": delta, "finish_reason": None}
        if "logprobs" in choice:
            first["logprobs"] = choice["logprobs"]
        chunks.append({**base, "choices": [first]})
        last = {"index": index, "delta": {}, "finish_reason": choice.get("finish_reason")}
        chunks.append({**base, "choices": [last]})
    if response.get("usage") is not None:
        chunks.append({**base, "choices": [], "usage": response["usage"]})
    return chunks
