"""Entry point of every worker process: the Celery app with all tasks registered.

Start through ``broker worker --region <region>`` or ``broker billing-worker``; they
run ``celery -A workers.worker worker`` with the right queues and pool.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import gevent
from celery.signals import task_received, worker_ready, worker_shutdown

from broker.metrics import mark_process_dead, start_worker_metrics_server
from broker.settings import get_settings
from workers import batches, billing, dispatch, webhooks  # noqa: F401  (registers the tasks)
from workers.app import RUN_JOB_TASK, celery_app
from workers.async_pass import start_async_pass
from workers.context import get_context
from workers.dispatch import claim_lease
from workers.heartbeat import set_node_name, start_heartbeat, worker_identity
from workers.sweeper import start_sweeper

# The pool name this process beats for, set by the ``broker`` command that starts it.
POOL_ENV = "BROKER_WORKER_POOL"

# httpx logs every request URL at INFO; a URL may carry a provider key (Gemini's ?key=).
logging.getLogger("httpx").setLevel(logging.WARNING)

app = celery_app
_stop_heartbeat = None
_stop_sweeper = None
_stop_async_pass = None


@worker_ready.connect
def _on_ready(sender: Any = None, **_: Any) -> None:
    global _stop_heartbeat, _stop_sweeper, _stop_async_pass
    pool = os.environ.get(POOL_ENV)
    set_node_name(sender.hostname)
    if pool:
        _stop_heartbeat = start_heartbeat(
            get_settings().redis_url, pool, worker_identity(), region=get_settings().worker_region
        )
    port = get_settings().worker_metrics_port
    if port:
        # Each worker process serves its own /metrics, so each needs its own port.
        start_worker_metrics_server(port)
    if pool == "billing":
        # Any number of billing workers may run it; a Redis lock lets one sweep at a time.
        _stop_sweeper = start_sweeper(get_settings().sweep_interval_s)
        # Webhook retries, batch windows and expiry, job retention (workers.async_pass).
        _stop_async_pass = start_async_pass(get_settings().async_pass_interval_s)


@task_received.connect
def _on_received(request: Any = None, **_: Any) -> None:
    if request is None or request.task_name != RUN_JOB_TASK:
        return
    # In its own greenlet: this handler runs in the consumer's loop, which would
    # otherwise wait for the round trip to Redis before it takes the next message.
    gevent.spawn(_lease_on_receipt, request.kwargs)


def _lease_on_receipt(spec: dict[str, Any]) -> None:
    try:
        claim_lease(get_context(), spec["job_id"], spec["region"], spec["deadline"])
    except Exception:  # noqa: BLE001  (the task claims the lease again when it starts)
        logging.getLogger(__name__).warning(
            "could not take the lease of job %s on receipt", spec.get("job_id")
        )


@worker_shutdown.connect
def _on_shutdown(**_: Any) -> None:
    mark_process_dead()
    for stop in (_stop_heartbeat, _stop_sweeper, _stop_async_pass):
        if stop is not None:
            stop.set()
