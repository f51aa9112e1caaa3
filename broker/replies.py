"""The API side of result hand-back: one Redis list and one reader per API process.

Workers push each finished job's outcome onto the list named in the job
(``reply_to``). A single reader task pops them and resolves the future of the request
waiting for that job, so thousands of waiting requests share one Redis connection.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from broker.redis_clients import async_client
from workers.streaming import cancel_key

logger = logging.getLogger(__name__)

# Seconds one blocking pop waits before looping, so a stop request is noticed promptly.
POP_TIMEOUT_S = 1
# Replies taken from the list per round trip once one has arrived.
DRAIN_BATCH = 256
# Seconds a cancel request stays in Redis; longer than any stream runs.
CANCEL_TTL_S = 3600
# Seconds to wait before reading again after Redis failed.
REDIS_RETRY_DELAY_S = 0.5
# Connections of an API process to Redis: the reply reader keeps one busy, and requests
# waiting on the others queue for a moment instead of failing.
API_REDIS_CONNECTIONS = 256


class ReplyListener:
    """Hands replies on this process's list to the requests waiting for them."""

    def __init__(self, redis_url: str) -> None:
        self.channel = f"broker:reply:{uuid.uuid4().hex}"
        self._redis = async_client(redis_url, API_REDIS_CONNECTIONS)
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._streams: dict[str, asyncio.Queue[dict[str, Any]]] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._read_loop(), name="reply-listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self._redis.aclose()

    def expect(self, job_id: str) -> asyncio.Future[dict[str, Any]]:
        """Register interest in a job's reply before its task is published."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[job_id] = future
        return future

    def expect_stream(self, job_id: str) -> asyncio.Queue[dict[str, Any]]:
        """Register interest in a streamed job: its chunks, then its final message."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._streams[job_id] = queue
        return queue

    def forget(self, job_id: str) -> None:
        self._waiting.pop(job_id, None)
        self._streams.pop(job_id, None)

    @property
    def redis(self) -> aioredis.Redis:
        return self._redis

    async def request_cancel(self, job_id: str) -> None:
        """Ask the worker running ``job_id`` to stop; safe to call while being cancelled."""
        task = asyncio.ensure_future(self._redis.set(cancel_key(job_id), b"1", ex=CANCEL_TTL_S))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            pass
        except RedisError as exc:
            logger.warning("could not ask the worker to cancel job %s: %s", job_id, exc)

    async def ping(self) -> None:
        await self._redis.ping()

    @property
    def waiting(self) -> int:
        return len(self._waiting) + len(self._streams)

    def _deliver(self, raw: bytes) -> None:
        message = orjson.loads(raw)
        queue = self._streams.get(message["job_id"])
        if queue is not None:
            queue.put_nowait(message)
            return
        future = self._waiting.pop(message["job_id"], None)
        if future is not None and not future.done():
            future.set_result(message)

    async def _pop(self, multi_pop: bool) -> list[bytes]:
        """Wait up to POP_TIMEOUT_S for replies and take those waiting, up to DRAIN_BATCH.

        BLMPOP (Redis 7.0) takes them with one command. Without it, BLPOP waits for the
        first and LPOP takes the rest.
        """
        if multi_pop:
            popped = await self._redis.blmpop(
                POP_TIMEOUT_S, 1, self.channel, direction="LEFT", count=DRAIN_BATCH
            )
            return popped[1] if popped else []
        first = await self._redis.blpop([self.channel], timeout=POP_TIMEOUT_S)
        if first is None:
            return []
        return [first[1], *(await self._redis.lpop(self.channel, DRAIN_BATCH - 1) or ())]

    async def _read_loop(self) -> None:
        multi_pop = True
        while True:
            try:
                replies = await self._pop(multi_pop)
            except asyncio.CancelledError:
                raise
            except RedisError as exc:
                if multi_pop and _unknown_command(exc):
                    logger.info("Redis has no BLMPOP (before 7.0); reading replies with BLPOP")
                    multi_pop = False
                    continue
                # Waiting requests fall back to reading the job row, so nothing is lost.
                logger.warning("reply listener cannot read %s: %s", self.channel, exc)
                await asyncio.sleep(REDIS_RETRY_DELAY_S)
                continue
            for raw in replies:
                try:
                    self._deliver(raw)
                except Exception:
                    logger.exception("reply listener dropped a malformed reply")


def _unknown_command(exc: RedisError) -> bool:
    return isinstance(exc, ResponseError) and str(exc).lower().startswith("unknown command")
