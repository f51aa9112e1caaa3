"""A Celery app whose job task only records what it received, for tests/test_publish.py.

It has the broker's Celery configuration (``make_celery``), so a worker started with
``celery -A publish_probe worker`` consumes job messages the way the region workers do.
"""

from __future__ import annotations

import json
from typing import Any

import redis

from workers.app import RUN_JOB_TASK, make_celery

app = make_celery()


def received_key(job_id: str) -> str:
    return f"probe:received:{job_id}"


@app.task(name=RUN_JOB_TASK, bind=True)
def run_job(self: Any, **kwargs: Any) -> None:
    """Store the task's keyword arguments and delivery info under ``received_key``."""
    record = {
        "kwargs": kwargs,
        "task_id": self.request.id,
        "delivery_info": self.request.delivery_info,
        "origin": self.request.origin,
    }
    with redis.Redis.from_url(app.conf.broker_url) as client:
        client.set(received_key(kwargs["job_id"]), json.dumps(record))
