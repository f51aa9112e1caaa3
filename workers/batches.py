"""Batch tasks on the ``batches`` queue: process (validate, then create the jobs),
finalize (write the result files) and stop (cancel or expire).

Tasks name only the batch id in Flower and the logs, never a request. A Redis lock
keeps one process task per batch at a time, and a repeated process task resumes after
the lines that already have jobs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from itertools import islice

from sqlalchemy import func, select

from broker.batches import (
    FINALIZE_BATCH_TASK,
    PROCESS_BATCH_TASK,
    STOP_BATCH_TASK,
    TRANSITIONS,
    BatchLine,
    batch_object,
    batch_price_ppm,
    iter_lines,
    parse_line,
    prepare_line,
    transition,
    validate_file,
)
from broker.filestore import FileStore
from broker.tables import Account, Batch, Job, StoredFile
from broker.webhooks import BATCH_EVENTS, enqueue_event, publish_deliveries
from workers.app import celery_app
from workers.batch_jobs import (
    cancelled_error,
    create_chunk,
    expired_error,
    load_principal,
    request_checker,
    top_up,
)
from workers.batch_output import write_result_files
from workers.batch_stop import stop_jobs
from workers.context import WorkerContext, get_context
from workers.job_events import send_finalize

logger = logging.getLogger(__name__)

# Seconds the per-batch processing lock lives; renewed after every chunk.
LOCK_TTL_S = 600
# Lines between yields to the other greenlets of the worker while validating.
YIELD_EVERY_LINES = 500


def processing_key(batch_id: str) -> str:
    return f"broker:batch:{batch_id}:processing"


def _load(ctx: WorkerContext, batch_id: str) -> Batch | None:
    with ctx.sessions() as session:
        return session.get(Batch, batch_id)


def _input_path(ctx: WorkerContext, batch: Batch) -> str | None:
    with ctx.sessions() as session:
        stored = session.get(StoredFile, batch.input_file_id)
    if stored is None or stored.deleted_at is not None:
        return None
    path = FileStore(ctx.settings.file_store_path).path(stored.storage_path)
    return str(path) if path.exists() else None


def emit_batch_event(ctx: WorkerContext, batch_id: str) -> None:
    """Queue and publish the event of a batch that reached a final status."""
    with ctx.sessions.begin() as session:
        batch = session.get(Batch, batch_id, populate_existing=True)
        if batch is None or batch.status not in BATCH_EVENTS:
            return
        deliveries = enqueue_event(
            session,
            batch.account_id,
            BATCH_EVENTS[batch.status],
            batch_object(batch),
            batch.webhook_url,
            ctx.settings.webhook_timeout_s,
        )
    publish_deliveries(celery_app, deliveries)
    logger.info("batch %s is %s", batch_id, batch.status)


def _fail(ctx: WorkerContext, batch_id: str, errors: list[dict[str, object]]) -> None:
    with ctx.sessions.begin() as session:
        changed = transition(session, batch_id, "failed", errors={"object": "list", "data": errors})
    if changed:
        emit_batch_event(ctx, batch_id)


def _validate(ctx: WorkerContext, batch: Batch) -> None:
    """Validate the input file and move the batch to in_progress or failed."""
    path = _input_path(ctx, batch)
    if path is None:
        _fail(
            ctx,
            batch.id,
            [
                {
                    "code": "file_not_found",
                    "line": None,
                    "param": "input_file_id",
                    "message": f"The input file {batch.input_file_id} is gone.",
                }
            ],
        )
        return
    with ctx.sessions() as session:
        principal = load_principal(session, batch, 1_000_000)
    checker = request_checker(ctx.catalog)

    def check(body: dict[str, object]) -> None:
        prepare_line(checker, principal, batch.endpoint, body)

    def pause(number: int) -> None:
        if number % YIELD_EVERY_LINES == 0:
            # Let settlements on the same worker run; renew the lock on the way.
            ctx.redis.expire(processing_key(batch.id), LOCK_TTL_S)
            time.sleep(0)

    with open(path, "rb") as handle:
        result = validate_file(
            handle,
            batch.endpoint,
            check,
            max_requests=ctx.settings.batch_max_requests,
            max_line_bytes=ctx.settings.max_request_bytes,
            on_line=pause,
        )
    if result.errors:
        logger.info("batch %s has %d invalid lines", batch.id, result.error_count)
        _fail(ctx, batch.id, [error.to_dict() for error in result.errors])
        return
    with ctx.sessions.begin() as session:
        transition(session, batch.id, "in_progress", total=result.requests)


def _lines_after(path: str, skip: int, max_line_bytes: int, endpoint: str) -> Iterator[BatchLine]:
    """Yield the parsed input lines after the first ``skip`` ones."""
    with open(path, "rb") as handle:
        for number, raw in islice(iter_lines(handle, max_line_bytes), skip, None):
            if raw is None:
                raise ValueError(f"line {number} of the input file changed after validation")
            yield parse_line(raw, number, endpoint)


def _create_jobs(ctx: WorkerContext, batch: Batch) -> None:
    """Create the jobs of the lines that have none yet, a chunk per transaction."""
    path = _input_path(ctx, batch)
    if path is None:
        raise FileNotFoundError(f"the input file of batch {batch.id} is gone")
    with ctx.sessions() as session:
        created = (
            session.scalar(select(func.count()).select_from(Job).where(Job.batch_id == batch.id))
            or 0
        )
        account_ppm = session.scalar(
            select(Account.price_multiplier_ppm).where(Account.id == batch.account_id)
        )
        principal = load_principal(
            session, batch, batch_price_ppm(account_ppm, ctx.settings.batch_discount_ppm)
        )
    checker = request_checker(ctx.catalog)
    lines = _lines_after(path, created, ctx.settings.max_request_bytes, batch.endpoint)
    while True:
        chunk: list[BatchLine] = list(islice(lines, ctx.settings.batch_chunk_size))
        if not chunk:
            return
        result = create_chunk(ctx, batch, principal, checker, chunk)
        if result.finalizing:
            send_finalize(batch.id)
        top_up(ctx, batch.id)
        ctx.redis.expire(processing_key(batch.id), LOCK_TTL_S)
        time.sleep(0)


@celery_app.task(name=PROCESS_BATCH_TASK)
def process_batch(batch_id: str) -> None:
    """Validate a batch's input file, then create its jobs and publish the first ones."""
    ctx = get_context()
    if not ctx.redis.set(processing_key(batch_id), b"1", nx=True, ex=LOCK_TTL_S):
        logger.info("batch %s is being processed elsewhere; dropping a repeated task", batch_id)
        return
    try:
        batch = _load(ctx, batch_id)
        if batch is not None and batch.status == "validating":
            _validate(ctx, batch)
            batch = _load(ctx, batch_id)
        if batch is None:
            return
        if batch.status == "cancelling" and batch.total == 0:
            with ctx.sessions.begin() as session:
                changed = transition(session, batch_id, "cancelled")
            if changed:
                emit_batch_event(ctx, batch_id)
            return
        if batch.status in ("in_progress", "cancelling"):
            _create_jobs(ctx, batch)
            # A cancel that came while the last chunk was written has not seen its jobs.
            if _load(ctx, batch_id).status == "cancelling":
                stop_jobs(ctx, batch_id, "cancelled", cancelled_error())
    finally:
        ctx.redis.delete(processing_key(batch_id))


@celery_app.task(name=FINALIZE_BATCH_TASK)
def finalize_batch(batch_id: str) -> None:
    """Write a finalizing batch's result files and give it its final status."""
    ctx = get_context()
    batch = _load(ctx, batch_id)
    if batch is None or batch.status != "finalizing":
        return
    files = write_result_files(ctx, batch)
    with ctx.sessions.begin() as session:
        expired_jobs = session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.batch_id == batch_id, Job.status == "expired")
        )
        if batch.cancelling_at is not None:
            final = "cancelled"
        elif expired_jobs:
            final = "expired"
        else:
            final = "completed"
        changed = transition(
            session,
            batch_id,
            final,
            output_file_id=files.output_file_id,
            error_file_id=files.error_file_id,
        )
    if not changed:
        # Another finalize task won, and its files are the batch's.
        logger.info("batch %s was finalized by another task; dropping this one's files", batch_id)
        store = FileStore(ctx.settings.file_store_path)
        for file_id in (files.output_file_id, files.error_file_id):
            if file_id:
                store.delete(f"{batch.account_id}/{file_id}")
        return
    emit_batch_event(ctx, batch_id)


@celery_app.task(name=STOP_BATCH_TASK)
def stop_batch(batch_id: str, reason: str) -> None:
    """Stop the jobs of a batch that was cancelled (``reason`` cancelled) or whose
    completion window passed (``reason`` expired)."""
    ctx = get_context()
    batch = _load(ctx, batch_id)
    if batch is None or batch.status not in TRANSITIONS["finalizing"]:
        return
    error = cancelled_error() if reason == "cancelled" else expired_error()
    stop_jobs(ctx, batch_id, reason, error)
