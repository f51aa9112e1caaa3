"""The worker side of result hand-back: push the final message to the API's reply list."""

from __future__ import annotations

from typing import Any

import orjson
import redis

from broker.pricing import cached_prompt_tokens, job_cost_micro_usd

# Seconds a reply list lives in Redis when no API process reads it.
REPLY_TTL_S = 300


def send_final_reply(client: redis.Redis, spec: dict[str, Any], outcome: Any) -> None:
    """Hand a job's final outcome to the API process waiting for it, if one waits."""
    pipe = client.pipeline(transaction=False)
    reply_to = queue_final_reply(pipe, spec, outcome)
    if reply_to is not None:
        pipe.expire(reply_to, REPLY_TTL_S)
    pipe.execute()


def queue_final_reply(
    pipe: redis.client.Pipeline, spec: dict[str, Any], outcome: Any
) -> str | None:
    """Add the push of ``send_final_reply`` to ``pipe``, if a request waits, and return
    the reply list. The caller sets the list's expiry once per list, after its pushes."""
    reply_to = spec.get("reply_to")
    if not reply_to:
        return None
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
        message["cost_micro_usd"] = job_cost_micro_usd(
            outcome.result.prompt_tokens,
            outcome.result.completion_tokens,
            spec["input_price"],
            spec["output_price"],
            cached_prompt_tokens(outcome.result.body),
            spec.get("cached_input_price"),
        )
    if outcome.error is not None:
        message["error"] = outcome.error.to_job_error()
    pipe.rpush(reply_to, orjson.dumps(message))
    return reply_to
