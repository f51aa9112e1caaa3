"""Per-key rate limits and provider gates against a private redis-server."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import pytest
import redis
import redis.asyncio as aioredis
from harness import RedisServer, start_redis

from broker.ratelimit import (
    Limits,
    ProviderGate,
    ProviderLimit,
    check,
    format_duration,
    parse_provider_limits,
    rate_limited_error,
    request_key,
    slots_key,
    starts_key,
    token_key,
)

T = TypeVar("T")

# A clock value at the start of a 60 s window, so elapsed time in the window is exact.
WINDOW_START = 1_800_000_000.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    started = start_redis(tmp_path_factory.mktemp("redis-ratelimit"))
    yield started
    started.process.terminate()
    started.process.wait(10)


@pytest.fixture
def sync_client(server: RedisServer) -> Iterator[redis.Redis]:
    client = server.client()
    client.flushdb()
    yield client
    client.close()


def run_with_client(server: RedisServer, use: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
    """Run ``use`` with an asyncio Redis client on a fresh event loop."""

    async def main() -> T:
        # A blocking pool makes the concurrency tests' tasks share 64 connections.
        pool = aioredis.BlockingConnectionPool.from_url(server.url, max_connections=64)
        client = aioredis.Redis(connection_pool=pool)
        try:
            return await use(client)
        finally:
            await client.aclose()
            await pool.disconnect()

    return asyncio.run(main())


# --- check(): requests and tokens per minute ------------------------------------------


def test_requests_denied_exactly_at_limit(server: RedisServer, sync_client: redis.Redis) -> None:
    limits = Limits(requests_per_minute=5)

    async def use(client: aioredis.Redis) -> list:
        return [await check(client, "key_a", limits, 0, now=WINDOW_START + 1) for _ in range(6)]

    decisions = run_with_client(server, use)
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert [d.remaining_requests for d in decisions] == [4, 3, 2, 1, 0, 0]
    assert all(d.limit_requests == 5 for d in decisions)
    assert decisions[0].retry_after_s == 0
    assert decisions[5].retry_after_s > 0
    assert decisions[5].limit_tokens is None


def test_tokens_denied_request_consumes_nothing(
    server: RedisServer, sync_client: redis.Redis
) -> None:
    limits = Limits(requests_per_minute=100, tokens_per_minute=100)
    now = WINDOW_START + 1

    async def use(client: aioredis.Redis) -> list:
        return [
            await check(client, "key_b", limits, 60, now=now),
            await check(client, "key_b", limits, 50, now=now),
            await check(client, "key_b", limits, 40, now=now),
            await check(client, "key_b", limits, 1, now=now),
        ]

    first, too_many, exact_fit, over = run_with_client(server, use)
    assert first.allowed
    assert first.remaining_tokens == 40
    assert not too_many.allowed
    # The denied request of 50 tokens left the counter at 60, so 40 more fit exactly.
    assert exact_fit.allowed
    assert exact_fit.remaining_tokens == 0
    assert not over.allowed
    assert int(sync_client.hget(token_key("key_b"), "current")) == 100
    # Denied requests count against neither limit.
    assert int(sync_client.hget(request_key("key_b"), "current")) == 2
    assert over.remaining_requests == 98


def test_carry_decays_then_window_resets(server: RedisServer, sync_client: redis.Redis) -> None:
    limits = Limits(requests_per_minute=4)

    async def admitted_at(client: aioredis.Redis, now: float, tries: int) -> int:
        decisions = [await check(client, "key_c", limits, 0, now=now) for _ in range(tries)]
        return sum(d.allowed for d in decisions)

    async def use(client: aioredis.Redis) -> list[int]:
        return [
            await admitted_at(client, WINDOW_START + 59, 10),
            # Next window, 0 s in: the 4 carried requests still weigh fully.
            await admitted_at(client, WINDOW_START + 60, 10),
            # 30 s in: the carry weighs 4 * 0.5 = 2, so 2 requests fit.
            await admitted_at(client, WINDOW_START + 90, 10),
            # Two windows after the last request nothing is carried.
            await admitted_at(client, WINDOW_START + 180, 10),
        ]

    assert run_with_client(server, use) == [4, 0, 2, 4]


def test_retry_after_is_exact_with_carry(server: RedisServer, sync_client: redis.Redis) -> None:
    limits = Limits(requests_per_minute=4)

    async def use(client: aioredis.Redis) -> tuple:
        for _ in range(4):
            await check(client, "key_d", limits, 0, now=WINDOW_START + 50)
        # 10 s into the next window the carry is 4 * 50 / 60 = 3.33, so no room yet.
        denied = await check(client, "key_d", limits, 0, now=WINDOW_START + 70)
        # One request fits once the carry drops to 3: at 15 s into the window.
        early = await check(client, "key_d", limits, 0, now=WINDOW_START + 74.9)
        on_time = await check(
            client, "key_d", limits, 0, now=WINDOW_START + 70 + denied.retry_after_s
        )
        return denied, early, on_time

    denied, early, on_time = run_with_client(server, use)
    assert not denied.allowed
    assert denied.retry_after_s == pytest.approx(5.0)
    assert denied.headers()["retry-after"] == "5"
    assert denied.headers()["retry-after-ms"] == "5000"
    assert not early.allowed
    assert on_time.allowed


def test_retry_after_spans_into_next_window(server: RedisServer, sync_client: redis.Redis) -> None:
    limits = Limits(tokens_per_minute=100)

    async def use(client: aioredis.Redis) -> tuple:
        await check(client, "key_e", limits, 100, now=WINDOW_START + 30)
        denied = await check(client, "key_e", limits, 50, now=WINDOW_START + 40)
        on_time = await check(
            client, "key_e", limits, 50, now=WINDOW_START + 40 + denied.retry_after_s
        )
        return denied, on_time

    denied, on_time = run_with_client(server, use)
    # 20 s to the window's end, then the carry of 100 must decay to 50: 30 s more.
    assert denied.retry_after_s == pytest.approx(50.0)
    assert on_time.allowed


def test_reset_headers_in_openai_format(server: RedisServer, sync_client: redis.Redis) -> None:
    limits = Limits(requests_per_minute=10, tokens_per_minute=1000)

    async def use(client: aioredis.Redis):
        return await check(client, "key_f", limits, 250, now=WINDOW_START)

    headers = run_with_client(server, use).headers()
    assert headers == {
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "9",
        # Usage decays to zero at the end of the next window: 2 minutes.
        "x-ratelimit-reset-requests": "2m0s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "750",
        "x-ratelimit-reset-tokens": "2m0s",
    }


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.02, "20ms"),
        (0.9995, "1s"),
        (1, "1s"),
        (2.4, "2.4s"),
        (90.5, "1m30.5s"),
        (360, "6m0s"),
        (3600, "1h0m0s"),
        (3723.25, "1h2m3.25s"),
    ],
)
def test_format_duration_cases(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_oversized_request_never_fits(server: RedisServer, sync_client: redis.Redis) -> None:
    limits = Limits(tokens_per_minute=100)

    async def use(client: aioredis.Redis):
        return await check(client, "key_g", limits, 101, now=WINDOW_START)

    decision = run_with_client(server, use)
    assert not decision.allowed
    assert decision.too_large
    assert decision.retry_after_s is None
    assert "retry-after" not in decision.headers()
    error = rate_limited_error(decision)
    assert error.status_code == 429
    assert "101 tokens" in error.message
    assert sync_client.exists(token_key("key_g")) == 0


def test_rate_limited_error_carries_headers(server: RedisServer, sync_client: redis.Redis) -> None:
    limits = Limits(requests_per_minute=1)

    async def use(client: aioredis.Redis):
        await check(client, "key_h", limits, 0, now=WINDOW_START)
        return await check(client, "key_h", limits, 0, now=WINDOW_START + 1)

    error = rate_limited_error(run_with_client(server, use))
    # With a limit of 1 the one request must decay completely: 59 s to the end of
    # its window, then a whole window of carry.
    assert error.headers["retry-after"] == "119"
    assert error.headers["x-ratelimit-remaining-requests"] == "0"
    assert "requests per minute: 1" in error.message


def test_disabled_limits_touch_no_redis(server: RedisServer, sync_client: redis.Redis) -> None:
    async def use(client: aioredis.Redis):
        return await check(client, "key_i", Limits(), 10_000)

    decision = run_with_client(server, use)
    assert decision.allowed
    assert decision.headers() == {}
    assert sync_client.dbsize() == 0


def test_limits_reject_invalid_values() -> None:
    with pytest.raises(ValueError, match="requests_per_minute"):
        Limits(requests_per_minute=0)
    with pytest.raises(ValueError, match="tokens_per_minute"):
        Limits(tokens_per_minute=-5)
    with pytest.raises(ValueError, match="window_s"):
        Limits(requests_per_minute=1, window_s=0)


def test_server_clock_window_resets(server: RedisServer, sync_client: redis.Redis) -> None:
    limits = Limits(requests_per_minute=3, window_s=0.2)

    async def use(client: aioredis.Redis) -> tuple[int, float]:
        admitted = 0
        for _ in range(20):
            admitted += (await check(client, "key_j", limits, 0)).allowed
        started = time.monotonic()
        deadline = started + 5
        while not (await check(client, "key_j", limits, 0)).allowed:
            assert time.monotonic() < deadline, "the window never reset"
            await asyncio.sleep(0.01)
        return admitted, time.monotonic() - started

    admitted, waited_s = run_with_client(server, use)
    # The 20 calls may straddle a window boundary, which admits up to the carry's room.
    assert 3 <= admitted <= 6
    assert waited_s < 0.5
    assert sync_client.pttl(request_key("key_j")) <= 400


def test_concurrent_checks_never_exceed_limit(
    server: RedisServer, sync_client: redis.Redis
) -> None:
    limits = Limits(requests_per_minute=50, tokens_per_minute=10_000)

    async def use(client: aioredis.Redis) -> list:
        tasks = [
            check(client, "key_k", limits, 30 + index % 7, now=WINDOW_START + 5)
            for index in range(400)
        ]
        return await asyncio.gather(*tasks)

    decisions = run_with_client(server, use)
    admitted = [d for d in decisions if d.allowed]
    assert len(admitted) == 50
    assert sum(d.requested_tokens for d in admitted) <= 10_000
    assert int(sync_client.hget(request_key("key_k"), "current")) == 50


def test_concurrent_token_limit_holds(server: RedisServer, sync_client: redis.Redis) -> None:
    limits = Limits(tokens_per_minute=1_000)

    async def use(client: aioredis.Redis) -> list:
        tasks = [
            check(client, "key_l", limits, 17 + index % 13, now=WINDOW_START + 5)
            for index in range(300)
        ]
        return await asyncio.gather(*tasks)

    decisions = run_with_client(server, use)
    admitted_tokens = sum(d.requested_tokens for d in decisions if d.allowed)
    assert admitted_tokens <= 1_000
    assert int(sync_client.hget(token_key("key_l"), "current")) == admitted_tokens
    # Requests cost 17 to 29 tokens, so the counter stops within 29 of the limit.
    assert admitted_tokens > 1_000 - 29


# --- ProviderGate: per provider-region caps in the workers ----------------------------


def test_gate_caps_concurrency_across_threads(sync_client: redis.Redis) -> None:
    gate = ProviderGate(sync_client, {"openai.us": ProviderLimit(max_concurrency=5)})
    lock = threading.Lock()
    barrier = threading.Barrier(50)
    holding = 0
    peak = 0
    peak_in_redis = 0
    granted = 0
    errors: list[BaseException] = []

    def call() -> None:
        nonlocal holding, peak, peak_in_redis, granted
        try:
            barrier.wait(10)
            slot = gate.acquire_wait("openai.us", timeout_s=30)
            assert slot is not None
            with lock:
                holding += 1
                granted += 1
                peak = max(peak, holding)
            peak_in_redis = max(peak_in_redis, gate.in_flight("openai.us"))
            time.sleep(0.02)
            with lock:
                holding -= 1
            gate.release(slot)
        except BaseException as exc:  # noqa: BLE001  (reported by the main thread)
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert granted == 50
    assert peak == 5
    assert peak_in_redis <= 5
    assert gate.in_flight("openai.us") == 0


def test_gate_lease_returns_lost_slots(sync_client: redis.Redis) -> None:
    gate = ProviderGate(sync_client, {"openai.us": ProviderLimit(max_concurrency=1)}, lease_s=0.3)
    # The holder of this slot never releases it, as if its worker had crashed.
    assert gate.acquire("openai.us") is not None
    assert gate.acquire("openai.us") is None
    started = time.monotonic()
    slot = gate.acquire_wait("openai.us", timeout_s=5)
    assert slot is not None
    assert time.monotonic() - started < 2


def test_gate_release_frees_slot(sync_client: redis.Redis) -> None:
    gate = ProviderGate(sync_client, {"openai.us": ProviderLimit(max_concurrency=1)})
    slot = gate.acquire("openai.us")
    assert slot is not None
    assert gate.acquire_wait("openai.us", timeout_s=0.1) is None
    gate.release(slot)
    gate.release(slot)
    second = gate.acquire("openai.us")
    assert second is not None
    assert gate.in_flight("openai.us") == 1


def test_gate_caps_calls_per_second(sync_client: redis.Redis) -> None:
    gate = ProviderGate(sync_client, {"deepseek.hk": ProviderLimit(rps=5)})
    starts = []
    for _ in range(12):
        slot = gate.acquire_wait("deepseek.hk", timeout_s=5)
        assert slot is not None
        starts.append(time.monotonic())
        gate.release(slot)
    # No rolling second contains more than 5 starts. The 10 ms margin covers reading the
    # clock after each start.
    gaps = [starts[i + 5] - starts[i] for i in range(len(starts) - 5)]
    assert min(gaps) >= 0.99
    assert sync_client.zcard(starts_key("deepseek.hk")) <= 5
    assert sync_client.exists(slots_key("deepseek.hk")) == 0


def test_gate_rps_denial_takes_no_slot(sync_client: redis.Redis) -> None:
    gate = ProviderGate(sync_client, {"qwen.hk": ProviderLimit(max_concurrency=10, rps=2)})
    assert gate.acquire("qwen.hk") is not None
    assert gate.acquire("qwen.hk") is not None
    assert gate.acquire("qwen.hk") is None
    assert gate.in_flight("qwen.hk") == 2


def test_gate_renew_extends_lease(sync_client: redis.Redis) -> None:
    gate = ProviderGate(sync_client, {"openai.us": ProviderLimit(max_concurrency=1)}, lease_s=0.3)
    slot = gate.acquire("openai.us")
    assert slot is not None
    for _ in range(4):
        time.sleep(0.15)
        assert gate.renew(slot)
    assert gate.acquire("openai.us") is None
    gate.release(slot)
    assert not gate.renew(slot)


def test_gate_unlimited_target_skips_redis(sync_client: redis.Redis) -> None:
    gate = ProviderGate(sync_client, {"openai.us": ProviderLimit(max_concurrency=1)})
    slots = [gate.acquire("mistral.eu") for _ in range(100)]
    assert all(slot is not None and not slot.counted for slot in slots)
    for slot in slots:
        gate.release(slot)
    assert sync_client.dbsize() == 0


def test_gate_most_specific_limit_wins(sync_client: redis.Redis) -> None:
    limits = {
        "openai.us": ProviderLimit(max_concurrency=1),
        "openai": ProviderLimit(max_concurrency=2),
        "*.hk": ProviderLimit(rps=3),
    }
    gate = ProviderGate(sync_client, limits)
    assert gate.limit_for("openai.us") == ProviderLimit(max_concurrency=1)
    assert gate.limit_for("openai.eu") == ProviderLimit(max_concurrency=2)
    assert gate.limit_for("openai.hk") == ProviderLimit(max_concurrency=2)
    assert gate.limit_for("deepseek.hk") == ProviderLimit(rps=3)
    assert gate.limit_for("deepseek.us") is None
    # A provider-wide entry still gives each region its own counter.
    assert gate.acquire("openai.eu") is not None
    assert gate.acquire("openai.hk") is not None
    assert gate.acquire("openai.eu") is not None
    assert gate.acquire("openai.eu") is None


def test_parse_provider_limits_checks_fields() -> None:
    parsed = parse_provider_limits({"openai.us": {"max_concurrency": 200, "rps": 50}})
    assert parsed == {"openai.us": ProviderLimit(max_concurrency=200, rps=50)}
    with pytest.raises(ValueError, match="unknown field 'concurrency'"):
        parse_provider_limits({"openai.us": {"concurrency": 5}})
    with pytest.raises(ValueError, match="rps must be a positive integer"):
        parse_provider_limits({"openai.us": {"rps": 0.5}})
    with pytest.raises(ValueError, match="max_concurrency must be a positive integer"):
        parse_provider_limits({"openai.us": {"max_concurrency": True}})
    with pytest.raises(ValueError, match="must be an object"):
        parse_provider_limits({"openai.us": 5})
