"""The API's reply listener against a real Redis."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from broker.replies import DRAIN_BATCH, ReplyListener

REPLIES_REDIS_DB = 14
# Seconds a test waits for the listener.
DEADLINE_S = 10.0


def _reply(job_id: str) -> bytes:
    return orjson.dumps({"job_id": job_id, "type": "final", "status": "succeeded"})


def test_listener_delivers_past_malformed_reply(
    redis_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> list[dict[str, Any]]:
        listener = ReplyListener(f"redis://127.0.0.1:{redis_server.port}/{REPLIES_REDIS_DB}")
        futures = [listener.expect(job_id) for job_id in ("job_a", "job_b", "job_c")]
        # Pushed before the listener starts, so that one pop takes them all.
        await listener.redis.rpush(
            listener.channel, _reply("job_a"), b"not json", _reply("job_b"), _reply("job_c")
        )
        await listener.start()
        try:
            return await asyncio.wait_for(asyncio.gather(*futures), DEADLINE_S)
        finally:
            await listener.redis.flushdb()
            await listener.stop()

    replies = asyncio.run(scenario())

    assert [reply["job_id"] for reply in replies] == ["job_a", "job_b", "job_c"]
    assert "reply listener dropped a malformed reply" in caplog.text


def test_blpop_fallback_takes_all_waiting(redis_server: Any) -> None:
    async def scenario() -> tuple[list[bytes], list[bytes], int]:
        listener = ReplyListener(f"redis://127.0.0.1:{redis_server.port}/{REPLIES_REDIS_DB}")
        waiting = [_reply(f"job_{n}") for n in range(DRAIN_BATCH + 1)]
        await listener.redis.rpush(listener.channel, *waiting)
        try:
            # The path for Redis before 7.0, which has no BLMPOP.
            popped = await listener._pop(multi_pop=False)
            left = await listener.redis.llen(listener.channel)
        finally:
            await listener.redis.flushdb()
            await listener.stop()
        return waiting, popped, left

    waiting, popped, left = asyncio.run(scenario())

    assert popped == waiting[:DRAIN_BATCH]
    assert left == 1
