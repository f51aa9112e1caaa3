"""Exact-match response cache against a private redis-server."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
import redis
import redis.asyncio as aioredis
from harness import RedisServer, start_redis

from broker import response_cache
from broker.errors import InvalidRequest
from broker.processes import free_port

T = TypeVar("T")

BODY: dict[str, Any] = {
    "model": "deepseek-v4-flash",
    "messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Capital of France?"},
    ],
    "temperature": 0,
    "max_tokens": 50,
    "response_format": {"type": "text"},
}

RESPONSE: dict[str, Any] = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1_800_000_000,
    "model": "deepseek-v4-flash",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Paris."},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 21, "completion_tokens": 2, "total_tokens": 23},
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    started = start_redis(tmp_path_factory.mktemp("redis-response-cache"))
    yield started
    started.process.terminate()
    started.process.wait(10)


@pytest.fixture
def sync_client(server: RedisServer) -> Iterator[redis.Redis]:
    client = server.client()
    client.flushdb()
    yield client
    client.close()


def run_with_client(url: str, use: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
    async def main() -> T:
        client = aioredis.Redis.from_url(url)
        try:
            return await use(client)
        finally:
            await client.aclose()

    return asyncio.run(main())


def store_then_lookup(
    url: str, stored_body: dict, looked_up_body: dict, account: str = "acct_1"
) -> dict | None:
    async def use(client: aioredis.Redis) -> dict | None:
        await response_cache.store(client, "acct_1", stored_body, RESPONSE, 3600)
        return await response_cache.lookup(client, account, looked_up_body)

    return run_with_client(url, use)


def test_round_trip_returns_response(server: RedisServer, sync_client: redis.Redis) -> None:
    async def use(client: aioredis.Redis) -> tuple[bool, dict | None]:
        stored = await response_cache.store(
            client, "acct_1", BODY, RESPONSE, 3600, cost_micro_usd=1234
        )
        return stored, await response_cache.lookup(client, "acct_1", BODY)

    stored, entry = run_with_client(server.url, use)
    assert stored
    assert entry is not None
    assert entry["response"] == RESPONSE
    assert entry["usage"] == RESPONSE["usage"]
    assert entry["cost_micro_usd"] == 1234
    assert entry["stored_at"] > 0


def test_miss_returns_none(server: RedisServer, sync_client: redis.Redis) -> None:
    async def use(client: aioredis.Redis) -> dict | None:
        return await response_cache.lookup(client, "acct_1", BODY)

    assert run_with_client(server.url, use) is None


def test_key_ignores_field_order(server: RedisServer, sync_client: redis.Redis) -> None:
    reordered = {key: BODY[key] for key in reversed(list(BODY))}
    reordered["messages"] = [
        {"content": message["content"], "role": message["role"]} for message in BODY["messages"]
    ]
    assert list(reordered) != list(BODY)
    assert response_cache.cache_key("acct_1", reordered) == response_cache.cache_key("acct_1", BODY)
    assert store_then_lookup(server.url, BODY, reordered) is not None


def test_key_ignores_delivery_fields(server: RedisServer, sync_client: redis.Redis) -> None:
    variant = copy.deepcopy(BODY)
    variant.update(
        stream=True,
        stream_options={"include_usage": True},
        user="someone",
        metadata={"trace": "x"},
        cache=True,
        region="hk",
        region_pin="hk",
        drop_params=True,
    )
    assert store_then_lookup(server.url, BODY, variant) is not None


def test_key_treats_whole_floats_as_integers() -> None:
    as_float = {**BODY, "temperature": 0.0, "max_tokens": 50.0}
    assert response_cache.cache_key("acct_1", as_float) == response_cache.cache_key("acct_1", BODY)
    other = {**BODY, "temperature": 0.5}
    assert response_cache.cache_key("acct_1", other) != response_cache.cache_key("acct_1", BODY)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("model", "deepseek-v4-pro"),
        ("max_tokens", 51),
        ("messages", [{"role": "user", "content": "Capital of Spain?"}]),
        ("fallbacks", ["qwen-3.5-plus"]),
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
    ],
)
def test_key_changes_with_answer_fields(
    server: RedisServer, sync_client: redis.Redis, field: str, value: Any
) -> None:
    changed = {**BODY, field: value}
    assert store_then_lookup(server.url, BODY, changed) is None


def test_accounts_do_not_share_entries(server: RedisServer, sync_client: redis.Redis) -> None:
    assert store_then_lookup(server.url, BODY, BODY, account="acct_2") is None
    assert store_then_lookup(server.url, BODY, BODY, account="acct_1") is not None


def test_store_sets_ttl(server: RedisServer, sync_client: redis.Redis) -> None:
    async def use(client: aioredis.Redis) -> bool:
        return await response_cache.store(client, "acct_1", BODY, RESPONSE, 90)

    assert run_with_client(server.url, use)
    ttl_ms = sync_client.pttl(response_cache.cache_key("acct_1", BODY))
    assert 89_000 < ttl_ms <= 90_000


def test_store_skips_short_ttl_and_large_entries(
    server: RedisServer, sync_client: redis.Redis
) -> None:
    large = copy.deepcopy(RESPONSE)
    large["choices"][0]["message"]["content"] = "x" * (response_cache.MAX_ENTRY_BYTES + 1)

    async def use(client: aioredis.Redis) -> tuple[bool, bool]:
        short = await response_cache.store(client, "acct_1", BODY, RESPONSE, 0.5)
        too_large = await response_cache.store(client, "acct_1", BODY, large, 3600)
        return short, too_large

    assert run_with_client(server.url, use) == (False, False)
    assert sync_client.dbsize() == 0


def test_corrupt_entry_is_a_miss(server: RedisServer, sync_client: redis.Redis) -> None:
    key = response_cache.cache_key("acct_1", BODY)
    sync_client.set(key, b"not json")

    async def use(client: aioredis.Redis) -> dict | None:
        return await response_cache.lookup(client, "acct_1", BODY)

    assert run_with_client(server.url, use) is None
    sync_client.set(key, b'{"usage": {}}')
    assert run_with_client(server.url, use) is None


def test_redis_down_is_a_miss() -> None:
    # Nothing listens on this port, so every call fails at once.
    url = f"redis://127.0.0.1:{free_port()}/0"

    async def use(client: aioredis.Redis) -> tuple[bool, dict | None]:
        stored = await response_cache.store(client, "acct_1", BODY, RESPONSE, 3600)
        return stored, await response_cache.lookup(client, "acct_1", BODY)

    assert run_with_client(url, use) == (False, None)


def test_hit_marks_prompt_tokens_cached() -> None:
    entry = {"response": RESPONSE}
    response = response_cache.hit_response(entry)
    assert response["usage"]["prompt_tokens_details"] == {"cached_tokens": 21}
    assert response["choices"] == RESPONSE["choices"]
    # The stored entry itself is left unchanged.
    assert "prompt_tokens_details" not in RESPONSE["usage"]
    with_details = copy.deepcopy(RESPONSE)
    with_details["usage"]["prompt_tokens_details"] = {"cached_tokens": 0, "audio_tokens": 0}
    details = response_cache.hit_response({"response": with_details})["usage"]
    assert details["prompt_tokens_details"] == {"cached_tokens": 21, "audio_tokens": 0}


@pytest.mark.parametrize(
    ("cost", "price_ppm", "expected"),
    [
        (1234, 0, 0),
        (1234, 1_000_000, 1234),
        (1234, 100_000, 124),
        (1, 1, 1),
        (None, 500_000, 0),
    ],
)
def test_hit_cost_rounds_up(cost: int | None, price_ppm: int, expected: int) -> None:
    assert response_cache.hit_cost_micro_usd(cost, price_ppm) == expected


@pytest.mark.parametrize(
    ("headers", "body", "flag", "expected"),
    [
        ({}, {"temperature": 0}, None, True),
        ({}, {"temperature": 0.0, "n": 1}, None, True),
        ({}, {"temperature": 0, "seed": 7}, None, True),
        ({}, {"temperature": 0, "n": 2}, None, False),
        ({}, {}, None, False),
        ({}, {"temperature": 0.7}, None, False),
        ({}, {"temperature": False}, None, False),
        ({}, {"temperature": 0.7}, True, True),
        ({}, {"temperature": 0}, False, False),
        ({"x-broker-cache": "true"}, {"temperature": 1}, None, True),
        ({"x-broker-cache": "False"}, {"temperature": 0}, True, False),
        ({"x-broker-cache": "true"}, {}, False, True),
    ],
)
def test_cache_enabled_rules(headers: dict, body: dict, flag: bool | None, expected: bool) -> None:
    assert response_cache.cache_enabled(headers, body, flag) is expected


def test_deterministic_default_can_be_off() -> None:
    assert not response_cache.cache_enabled({}, {"temperature": 0}, deterministic=False)
    assert response_cache.cache_enabled({}, {"temperature": 0}, True, deterministic=False)


def test_invalid_cache_flags_raise() -> None:
    with pytest.raises(InvalidRequest) as header_error:
        response_cache.cache_enabled({"x-broker-cache": "maybe"}, {})
    assert header_error.value.param == "x-broker-cache"
    body = {"cache": "yes"}
    with pytest.raises(InvalidRequest) as body_error:
        response_cache.pop_cache_flag(body)
    assert body_error.value.param == "cache"


def test_pop_cache_flag_removes_field() -> None:
    body = {"model": "m", "cache": True}
    assert response_cache.pop_cache_flag(body) is True
    assert body == {"model": "m"}
    assert response_cache.pop_cache_flag(body) is None


def test_replay_chunks_rebuild_stream() -> None:
    response = copy.deepcopy(RESPONSE)
    response["choices"].append(
        {
            "index": 1,
            "message": {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "f", "arguments": "{}"},
                    }
                ],
            },
            "finish_reason": "tool_calls",
        }
    )

    chunks = response_cache.replay_chunks(response)

    assert len(chunks) == 5
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert all(chunk["id"] == "chatcmpl-1" for chunk in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "Paris."}
    assert chunks[1]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}

    tool_delta = chunks[2]["choices"][0]["delta"]
    assert tool_delta["tool_calls"][0]["index"] == 0
    assert tool_delta["tool_calls"][0]["function"] == {"name": "f", "arguments": "{}"}
    assert "content" not in tool_delta
    assert chunks[3]["choices"][0]["finish_reason"] == "tool_calls"

    assert chunks[4]["choices"] == []
    assert chunks[4]["usage"] == RESPONSE["usage"]
