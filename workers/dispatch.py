"""The job task: call the upstream with retries, record the outcome, hand it back."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from celery import Task
from sqlalchemy import insert, update

from broker.pricing import token_cost_micro_usd
from broker.tables import Attempt, Job, utcnow
from workers.adapters import adapter_for
from workers.adapters.base import UpstreamError, UpstreamResult
from workers.app import BILLING_QUEUE, RUN_JOB_TASK, SETTLE_JOB_TASK, celery_app
from workers.context import WorkerContext, get_context
from workers.retry import backoff_s, should_retry
from workers.streaming import relay_stream

logger = logging.getLogger(__name__)

# Seconds a reply list lives in Redis when no API process reads it.
REPLY_TTL_S = 300
EMBEDDINGS_ENDPOINT = "/v1/embeddings"


@dataclass
class Outcome:
    result: UpstreamResult | None = None
    error: UpstreamError | None = None
    cancelled: bool = False
    attempts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def status(self) -> str:
        if self.cancelled:
            return "cancelled"
        return "succeeded" if self.result is not None else "failed"


def _call_once(ctx: WorkerContext, spec: dict[str, Any], outcome: Outcome) -> UpstreamResult:
    adapter = adapter_for(spec["wire_format"])
    if adapter is None:
        raise UpstreamError(f"No adapter for the {spec['wire_format']} wire format.")
    args = (
        ctx.http,
        ctx.catalog.base_url(spec["provider"], spec["region"]),
        ctx.provider_key(spec["provider"]),
        spec["body"],
        spec["upstream_model"],
        spec["model"],
        ctx.settings.upstream_timeout_s,
    )
    if spec.get("endpoint") == EMBEDDINGS_ENDPOINT:
        if adapter.embeddings is None:
            raise UpstreamError(f"The {spec['wire_format']} wire format has no embeddings.")
        return adapter.embeddings(*args)
    if not spec["body"].get("stream"):
        return adapter.chat_completion(*args)

    assembler, outcome.cancelled = relay_stream(ctx, spec, adapter.stream_chat_completion(*args))
    return UpstreamResult(
        body=assembler.completion(),
        prompt_tokens=assembler.prompt_tokens,
        completion_tokens=assembler.completion_tokens,
        status_code=200,
    )


def call_with_retries(ctx: WorkerContext, spec: dict[str, Any]) -> Outcome:
    """Call the target until it succeeds, fails for good, or the attempts run out."""
    outcome = Outcome()
    attempt = 0
    while True:
        attempt += 1
        started = time.monotonic()
        started_at = utcnow()
        error: UpstreamError | None = None
        try:
            outcome.result = _call_once(ctx, spec, outcome)
        except UpstreamError as exc:
            error = exc
        outcome.attempts.append(
            {
                "number": attempt,
                "provider": spec["provider"],
                "region": spec["region"],
                "upstream_model": spec["upstream_model"],
                "worker": spec.get("worker"),
                "latency_ms": int((time.monotonic() - started) * 1000),
                "status_code": outcome.result.status_code if error is None else error.status_code,
                "error": None if error is None else error.message[:500],
                "started_at": started_at,
            }
        )
        if error is None:
            return outcome
        if not should_retry(error, attempt, ctx.settings.max_attempts):
            logger.warning(
                "job %s failed after %d attempts on %s.%s: %s",
                spec["job_id"],
                attempt,
                spec["provider"],
                spec["region"],
                error.message,
            )
            outcome.error = error
            return outcome
        delay_s = backoff_s(attempt, error, ctx.settings.max_backoff_s)
        logger.info(
            "job %s attempt %d on %s.%s failed (%s), retrying in %.2f s",
            spec["job_id"],
            attempt,
            spec["provider"],
            spec["region"],
            error.status_code or type(error).__name__,
            delay_s,
        )
        time.sleep(delay_s)


def record_outcome(ctx: WorkerContext, job_id: str, spec: dict[str, Any], outcome: Outcome) -> bool:
    """Store the outcome unless the job is already final (a redelivered message)."""
    values: dict[str, Any] = {
        "status": outcome.status,
        "finished_at": utcnow(),
        "served_provider": spec["provider"],
        "served_region": spec["region"],
        "served_model": spec["model"],
    }
    if outcome.result is not None:
        values.update(
            response=outcome.result.body,
            prompt_tokens=outcome.result.prompt_tokens,
            completion_tokens=outcome.result.completion_tokens,
        )
    if outcome.error is not None:
        values["error"] = outcome.error.to_job_error()

    with ctx.sessions.begin() as session:
        updated = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status.in_(("queued", "running")))
            .values(**values)
        ).rowcount
        if not updated:
            return False
        session.execute(insert(Attempt), [dict(job_id=job_id, **a) for a in outcome.attempts])
    return True


def send_reply(ctx: WorkerContext, spec: dict[str, Any], outcome: Outcome) -> None:
    """Hand the final outcome to the API process waiting for it, if one waits."""
    reply_to = spec.get("reply_to")
    if not reply_to:
        return
    message: dict[str, Any] = {
        "job_id": spec["job_id"],
        "type": "final",
        "status": outcome.status,
        "provider": spec["provider"],
        "region": spec["region"],
        "model": spec["model"],
    }
    if outcome.result is not None:
        if not spec["body"].get("stream"):
            message["response"] = outcome.result.body
        message["cost_micro_usd"] = token_cost_micro_usd(
            outcome.result.prompt_tokens,
            outcome.result.completion_tokens,
            spec["input_price"],
            spec["output_price"],
        )
    if outcome.error is not None:
        message["error"] = outcome.error.to_job_error()
    pipe = ctx.redis.pipeline(transaction=False)
    pipe.rpush(reply_to, orjson.dumps(message))
    pipe.expire(reply_to, REPLY_TTL_S)
    pipe.execute()


@celery_app.task(name=RUN_JOB_TASK, bind=True)
def run_job(self: Task, **spec: Any) -> None:
    """Run one job: ``spec`` is the message the API published (see ``broker.intake``)."""
    ctx = get_context()
    spec["worker"] = self.request.hostname
    job_id = spec["job_id"]
    outcome = call_with_retries(ctx, spec)
    if not record_outcome(ctx, job_id, spec, outcome):
        logger.info("job %s was already finished; ignoring a repeated delivery", job_id)
        return
    # TODO: a crash between the record above and the two sends below leaves the job
    # unsettled until a sweeper re-sends the settle task.
    send_reply(ctx, spec, outcome)
    celery_app.send_task(SETTLE_JOB_TASK, args=[job_id], queue=BILLING_QUEUE)
