"""Settle tasks gathered by a region worker, sent to a real Redis."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from workers.group_commit import GroupCommit
from workers.settle_sender import MAX_IDS_PER_TASK, SettleSender

SETTLE_SENDER_REDIS_DB = 13
# Seconds a test waits for the sender's thread.
DEADLINE_S = 10.0


@pytest.fixture
def client(redis_server: Any) -> Iterator[redis.Redis]:
    client = redis.Redis(port=redis_server.port, db=SETTLE_SENDER_REDIS_DB)
    try:
        yield client
    finally:
        client.flushdb()
        client.close()


def _settle_tasks(client: redis.Redis) -> list[tuple[str, list[str]]]:
    """Return (task name, job ids) of each message in the billing list, oldest first."""
    tasks = []
    for raw in reversed(client.lrange("billing", 0, -1)):
        message = json.loads(raw)
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        tasks.append((message["headers"]["task"], args[0]))
    return tasks


def _wait_for_messages(client: redis.Redis, count: int) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while client.llen("billing") < count:
        assert time.monotonic() < deadline, f"fewer than {count} settle tasks arrived"
        time.sleep(0.01)


def test_ids_within_linger_share_task(client: redis.Redis) -> None:
    sender = SettleSender(client, linger_s=0.5)
    sender.add(["job_a"])
    sender.add(["job_b", "job_c"])
    sender.add([])
    _wait_for_messages(client, 1)

    assert _settle_tasks(client) == [("broker.settle_jobs", ["job_a", "job_b", "job_c"])]


def test_drain_sends_what_is_gathered(client: redis.Redis) -> None:
    # A linger far beyond the test's deadline: only drain can send the ids in time.
    sender = SettleSender(client, linger_s=60)
    sender.add(["job_a", "job_b"])

    assert sender.drain(timeout_s=DEADLINE_S)
    assert _settle_tasks(client) == [("broker.settle_jobs", ["job_a", "job_b"])]


def test_full_task_goes_without_lingering(client: redis.Redis) -> None:
    sender = SettleSender(client, linger_s=60)
    ids = [f"job_{n}" for n in range(MAX_IDS_PER_TASK + 1)]
    sender.add(ids)
    _wait_for_messages(client, 1)

    assert _settle_tasks(client) == [("broker.settle_jobs", ids[:MAX_IDS_PER_TASK])]
    # The last id waits for more; drain sends it without the rest of the linger.
    assert sender.drain(timeout_s=DEADLINE_S)
    assert _settle_tasks(client)[1] == ("broker.settle_jobs", ids[MAX_IDS_PER_TASK:])


def test_unreachable_redis_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    unreachable = redis.Redis(port=1, socket_connect_timeout=0.5)
    sender = SettleSender(unreachable, linger_s=0)
    sender.add(["job_a"])

    assert sender.drain(timeout_s=DEADLINE_S)
    assert "sending 1 jobs (first job_a) to be settled failed" in caplog.text


def test_drain_waits_for_running_batch() -> None:
    written: list[list[int]] = []

    def slow_write(items: list[int]) -> list[None]:
        time.sleep(0.2)
        written.append(items)
        return [None] * len(items)

    commit: GroupCommit[int, None] = GroupCommit(slow_write, max_items=10)
    commit.submit_nowait([1, 2])

    assert commit.drain(timeout_s=DEADLINE_S)
    assert written == [[1, 2]]
