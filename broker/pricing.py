"""Integer pricing: the worst-case hold before a job and the charge after it."""

from __future__ import annotations

from typing import Any

import orjson

# Catalog prices are micro-dollars per million tokens.
TOKENS_PER_PRICE_UNIT = 1_000_000
# Tokens a chat format adds around each message and at the start of the reply.
MESSAGE_OVERHEAD_TOKENS = 8
REPLY_OVERHEAD_TOKENS = 8
# Upper bound of the tokens one image part costs at high detail on the providers we route.
IMAGE_PART_TOKENS = 1_600
# Output tokens assumed when neither the request nor the catalog gives a limit.
FALLBACK_MAX_OUTPUT_TOKENS = 4_096


def token_cost_micro_usd(
    prompt_tokens: int, completion_tokens: int, input_price: int, output_price: int
) -> int:
    """Return the cost of a call in micro-dollars, rounded up to a whole micro-dollar.

    Prices are micro-dollars per million tokens. The sum is rounded once per job, so a
    job is never charged more than one micro-dollar above its exact price.
    """
    exact = prompt_tokens * input_price + completion_tokens * output_price
    return -(-exact // TOKENS_PER_PRICE_UNIT)


def job_cost_micro_usd(
    prompt_tokens: int,
    completion_tokens: int,
    input_price: int,
    output_price: int,
    cached_tokens: int = 0,
    cached_price: int | None = None,
) -> int:
    """Return a job's cost: cached prompt tokens at the cached price, the rest as usual.

    ``cached_tokens`` are part of ``prompt_tokens``, as providers report them.
    """
    cached = min(max(cached_tokens, 0), prompt_tokens)
    price = input_price if cached_price is None else cached_price
    exact = (
        (prompt_tokens - cached) * input_price + cached * price + completion_tokens * output_price
    )
    return -(-exact // TOKENS_PER_PRICE_UNIT)


def cached_prompt_tokens(response: dict[str, Any] | None) -> int:
    """Read the prompt tokens a provider served from its cache from an OpenAI usage."""
    usage = (response or {}).get("usage") or {}
    details = usage.get("prompt_tokens_details") or {}
    return int(details.get("cached_tokens") or 0)


def _content_tokens_upper_bound(content: Any) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return len(content.encode("utf-8"))
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, dict) and part.get("type") in ("image_url", "input_image"):
                total += IMAGE_PART_TOKENS
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                total += len(part["text"].encode("utf-8"))
            else:
                total += len(orjson.dumps(part))
        return total
    return len(orjson.dumps(content))


def prompt_tokens_upper_bound(body: dict[str, Any]) -> int:
    """Return an upper bound of the prompt tokens of a chat request.

    Byte-level BPE tokenizers (those of every chat provider in the catalog) never make
    more tokens than the text has UTF-8 bytes, so the byte count bounds the real count.
    """
    total = REPLY_OVERHEAD_TOKENS
    for message in body.get("messages", []):
        total += MESSAGE_OVERHEAD_TOKENS + _content_tokens_upper_bound(message.get("content"))
        if "tool_calls" in message:
            total += len(orjson.dumps(message["tool_calls"]))
    for field in ("tools", "functions", "response_format"):
        if field in body:
            total += len(orjson.dumps(body[field]))
    return total


def max_output_tokens(body: dict[str, Any], model_max_output_tokens: int | None) -> int:
    """Return the most output tokens the request can produce, over all its choices."""
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if limit is None:
        limit = model_max_output_tokens or FALLBACK_MAX_OUTPUT_TOKENS
    return int(limit) * int(body.get("n") or 1)


def hold_micro_usd(
    body: dict[str, Any],
    input_price: int,
    output_price: int,
    model_max_output_tokens: int | None,
) -> int:
    """Return the worst-case cost of a chat request: what the wallet must cover."""
    return token_cost_micro_usd(
        prompt_tokens_upper_bound(body),
        max_output_tokens(body, model_max_output_tokens),
        input_price,
        output_price,
    )
