"""The API's asyncio publish of job tasks, checked against Celery's own publish.

``Intake._publish`` writes the task message itself instead of calling Celery's
``send_task``. These tests compare the two messages in a private Redis, run a message
from the new path on a real Celery worker, and check that an unreachable Redis fails
the request with 503 and charges nothing.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from harness import RedisServer, create_database, start_redis
from kombu.compression import decompress
from sqlalchemy import select
from support import wait_for

import broker.intake as intake_module
from broker.accounts import create_account, create_api_key
from broker.catalog import load_catalog
from broker.chat_request import ChatCompletionRequest
from broker.circuits import region_alive_key, state_keys, target_name
from broker.db import async_session_factory, make_async_engine, make_engine, session_factory
from broker.errors import ServiceUnavailable
from broker.intake import (
    AVAILABILITY_MAX_AGE_S,
    MARKER_MARGIN_S,
    Intake,
    JobMessage,
    Principal,
    Submission,
)
from broker.ledger import check_wallet, top_up
from broker.migrate import upgrade
from broker.processes import free_port
from broker.replies import ReplyListener
from broker.settings import Settings
from broker.tables import Job, LedgerEntry, Wallet
from workers.app import (
    BILLING_QUEUE,
    MAX_MESSAGE_BODY_BYTES,
    RUN_JOB_TASK,
    RUN_JOBS_TASK,
    SETTLE_JOBS_TASK,
    encode_job_messages,
    encode_settle_message,
    job_kwargsrepr,
    job_task_kwargs,
    jobs_kwargsrepr,
    make_celery,
    publish_job,
)
from workers.markers import queued_key

TESTS_DIR = Path(__file__).parent
JOB_TIMEOUT_S = 600
OPENING_BALANCE = 5_000_000
CHAT_BODY = {
    "model": "deepseek-v4-flash",
    "max_tokens": 40,
    # Non-ASCII text checks that both paths escape it the same way.
    "messages": [{"role": "user", "content": "Say hello: 你好, Grüß dich."}],
}
PRINCIPAL = Principal(account_id="acct_test", api_key_id="key_test", wallet_id="wal_test")


@pytest.fixture(scope="module")
def publish_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("publish-redis"))
    yield server
    server.process.terminate()
    server.process.wait(10)


def make_intake(redis_url: str, sessions: Any = None) -> Intake:
    """Build an Intake the way the API does, with its Celery app on ``redis_url``."""
    celery = make_celery()
    celery.conf.broker_url = redis_url
    replies = ReplyListener(redis_url)
    catalog = load_catalog(Settings().catalog_path)
    return Intake(catalog, sessions, celery, replies, replies.redis, 60, JOB_TIMEOUT_S)


def chat_submission(intake: Intake, principal: Principal = PRINCIPAL) -> Submission:
    request = ChatCompletionRequest.model_validate(CHAT_BODY)
    return intake.prepare_chat(CHAT_BODY, request, principal)


def decode(raw: bytes) -> dict[str, Any]:
    """Parse a Redis list entry and decode its base64, maybe compressed, JSON body."""
    message = json.loads(raw)
    data = base64.b64decode(message["body"])
    if "compression" in message["headers"]:
        data = decompress(data, message["headers"]["compression"])
    message["body"] = json.loads(data)
    return message


def mask_task_ids(message: dict[str, Any]) -> None:
    """Replace a decoded message's task id and delivery tag, which differ per publish."""
    message["headers"]["id"] = message["headers"]["root_id"] = "<task id>"
    message["properties"]["correlation_id"] = "<task id>"
    message["properties"]["delivery_tag"] = "<delivery tag>"


def without_unique_fields(message: dict[str, Any]) -> dict[str, Any]:
    """Copy a decoded message with the ids, the delivery tag and the time replaced."""
    copy = json.loads(json.dumps(message))
    copy["headers"]["id"] = copy["headers"]["root_id"] = "<task id>"
    copy["properties"]["correlation_id"] = "<task id>"
    copy["properties"]["delivery_tag"] = "<delivery tag>"
    copy["body"][1]["published_at"] = "<publish time>"
    return copy


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_intake_message_matches_send_task(
    publish_redis: RedisServer, compression: str | None
) -> None:
    redis_url = f"redis://127.0.0.1:{publish_redis.port}/{1 if compression is None else 2}"
    intake = make_intake(redis_url)
    intake.celery.conf.task_compression = compression
    submission = chat_submission(intake)
    spec = intake._task_spec("job_compare", submission, time.time() + JOB_TIMEOUT_S)
    queue = submission.target.queue

    publish_job(intake.celery, spec, queue)

    async def publish() -> tuple[float, float]:
        before = time.time()
        await intake._publish_messages([JobMessage("job_compare", queue, spec)])
        after = time.time()
        await intake.redis.aclose()
        return before, after

    before, after = asyncio.run(publish())
    intake.celery.close()

    with redis.Redis.from_url(redis_url) as client:
        entries = client.lrange(queue, 0, -1)
        marker = client.get(queued_key("job_compare"))
        marker_ttl = client.ttl(queued_key("job_compare"))
        priority_lists = client.keys(f"{queue}\x06\x16*")
    assert len(entries) == 2
    # LPUSH puts the newest entry first: the one from Intake._publish_messages.
    new, old = (decode(entry) for entry in entries)

    assert without_unique_fields(new) == without_unique_fields(old)
    assert list(new) == list(old)
    assert list(new["headers"]) == list(old["headers"])
    assert list(new["properties"]) == list(old["properties"])

    assert new["headers"]["task"] == RUN_JOB_TASK
    assert new["headers"]["id"] != old["headers"]["id"]
    assert new["headers"]["root_id"] == new["headers"]["id"]
    assert new["properties"]["correlation_id"] == new["headers"]["id"]
    assert new["properties"]["delivery_tag"] != old["properties"]["delivery_tag"]
    assert new["properties"]["delivery_info"] == {"exchange": "", "routing_key": queue}
    assert new["headers"]["kwargsrepr"] == job_kwargsrepr(spec)
    assert {**new["body"][1], "published_at": None} == {**spec, "published_at": None}
    assert before <= new["body"][1]["published_at"] <= after
    assert ("compression" in new["headers"]) == (compression is not None)

    assert marker == b"1"
    assert JOB_TIMEOUT_S + MARKER_MARGIN_S - 5 <= marker_ttl <= JOB_TIMEOUT_S + MARKER_MARGIN_S
    assert priority_lists == []


def test_one_queue_shares_a_message(publish_redis: RedisServer) -> None:
    redis_url = f"redis://127.0.0.1:{publish_redis.port}/5"
    intake = make_intake(redis_url)
    submission = chat_submission(intake)
    queue = submission.target.queue
    deadline = time.time() + JOB_TIMEOUT_S
    specs = [intake._task_spec(f"job_group_{n}", submission, deadline) for n in range(3)]
    other_queue = "openai.hk.interactive"
    other = intake._task_spec("job_other", submission, deadline)

    intake.celery.send_task(
        RUN_JOBS_TASK,
        kwargs={"jobs": [job_task_kwargs(spec) for spec in specs]},
        queue=queue,
        kwargsrepr=jobs_kwargsrepr(specs),
    )

    async def publish() -> None:
        messages = [JobMessage(spec["job_id"], queue, spec) for spec in specs]
        messages.insert(1, JobMessage("job_other", other_queue, other))
        await intake._publish_messages(messages)
        await intake.redis.aclose()

    asyncio.run(publish())
    intake.celery.close()

    with redis.Redis.from_url(redis_url) as client:
        entries = client.lrange(queue, 0, -1)
        others = client.lrange(other_queue, 0, -1)
        markers = client.mget([queued_key(spec["job_id"]) for spec in [*specs, other]])
    assert len(entries) == 2
    new, old = (decode(entry) for entry in entries)
    for decoded in (new, old):
        mask_task_ids(decoded)
        for job in decoded["body"][1]["jobs"]:
            job["published_at"] = "<publish time>"
    assert new == old
    assert new["headers"]["task"] == RUN_JOBS_TASK
    assert [job["job_id"] for job in new["body"][1]["jobs"]] == [s["job_id"] for s in specs]
    assert "job_group_0, job_group_1, job_group_2" in new["headers"]["kwargsrepr"]
    assert "content" not in new["headers"]["kwargsrepr"]
    # A job alone in its queue keeps the single-job task.
    assert len(others) == 1
    assert decode(others[0])["headers"]["task"] == RUN_JOB_TASK
    assert markers == [b"1"] * 4


def test_group_messages_split_by_count_and_size() -> None:
    app = make_celery()
    spec = {"job_id": "job", "model": "m", "region": "us", "body": {"text": "x"}}
    jobs = [("q", {**spec, "job_id": f"job_{n}"}) for n in range(33)]
    messages = encode_job_messages(app, jobs)
    sizes = [len(decode(m.payload.encode())["body"][1].get("jobs", [None])) for m in messages]
    # Settings.jobs_per_message is 32 unless the environment sets it.
    assert sizes == [32, 1]
    # One job per message, as workers without run_jobs need.
    singles = encode_job_messages(app, jobs[:3], max_jobs=1)
    assert [decode(m.payload.encode())["headers"]["task"] for m in singles] == [RUN_JOB_TASK] * 3

    big = {**spec, "body": {"text": "x" * (MAX_MESSAGE_BODY_BYTES // 2)}}
    messages = encode_job_messages(app, [("q", {**big, "job_id": f"job_{n}"}) for n in range(3)])
    assert len(messages) == 3
    app.close()


def test_concurrent_reads_share_one_mget(publish_redis: RedisServer) -> None:
    redis_url = f"redis://127.0.0.1:{publish_redis.port}/6"
    intake = make_intake(redis_url)
    plan = chat_submission(intake).plan
    assert len(plan) >= 2
    primary = plan[0]
    with redis.Redis.from_url(redis_url) as client:
        for target in plan:
            client.set(region_alive_key(target.region, target.lane), b"1")

        def mget_calls() -> int:
            return client.info("commandstats").get("cmdstat_mget", {}).get("calls", 0)

        async def choose(count: int) -> list[int]:
            return list(await asyncio.gather(*(intake._choose_start(plan) for _ in range(count))))

        async def first_start_within(expected: int, deadline_s: float) -> float:
            """Return the seconds until a read chooses ``expected``; fail at the deadline."""
            started = time.monotonic()
            while (chosen := await intake._choose_start(plan)) != expected:
                assert time.monotonic() - started < deadline_s, f"still chose {chosen}"
                await asyncio.sleep(0.02)
            return time.monotonic() - started

        async def scenario() -> tuple[list[int], int, int, int, float, float]:
            before = mget_calls()
            together = await choose(20)
            shared = mget_calls() - before
            target = target_name(*primary.key)
            client.set(state_keys(target)[0], b"1")
            # The read just made still serves: no round trip, and the circuit still closed.
            before = mget_calls()
            recent = await intake._choose_start(plan)
            served_reads = mget_calls() - before
            # Once it is older than its maximum age, a new read reports the open circuit.
            until_open = await first_start_within(1, AVAILABILITY_MAX_AGE_S + 5)
            client.delete(state_keys(target)[0])
            until_closed = await first_start_within(0, AVAILABILITY_MAX_AGE_S + 5)
            await intake.redis.aclose()
            return together, shared, recent, served_reads, until_open, until_closed

        together, shared, recent, served_reads, until_open, until_closed = asyncio.run(scenario())
    intake.celery.close()
    assert together == [0] * 20
    assert shared == 1
    assert recent == 0
    assert served_reads == 0
    # A change is seen once the stored read is older than its maximum age (with slack for a
    # loaded machine), in both directions.
    assert until_open <= AVAILABILITY_MAX_AGE_S + 1.0
    assert until_closed <= AVAILABILITY_MAX_AGE_S + 1.0


def test_settle_message_matches_send_task(publish_redis: RedisServer) -> None:
    redis_url = f"redis://127.0.0.1:{publish_redis.port}/4"
    app = make_celery()
    app.conf.broker_url = redis_url
    app.send_task(SETTLE_JOBS_TASK, args=[["job_a", "job_b"]], queue=BILLING_QUEUE)
    message = encode_settle_message(app, ["job_a", "job_b"])
    app.close()

    with redis.Redis.from_url(redis_url) as client:
        client.lpush(message.key, message.payload)
        entries = client.lrange(BILLING_QUEUE, 0, -1)
    assert message.key == BILLING_QUEUE
    assert len(entries) == 2
    new, old = (decode(entry) for entry in entries)
    for decoded in (new, old):
        mask_task_ids(decoded)
    assert new == old
    assert list(new["headers"]) == list(old["headers"])
    assert list(new["properties"]) == list(old["properties"])
    assert new["headers"]["task"] == SETTLE_JOBS_TASK
    assert new["body"][0] == [["job_a", "job_b"]]


def test_worker_started_later_runs_pushed_job(publish_redis: RedisServer, tmp_path: Path) -> None:
    redis_url = f"redis://127.0.0.1:{publish_redis.port}/3"
    intake = make_intake(redis_url)
    submission = chat_submission(intake)
    spec = intake._task_spec("job_later", submission, time.time() + JOB_TIMEOUT_S)
    queue = submission.target.queue

    async def publish() -> None:
        await intake._publish_messages([JobMessage("job_later", queue, spec)])
        await intake.redis.aclose()

    asyncio.run(publish())
    client = redis.Redis.from_url(redis_url)
    # No Celery producer or worker has declared the queue, so no binding table exists.
    assert client.keys("_kombu.*") == []
    assert client.llen(queue) == 1

    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "publish_probe",
            "worker",
            "--pool",
            "solo",
            "--queues",
            queue,
            "--without-mingle",
            "--without-gossip",
            "--loglevel",
            "INFO",
        ],
        env={
            **os.environ,
            "BROKER_REDIS_URL": redis_url,
            "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
        },
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        raw = wait_for(
            lambda: client.get("probe:received:job_later"), what="the worker to run the job"
        )
        # With late acknowledgement the message leaves the unacked hash after the run.
        wait_for(
            lambda: client.llen(queue) == 0 and client.hlen("unacked") == 0,
            what="the message to be acknowledged",
        )
    finally:
        worker.terminate()
        worker.wait(20)
        log.close()
        client.close()
    record = json.loads(raw)
    assert {**record["kwargs"], "published_at": None} == {**spec, "published_at": None}
    assert record["delivery_info"]["routing_key"] == queue
    assert record["delivery_info"]["exchange"] == ""
    assert record["origin"] == f"gen{os.getpid()}@{socket.gethostname()}"


def test_publish_without_redis_fails_with_503(tmp_path: Path) -> None:
    database_url, _ = create_database("sqlite", tmp_path)
    upgrade(database_url)
    engine = make_engine(database_url, pool_size=1)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        account, wallet = create_account(session, "test")
        top_up(session, account.id, OPENING_BALANCE, note="test opening balance")
        key, _ = create_api_key(session, account.id, "test")
    principal = Principal(account_id=account.id, api_key_id=key.id, wallet_id=wallet.id)
    # Nothing listens on a free port, so every Redis command fails to connect.
    async_engine = make_async_engine(database_url)
    intake = make_intake(f"redis://127.0.0.1:{free_port()}/0", async_session_factory(async_engine))
    submission = chat_submission(intake, principal)

    async def run() -> None:
        try:
            await intake.run(principal, submission)
        finally:
            await intake.redis.aclose()
            await async_engine.dispose()

    with pytest.raises(ServiceUnavailable) as caught:
        asyncio.run(run())
    assert caught.value.status_code == 503
    assert "nothing was charged" in str(caught.value)

    with sessions() as session:
        job = session.scalars(select(Job).where(Job.account_id == account.id)).one()
        wallet_row = session.get(Wallet, wallet.id)
        entries = session.scalars(
            select(LedgerEntry).where(LedgerEntry.wallet_id == wallet.id)
        ).all()
        check = check_wallet(session, wallet.id)
    engine.dispose()
    assert job.status == "failed"
    assert job.cost_micro_usd == 0
    assert job.settled_at is not None
    assert job.idempotency_key is None
    assert wallet_row.balance_micro_usd == OPENING_BALANCE
    assert wallet_row.held_micro_usd == 0
    assert sorted(entry.kind for entry in entries if entry.job_id == job.id) == ["hold", "release"]
    assert sum(entry.held_delta_micro_usd for entry in entries) == 0
    assert check.ok


def test_wait_outlasts_database_outage(
    publish_redis: RedisServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Read the job row soon and often, and from a server that refuses connections.
    monkeypatch.setattr(intake_module, "REPLY_FALLBACK_CHECK_S", 0.05)
    unreachable = f"postgresql://postgres@127.0.0.1:{free_port()}/broker"
    reply = {"job_id": "job_outage", "type": "final", "status": "succeeded"}

    async def scenario() -> dict[str, Any]:
        engine = make_async_engine(unreachable, pool_size=1)
        intake = make_intake(
            f"redis://127.0.0.1:{publish_redis.port}/0", async_session_factory(engine)
        )
        future = asyncio.get_running_loop().create_future()
        # The reply arrives after several failed reads of the job row.
        asyncio.get_running_loop().call_later(0.5, future.set_result, reply)
        try:
            return await intake._wait("job_outage", future)
        finally:
            await intake.replies.stop()
            await engine.dispose()

    assert asyncio.run(scenario()) == reply
    assert "reading job job_outage failed while waiting for its reply" in caplog.text
