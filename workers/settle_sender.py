"""Settle tasks of a region worker, gathered for a moment after the outcomes are stored.

The hand-back replies at once, but the ids of the stored jobs wait up to
``SETTLE_SEND_LINGER_S`` and then go to the billing worker together, as one
``settle_jobs`` task. At low load every outcome would otherwise be a task of its own.
The billing worker would then spend most of its CPU on Celery's handling of single
messages, on the same cores as the requests that wait for their replies.

Ids still gathered when a worker is killed are lost with it. Nothing else is: the
sweeper sends every job that has been finished and unsettled for a while to be settled,
as it does for a settle task lost in Redis.
"""

from __future__ import annotations

import logging

from redis import Redis

from workers.app import celery_app, encode_settle_message
from workers.group_commit import GroupCommit

logger = logging.getLogger(__name__)

# Seconds between the first gathered id and the task that carries it. The billing
# worker lingers for more settle tasks anyway, so this adds little to the time before a
# job is settled.
SETTLE_SEND_LINGER_S = 0.05
# Max job ids in one settle task. A full task is sent without waiting for the linger.
MAX_IDS_PER_TASK = 1024
# Seconds a stopping worker waits for its gathered ids to be sent.
DRAIN_TIMEOUT_S = 5.0


class SettleSender:
    """Sender of the ids of stored outcomes to the billing worker, in shared settle tasks."""

    def __init__(self, redis: Redis, linger_s: float = SETTLE_SEND_LINGER_S) -> None:
        self._redis = redis
        self._ids: GroupCommit[str, None] = GroupCommit(
            self._send, max_items=MAX_IDS_PER_TASK, name="settle-sender", linger_s=linger_s
        )

    def add(self, job_ids: list[str]) -> None:
        """Queue ``job_ids`` for the next settle task, without waiting for it."""
        if job_ids:
            self._ids.submit_nowait(job_ids)

    def drain(self, timeout_s: float = DRAIN_TIMEOUT_S) -> bool:
        """Send the gathered ids now and wait; return False if that took over ``timeout_s``."""
        return self._ids.drain(timeout_s)

    def _send(self, job_ids: list[str]) -> list[None]:
        try:
            message = encode_settle_message(celery_app, job_ids)
            self._redis.lpush(message.key, message.payload)
        except Exception as exc:  # noqa: BLE001  (the sweeper sends the jobs again)
            logger.warning(
                "sending %d jobs (first %s) to be settled failed, so the sweeper sends them "
                "later: %s: %s",
                len(job_ids),
                job_ids[0],
                type(exc).__name__,
                exc,
            )
        return [None] * len(job_ids)
