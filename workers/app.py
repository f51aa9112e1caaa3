"""The Celery application shared by the API (to publish) and the workers (to consume)."""

from __future__ import annotations

import time
from typing import Any

from celery import Celery

from broker.settings import get_settings

RUN_JOB_TASK = "broker.run_job"
SETTLE_JOB_TASK = "broker.settle_job"
BILLING_QUEUE = "billing"
WEBHOOKS_QUEUE = "webhooks"
BATCHES_QUEUE = "batches"

# Seconds before Redis hands an unacknowledged message to another worker. Longer than
# the longest job (the synchronous wait limit), or a slow job would run twice.
VISIBILITY_TIMEOUT_S = 2 * 3600
# Reconnection attempts when publishing, at most about one second in all.
PUBLISH_RETRY_POLICY = {
    "max_retries": 3,
    "interval_start": 0,
    "interval_step": 0.25,
    "interval_max": 0.5,
}


def make_celery() -> Celery:
    """Build the Celery app from the settings."""
    settings = get_settings()
    app = Celery("broker", broker=settings.redis_url)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        # At-least-once: acknowledge after the task ran, and give a message back to the
        # queue when the process running it dies.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # One reserved message per greenlet slot, so no slot's work waits behind another's.
        worker_prefetch_multiplier=1,
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S},
        broker_connection_retry_on_startup=True,
        task_default_queue=BILLING_QUEUE,
        task_send_sent_event=False,
        # Task events cost each worker a Redis publish per task state, about a quarter
        # of a settle task's CPU. Flower turns them on in every worker while it runs.
        worker_send_task_events=False,
    )
    return app


celery_app = make_celery()


def publish_job(app: Celery, spec: dict[str, Any], queue: str) -> None:
    """Publish a job's task.

    The prompt travels in the message but is never displayed: Flower and the worker
    logs show ``kwargsrepr`` instead of the arguments.
    """
    app.send_task(
        RUN_JOB_TASK,
        # The publish time lets the worker measure how long the job waited in the queue.
        kwargs={**spec, "published_at": time.time()},
        queue=queue,
        # A connection broken by a Redis restart is replaced on the first retry.
        retry=True,
        retry_policy=PUBLISH_RETRY_POLICY,
        kwargsrepr=(
            f"{{job_id: {spec['job_id']}, model: {spec['model']}, region: {spec['region']}"
            + (f", batch_id: {spec['batch_id']}" if spec.get("batch_id") else "")
            + "}"
        ),
    )
