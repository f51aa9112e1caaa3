"""The sweeper: the database is the source of truth, and this repairs what Redis lost.

Every ``sweep_interval_s`` the one process that holds the Redis lock scans the jobs
that are not final, and:

- expires jobs past their deadline, replies to a waiting client, and sends the settle
  task that releases their hold;
- publishes again jobs whose message is gone: no queued marker and no lease (Redis was
  flushed), or a lease whose worker stopped sending heartbeats (the worker died);
- sends the settle task again for finished jobs that stayed unsettled.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update

from broker.catalog import queue_name
from broker.circuits import CircuitBreaker
from broker.errors import GatewayTimeout
from broker.tables import Job, as_utc, utcnow
from workers.adapters.base import DeadlineExceeded
from workers.app import BILLING_QUEUE, SETTLE_JOB_TASK, celery_app, publish_job
from workers.calls import Outcome
from workers.context import WorkerContext, get_context
from workers.heartbeat import holder_alive
from workers.markers import lease_key, queued_key
from workers.replies import send_final_reply

logger = logging.getLogger(__name__)

LOCK_KEY = "broker:sweeper:lock"
# Seconds after its last dispatch before a job's message counts as possibly lost, so a
# message on its way from the API to Redis is not taken for a lost one.
REDISPATCH_GRACE_S = 10
# Seconds after finishing before an unsettled job gets its settle task again.
SETTLE_GRACE_S = 30
# Seconds before the same unsettled job gets its settle task again.
SETTLE_RESEND_INTERVAL_S = 60
# Jobs examined per run and per kind, so one run stays short however large the backlog.
BATCH = 500
ACTIVE_STATUSES = ("queued", "running")


@dataclass
class SweepReport:
    expired: int = 0
    redispatched: int = 0
    resettled: int = 0


def _expire(ctx: WorkerContext, job: Job) -> bool:
    error = GatewayTimeout(
        f"Job {job.id} passed its deadline before a provider answered; its hold was released."
    ).to_job_error()
    with ctx.sessions.begin() as session:
        updated = session.execute(
            update(Job)
            .where(Job.id == job.id, Job.status.in_(ACTIVE_STATUSES))
            .values(status="expired", error=error, finished_at=utcnow())
        ).rowcount
    if not updated:
        return False
    spec = dict(job.dispatch or {}, job_id=job.id)
    spec.setdefault("provider", job.provider)
    spec.setdefault("region", job.region)
    spec.setdefault("model", job.model)
    spec.setdefault("body", job.request)
    spec.setdefault("reply_to", job.reply_to)
    send_final_reply(ctx.redis, spec, Outcome(error=DeadlineExceeded(error["message"])))
    celery_app.send_task(SETTLE_JOB_TASK, args=[job.id], queue=BILLING_QUEUE)
    return True


def _message_lost(ctx: WorkerContext, job: Job) -> bool:
    """Return whether nothing is going to run the job unless it is published again."""
    lease, queued = ctx.redis.mget(lease_key(job.id), queued_key(job.id))
    if lease:
        # TODO: a live worker that lost its broker connection keeps the lease of a job it
        # will not run, so the job waits until the sweeper expires it at its deadline.
        return not holder_alive(ctx.redis, lease)
    if not queued:
        return True
    # A queued marker without a lease: the message waits in its queue, unless the queue
    # is empty, which happens when a worker died between taking the message and
    # recording the lease.
    spec = job.dispatch or {}
    queue = queue_name(
        spec.get("provider", job.provider),
        spec.get("region", job.region),
        spec.get("lane", job.lane),
    )
    return ctx.redis.llen(queue) == 0


def _better_target(ctx: WorkerContext, spec: dict[str, Any]) -> int | None:
    """Return the route index to publish the job to: its own target while that region
    has workers and a closed circuit, else the first usable one, or None if none is."""
    route = spec.get("route") or []
    current = spec.get("route_index", 0)
    order = [current] + [index for index in range(len(route)) if index != current]
    return CircuitBreaker(ctx.redis).first_usable(route, order if route else [])


def _stranded(ctx: WorkerContext, job: Job) -> bool:
    """Return whether the job waits on a target that cannot run it now (no live worker
    in its region, or an open circuit) while another target of its route can."""
    lease = ctx.redis.get(lease_key(job.id))
    if lease and holder_alive(ctx.redis, lease):
        return False
    spec = job.dispatch or {}
    better = _better_target(ctx, spec)
    return better is not None and better != spec.get("route_index", 0)


def _redispatch(ctx: WorkerContext, job: Job) -> None:
    spec: dict[str, Any] = dict(job.dispatch or {})
    spec.pop("worker", None)
    index = _better_target(ctx, spec)
    if index is not None and index != spec.get("route_index", 0):
        # The job's region lost its workers or its circuit opened: move the job along
        # its route, as a worker does when retries run out.
        spec.update(spec["route"][index], route_index=index)
    with ctx.sessions.begin() as session:
        session.execute(
            update(Job)
            .where(Job.id == job.id)
            .values(dispatch=spec, dispatched_at=utcnow(), dispatch_count=Job.dispatch_count + 1)
        )
    ctx.redis.set(
        queued_key(job.id),
        b"1",
        ex=int(max(60, (job.deadline_at - utcnow()).total_seconds() + 300)),
    )
    publish_job(celery_app, spec, queue_name(spec["provider"], spec["region"], spec["lane"]))
    logger.warning(
        "job %s lost its message or its worker; published it again to %s.%s (dispatch %d)",
        job.id,
        spec["provider"],
        spec["region"],
        job.dispatch_count + 1,
    )


def sweep(ctx: WorkerContext) -> SweepReport:
    """Run one pass over the jobs that are not settled."""
    report = SweepReport()
    now = utcnow()
    with ctx.sessions() as session:
        # A batch's unpublished jobs (no dispatched_at) wait in the database for their
        # batch's window (workers.batch_jobs); the batch expires them itself.
        active = session.scalars(
            select(Job)
            .where(Job.status.in_(ACTIVE_STATUSES), Job.dispatched_at.is_not(None))
            .order_by(Job.created_at)
            .limit(BATCH)
        ).all()
        unsettled = session.scalars(
            select(Job.id)
            .where(
                Job.settled_at.is_(None),
                Job.status.not_in(ACTIVE_STATUSES),
                Job.finished_at < now - timedelta(seconds=SETTLE_GRACE_S),
            )
            .limit(BATCH)
        ).all()

    for job in active:
        if job.deadline_at is not None and as_utc(job.deadline_at) <= now:
            report.expired += _expire(ctx, job)
        elif (
            job.dispatch
            and job.dispatched_at is not None
            and as_utc(job.dispatched_at) <= now - timedelta(seconds=REDISPATCH_GRACE_S)
            and (_message_lost(ctx, job) or _stranded(ctx, job))
        ):
            _redispatch(ctx, job)
            report.redispatched += 1
    for job_id in unsettled:
        # One resend per job a minute, so a billing backlog is not buried under repeats.
        if ctx.redis.set(
            f"broker:job:{job_id}:settle-resent", b"1", nx=True, ex=SETTLE_RESEND_INTERVAL_S
        ):
            celery_app.send_task(SETTLE_JOB_TASK, args=[job_id], queue=BILLING_QUEUE)
            report.resettled += 1
    if report.expired or report.redispatched or report.resettled:
        logger.info(
            "sweep: %d expired, %d published again, %d sent to settle again",
            report.expired,
            report.redispatched,
            report.resettled,
        )
    return report


def start_sweeper(interval_s: float) -> threading.Event:
    """Sweep every ``interval_s`` seconds in this process while it holds the lock."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval_s):
            ctx = get_context()
            try:
                if ctx.redis.set(LOCK_KEY, b"1", nx=True, ex=max(1, int(interval_s))):
                    sweep(ctx)
            except Exception:
                logger.exception("sweep failed; the next run tries again")

    threading.Thread(target=loop, name="sweeper", daemon=True).start()
    return stop
