"""Redis markers that tell the sweeper where each job is, without a database write.

- ``queued``: set when the task is published; the message may be waiting in a queue.
- ``lease``: set by the worker running the job, holding its node name.
- ``done``: set once the outcome is stored; a redelivered message then does nothing.

Losing them all (a flushed Redis) only makes the sweeper publish the job again, and the
database guard on the job's status keeps a second run from finishing it twice.
"""

from __future__ import annotations

# Seconds a done marker is kept: longer than any redelivery of the job's message.
DONE_TTL_S = 24 * 3600


def queued_key(job_id: str) -> str:
    return f"broker:job:{job_id}:queued"


def lease_key(job_id: str) -> str:
    return f"broker:job:{job_id}:lease"


def done_key(job_id: str) -> str:
    return f"broker:job:{job_id}:done"
