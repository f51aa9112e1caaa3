"""Calls to one target: adapter choice, per-attempt limits, retries and the circuit."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from broker.circuits import CircuitBreaker, target_name
from broker.metrics import count_retry, observe_upstream
from broker.tables import utcnow
from workers.adapters import adapter_for
from workers.adapters.base import (
    CircuitOpen,
    DeadlineExceeded,
    ProviderBusy,
    UpstreamError,
    UpstreamResult,
)
from workers.context import WorkerContext
from workers.retry import backoff_s, should_retry
from workers.streaming import relay_stream
from workers.upstream_http import UpstreamClient

logger = logging.getLogger(__name__)

EMBEDDINGS_ENDPOINT = "/v1/embeddings"
# Seconds an attempt waits for a free slot under the provider region's caps.
GATE_WAIT_S = 30.0


@dataclass
class Outcome:
    """The result of the calls to one target, with one row per attempt."""

    result: UpstreamResult | None = None
    error: UpstreamError | None = None
    cancelled: bool = False
    attempts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def status(self) -> str:
        if self.cancelled:
            return "cancelled"
        return "succeeded" if self.result is not None else "failed"


def _call_once(
    ctx: WorkerContext, spec: dict[str, Any], outcome: Outcome, timeout_s: float
) -> UpstreamResult:
    with ctx.http_client() as http:
        return _call_with(ctx, http, spec, outcome, timeout_s)


def _call_with(
    ctx: WorkerContext,
    http: UpstreamClient,
    spec: dict[str, Any],
    outcome: Outcome,
    timeout_s: float,
) -> UpstreamResult:
    adapter = adapter_for(spec["wire_format"])
    if adapter is None:
        raise UpstreamError(f"No adapter for the {spec['wire_format']} wire format.")
    args = (
        http,
        ctx.catalog.base_url(spec["provider"], spec["region"]),
        ctx.provider_key(spec["provider"]),
        spec["body"],
        spec["upstream_model"],
        spec["model"],
        timeout_s,
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


def _attempt_row(
    spec: dict[str, Any],
    number: int,
    started: float,
    started_at: Any,
    result: UpstreamResult | None,
    error: UpstreamError | None,
) -> dict[str, Any]:
    return {
        "number": spec.get("attempt_offset", 0) + number,
        "provider": spec["provider"],
        "region": spec["region"],
        "upstream_model": spec["upstream_model"],
        "worker": spec.get("worker"),
        "latency_ms": int((time.monotonic() - started) * 1000),
        "status_code": result.status_code if result is not None else error.status_code,
        "error": None if error is None else error.message[:500],
        "started_at": started_at,
    }


def call_target(
    ctx: WorkerContext, spec: dict[str, Any], circuit_state: str | None = None
) -> Outcome:
    """Call the job's current target until it succeeds, fails for good, or attempts run out.

    Each attempt is limited by the upstream timeout and by what is left of the job's
    deadline; backoff sleeps never run past the deadline either. ``circuit_state`` is the
    target's circuit state if the caller has just read it; later attempts read it again.
    """
    breaker = CircuitBreaker(ctx.redis)
    circuit = target_name(spec["provider"], spec["region"])
    outcome = Outcome()
    attempt = 0
    while True:
        attempt += 1
        started, started_at = time.monotonic(), utcnow()
        remaining_s = spec["deadline"] - time.time()
        result: UpstreamResult | None = None
        error: UpstreamError | None = None
        if remaining_s <= 0:
            outcome.error = DeadlineExceeded(
                "The job's deadline passed before the provider answered."
            )
            return outcome
        state = circuit_state if attempt == 1 and circuit_state else breaker.state(circuit)
        if state == "open" or (state == "half_open" and not breaker.take_probe(circuit)):
            outcome.error = CircuitOpen(
                f"The circuit for {circuit} is open after repeated failures."
            )
            return outcome
        slot = ctx.gate.acquire_wait(circuit, min(remaining_s, GATE_WAIT_S))
        try:
            if slot is None:
                raise ProviderBusy(
                    f"{circuit} stayed at its concurrency or rate cap for {GATE_WAIT_S:g} s."
                )
            result = _call_once(
                ctx, spec, outcome, min(ctx.settings.upstream_timeout_s, remaining_s)
            )
        except UpstreamError as exc:
            error = exc
        finally:
            if slot is not None:
                ctx.gate.release(slot)
        observe_upstream(spec["provider"], spec["region"], time.monotonic() - started)
        outcome.attempts.append(_attempt_row(spec, attempt, started, started_at, result, error))

        if error is None:
            # A closed circuit needs no write on success: failures expire with their window.
            if state != "closed":
                breaker.record_success(circuit)
            outcome.result = result
            return outcome
        if error.trips_circuit:
            breaker.record_failure(circuit)
        if not should_retry(error, attempt, ctx.settings.max_attempts):
            logger.warning(
                "job %s gave up on %s after %d attempts: %s",
                spec["job_id"],
                circuit,
                attempt,
                error.message,
            )
            outcome.error = error
            return outcome
        delay_s = min(
            backoff_s(attempt, error, ctx.settings.max_backoff_s),
            max(0.0, spec["deadline"] - time.time()),
        )
        logger.info(
            "job %s attempt %d on %s failed (%s), retrying in %.2f s",
            spec["job_id"],
            attempt,
            circuit,
            error.status_code or type(error).__name__,
            delay_s,
        )
        count_retry(spec["provider"], spec["region"])
        time.sleep(delay_s)
