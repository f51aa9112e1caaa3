"""The billing task: settle a finished job against its wallet, exactly once.

Settle tasks that run at the same time in one billing worker share a transaction
(``GroupCommit``): one statement marks all their jobs settled, each wallet is updated
once, and the ledger entries are one insert. The guarded update of the job rows keeps
each settlement exactly once, whatever the batch. Region workers send one
``settle_jobs`` task for the outcomes they stored together; the sweeper and the jobs API
send ``settle_job`` for one job.
"""

from __future__ import annotations

import logging

from sqlalchemy.exc import DBAPIError

from broker import ledger
from broker.ledger import Settlement
from workers.app import SETTLE_JOB_TASK, SETTLE_JOBS_TASK, celery_app
from workers.context import WorkerContext, get_context
from workers.group_commit import GroupCommit
from workers.job_events import AfterSettle, on_jobs_settled

logger = logging.getLogger(__name__)

# Max settlements per transaction.
MAX_BATCH = 256
# Seconds the settlement writer waits for more settle tasks before a transaction that is
# not full. No request waits for its settlement, and under load each transaction then
# carries the settlements of several region-worker batches: the billing worker's CPU
# per job is mostly per transaction.
SETTLE_LINGER_S = 0.1


def settle_together(ctx: WorkerContext, job_ids: list[str]) -> list[Settlement | None]:
    """Settle the jobs in one transaction; None for a job with nothing to settle."""
    afters: list[AfterSettle] = []
    with ctx.sessions.begin() as session:

        def record_events(settlements: list[Settlement]) -> None:
            # Batch progress and webhook events change in the settlement's transaction,
            # before the wallet updates, which come last to keep the wallet locks short.
            with_events = [s.job_id for s in settlements if s.has_events]
            if with_events:
                afters.append(on_jobs_settled(session, with_events, ctx.settings))

        settlements = ledger.settle_jobs(session, job_ids, before_wallets=record_events)
    for after in afters:
        try:
            after.send(ctx)
        except Exception:
            # The events are stored; the webhook and batch passes publish what was not
            # published, so a failed publish must not fail the settlements.
            logger.exception(
                "could not publish the tasks that follow %d settlements", len(settlements)
            )
    by_id = {settlement.job_id: settlement for settlement in settlements}
    return [by_id.get(job_id) for job_id in job_ids]


def settle_each(job_ids: list[str]) -> list[Settlement | None | BaseException]:
    """Settle the jobs together, or one by one if that fails; one result per job."""
    ctx = get_context()
    try:
        return list(settle_together(ctx, job_ids))
    except DBAPIError:
        if len(job_ids) == 1:
            raise
        logger.warning("settling %d jobs together failed; settling them one by one", len(job_ids))
    results: list[Settlement | None | BaseException] = []
    for job_id in job_ids:
        try:
            results.extend(settle_together(ctx, [job_id]))
        except Exception as exc:
            logger.warning("settling job %s failed: %s", job_id, exc)
            results.append(exc)
    return results


_settlements: GroupCommit[str, Settlement | None] = GroupCommit(
    settle_each, max_items=MAX_BATCH, name="settlements", linger_s=SETTLE_LINGER_S
)


@celery_app.task(name=SETTLE_JOB_TASK)
def settle_job(job_id: str) -> None:
    """Charge the job's usage and release its hold; a repeated call changes nothing."""
    settlement = _settlements.submit(job_id)
    if settlement is None:
        logger.info("job %s is already settled or not finished; nothing to do", job_id)
        return
    logger.info(
        "settled job %s: charged %d micro-USD, released %d micro-USD",
        job_id,
        settlement.cost_micro_usd,
        settlement.released_micro_usd,
    )


@celery_app.task(name=SETTLE_JOBS_TASK)
def settle_jobs(job_ids: list[str]) -> None:
    """Settle several jobs, with those of other settle tasks running at the same time."""
    results = _settlements.submit_all(job_ids)
    failed = [
        job_id
        for job_id, result in zip(job_ids, results, strict=True)
        if isinstance(result, BaseException)
    ]
    settled = sum(1 for result in results if isinstance(result, Settlement))
    logger.info("settled %d of %d jobs", settled, len(job_ids))
    if failed:
        # The sweeper sends finished, unsettled jobs to be settled again.
        logger.warning("could not settle %d jobs, such as %s", len(failed), failed[0])
