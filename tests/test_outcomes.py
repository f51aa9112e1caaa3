"""Storing job outcomes in one transaction, on a real database."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import orjson
import psycopg
import pytest
import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from support import new_job

from broker.accounts import create_account
from broker.db import BlockingStatementConnection, is_sqlite, make_engine, session_factory
from broker.tables import Attempt, Job, utcnow
from workers.adapters.base import UpstreamError, UpstreamResult
from workers.calls import Outcome
from workers.dispatch import STORE_ONE_OUTCOME, hand_back, record_outcomes
from workers.markers import done_key, lease_key
from workers.replies import REPLY_TTL_S

COMPLETION = {"id": "chatcmpl-1", "object": "chat.completion", "choices": [], "usage": {}}


@pytest.fixture
def sessions(migrated_database: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(migrated_database, pool_size=1)
    yield session_factory(engine)
    engine.dispose()


@pytest.fixture
def ctx(sessions: sessionmaker[Session], migrated_database: str) -> Iterator[SimpleNamespace]:
    """The parts of a worker context that record_outcomes uses."""
    statements = None
    if not is_sqlite(migrated_database):
        statements = BlockingStatementConnection(migrated_database)
    yield SimpleNamespace(sessions=sessions, outcome_statements=statements)
    if statements is not None:
        statements.close()


def _add_jobs(sessions: sessionmaker[Session], statuses: list[str]) -> list[str]:
    with sessions.begin() as session:
        account, _ = create_account(session, "outcomes")
        jobs = [new_job(account.id, status) for status in statuses]
        session.add_all(jobs)
        job_ids = [job.id for job in jobs]
    return job_ids


def _spec(job_id: str) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "provider": "openai",
        "region": "us",
        "model": "m",
        "upstream_model": "m-upstream",
        "input_price": 3,
        "output_price": 5,
        "cached_input_price": None,
    }


def _attempt(job_id: str, status_code: int, error: str | None) -> dict[str, Any]:
    return {
        "number": 1,
        "provider": "openai",
        "region": "us",
        "upstream_model": "m-upstream",
        "worker": "us@test",
        "latency_ms": 7,
        "status_code": status_code,
        "error": error,
        "started_at": utcnow(),
    }


def _succeeded(job_id: str, prompt: int, completion: int) -> Outcome:
    return Outcome(
        result=UpstreamResult(COMPLETION, prompt, completion, 200),
        attempts=[_attempt(job_id, 200, None)],
    )


def _failed(job_id: str) -> Outcome:
    return Outcome(
        error=UpstreamError("invalid request", status_code=400),
        attempts=[_attempt(job_id, 400, "invalid request")],
    )


def _attempt_count(session: Session, job_id: str) -> int:
    return session.scalar(select(func.count()).select_from(Attempt).where(Attempt.job_id == job_id))


def test_mixed_outcomes_stored_together(
    sessions: sessionmaker[Session], ctx: SimpleNamespace
) -> None:
    ok, other_ok, bad = _add_jobs(sessions, ["running", "queued", "running"])
    finished = [
        (_spec(ok), _succeeded(ok, 11, 22)),
        (_spec(other_ok), _succeeded(other_ok, 33, 44)),
        (_spec(bad), _failed(bad)),
    ]

    stored = record_outcomes(ctx, finished)

    assert stored == [True, True, True]
    with sessions() as session:
        jobs = {job.id: job for job in session.scalars(select(Job))}
        assert jobs[ok].status == "succeeded"
        assert jobs[ok].response == COMPLETION
        assert (jobs[ok].prompt_tokens, jobs[ok].completion_tokens) == (11, 22)
        assert (jobs[other_ok].prompt_tokens, jobs[other_ok].completion_tokens) == (33, 44)
        assert jobs[ok].input_price_micro_usd == 3
        assert jobs[ok].output_price_micro_usd == 5
        assert jobs[ok].error is None
        assert jobs[bad].status == "failed"
        assert jobs[bad].error["message"] == "invalid request"
        assert jobs[bad].response is None
        assert all(job.finished_at is not None for job in jobs.values())
        assert [_attempt_count(session, job_id) for job_id in (ok, other_ok, bad)] == [1, 1, 1]


def test_outcome_stored_after_lost_connection(
    sessions: sessionmaker[Session], ctx: SimpleNamespace, migrated_database: str
) -> None:
    if is_sqlite(migrated_database):
        pytest.skip("a lost server connection happens on PostgreSQL")
    first, second = _add_jobs(sessions, ["running", "running"])
    assert record_outcomes(ctx, [(_spec(first), _succeeded(first, 1, 2))]) == [True]
    # The writer's connection is the one whose last statement stored that outcome.
    with psycopg.connect(migrated_database, autocommit=True) as admin:
        terminated = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND query LIKE '%%WITH given AS%%'"
        ).fetchall()
    assert terminated == [(True,)]

    stored = record_outcomes(ctx, [(_spec(second), _succeeded(second, 1, 2))])

    assert stored == [True]
    with sessions() as session:
        assert session.get(Job, second).status == "succeeded"
        assert _attempt_count(session, second) == 1


def test_final_job_left_alone_others_stored(
    sessions: sessionmaker[Session], ctx: SimpleNamespace
) -> None:
    first, done, last = _add_jobs(sessions, ["running", "succeeded", "running"])
    finished = [
        (_spec(first), _succeeded(first, 1, 2)),
        (_spec(done), _failed(done)),
        (_spec(last), _succeeded(last, 3, 4)),
    ]

    stored = record_outcomes(ctx, finished)

    assert stored == [True, False, True]
    with sessions() as session:
        jobs = {job.id: job for job in session.scalars(select(Job))}
        assert jobs[done].status == "succeeded"
        assert jobs[done].error is None
        assert _attempt_count(session, done) == 0
        assert jobs[first].status == "succeeded"
        assert jobs[last].completion_tokens == 4
        assert _attempt_count(session, first) == 1
        assert _attempt_count(session, last) == 1


def test_outcome_sets_only_the_values_it_has(
    sessions: sessionmaker[Session], ctx: SimpleNamespace
) -> None:
    with sessions.begin() as session:
        account, _ = create_account(session, "outcomes")
        # The primary target's prices, written when the job was created.
        jobs = [new_job(account.id, "running", cached_input_price_micro_usd=7) for _ in range(2)]
        session.add_all(jobs)
        served, failed = (job.id for job in jobs)
    cached_result = {**COMPLETION, "usage": {"prompt_tokens_details": {"cached_tokens": 4}}}
    finished = [
        # Served by a target without a cached-input price.
        (_spec(served), Outcome(result=UpstreamResult(cached_result, 10, 2, 200), attempts=[])),
        (_spec(failed), _failed(failed)),
    ]

    stored = record_outcomes(ctx, finished)

    assert stored == [True, True]
    with sessions() as session:
        jobs = {job.id: job for job in session.scalars(select(Job))}
        assert jobs[served].cached_input_price_micro_usd is None
        assert jobs[served].cached_prompt_tokens == 4
        assert jobs[served].response == cached_result
        assert jobs[failed].cached_input_price_micro_usd == 7
        assert (jobs[failed].prompt_tokens, jobs[failed].completion_tokens) == (0, 0)
        assert jobs[failed].cached_prompt_tokens == 0
        assert jobs[failed].served_provider == "openai"
        assert _attempt_count(session, served) == 0
        assert _attempt_count(session, failed) == 1


def test_repeated_job_in_one_group_stored_once(
    sessions: sessionmaker[Session], ctx: SimpleNamespace
) -> None:
    (job_id,) = _add_jobs(sessions, ["running"])
    finished = [
        (_spec(job_id), _succeeded(job_id, 1, 2)),
        (_spec(job_id), _succeeded(job_id, 5, 6)),
    ]

    stored = record_outcomes(ctx, finished)

    assert stored == [True, False]
    with sessions() as session:
        job = session.get(Job, job_id)
        assert (job.prompt_tokens, job.completion_tokens) == (1, 2)
        assert _attempt_count(session, job_id) == 1


# Database number of the test Redis server that only the hand-back test uses.
HAND_BACK_REDIS_DB = 11


def test_hand_back_replies_then_expires_each_list(redis_server: Any) -> None:
    client = redis.Redis(port=redis_server.port, db=HAND_BACK_REDIS_DB)
    try:
        specs = [
            {**_spec("job_a"), "reply_to": "broker:reply:one", "body": {}},
            {**_spec("job_b"), "reply_to": "broker:reply:one", "body": {}},
            {**_spec("job_c"), "reply_to": "broker:reply:two", "body": {}},
            {**_spec("job_d"), "reply_to": None, "body": {}},
            {**_spec("job_e"), "reply_to": "broker:reply:three", "body": {}},
        ]
        for spec in specs:
            client.set(lease_key(spec["job_id"]), b"us|test")
        finished = [(spec, _succeeded(spec["job_id"], 10, 5)) for spec in specs]

        # job_e was already final: it gets its done marker but no reply.
        sent: list[list[str]] = []
        sender = SimpleNamespace(add=sent.append)
        hand_back(
            SimpleNamespace(redis=client, settle_sender=sender),
            finished,
            [True, True, True, True, False],
        )

        replies = [orjson.loads(raw) for raw in client.lrange("broker:reply:one", 0, -1)]
        assert [reply["job_id"] for reply in replies] == ["job_a", "job_b"]
        assert replies[0]["status"] == "succeeded"
        assert replies[0]["cost_micro_usd"] > 0
        assert client.llen("broker:reply:two") == 1
        assert not client.exists("broker:reply:three")
        for name in ("broker:reply:one", "broker:reply:two"):
            assert 0 < client.ttl(name) <= REPLY_TTL_S
        for spec in specs:
            assert client.exists(done_key(spec["job_id"]))
        for job_id in ("job_a", "job_b", "job_c", "job_d"):
            assert not client.exists(lease_key(job_id))
        assert client.exists(lease_key("job_e"))
        assert sent == [["job_a", "job_b", "job_c", "job_d"]]
    finally:
        client.flushdb()
        client.close()


def test_single_outcome_plan_uses_primary_key(migrated_database: str) -> None:
    if is_sqlite(migrated_database):
        pytest.skip("the one-outcome statement is PostgreSQL's")
    statement = (
        STORE_ONE_OUTCOME.replace("%(outcomes)s", "$1")
        .replace("%(attempts)s", "$2")
        .replace("%(job_id)s", "$3")
    )
    with psycopg.connect(migrated_database.replace("+psycopg", ""), autocommit=True) as db:
        # The plan a prepared statement may keep: made once, for any parameters, here
        # on an empty jobs table.
        db.execute("SET plan_cache_mode = force_generic_plan")
        db.execute(f"PREPARE one_outcome (jsonb, jsonb, text) AS {statement}")
        plan = "\n".join(
            row[0] for row in db.execute("EXPLAIN EXECUTE one_outcome('{}', '[]', 'job_x')")
        )

    assert "Index Scan using jobs_pkey on jobs" in plan
    assert "ix_jobs_status" not in plan
