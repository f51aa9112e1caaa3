"""Entry point of every worker process: the Celery app with all tasks registered.

Start through ``broker worker --region <region>`` or ``broker billing-worker``; they
run ``celery -A workers.worker worker`` with the right queues and pool.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery.signals import worker_ready, worker_shutdown

from broker.settings import get_settings
from workers import billing, dispatch  # noqa: F401  (registers the tasks)
from workers.app import celery_app
from workers.heartbeat import start_heartbeat

# The pool name this process beats for, set by the ``broker`` command that starts it.
POOL_ENV = "BROKER_WORKER_POOL"

# httpx logs every request URL at INFO; a URL may carry a provider key (Gemini's ?key=).
logging.getLogger("httpx").setLevel(logging.WARNING)

app = celery_app
_stop_heartbeat = None


@worker_ready.connect
def _on_ready(sender: Any = None, **_: Any) -> None:
    global _stop_heartbeat
    pool = os.environ.get(POOL_ENV)
    if pool:
        _stop_heartbeat = start_heartbeat(get_settings().redis_url, pool, sender.hostname)


@worker_shutdown.connect
def _on_shutdown(**_: Any) -> None:
    if _stop_heartbeat is not None:
        _stop_heartbeat.set()
