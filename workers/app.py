"""The Celery application shared by the API (to publish) and the workers (to consume)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, NamedTuple

from celery import Celery
from kombu import serialization
from kombu.compression import compress
from kombu.entity import maybe_delivery_mode
from kombu.transport.redis import Channel as RedisChannel
from kombu.utils.json import dumps as json_dumps
from kombu.utils.uuid import uuid

from broker.db import json_text
from broker.settings import Settings, get_settings

RUN_JOB_TASK = "broker.run_job"
# Runs several jobs of one queue that were published together, each in its own greenlet.
RUN_JOBS_TASK = "broker.run_jobs"
SETTLE_JOB_TASK = "broker.settle_job"
# Settles several jobs in one transaction; a region worker sends one per batch of
# outcomes it stored together.
SETTLE_JOBS_TASK = "broker.settle_jobs"
BILLING_QUEUE = "billing"
WEBHOOKS_QUEUE = "webhooks"
BATCHES_QUEUE = "batches"

# Seconds before Redis hands an unacknowledged message to another worker. Longer than
# the longest job (the synchronous wait limit), or a slow job would run twice.
VISIBILITY_TIMEOUT_S = 2 * 3600
# Jobs created together go to a queue as one message of at most
# ``Settings.jobs_per_message`` jobs and about this many bytes of request bodies. A
# worker's consumer takes one message per Redis round trip, and that loop was what
# limited a worker's intake.
MAX_MESSAGE_BODY_BYTES = 1024 * 1024
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
        broker_transport_options={
            "visibility_timeout": VISIBILITY_TIMEOUT_S,
            # Every greenlet acknowledges its own task on kombu's connection pool, which
            # raises instead of waiting when it is full. A full pool (kombu's default is
            # 10) dropped the worker's broker connection when many tasks ended at once.
            "max_connections": redis_connections(settings),
            # Region workers skip kombu's acknowledgement emulation, which costs two Redis
            # transactions per message. Their jobs are recovered from the database instead:
            # a dead worker's leases lapse with its heartbeat (15 s), and the sweeper then
            # publishes those jobs again. An unacknowledged message would wait for the
            # visibility timeout.
            "ack_emulation": settings.worker_region is None,
            # One Redis list per queue. The broker never sets a message priority (lanes
            # keep batch jobs apart), and each extra step adds a key per queue to every
            # BRPOP: with kombu's default four steps, a region worker's BRPOP named 112.
            "priority_steps": [0],
        },
        broker_connection_retry_on_startup=True,
        task_default_queue=BILLING_QUEUE,
        task_send_sent_event=False,
        # Task events cost each worker a Redis publish per task state, about a quarter
        # of a settle task's CPU. Flower turns them on in every worker while it runs.
        worker_send_task_events=False,
    )
    return app


def redis_connections(settings: Settings) -> int:
    """Return the size of kombu's Redis pool: one per greenlet, and some for the
    consumer, heartbeats and control messages."""
    return max(settings.worker_concurrency, settings.billing_concurrency) + 32


celery_app = make_celery()


def job_task_kwargs(spec: dict[str, Any]) -> dict[str, Any]:
    """Return the job task's keyword arguments: the spec and the publish time.

    The publish time lets the worker measure how long the job waited in the queue.
    """
    return {**spec, "published_at": time.time()}


def job_kwargsrepr(spec: dict[str, Any]) -> str:
    """Return the job task's ``kwargsrepr``, the text shown in place of its arguments."""
    return (
        f"{{job_id: {spec['job_id']}, model: {spec['model']}, region: {spec['region']}"
        + (f", batch_id: {spec['batch_id']}" if spec.get("batch_id") else "")
        + "}"
    )


def publish_job(app: Celery, spec: dict[str, Any], queue: str) -> None:
    """Publish a job's task with Celery, blocking on the round trip to Redis.

    The prompt travels in the message but is never displayed: Flower and the worker
    logs show ``kwargsrepr`` instead of the arguments. The API publishes the same
    message without blocking, from ``encode_job_message``.
    """
    app.send_task(
        RUN_JOB_TASK,
        kwargs=job_task_kwargs(spec),
        queue=queue,
        # A connection broken by a Redis restart is replaced on the first retry.
        retry=True,
        retry_policy=PUBLISH_RETRY_POLICY,
        kwargsrepr=job_kwargsrepr(spec),
    )


class RedisMessage(NamedTuple):
    """A message as kombu's Redis transport stores it: the list key and the entry."""

    key: str
    payload: str


# The body encoding that kombu's virtual transports apply by default ("base64").
_BODY_ENCODING = RedisChannel.body_encoding
_encode_body = RedisChannel.codecs[_BODY_ENCODING].encode


def encode_job_message(app: Celery, spec: dict[str, Any], queue: str) -> RedisMessage:
    """Encode the list entry that ``publish_job`` makes kombu's Redis transport push.

    The caller pushes ``payload`` onto ``key`` with LPUSH, so an asyncio client can
    publish without Celery's blocking producer.
    """
    return encode_task_message(
        app, RUN_JOB_TASK, queue, kwargs=job_task_kwargs(spec), kwargsrepr=job_kwargsrepr(spec)
    )


def jobs_kwargsrepr(specs: list[dict[str, Any]]) -> str:
    """Return the ``kwargsrepr`` of a message of several jobs: ids, models, no prompts."""
    ids = ", ".join(spec["job_id"] for spec in specs)
    models = ", ".join(sorted({spec["model"] for spec in specs}))
    batches = sorted({spec["batch_id"] for spec in specs if spec.get("batch_id")})
    return (
        f"{{jobs: [{ids}], models: [{models}], region: {specs[0]['region']}"
        + (f", batch_ids: [{', '.join(batches)}]" if batches else "")
        + "}"
    )


def encode_job_messages(
    app: Celery, jobs: Iterable[tuple[str, dict[str, Any]]], max_jobs: int | None = None
) -> list[RedisMessage]:
    """Encode the messages that publish ``jobs``, pairs of a queue and a job's spec.

    The jobs of a queue share ``run_jobs`` messages of at most ``max_jobs`` jobs
    (``Settings.jobs_per_message`` by default). A job alone in its message gets the
    ``run_job`` message that ``publish_job`` would send.
    """
    if max_jobs is None:
        max_jobs = get_settings().jobs_per_message
    by_queue: dict[str, list[list[dict[str, Any]]]] = {}
    sizes: dict[str, int] = {}
    for queue, spec in jobs:
        chunks = by_queue.setdefault(queue, [[]])
        size = len(json_text(spec.get("body")))
        chunk = chunks[-1]
        if chunk and (len(chunk) >= max_jobs or sizes[queue] + size > MAX_MESSAGE_BODY_BYTES):
            chunk = []
            chunks.append(chunk)
            sizes[queue] = 0
        chunk.append(spec)
        sizes[queue] = sizes.get(queue, 0) + size
    messages: list[RedisMessage] = []
    for queue, chunks in by_queue.items():
        for chunk in chunks:
            if len(chunk) == 1:
                messages.append(encode_job_message(app, chunk[0], queue))
            else:
                messages.append(
                    encode_task_message(
                        app,
                        RUN_JOBS_TASK,
                        queue,
                        kwargs={"jobs": [job_task_kwargs(spec) for spec in chunk]},
                        kwargsrepr=jobs_kwargsrepr(chunk),
                    )
                )
    return messages


def encode_settle_message(app: Celery, job_ids: list[str]) -> RedisMessage:
    """Encode the task that settles ``job_ids``, as ``send_task(SETTLE_JOBS_TASK, ...)``
    would."""
    return encode_task_message(app, SETTLE_JOBS_TASK, BILLING_QUEUE, args=[job_ids])


def encode_task_message(
    app: Celery,
    name: str,
    queue: str,
    *,
    args: list[Any] | None = None,
    kwargs: dict[str, Any] | None = None,
    kwargsrepr: str | None = None,
) -> RedisMessage:
    """Encode the list entry that ``app.send_task`` makes kombu's Redis transport push.

    Pushing it with LPUSH in a pipeline lets a caller publish with its other Redis
    commands in one round trip. The steps follow Celery 5.7's ``send_task`` and kombu
    5.7's ``Producer.publish`` and Redis ``Channel._put``; tests/test_publish.py compares
    the result with a message that Celery published.
    """
    task_id = uuid()
    # send_task passes ignore_result=None for a task the publishing process has not
    # registered; the result is ignored either way (task_ignore_result).
    headers, properties, body, _ = app.amqp.as_task_v2(
        task_id,
        name,
        args=args or [],
        kwargs=kwargs,
        reply_to=app.thread_oid,
        ignore_result=None,
        kwargsrepr=kwargsrepr,
    )
    # send_task_message copies options it does not know, kwargsrepr among them, into
    # the properties.
    if kwargsrepr is not None:
        properties["kwargsrepr"] = kwargsrepr
    properties["delivery_mode"] = maybe_delivery_mode(app.conf.task_default_delivery_mode)
    content_type, content_encoding, data = serialization.dumps(
        body, serializer=app.conf.task_serializer
    )
    if app.conf.task_compression:
        data, headers["compression"] = compress(data, app.conf.task_compression)
    # send_task publishes to a queue missing from task_queues through the default
    # exchange (""), with the queue name as the routing key. A worker restoring an
    # unacknowledged message routes it the same way, so no binding table is needed.
    properties["delivery_info"] = {"exchange": "", "routing_key": queue}
    properties["priority"] = 0
    properties["body_encoding"] = _BODY_ENCODING
    properties["delivery_tag"] = uuid()
    message = {
        "body": _encode_body(data),
        "content-encoding": content_encoding,
        "content-type": content_type,
        "headers": headers,
        "properties": properties,
    }
    # kombu keeps priority 0 messages in the list named after the queue, and adds a
    # suffix to the name for the priority steps 3, 6 and 9.
    return RedisMessage(queue, json_dumps(message))
