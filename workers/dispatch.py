"""The job task: call the target with retries, fail over, record the outcome, hand it back."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import defaultdict
from typing import Any

import psycopg
from celery import Task, bootsteps
from sqlalchemy import Connection, Update, bindparam, insert, or_, update
from sqlalchemy.exc import DBAPIError, OperationalError
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from broker.catalog import queue_name
from broker.circuits import CircuitBreaker, state_from, state_keys, target_name
from broker.db import BlockingStatementConnection, json_rows
from broker.metrics import count_failover, count_tokens, job_in_flight, observe_queue_wait
from broker.pricing import cached_prompt_tokens
from broker.tables import Attempt, Job, utcnow
from workers.app import (
    RUN_JOB_TASK,
    RUN_JOBS_TASK,
    celery_app,
    publish_job,
)
from workers.calls import Outcome, call_target
from workers.context import WorkerContext, get_context
from workers.group_commit import GroupCommit
from workers.heartbeat import holder_alive, worker_identity
from workers.markers import DONE_TTL_S, done_key, lease_key, queued_key
from workers.replies import REPLY_TTL_S, queue_final_reply
from workers.streaming import cancel_key

logger = logging.getLogger(__name__)

# Seconds a lease outlives the job's deadline, so a slow finish keeps its claim.
LEASE_MARGIN_S = 60
ACTIVE_STATUSES = ("queued", "running")
# Jobs this process is running; greenlets share one thread, so a plain set is safe.
_running: set[str] = set()


def next_target(ctx: WorkerContext, spec: dict[str, Any]) -> int | None:
    """Return the index of the next usable target of the job's route, if any."""
    route = spec.get("route") or []
    later = list(range(spec.get("route_index", 0) + 1, len(route)))
    return CircuitBreaker(ctx.redis).first_usable(route, later)


def _attempt_rows(job_id: str, outcome: Outcome) -> list[dict[str, Any]]:
    return [dict(job_id=job_id, **attempt) for attempt in outcome.attempts]


def hand_over(ctx: WorkerContext, spec: dict[str, Any], outcome: Outcome, index: int) -> bool:
    """Send the job to another target of its route; returns False if it is already final."""
    job_id = spec["job_id"]
    nxt = {key: value for key, value in spec.items() if key != "worker"}
    nxt.update(
        spec["route"][index],
        route_index=index,
        attempt_offset=spec.get("attempt_offset", 0) + len(outcome.attempts),
    )
    with ctx.sessions.begin() as session:
        updated = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status.in_(ACTIVE_STATUSES))
            .values(dispatch=nxt, dispatched_at=utcnow(), dispatch_count=Job.dispatch_count + 1)
        ).rowcount
        if not updated:
            return False
        session.execute(insert(Attempt), _attempt_rows(job_id, outcome))
    ctx.redis.set(queued_key(job_id), b"1", ex=int(max(60, spec["deadline"] - time.time())))
    publish_job(celery_app, nxt, queue_name(nxt["provider"], nxt["region"], nxt["lane"]))
    count_failover(f"{spec['provider']}.{spec['region']}", f"{nxt['provider']}.{nxt['region']}")
    logger.info(
        "job %s failed over from %s.%s to %s.%s (%s): %s",
        job_id,
        spec["provider"],
        spec["region"],
        nxt["provider"],
        nxt["region"],
        nxt["model"],
        outcome.error.message if outcome.error else "",
    )
    return True


# A database that is briefly unreachable or out of connections should not leave a
# finished job unrecorded (and its upstream call to be made again by the sweeper).
# record_outcomes makes the first attempt itself, because setting up tenacity's retry
# loop took about a twentieth of a region worker's CPU at one job at a time
# (py-spy, on the benchmark machine).
# TODO: an outage longer than these retries (a few seconds) leaves the outcome unstored,
# and the sweeper then calls the upstream again for the job.
_CONNECTION_ERRORS = (OperationalError, psycopg.OperationalError)
_db_retry = retry(
    retry=retry_if_exception_type(_CONNECTION_ERRORS),
    reraise=True,
    stop=stop_after_attempt(4),
    wait=wait_random_exponential(0.2, max=2),
)


def _outcome_values(spec: dict[str, Any], outcome: Outcome) -> dict[str, Any]:
    values: dict[str, Any] = {
        "status": outcome.status,
        "finished_at": utcnow(),
        "served_provider": spec["provider"],
        "served_region": spec["region"],
        "served_model": spec["model"],
        # The job is charged at the prices of the target that served it.
        "input_price_micro_usd": spec["input_price"],
        "output_price_micro_usd": spec["output_price"],
    }
    if outcome.result is not None:
        values.update(
            response=outcome.result.body,
            prompt_tokens=outcome.result.prompt_tokens,
            completion_tokens=outcome.result.completion_tokens,
            cached_prompt_tokens=cached_prompt_tokens(outcome.result.body),
            cached_input_price_micro_usd=spec.get("cached_input_price"),
        )
    if outcome.error is not None:
        values["error"] = outcome.error.to_job_error()
    return values


_jobs = Job.__table__
_attempts = Attempt.__table__


Finished = tuple[dict[str, Any], Outcome]


class _AlreadyFinal(Exception):
    """Raised to roll back a group update when one of its jobs was already final."""


@functools.cache
def _update_outcome(columns: tuple[str, ...]) -> Update:
    """Return the UPDATE that stores outcomes with these columns, run once per job.

    The parameters are named ``v_<column>`` because SQLAlchemy reserves the bare column
    names for its own SET parameters.
    """
    return (
        update(_jobs)
        .where(
            _jobs.c.id == bindparam("v_job_id"),
            # IN would expand its list per execution, which executemany does not allow.
            or_(*(_jobs.c.status == status for status in ACTIVE_STATUSES)),
        )
        .values({column: bindparam(f"v_{column}") for column in columns})
    )


def _store_together(connection: Connection, finished: list[Finished]) -> None:
    """Store every outcome with one executemany per set of columns.

    Raises _AlreadyFinal, before the commit, when fewer rows changed than jobs were
    given, because the summed row count does not identify the job that was already final.
    """
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
    for spec, outcome in finished:
        values = _outcome_values(spec, outcome)
        row = {f"v_{column}": value for column, value in values.items()}
        row["v_job_id"] = spec["job_id"]
        groups[tuple(sorted(values))].append(row)
    for columns, rows in groups.items():
        if connection.execute(_update_outcome(columns), rows).rowcount != len(rows):
            raise _AlreadyFinal
    attempts = [row for spec, outcome in finished for row in _attempt_rows(spec["job_id"], outcome)]
    if attempts:
        connection.execute(insert(_attempts), attempts)


def _store_one_by_one(connection: Connection, finished: list[Finished]) -> list[bool]:
    stored: list[bool] = []
    attempts: list[dict[str, Any]] = []
    for spec, outcome in finished:
        updated = connection.execute(
            update(_jobs)
            .where(_jobs.c.id == spec["job_id"], _jobs.c.status.in_(ACTIVE_STATUSES))
            .values(**_outcome_values(spec, outcome))
        ).rowcount
        stored.append(updated == 1)
        if updated:
            attempts.extend(_attempt_rows(spec["job_id"], outcome))
    if attempts:
        connection.execute(insert(_attempts), attempts)
    return stored


# Columns of an outcome as the outcome statements read them from JSON.
_OUTCOME_COLUMNS = """
        id text, status text, finished_at timestamptz, served_provider text,
        served_region text, served_model text, input_price_micro_usd bigint,
        output_price_micro_usd bigint, response jsonb, prompt_tokens integer,
        completion_tokens integer, cached_prompt_tokens integer,
        cached_input_price_micro_usd bigint, error jsonb, has_result boolean,
        has_error boolean"""


def _store_outcomes_sql(source: str, match: str) -> str:
    """Return a statement that stores outcomes and their attempts, on PostgreSQL.

    ``source`` reads the outcomes from JSON, and ``match`` joins them to their jobs.
    has_result and has_error mark which optional values an outcome has, so a failed job
    keeps its zero token counts and a served job takes its target's cached-input price,
    even if none.
    """
    return f"""
WITH given AS (
    SELECT * FROM {source} AS o({_OUTCOME_COLUMNS})
), stored AS (
    UPDATE jobs SET
        status = o.status,
        finished_at = o.finished_at,
        served_provider = o.served_provider,
        served_region = o.served_region,
        served_model = o.served_model,
        input_price_micro_usd = o.input_price_micro_usd,
        output_price_micro_usd = o.output_price_micro_usd,
        response = CASE WHEN o.has_result THEN o.response ELSE jobs.response END,
        prompt_tokens = CASE WHEN o.has_result THEN o.prompt_tokens ELSE jobs.prompt_tokens END,
        completion_tokens =
            CASE WHEN o.has_result THEN o.completion_tokens ELSE jobs.completion_tokens END,
        cached_prompt_tokens =
            CASE WHEN o.has_result THEN o.cached_prompt_tokens ELSE jobs.cached_prompt_tokens END,
        cached_input_price_micro_usd = CASE WHEN o.has_result
            THEN o.cached_input_price_micro_usd ELSE jobs.cached_input_price_micro_usd END,
        error = CASE WHEN o.has_error THEN o.error ELSE jobs.error END
    FROM given AS o
    WHERE {match} AND jobs.status IN ('queued', 'running')
    RETURNING jobs.id
), attempted AS (
    INSERT INTO attempts (job_id, number, provider, region, upstream_model, worker,
        latency_ms, status_code, error, started_at)
    SELECT a.job_id, a.number, a.provider, a.region, a.upstream_model, a.worker,
        a.latency_ms, a.status_code, a.error, a.started_at
    FROM jsonb_populate_recordset(NULL::attempts, %(attempts)s::jsonb) AS a
    WHERE a.job_id IN (SELECT id FROM stored)
)
SELECT id FROM stored
"""


# Any number of outcomes, given as a JSON array. Its generic plan, made while the jobs
# table was small, read the status index for every job still queued or running. Without
# autovacuum that index kept growing (76 ms per outcome at 69,000 jobs), so this
# statement is planned at each run (about 0.4 ms) and never prepared.
STORE_OUTCOMES = _store_outcomes_sql("jsonb_to_recordset(%(outcomes)s::jsonb)", "jobs.id = o.id")
# One outcome, given as a JSON object, with its job id also as a parameter: every plan,
# generic ones too, finds the job by its primary key, so this one may be prepared. A
# worker at low load stores its outcomes one at a time.
STORE_ONE_OUTCOME = _store_outcomes_sql(
    "jsonb_to_record(%(outcomes)s::jsonb)", "jobs.id = %(job_id)s AND o.id = %(job_id)s"
)


def _store_in_one_statement(
    statements: BlockingStatementConnection, finished: list[Finished]
) -> list[bool]:
    """Store the outcomes whose jobs are not final yet, with their attempts (PostgreSQL).

    One statement in autocommit: one round trip, with no BEGIN or COMMIT of its own,
    and no second pass when a job was already final, because it returns the jobs it
    stored.
    """
    # A job given twice gets its first outcome. The later ones count as repeated.
    first = {}
    for index, (spec, _) in enumerate(finished):
        first.setdefault(spec["job_id"], index)
    outcomes = []
    attempts = []
    for index in first.values():
        spec, outcome = finished[index]
        values = _outcome_values(spec, outcome)
        values.update(
            id=spec["job_id"],
            has_result=outcome.result is not None,
            has_error=outcome.error is not None,
        )
        outcomes.append(values)
        attempts.extend(_attempt_rows(spec["job_id"], outcome))
    if len(outcomes) == 1:
        rows = statements.fetchall(
            STORE_ONE_OUTCOME,
            {
                "outcomes": json_rows(outcomes[0]),
                "job_id": outcomes[0]["id"],
                "attempts": json_rows(attempts),
            },
        )
    else:
        rows = statements.fetchall(
            STORE_OUTCOMES,
            {"outcomes": json_rows(outcomes), "attempts": json_rows(attempts)},
            prepare=False,
        )
    stored_ids = {job_id for (job_id,) in rows}
    return [
        spec["job_id"] in stored_ids and first[spec["job_id"]] == index
        for index, (spec, _) in enumerate(finished)
    ]


def record_outcomes(ctx: WorkerContext, finished: list[Finished]) -> list[bool]:
    """Store each outcome unless its job is already final (a repeated delivery).

    Returns, per outcome, whether it was stored. All are written in one transaction.
    PostgreSQL takes one statement. Elsewhere each set of columns takes one statement
    for all jobs; if one of the jobs was already final, the outcomes are written again
    job by job. After a failed connection the write is tried again at once, and then up
    to three more times with backoff.
    """
    try:
        return _record_outcomes(ctx, finished)
    except _CONNECTION_ERRORS as exc:
        logger.info("storing %d outcomes failed, retrying: %s", len(finished), exc)
    return _record_outcomes_again(ctx, finished)


def _record_outcomes(ctx: WorkerContext, finished: list[Finished]) -> list[bool]:
    if ctx.outcome_statements is not None:
        return _store_in_one_statement(ctx.outcome_statements, finished)
    try:
        with ctx.sessions.begin() as session:
            _store_together(session.connection(), finished)
        return [True] * len(finished)
    except _AlreadyFinal:
        pass
    with ctx.sessions.begin() as session:
        return _store_one_by_one(session.connection(), finished)


_record_outcomes_again = _db_retry(_record_outcomes)


def _write_outcomes(finished: list[Finished]) -> list[bool | BaseException]:
    ctx = get_context()
    try:
        stored: list[bool | BaseException] = list(record_outcomes(ctx, finished))
    except (DBAPIError, psycopg.Error):
        if len(finished) == 1:
            raise
        logger.warning("storing %d outcomes together failed; storing each alone", len(finished))
        stored = []
        for item in finished:
            try:
                stored.extend(record_outcomes(ctx, [item]))
            except Exception as exc:
                logger.warning("storing the outcome of job %s failed: %s", item[0]["job_id"], exc)
                stored.append(exc)
    hand_back(ctx, finished, stored)
    return stored


def hand_back(
    ctx: WorkerContext, finished: list[Finished], stored: list[bool | BaseException]
) -> None:
    """Send the replies and lease releases of stored outcomes in one round trip, and the
    stored jobs to the settle sender.

    Per stored job that is the done marker, the reply to a waiting request and the
    lease's release. A job that was already final gets its done marker, so later copies
    stop at the start check instead of calling the upstream. If Redis cannot be reached,
    a waiting request reads the result from the database, the leases expire, and the
    sweeper sends the jobs to be settled if the settle sender could not.

    The outcomes are already stored, so errors here are logged, not raised, and one
    job's reply that fails to encode leaves the other jobs' replies alone.
    """
    pipe = ctx.redis.pipeline(transaction=False)
    reply_lists: set[str] = set()
    for (spec, outcome), ok in zip(finished, stored, strict=True):
        if ok is True or ok is False:
            pipe.set(done_key(spec["job_id"]), b"1", ex=DONE_TTL_S)
        if ok is True:
            try:
                reply_to = queue_final_reply(pipe, spec, outcome)
                if reply_to is not None:
                    reply_lists.add(reply_to)
            except Exception:
                logger.exception("could not encode the reply of job %s", spec["job_id"])
            pipe.delete(lease_key(spec["job_id"]))
    # Most replies of a group go to the same API process: one expiry per list.
    for reply_to in reply_lists:
        pipe.expire(reply_to, REPLY_TTL_S)
    try:
        pipe.execute()
    except Exception as exc:  # noqa: BLE001  (logged; see the docstring for the repair)
        first = finished[0][0]["job_id"]
        logger.warning(
            "sending the replies and settle task of %d jobs (first %s) failed: %s: %s",
            len(finished),
            first,
            type(exc).__name__,
            exc,
        )
    ctx.settle_sender.add(
        [spec["job_id"] for (spec, _), ok in zip(finished, stored, strict=True) if ok is True]
    )


# Outcomes finished at the same time in this process share one transaction.
_outcomes: GroupCommit[Finished, bool] = GroupCommit(
    _write_outcomes, max_items=256, name="outcomes"
)


def finish(ctx: WorkerContext, spec: dict[str, Any], outcome: Outcome) -> bool:
    """Record a final outcome, after which ``hand_back`` replies and releases the lease.

    The outcome is stored with those of other jobs finishing at the same time. Returns
    whether it was stored, which is when its lease was released.
    """
    job_id = spec["job_id"]
    # A job no request waits for (POST /v1/jobs, batches) may be cancelled through the
    # jobs API while it runs: it ends cancelled, charged for the usage it had.
    if spec.get("reply_to") is None and ctx.redis.exists(cancel_key(job_id)):
        outcome.cancelled = True
    if not _outcomes.submit((spec, outcome)):
        logger.info("job %s was already finished; ignoring a repeated delivery", job_id)
        return False
    if outcome.result is not None:
        count_tokens(spec["model"], outcome.result.prompt_tokens, outcome.result.completion_tokens)
    return True


def lease_holder(region: str) -> str:
    """Return the lease value of this process: ``<pool>|<identity>``."""
    return f"{region}|{worker_identity()}"


def take_over_lease(
    ctx: WorkerContext, job_id: str, holder: str, current: bytes | None, lease_s: int
) -> bool:
    """Take a lease that is already set, unless a live worker other than this one holds it.

    The lease names the heartbeat that proves its holder alive: ``<pool>|<identity>``.
    A lease left by a dead worker, or by this process, is taken over.
    """
    if current and current.decode() != holder and holder_alive(ctx.redis, current):
        logger.info(
            "job %s is running on %s; dropping a repeated delivery", job_id, current.decode()
        )
        return False
    ctx.redis.set(lease_key(job_id), holder, ex=lease_s)
    return True


@celery_app.task(name=RUN_JOB_TASK, bind=True)
def run_job(self: Task, **spec: Any) -> None:
    """Run one job: ``spec`` is the message the API published (see ``broker.intake``)."""
    run_delivered(get_context(), self.request.hostname, [spec])


@celery_app.task(name=RUN_JOBS_TASK, bind=True)
def run_jobs(self: Task, jobs: list[dict[str, Any]]) -> None:
    """Run the jobs of one queue that the API or a batch published together."""
    _prefetch.add(len(jobs) - 1)
    try:
        run_delivered(get_context(), self.request.hostname, jobs)
    finally:
        _prefetch.add(1 - len(jobs))


class _ConsumerHandle(bootsteps.StartStopStep):
    """Keeps the worker's consumer, whose prefetch window ``run_jobs`` adjusts."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, parent: Any) -> None:
        global _consumer
        _consumer = parent


_consumer: Any = None
celery_app.steps["consumer"].add(_ConsumerHandle)


class _PrefetchShare:
    """Shrinks the consumer's prefetch window by the extra jobs of running messages.

    Celery counts the messages a worker holds, and a message may carry many jobs. Left
    alone, a busy worker would take its concurrency in messages and keep jobs waiting
    for its call slots that another worker could run. The window is recomputed from the
    sum of extra jobs whenever that sum changes, never goes below one message, and is
    given back in full once no message with extra jobs runs.
    """

    def __init__(self) -> None:
        self.extra_jobs = 0
        self._qos: Any = None
        self._subtracted = 0

    def add(self, extra_jobs: int) -> None:
        self.extra_jobs += extra_jobs
        qos = getattr(_consumer, "qos", None)
        if qos is None:
            return
        if qos is not self._qos:
            # A reconnected consumer has a new window, at its full size.
            self._qos, self._subtracted = qos, 0
        full = qos.value + self._subtracted
        target = min(self.extra_jobs, max(full - 1, 0))
        if target > self._subtracted:
            qos.decrement_eventually(target - self._subtracted)
        elif target < self._subtracted:
            qos.increment_eventually(self._subtracted - target)
        self._subtracted = target


_prefetch = _PrefetchShare()


def run_delivered(ctx: WorkerContext, hostname: str, specs: list[dict[str, Any]]) -> None:
    """Claim the delivered jobs in one round trip, then run each claimed one.

    A single job runs in the calling greenlet; several run in a greenlet each, and this
    returns when all have ended. Each job leaves ``_running`` when its own run ends.
    """
    fresh: list[dict[str, Any]] = []
    for spec in specs:
        job_id = spec["job_id"]
        spec["worker"] = hostname
        # Checked before the Redis reads: a copy finishing while they wait would make
        # them stale. A copy sets the done marker before it leaves the set.
        if job_id in _running:
            logger.info("job %s is already running; dropping a repeated delivery", job_id)
            continue
        _running.add(job_id)
        fresh.append(spec)
    try:
        claimed = _claim(ctx, fresh)
    except BaseException:
        for spec in fresh:
            _running.discard(spec["job_id"])
        raise
    running = {spec["job_id"] for spec, _ in claimed}
    for spec in fresh:
        if spec["job_id"] not in running:
            _running.discard(spec["job_id"])
    if len(claimed) == 1:
        _run_and_leave(ctx, *claimed[0])
        return
    threads = [
        threading.Thread(target=_run_logged, args=(ctx, spec, circuit), daemon=True)
        for spec, circuit in claimed
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _claim(
    ctx: WorkerContext, specs: list[dict[str, Any]]
) -> list[tuple[dict[str, Any], list[bytes | None]]]:
    """Take the lease of each job unless it is done or held; return the claimed jobs,
    each with the state of its target's circuit.

    One round trip for all: per job the lease (taken if free), the done marker and the
    lease's holder, and per target the circuit state. The lease comes first: a copy
    finishing elsewhere sets the done marker before it frees the lease, so once the SET
    NX succeeds the EXISTS after it finds the marker. If anything fails, the leases this
    process took are released, so the sweeper can publish the jobs again.
    """
    if not specs:
        return []
    try:
        return _claim_leases(ctx, specs)
    except Exception:
        _release_own_leases(ctx, specs)
        raise


def _claim_leases(
    ctx: WorkerContext, specs: list[dict[str, Any]]
) -> list[tuple[dict[str, Any], list[bytes | None]]]:
    pipe = ctx.redis.pipeline(transaction=False)
    for spec in specs:
        pipe.set(
            lease_key(spec["job_id"]), lease_holder(spec["region"]), nx=True, ex=_lease_s(spec)
        )
        pipe.exists(done_key(spec["job_id"]))
        pipe.get(lease_key(spec["job_id"]))
    targets = sorted({target_name(spec["provider"], spec["region"]) for spec in specs})
    for target in targets:
        pipe.mget(state_keys(target))
    replies = pipe.execute()
    circuits = dict(zip(targets, replies[3 * len(specs) :], strict=True))
    claimed = []
    for index, spec in enumerate(specs):
        job_id = spec["job_id"]
        lease_taken, done, current = replies[3 * index : 3 * index + 3]
        if done:
            if lease_taken:
                ctx.redis.delete(lease_key(job_id))
            logger.info("job %s is already done; dropping a repeated delivery", job_id)
            continue
        holder = lease_holder(spec["region"])
        if not (lease_taken or take_over_lease(ctx, job_id, holder, current, _lease_s(spec))):
            logger.info("job %s is already running; dropping a repeated delivery", job_id)
            continue
        claimed.append((spec, circuits[target_name(spec["provider"], spec["region"])]))
    return claimed


# Deletes a lease only if this process holds it.
_RELEASE_OWN_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


def _release_own_leases(ctx: WorkerContext, specs: list[dict[str, Any]]) -> None:
    try:
        release = ctx.redis.register_script(_RELEASE_OWN_LEASE)
        pipe = ctx.redis.pipeline(transaction=False)
        for spec in specs:
            release(
                keys=[lease_key(spec["job_id"])], args=[lease_holder(spec["region"])], client=pipe
            )
        pipe.execute()
    except Exception as exc:  # noqa: BLE001  (the leases then expire with the jobs)
        logger.warning(
            "could not release the leases of %d jobs (first %s): %s",
            len(specs),
            specs[0]["job_id"],
            exc,
        )


def _lease_s(spec: dict[str, Any]) -> int:
    return int(max(0.0, spec["deadline"] - time.time()) + LEASE_MARGIN_S)


def _run_logged(ctx: WorkerContext, spec: dict[str, Any], circuit: list[bytes | None]) -> None:
    try:
        _run_and_leave(ctx, spec, circuit)
    except Exception:
        # The lease is released, so the job is handled as one whose message was lost.
        logger.exception("job %s failed in the worker", spec["job_id"])


def _run_and_leave(ctx: WorkerContext, spec: dict[str, Any], circuit: list[bytes | None]) -> None:
    try:
        _run_claimed(ctx, spec, circuit)
    finally:
        _running.discard(spec["job_id"])


def _run_claimed(ctx: WorkerContext, spec: dict[str, Any], circuit: list[bytes | None]) -> None:
    """Run a job whose lease this process holds, and release the lease if not finished."""
    job_id = spec["job_id"]
    released = False
    observe_queue_wait(
        queue_name(spec["provider"], spec["region"], spec["lane"]),
        time.time() - spec.get("published_at", time.time()),
    )
    slots = _call_slots(ctx)
    try:
        # A circuit state read before a wait for a slot may be stale: read it again.
        state: str | None = state_from(*circuit)
        if not slots.acquire(blocking=False):
            slots.acquire()
            state = None
        try:
            with job_in_flight(spec["region"]):
                outcome = call_target(ctx, spec, state)
        finally:
            slots.release()
        if outcome.error is not None and outcome.error.failover:
            index = next_target(ctx, spec)
            if index is not None:
                hand_over(ctx, spec, outcome, index)
                return
        released = finish(ctx, spec, outcome)
    finally:
        if not released:
            ctx.redis.delete(lease_key(job_id))


_slots: threading.BoundedSemaphore | None = None


def _call_slots(ctx: WorkerContext) -> threading.BoundedSemaphore:
    """Return the semaphore that keeps this process's upstream calls within its concurrency.

    Celery's concurrency counts messages, and a message may carry several jobs.
    """
    global _slots
    if _slots is None:
        _slots = threading.BoundedSemaphore(ctx.settings.worker_concurrency)
    return _slots
