"""Entry point of every worker process: the Celery app with all tasks registered.

Start through ``broker worker --region <region>`` or ``broker billing-worker``; they
run ``celery -A workers.worker worker`` with the right queues and pool.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery.signals import worker_ready, worker_shutdown

from broker.gc_tuning import tune_after_startup
from broker.metrics import mark_process_dead, start_worker_metrics_server
from broker.settings import get_settings
from workers import batches, billing, dispatch, webhooks  # noqa: F401  (registers the tasks)
from workers.app import celery_app
from workers.async_pass import start_async_pass
from workers.context import get_context
from workers.gevent_tuning import use_system_poll_for_idle_checks
from workers.heartbeat import set_node_name, start_heartbeat, worker_identity
from workers.sweeper import start_sweeper

# The pool name this process beats for, set by the ``broker`` command that starts it.
POOL_ENV = "BROKER_WORKER_POOL"

# httpx logs every request URL at INFO; a URL may carry a provider key (Gemini's ?key=).
logging.getLogger("httpx").setLevel(logging.WARNING)
use_system_poll_for_idle_checks()

logger = logging.getLogger(__name__)

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
        settings = get_settings()
        _stop_heartbeat = start_heartbeat(
            settings.redis_url,
            pool,
            worker_identity(),
            region=settings.worker_region,
            lanes=tuple(settings.worker_lanes.split(",")),
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
    tune_after_startup()


@worker_shutdown.connect
def _on_shutdown(**_: Any) -> None:
    # Sent once the pool has stopped, so no job adds ids to settle after this.
    if get_context.cache_info().currsize:
        ctx = get_context()
        if not ctx.settle_sender.drain():
            logger.warning("sending the gathered settle ids timed out; the sweeper settles them")
        if ctx.outcome_statements is not None:
            ctx.outcome_statements.close()
    mark_process_dead()
    for stop in (_stop_heartbeat, _stop_sweeper, _stop_async_pass):
        if stop is not None:
            stop.set()
