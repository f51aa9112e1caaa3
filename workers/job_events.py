"""What follows a job's settlement: batch progress and webhook events.

``on_job_settled`` runs in the settlement's transaction, so a batch's counters and a
job's event change exactly once with the charge. The work that must wait for the
commit (publishing tasks) is returned as an ``AfterSettle`` to ``send``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from broker.batches import FINALIZE_BATCH_TASK, send_batch_task, start_finalizing
from broker.settings import Settings
from broker.tables import Batch, Job
from broker.webhooks import JOB_EVENTS, enqueue_event, job_event_data, publish_deliveries
from workers.app import celery_app
from workers.context import WorkerContext

logger = logging.getLogger(__name__)


@dataclass
class AfterSettle:
    """Tasks to publish once the settlement has committed."""

    deliveries: list[str] = field(default_factory=list)
    finalize_batch: str | None = None
    next_of_batch: str | None = None
    # The same for many jobs: batches to finalize, and per batch how many places its
    # settled jobs left in its window.
    finalize_batches: list[str] = field(default_factory=list)
    next_of_batches: dict[str, int] = field(default_factory=dict)

    def send(self, ctx: WorkerContext) -> None:
        from workers.batch_jobs import publish_next

        publish_deliveries(celery_app, self.deliveries)
        if self.finalize_batch is not None:
            send_finalize(self.finalize_batch)
        for batch_id in self.finalize_batches:
            send_finalize(batch_id)
        if self.next_of_batch is not None:
            # The settled job leaves a place in the batch's window for the next one.
            publish_next(ctx, self.next_of_batch, 1)
        for batch_id, places in self.next_of_batches.items():
            publish_next(ctx, batch_id, places)


def send_finalize(batch_id: str) -> None:
    """Publish the task that writes a finalizing batch's output files."""
    send_batch_task(celery_app, FINALIZE_BATCH_TASK, batch_id)


def produced_result(status: str, has_response: bool, has_error: bool) -> bool:
    """Return whether a finished job counts as completed in its batch: it has a result.

    A job cancelled while it ran still has one, and is charged for it.
    """
    return status in ("succeeded", "cancelled") and has_response and not has_error


def on_jobs_settled(session: Session, job_ids: list[str], settings: Settings) -> AfterSettle:
    """Do what ``on_job_settled`` does for many jobs settled in one transaction.

    A batch's counters change once per batch, and the next jobs of a batch are
    published together, so a large batch does not take a statement and a transaction
    per job.
    """
    after = AfterSettle()
    rows = session.execute(
        select(
            Job.id,
            Job.batch_id,
            Job.status,
            # Compared in Python: a JSON column may hold a JSON null, which SQL's
            # IS NULL does not match.
            Job.response,
            Job.error,
        ).where(Job.id.in_(job_ids))
    ).all()
    counts: dict[str, list[int]] = {}
    for row in rows:
        if row.batch_id is None:
            # An asynchronous job: its event needs the whole row.
            single = on_job_settled(session, row.id, settings)
            after.deliveries.extend(single.deliveries)
            continue
        completed = produced_result(row.status, row.response is not None, row.error is not None)
        counts.setdefault(row.batch_id, [0, 0])[0 if completed else 1] += 1
    for batch_id in sorted(counts):
        completed, failed = counts[batch_id]
        session.execute(
            update(Batch)
            .where(Batch.id == batch_id)
            .values(completed=Batch.completed + completed, failed=Batch.failed + failed)
        )
        if start_finalizing(session, batch_id):
            after.finalize_batches.append(batch_id)
        else:
            after.next_of_batches[batch_id] = completed + failed
    return after


def on_job_settled(session: Session, job_id: str, settings: Settings) -> AfterSettle:
    """Count a settled batch job in its batch, or queue the event of an asynchronous job.

    An asynchronous job (``POST /v1/jobs``) is one that no request waits for: it has no
    ``reply_to`` and belongs to no batch. Synchronous jobs send no events.
    """
    after = AfterSettle()
    job = session.scalars(
        select(Job).where(Job.id == job_id).execution_options(populate_existing=True)
    ).one()
    if job.batch_id is not None:
        completed = produced_result(job.status, job.response is not None, job.error is not None)
        column = Batch.completed if completed else Batch.failed
        session.execute(
            update(Batch).where(Batch.id == job.batch_id).values({column.key: column + 1})
        )
        if start_finalizing(session, job.batch_id):
            after.finalize_batch = job.batch_id
        else:
            after.next_of_batch = job.batch_id
        return after
    if job.reply_to is None and job.status in JOB_EVENTS:
        after.deliveries = enqueue_event(
            session,
            job.account_id,
            JOB_EVENTS[job.status],
            job_event_data(job),
            job.webhook_url,
            settings.webhook_timeout_s,
        )
    return after
