"""Asynchronous jobs: ``POST /v1/jobs`` returns 202 at once, and the result comes later.

A job runs the same checks, hold and queues as a synchronous request (``Intake``), but
no request waits for it: ``GET /v1/jobs/{id}`` shows its state and result, and its
``webhook_url`` and the account's webhook endpoints get a ``job.*`` event when it ends.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from sqlalchemy import select, update

from broker.api.batches import check_metadata
from broker.api.pages import page_body, paginate
from broker.api.services import Caller, services
from broker.api.webhooks import checked_webhook_url, require_signing_endpoint
from broker.chat_request import parse_json_body, validate_chat_request
from broker.errors import BrokerError, Conflict, InvalidRequest, NotFound, PayloadTooLarge
from broker.intake import CHAT_ENDPOINT, EMBEDDINGS_ENDPOINT, Submission
from broker.jsonresponse import ORJSONResponse
from broker.replies import CANCEL_TTL_S
from broker.tables import Attempt, Job, as_utc, utcnow
from broker.webhooks import public_error
from workers.app import BILLING_QUEUE, SETTLE_JOB_TASK
from workers.markers import DONE_TTL_S, done_key, lease_key
from workers.streaming import cancel_key

router = APIRouter()

ENDPOINTS = (CHAT_ENDPOINT, EMBEDDINGS_ENDPOINT)
ACTIVE_STATUSES = ("queued", "running")
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled", "expired")
MAX_PAGE = 100
# Longest Idempotency-Key accepted, because the column stores at most 200 characters.
MAX_IDEMPOTENCY_KEY_CHARS = 200


def _time(moment: Any) -> int | None:
    return int(as_utc(moment).timestamp()) if moment is not None else None


def job_object(
    job: Job, attempts: list[Attempt] | None = None, running: bool = False
) -> dict[str, Any]:
    """Render a job; ``running`` shows a queued job that a worker has taken as running."""
    status = "running" if running and job.status == "queued" else job.status
    finished = job.status not in ACTIVE_STATUSES
    body: dict[str, Any] = {
        "id": job.id,
        "object": "job",
        "endpoint": job.endpoint,
        "model": job.model,
        "status": status,
        "created_at": _time(job.created_at),
        "finished_at": _time(job.finished_at),
        "metadata": job.job_metadata,
        "webhook_url": job.webhook_url,
        "batch_id": job.batch_id,
        "custom_id": job.custom_id,
        "result": job.response,
        "usage": {
            "prompt_tokens": job.prompt_tokens,
            "completion_tokens": job.completion_tokens,
            "total_tokens": job.prompt_tokens + job.completion_tokens,
            "cached_prompt_tokens": job.cached_prompt_tokens,
        }
        if finished
        else None,
        # Known once the billing worker has settled the job.
        "cost_micro_usd": job.cost_micro_usd if job.settled_at is not None else None,
        "error": public_error(job.error),
        "served": {
            "provider": job.served_provider,
            "region": job.served_region,
            "model": job.served_model,
        }
        if job.served_provider
        else None,
    }
    if attempts is not None:
        body["attempts"] = [
            {
                "number": attempt.number,
                "provider": attempt.provider,
                "region": attempt.region,
                "model": attempt.upstream_model,
                "status_code": attempt.status_code,
                "latency_ms": attempt.latency_ms,
                "error": attempt.error,
                "started_at": _time(attempt.started_at),
            }
            for attempt in attempts
        ]
    return body


async def _owned_job(request: Request, caller: Caller, job_id: str) -> Job:
    async with services(request).sessions() as session:
        job = await session.get(Job, job_id, populate_existing=True)
    if job is None or job.account_id != caller.account_id:
        raise NotFound(f"No such job: {job_id}", param="job_id")
    return job


def _prepare(request: Request, caller: Caller, endpoint: str, body: dict[str, Any]) -> Submission:
    """Run the synchronous API's checks, naming an error's param under ``body.``."""
    intake = services(request).intake
    try:
        if endpoint == EMBEDDINGS_ENDPOINT:
            return intake.prepare_embeddings(body, caller)
        chat = validate_chat_request(body)
        if chat.stream:
            raise InvalidRequest("An asynchronous job cannot stream.", param="stream")
        return intake.prepare_chat(body, chat, caller)
    except BrokerError as exc:
        exc.param = f"body.{exc.param}" if exc.param else "body"
        raise


@router.post("/v1/jobs", status_code=202)
async def create_job(request: Request, caller: Caller) -> ORJSONResponse:
    raw = await request.body()
    limit = services(request).settings.max_request_bytes
    if len(raw) > limit:
        raise PayloadTooLarge(f"The request body has {len(raw)} bytes; the limit is {limit}.")
    envelope = parse_json_body(raw)
    endpoint = envelope.get("endpoint")
    if endpoint not in ENDPOINTS:
        raise InvalidRequest(
            f"Invalid endpoint {endpoint!r}; jobs support {', '.join(ENDPOINTS)}.",
            param="endpoint",
        )
    body = envelope.get("body")
    if not isinstance(body, dict):
        raise InvalidRequest("'body' must be the request object of the endpoint.", param="body")
    metadata = check_metadata(envelope.get("metadata"))
    webhook_url = envelope.get("webhook_url")
    if webhook_url is not None:
        webhook_url = await checked_webhook_url(request, webhook_url, "webhook_url")
        await require_signing_endpoint(request, caller, "webhook_url")

    submission = _prepare(request, caller, endpoint, body)
    key = request.headers.get("idempotency-key")
    if key is not None and not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_CHARS:
        raise InvalidRequest(
            f"The Idempotency-Key header must have 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters.",
            param="Idempotency-Key",
        )
    submission.idempotency_key = key
    submission.job_fields = {"webhook_url": webhook_url, "job_metadata": metadata}
    job_id = await services(request).intake.submit_async(caller, submission)
    if submission.created is not None and submission.created["id"] == job_id:
        # The job as inserted, without reading it back: it is a new job, still queued.
        job = Job(**submission.created)
    else:
        # A repeated Idempotency-Key: the job that first used it, as it is now.
        job = await _owned_job(request, caller, job_id)
    return ORJSONResponse(job_object(job), status_code=202)


@router.get("/v1/jobs/{job_id}")
async def retrieve_job(request: Request, caller: Caller, job_id: str) -> ORJSONResponse:
    job = await _owned_job(request, caller, job_id)
    async with services(request).sessions() as session:
        attempts = (
            await session.scalars(
                select(Attempt).where(Attempt.job_id == job_id).order_by(Attempt.number)
            )
        ).all()
    running = job.status == "queued" and bool(
        await services(request).replies.redis.exists(lease_key(job_id))
    )
    return ORJSONResponse(job_object(job, list(attempts), running=running))


@router.get("/v1/jobs")
async def list_jobs(
    request: Request,
    caller: Caller,
    status: str | None = Query(None),
    model: str | None = Query(None),
    batch_id: str | None = Query(None),
    after: str | None = Query(None),
    limit: int = Query(20, ge=1, le=MAX_PAGE),
) -> ORJSONResponse:
    """List the account's jobs, newest first. ``queued`` includes jobs being run."""
    query = select(Job).where(Job.account_id == caller.account_id)
    if status is not None:
        if status not in JOB_STATUSES:
            raise InvalidRequest(
                f"Invalid status {status!r}; use one of {', '.join(JOB_STATUSES)}.",
                param="status",
            )
        query = query.where(Job.status == status)
    if model is not None:
        query = query.where(Job.model == model)
    if batch_id is not None:
        query = query.where(Job.batch_id == batch_id)
    async with services(request).sessions() as session:
        rows = (await session.scalars(paginate(query, Job.id, after, limit))).all()
    return ORJSONResponse(page_body(rows, limit, job_object))


@router.post("/v1/jobs/{job_id}/cancel")
async def cancel_job(request: Request, caller: Caller, job_id: str) -> ORJSONResponse:
    """Cancel a job. One that no worker has taken ends at once and its hold is released.
    One being run is asked to stop, and ends cancelled, charged for its usage."""
    job = await _owned_job(request, caller, job_id)
    if job.status == "cancelled":
        return ORJSONResponse(job_object(job))
    if job.status not in ACTIVE_STATUSES:
        raise Conflict(
            f"Job {job_id} is already {job.status}; only queued or running jobs can be cancelled.",
            param="job_id",
        )
    state = services(request)
    redis = state.replies.redis
    if await redis.exists(lease_key(job_id)):
        await redis.set(cancel_key(job_id), b"1", ex=CANCEL_TTL_S)
        return ORJSONResponse(job_object(job, running=True))
    # The done marker first, so a worker that takes the message now drops it.
    await redis.set(done_key(job_id), b"1", ex=DONE_TTL_S)
    error = Conflict("The job was cancelled before it ran.", code="cancelled").to_job_error()
    async with state.sessions.begin() as session:
        changed = (
            await session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status.in_(ACTIVE_STATUSES))
                .values(status="cancelled", error=error, finished_at=utcnow())
            )
        ).rowcount
    if changed:
        # The billing worker releases the hold and sends the job.cancelled event.
        state.celery.send_task(SETTLE_JOB_TASK, args=[job_id], queue=BILLING_QUEUE)
    return ORJSONResponse(job_object(await _owned_job(request, caller, job_id)))
