"""Checks around a job on the API side: the per-key rate limit and the response cache."""

from __future__ import annotations

from typing import Any

from starlette.datastructures import Headers

from broker import response_cache
from broker.api.services import Services
from broker.intake import CHAT_ENDPOINT, Principal, Submission
from broker.pricing import max_output_tokens, prompt_tokens_upper_bound
from broker.ratelimit import Limits, check, rate_limited_error


def worst_case_tokens(submission: Submission) -> int:
    """Return the tokens a request may use at most: what the token limit counts."""
    body = submission.body
    if submission.endpoint != CHAT_ENDPOINT:
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts or []
        return sum(len(text.encode("utf-8")) for text in texts)
    return prompt_tokens_upper_bound(body) + max_output_tokens(
        body, submission.target.model.max_output_tokens
    )


async def enforce_rate_limit(
    state: Services, caller: Principal, submission: Submission
) -> dict[str, str]:
    """Count the request against its key's limits; returns the ``x-ratelimit-*`` headers.

    Raises the 429 error, with Retry-After, when the key is over a limit; a refused
    request is not counted.
    """
    limits = Limits(state.settings.rate_limit_rpm, state.settings.rate_limit_tpm)
    if not limits.enabled:
        return {}
    decision = await check(
        state.replies.redis, caller.api_key_id, limits, worst_case_tokens(submission)
    )
    if not decision.allowed:
        raise rate_limited_error(decision)
    return decision.headers()


class CachePlan:
    """Whether a chat request uses the response cache, and its stored entry if any."""

    def __init__(self, enabled: bool, entry: dict[str, Any] | None = None) -> None:
        self.enabled = enabled
        self.entry = entry


async def plan_cache(
    state: Services,
    caller: Principal,
    headers: Headers,
    submission: Submission,
    body_flag: bool | None,
) -> CachePlan:
    settings = state.settings
    enabled = response_cache.cache_enabled(
        headers, submission.body, body_flag, deterministic=settings.response_cache_temperature_zero
    )
    if not enabled or submission.idempotency_key:
        return CachePlan(False)
    entry = await response_cache.lookup(state.replies.redis, caller.account_id, submission.body)
    return CachePlan(True, entry)


async def remember(
    state: Services, caller: Principal, submission: Submission, reply: dict[str, Any]
) -> None:
    """Store a successful non-streamed reply in the cache."""
    await response_cache.store(
        state.replies.redis,
        caller.account_id,
        submission.body,
        reply["response"],
        state.settings.response_cache_ttl_s,
        cost_micro_usd=reply.get("cost_micro_usd"),
    )
