"""The billing task: settle a finished job against its wallet, exactly once."""

from __future__ import annotations

import logging

from broker.ledger import settle_job as settle_in_session
from workers.app import SETTLE_JOB_TASK, celery_app
from workers.context import get_context
from workers.job_events import on_job_settled

logger = logging.getLogger(__name__)


@celery_app.task(name=SETTLE_JOB_TASK)
def settle_job(job_id: str) -> None:
    """Charge the job's usage and release its hold; a repeated call changes nothing."""
    ctx = get_context()
    with ctx.sessions.begin() as session:
        settlement = settle_in_session(session, job_id)
        # Batch progress and webhook events change in the settlement's transaction.
        after = on_job_settled(session, job_id, ctx.settings) if settlement else None
    if settlement is None or after is None:
        logger.info("job %s is already settled or not finished; nothing to do", job_id)
        return
    logger.info(
        "settled job %s: charged %d micro-USD, released %d micro-USD",
        job_id,
        settlement.cost_micro_usd,
        settlement.released_micro_usd,
    )
    after.send(ctx)
