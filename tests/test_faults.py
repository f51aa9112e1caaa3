"""Faults with real processes: every job ends final, none is charged twice, the ledger adds up.

These tests own their Redis server (they flush and restart it) and their own system on
PostgreSQL, the production database.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from harness import RedisServer, Stack, running_stack, start_redis
from sqlalchemy import func, select
from support import wait_for

from broker.circuits import FAILURE_THRESHOLD, region_alive_key
from broker.processes import broker_command
from broker.tables import Attempt, Job, LedgerEntry, Wallet
from workers.app import RUN_JOBS_TASK, encode_job_messages, make_celery, publish_job

# Fault tests sweep every second, so a lost message is found quickly.
FAST_SWEEP_ENV = {"BROKER_SWEEP_INTERVAL_S": "1"}


@pytest.fixture(scope="module")
def fault_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("fault-redis"))
    yield server
    if server.process.poll() is None:
        server.process.terminate()
        server.process.wait(10)


@pytest.fixture(scope="module")
def fault_stack(
    fault_redis: RedisServer, postgres_admin: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    with running_stack(
        "postgresql", fault_redis.url, tmp_path_factory.mktemp("faults"), env=FAST_SWEEP_ENV
    ) as stack:
        yield stack


@pytest.fixture
def simulators(fault_stack: Stack) -> Iterator[callable]:
    """Change simulator settings per region for one test; reset both afterwards."""

    def apply(region: str, **fields: object) -> None:
        httpx.post(
            f"{fault_stack.simulator_url(region)}/_sim/config", json=fields
        ).raise_for_status()

    yield apply
    for region in ("us", "hk"):
        apply(
            region,
            down=False,
            latency_ms=0,
            fault_rate_429=0.0,
            fault_rate_500=0.0,
            fault_rate_timeout=0.0,
        )


def ledger_consistent(stack: Stack, account_id: str, wallet_id: str, opening: int) -> None:
    """Assert every job is final and settled once, and the wallet equals its ledger."""

    def all_settled() -> bool:
        with stack.sessions() as session:
            return (
                session.scalar(
                    select(func.count())
                    .select_from(Job)
                    .where(Job.account_id == account_id, Job.settled_at.is_(None))
                )
                == 0
            )

    wait_for(all_settled, timeout_s=120, interval_s=0.5, what="every job to be settled")

    with stack.sessions() as session:
        jobs = session.scalars(select(Job).where(Job.account_id == account_id)).all()
        charges = session.execute(
            select(LedgerEntry.job_id, func.count())
            .where(LedgerEntry.wallet_id == wallet_id, LedgerEntry.kind == "charge")
            .group_by(LedgerEntry.job_id)
        ).all()
        wallet = session.get(Wallet, wallet_id)
        entries = session.execute(
            select(
                func.sum(LedgerEntry.amount_micro_usd), func.sum(LedgerEntry.held_delta_micro_usd)
            ).where(LedgerEntry.wallet_id == wallet_id)
        ).one()
    assert all(job.status in ("succeeded", "failed", "expired", "cancelled") for job in jobs)
    assert all(count == 1 for _, count in charges), "a job was charged twice"
    total_cost = sum(job.cost_micro_usd or 0 for job in jobs)
    assert wallet.balance_micro_usd == opening - total_cost
    assert wallet.balance_micro_usd == entries[0]
    assert wallet.held_micro_usd == 0
    assert entries[1] == 0


async def send_many(
    stack: Stack, api_key: str, count: int, model: str, timeout_s: float = 120
) -> list[object]:
    """Send ``count`` chat completions at once, each with its own Idempotency-Key."""
    client = openai.AsyncOpenAI(
        base_url=stack.api_url, api_key=api_key, max_retries=3, timeout=timeout_s
    )

    async def one(number: int) -> object:
        try:
            return await client.chat.completions.create(
                model=model,
                max_tokens=40,
                messages=[{"role": "user", "content": f"Request {number}: say hello."}],
                extra_headers={"Idempotency-Key": f"{uuid.uuid4()}"},
            )
        except openai.APIError as exc:
            return exc

    try:
        return await asyncio.gather(*(one(n) for n in range(count)))
    finally:
        await client.close()


def restart_worker(stack: Stack, region: str) -> None:
    stack.group.start(f"worker-{region}", broker_command("worker", "--region", region))
    stack.group.wait_worker(f"worker-{region}", stack.settings.redis_url, region)


def test_worker_killed_mid_run_loses_nothing(fault_stack: Stack, simulators: callable) -> None:
    simulators("us", latency_ms=400)
    account = fault_stack.new_account(50_000_000)

    async def scenario() -> list[object]:
        sending = asyncio.create_task(send_many(fault_stack, account.api_key, 200, "gpt-5.4-mini"))
        await asyncio.to_thread(
            wait_for,
            lambda: fault_stack.redis.keys("broker:job:*:lease"),
            what="jobs to be running",
        )
        worker = fault_stack.group.processes["worker-us"]
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
        fault_stack.group.processes.pop("worker-us")
        await asyncio.to_thread(restart_worker, fault_stack, "us")
        return await sending

    results = asyncio.run(scenario())
    failures = [r for r in results if isinstance(r, Exception)]
    assert failures == []
    ledger_consistent(fault_stack, account.id, account.wallet_id, 50_000_000)
    with fault_stack.sessions() as session:
        succeeded = session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.account_id == account.id, Job.status == "succeeded")
        )
    assert succeeded == 200


def test_redis_flushed_and_restarted_mid_run(
    fault_stack: Stack, fault_redis: RedisServer, simulators: callable
) -> None:
    simulators("us", latency_ms=300)
    simulators("hk", latency_ms=300)
    account = fault_stack.new_account(50_000_000)

    async def scenario() -> list[object]:
        sending = asyncio.create_task(send_many(fault_stack, account.api_key, 100, "glm-5.1"))
        await asyncio.to_thread(
            wait_for,
            lambda: fault_stack.redis.keys("broker:job:*:lease"),
            what="jobs to be running",
        )
        fault_stack.redis.flushall()
        fault_stack.redis.shutdown(nosave=True)
        fault_redis.process.wait(10)
        restarted = start_redis(fault_redis.workdir, fault_redis.port)
        fault_redis.process = restarted.process
        return await sending

    results = asyncio.run(scenario())
    failures = [r for r in results if isinstance(r, Exception)]
    assert failures == []
    ledger_consistent(fault_stack, account.id, account.wallet_id, 50_000_000)


def test_region_down_fails_over_then_circuit_closes(
    fault_stack: Stack, simulators: callable
) -> None:
    # A worker fails over only to a region whose workers are known alive. After a Redis
    # flush (an earlier test) that is known again at the next heartbeat.
    for region in ("us", "hk"):
        wait_for(
            lambda region=region: fault_stack.redis.exists(region_alive_key(region, "interactive")),
            what=f"the {region} workers' heartbeat",
        )
    simulators("us", down=True)
    account = fault_stack.new_account()
    client = fault_stack.client(account.api_key, timeout_s=30)
    regions = []
    for number in range(FAILURE_THRESHOLD + 2):
        raw = client.chat.completions.with_raw_response.create(
            model="grok-4.1-fast",
            max_tokens=20,
            messages=[{"role": "user", "content": f"Ping {number}"}],
        )
        regions.append(raw.headers["x-broker-region"])
    assert set(regions) == {"hk"}
    assert fault_stack.redis.exists("broker:circuit:xai.us:open")

    simulators("us", down=False)

    def served_in_us() -> bool:
        raw = client.chat.completions.with_raw_response.create(
            model="grok-4.1-fast", max_tokens=20, messages=[{"role": "user", "content": "Back?"}]
        )
        return raw.headers["x-broker-region"] == "us"

    wait_for(served_in_us, timeout_s=40, interval_s=1, what="the us circuit to close")
    assert not fault_stack.redis.exists("broker:circuit:xai.us:tripped")
    ledger_consistent(fault_stack, account.id, account.wallet_id, 5_000_000)


def test_rate_limit_storm_honours_retry_after(fault_stack: Stack, simulators: callable) -> None:
    simulators("us", fault_rate_429=0.5, retry_after_s=1)
    account = fault_stack.new_account()
    # The SDK resends a request whose job ran out of attempts, as a client would.
    client = openai.OpenAI(
        base_url=fault_stack.api_url, api_key=account.api_key, max_retries=5, timeout=60
    )
    fault_stack.clients.append(client)
    job_ids = []
    for number in range(8):
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-5.4",
            max_tokens=20,
            extra_body={"region_pin": "us"},
            messages=[{"role": "user", "content": f"Storm {number}"}],
        )
        assert raw.headers["x-broker-region"] == "us"
        job_ids.append(raw.headers["x-broker-job-id"])

    with fault_stack.sessions() as session:
        attempts = session.scalars(
            select(Attempt)
            .where(Attempt.job_id.in_(job_ids))
            .order_by(Attempt.job_id, Attempt.number)
        ).all()
    limited = [
        (a, b)
        for a, b in zip(attempts, attempts[1:], strict=False)
        if a.job_id == b.job_id and a.status_code == 429
    ]
    assert limited, "the storm produced no 429 followed by a retry"
    for first, retry in limited:
        waited_s = (retry.started_at - first.started_at).total_seconds()
        assert waited_s >= 1.0, f"retried after {waited_s:.2f} s despite Retry-After: 1"
    ledger_consistent(fault_stack, account.id, account.wallet_id, 5_000_000)


def test_duplicate_delivery_calls_upstream_once(fault_stack: Stack) -> None:
    account = fault_stack.new_account()
    model = "mistral-large-3"
    fault_stack.group.stop("worker-us")
    fault_stack.group.stop("worker-hk")
    try:
        with pytest.raises(openai.APITimeoutError):
            fault_stack.client(account.api_key, timeout_s=2).chat.completions.create(
                model=model, max_tokens=20, messages=[{"role": "user", "content": "Once."}]
            )
        with fault_stack.sessions() as session:
            job = session.scalars(select(Job).where(Job.account_id == account.id)).one()
        celery = make_celery()
        celery.conf.broker_url = fault_stack.settings.redis_url
        # Several copies, so some start while another is finishing.
        for _ in range(7):
            publish_job(celery, job.dispatch, f"mistral.{job.region}.interactive")
        celery.close()
        assert fault_stack.redis.llen(f"mistral.{job.region}.interactive") == 8
    finally:
        restart_worker(fault_stack, "us")
        restart_worker(fault_stack, "hk")

    ledger_consistent(fault_stack, account.id, account.wallet_id, 5_000_000)
    with fault_stack.sessions() as session:
        attempts = session.scalar(
            select(func.count()).select_from(Attempt).where(Attempt.job_id == job.id)
        )
    assert attempts == 1
    stats = httpx.get(f"{fault_stack.simulator_url(job.region)}/_sim/stats").json()
    assert stats["by_model"][job.dispatch["upstream_model"]] == 1


def test_repeated_group_message_runs_once(fault_stack: Stack) -> None:
    """Jobs published together share a message; copies of it, whole or per job, run
    each job once."""
    account = fault_stack.new_account()
    model = "mistral-medium-3.1"
    fault_stack.group.stop("worker-us")
    fault_stack.group.stop("worker-hk")
    try:
        client = fault_stack.client(account.api_key, timeout_s=2)
        for number in range(3):
            with pytest.raises(openai.APITimeoutError):
                client.chat.completions.create(
                    model=model,
                    max_tokens=20,
                    messages=[{"role": "user", "content": f"Job {number}."}],
                )
        with fault_stack.sessions() as session:
            jobs = session.scalars(select(Job).where(Job.account_id == account.id)).all()
        assert len(jobs) == 3
        queues = {f"mistral.{job.region}.interactive" for job in jobs}
        assert len(queues) == 1
        queue = queues.pop()
        celery = make_celery()
        together = encode_job_messages(celery, [(queue, job.dispatch) for job in jobs])
        alone = encode_job_messages(celery, [(queue, jobs[1].dispatch)])
        celery.close()
        assert len(together) == 1
        assert json.loads(together[0].payload)["headers"]["task"] == RUN_JOBS_TASK
        for message in [*together, *together, *alone]:
            fault_stack.redis.lpush(message.key, message.payload)
    finally:
        restart_worker(fault_stack, "us")
        restart_worker(fault_stack, "hk")

    ledger_consistent(fault_stack, account.id, account.wallet_id, 5_000_000)
    with fault_stack.sessions() as session:
        attempts = session.execute(
            select(Attempt.job_id, func.count())
            .where(Attempt.job_id.in_([job.id for job in jobs]))
            .group_by(Attempt.job_id)
        ).all()
        statuses = session.scalars(select(Job.status).where(Job.account_id == account.id)).all()
    assert sorted(count for _, count in attempts) == [1, 1, 1]
    assert statuses == ["succeeded"] * 3
    stats = httpx.get(f"{fault_stack.simulator_url(jobs[0].region)}/_sim/stats").json()
    assert stats["by_model"][jobs[0].dispatch["upstream_model"]] == 3


def test_busy_worker_leaves_group_messages_queued(fault_stack: Stack, simulators: callable) -> None:
    """A worker counts the jobs of a message, not the message, against its concurrency."""
    account = fault_stack.new_account()
    fault_stack.group.stop("worker-us")
    fault_stack.group.stop("worker-hk")
    queue = "mistral.us.interactive"
    try:
        with pytest.raises(openai.APITimeoutError):
            fault_stack.client(account.api_key, timeout_s=2).chat.completions.create(
                model="mistral-small-3.2",
                max_tokens=20,
                extra_body={"region_pin": "us"},
                messages=[{"role": "user", "content": "Template."}],
            )
        with fault_stack.sessions() as session:
            template = session.scalars(select(Job).where(Job.account_id == account.id)).one()
        fault_stack.redis.delete(queue)
        # Six messages of four jobs each. Jobs missing from the database run all the
        # same and store nothing, which is all this test needs of them.
        specs = [
            {**template.dispatch, "job_id": f"job_busy_{number:02d}_{uuid.uuid4().hex[:8]}"}
            for number in range(24)
        ]
        celery = make_celery()
        messages = [
            message
            for start in range(0, 24, 4)
            for message in encode_job_messages(
                celery, [(queue, s) for s in specs[start : start + 4]]
            )
        ]
        celery.close()
        assert len(messages) == 6
        for message in messages:
            fault_stack.redis.lpush(message.key, message.payload)
        simulators("us", latency_ms=1500)
        fault_stack.group.start(
            "worker-us", broker_command("worker", "--region", "us", "--concurrency", "4")
        )
        fault_stack.group.wait_worker("worker-us", fault_stack.settings.redis_url, "us")

        def leases() -> int:
            return len(fault_stack.redis.keys("broker:job:job_busy_*:lease"))

        wait_for(lambda: leases() >= 4, what="the first jobs to start")
        # Concurrency 4 counted in messages would take four of them at once. Counted in
        # jobs it takes one, and one or two more before its prefetch window shrinks.
        assert fault_stack.redis.llen(queue) >= 3
        assert leases() <= 12
        wait_for(
            lambda: fault_stack.redis.llen(queue) == 0 and leases() == 0,
            timeout_s=120,
            what="every message to be run",
        )
    finally:
        simulators("us", latency_ms=0)
        fault_stack.group.stop("worker-us")
        restart_worker(fault_stack, "us")
        restart_worker(fault_stack, "hk")


def test_idempotency_key_returns_first_job(fault_stack: Stack) -> None:
    account = fault_stack.new_account()
    client = fault_stack.client(account.api_key)
    request = {
        "model": "deepseek-v4-flash",
        "max_tokens": 30,
        "messages": [{"role": "user", "content": "Charge me once."}],
    }
    first = client.chat.completions.with_raw_response.create(
        **request, extra_headers={"Idempotency-Key": "order-42"}
    )
    again = client.chat.completions.with_raw_response.create(
        **request, extra_headers={"Idempotency-Key": "order-42"}
    )
    assert again.headers["x-broker-job-id"] == first.headers["x-broker-job-id"]
    assert again.parse().choices[0].message.content == first.parse().choices[0].message.content
    with pytest.raises(openai.ConflictError):
        client.chat.completions.create(
            **{**request, "max_tokens": 31}, extra_headers={"Idempotency-Key": "order-42"}
        )
    ledger_consistent(fault_stack, account.id, account.wallet_id, 5_000_000)
    with fault_stack.sessions() as session:
        assert (
            session.scalar(
                select(func.count()).select_from(Job).where(Job.account_id == account.id)
            )
            == 1
        )


def test_sigterm_lets_call_in_flight_finish(fault_stack: Stack, simulators: callable) -> None:
    simulators("hk", latency_ms=2000)
    account = fault_stack.new_account()

    async def scenario() -> object:
        client = openai.AsyncOpenAI(
            base_url=fault_stack.api_url, api_key=account.api_key, max_retries=0, timeout=30
        )
        call = asyncio.create_task(
            client.chat.completions.with_raw_response.create(
                model="kimi-k2.6", max_tokens=20, messages=[{"role": "user", "content": "Slow"}]
            )
        )
        await asyncio.to_thread(
            wait_for,
            lambda: fault_stack.redis.keys("broker:job:*:lease"),
            what="the call to be in flight",
        )
        worker = fault_stack.group.processes["worker-hk"]
        worker.send_signal(signal.SIGTERM)
        raw = await call
        await client.close()
        exit_code = await asyncio.to_thread(worker.wait, 20)
        return raw, exit_code

    try:
        raw, exit_code = asyncio.run(scenario())
        assert raw.headers["x-broker-region"] == "hk"
        assert raw.parse().choices[0].message.content
        assert exit_code == 0
    finally:
        fault_stack.group.processes.pop("worker-hk", None)
        restart_worker(fault_stack, "hk")


def test_slow_upstream_times_out_and_releases_hold(
    fault_redis: RedisServer, tmp_path: Path
) -> None:
    env = {**FAST_SWEEP_ENV, "BROKER_JOB_TIMEOUT_S": "3", "BROKER_UPSTREAM_TIMEOUT_S": "2"}
    redis_url = f"redis://127.0.0.1:{fault_redis.port}/3"
    with running_stack("postgresql", redis_url, tmp_path, env=env) as stack:
        for region in ("us", "hk"):
            httpx.post(
                f"{stack.simulator_url(region)}/_sim/config", json={"fault_rate_timeout": 1.0}
            ).raise_for_status()
        account = stack.new_account()
        with pytest.raises(openai.APIStatusError) as caught:
            stack.client(account.api_key, timeout_s=30).chat.completions.create(
                model="qwen3-max", max_tokens=20, messages=[{"role": "user", "content": "Hi"}]
            )
        assert caught.value.status_code == 504
        assert caught.value.body["type"] == "timeout"
        ledger_consistent(stack, account.id, account.wallet_id, 5_000_000)
        with stack.sessions() as session:
            job = session.scalars(select(Job).where(Job.account_id == account.id)).one()
        assert job.cost_micro_usd == 0
        stack.close_clients()


def test_dead_region_jobs_move_to_live_region(fault_stack: Stack) -> None:
    account = fault_stack.new_account()
    worker = fault_stack.group.processes.pop("worker-us")
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    try:
        raw = fault_stack.client(
            account.api_key, timeout_s=90
        ).chat.completions.with_raw_response.create(
            model="gpt-5.4-nano",
            max_tokens=20,
            extra_body={"region": "us"},
            messages=[{"role": "user", "content": "Anyone in us?"}],
        )
        assert raw.headers["x-broker-region"] == "hk"
    finally:
        restart_worker(fault_stack, "us")
    ledger_consistent(fault_stack, account.id, account.wallet_id, 5_000_000)
