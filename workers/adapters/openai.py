"""Adapter for the OpenAI chat completions wire format and its compatible providers."""

from __future__ import annotations

from typing import Any

import httpx
import orjson

from workers.adapters.base import (
    UpstreamResult,
    UpstreamStatusError,
    UpstreamTimeout,
    UpstreamUnreachable,
    parse_retry_after,
)
from workers.upstream_http import HttpClient

# Body fields that steer the broker itself and mean nothing to a provider.
BROKER_FIELDS = ("region", "region_pin", "models", "fallbacks", "drop_params")


def build_body(body: dict[str, Any], upstream_model: str) -> dict[str, Any]:
    upstream = {key: value for key, value in body.items() if key not in BROKER_FIELDS}
    upstream["model"] = upstream_model
    return upstream


def _error_message(response: httpx.Response) -> tuple[str, str | None]:
    try:
        error = response.json().get("error") or {}
    except (ValueError, AttributeError):
        return response.text[:300] or response.reason_phrase, None
    if isinstance(error, str):
        return error, None
    return str(error.get("message") or response.reason_phrase), error.get("code")


def chat_completion(
    client: HttpClient,
    base_url: str,
    api_key: str | None,
    body: dict[str, Any],
    upstream_model: str,
    public_model: str,
    timeout_s: float,
) -> UpstreamResult:
    """Call ``POST {base_url}/chat/completions`` and return the parsed result."""
    headers = {"content-type": "application/json"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    try:
        response = client.post(
            f"{base_url}/chat/completions",
            headers=headers,
            content=orjson.dumps(build_body(body, upstream_model)),
            timeout=timeout_s,
        )
    except httpx.TimeoutException as exc:
        raise UpstreamTimeout(f"The provider did not respond within {timeout_s:g} s.") from exc
    except httpx.TransportError as exc:
        raise UpstreamUnreachable(f"The provider could not be reached: {exc!r}") from exc

    if response.status_code >= 400:
        message, code = _error_message(response)
        raise UpstreamStatusError(
            message,
            status_code=response.status_code,
            code=code,
            retry_after_s=parse_retry_after(response.headers.get("retry-after")),
        )
    try:
        parsed = orjson.loads(response.content)
        usage = parsed.get("usage") or {}
    except (orjson.JSONDecodeError, AttributeError) as exc:
        raise UpstreamStatusError(
            "The provider returned a body that is not a JSON object.", status_code=502
        ) from exc
    parsed["model"] = public_model
    return UpstreamResult(
        body=parsed,
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        status_code=response.status_code,
    )
