"""Streamed chat completions and embeddings for OpenAI-compatible upstreams."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson

from workers.adapters.base import UpstreamResult, UpstreamStatusError, UpstreamUnreachable
from workers.adapters.openai import build_body
from workers.adapters.translate_common import (
    first_error_object,
    iter_sse,
    load_event_json,
    post_json,
    raise_for_status,
    upstream_call,
)
from workers.upstream_http import HttpClient

DONE_DATA = "[DONE]"


def _headers(api_key: str | None) -> dict[str, str]:
    headers = {"content-type": "application/json"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    return headers


def parse_error(payload: Any) -> tuple[str | None, str | None, float | None]:
    """Read the message and code of an OpenAI error body."""
    error = first_error_object(payload)
    if not error and isinstance(payload, dict) and isinstance(payload.get("error"), str):
        return payload["error"], None, None
    code = error.get("code")
    return error.get("message"), None if code is None else str(code), None


def stream_request_body(body: dict[str, Any], upstream_model: str) -> dict[str, Any]:
    """Return the upstream body with streaming and the final usage chunk turned on."""
    upstream = build_body(body, upstream_model)
    upstream["stream"] = True
    stream_options = upstream.get("stream_options")
    upstream["stream_options"] = {
        **(stream_options if isinstance(stream_options, dict) else {}),
        "include_usage": True,
    }
    return upstream


def stream_chat_completion(
    client: HttpClient,
    base_url: str,
    api_key: str | None,
    body: dict[str, Any],
    upstream_model: str,
    public_model: str,
    timeout_s: float,
) -> Iterator[dict[str, Any]]:
    """Stream ``POST {base_url}/chat/completions`` and yield its chunks.

    Each chunk's ``model`` is replaced by ``public_model``. The last chunk has no
    choices and carries the usage. ``timeout_s`` applies to each read, not to the
    whole stream. Raises UpstreamError subclasses, also while iterating.
    """
    payload = stream_request_body(body, upstream_model)
    with upstream_call(timeout_s):
        with client.stream(
            "POST",
            f"{base_url}/chat/completions",
            headers={**_headers(api_key), "accept": "text/event-stream"},
            content=orjson.dumps(payload),
            timeout=timeout_s,
        ) as response:
            if response.status_code >= 400:
                response.read()
                raise_for_status(response, parse_error)
            yield from _translate_chunks(response.iter_bytes(), public_model)


def _translate_chunks(byte_chunks: Iterator[bytes], public_model: str) -> Iterator[dict[str, Any]]:
    finished = False
    # Events after [DONE] are read and ignored, so that the body is consumed to its end
    # and the connection can go back to the pool.
    done = False
    for event in iter_sse(byte_chunks):
        if done:
            continue
        if event.data.strip() == DONE_DATA:
            done = True
            continue
        chunk = load_event_json(event.data)
        if not isinstance(chunk, dict):
            continue
        if "error" in chunk and not chunk.get("choices"):
            # Some OpenAI-compatible providers report a failure inside a started stream.
            message, code, _ = parse_error(chunk)
            raise UpstreamStatusError(
                message or "The provider reported an error inside the stream.",
                status_code=_stream_error_status(code),
                code=code,
            )
        chunk["model"] = public_model
        finished = finished or any(
            choice.get("finish_reason") for choice in chunk.get("choices") or []
        )
        yield chunk
    if not done and not finished:
        raise UpstreamUnreachable("The provider's stream ended before the completion finished.")


def _stream_error_status(code: str | None) -> int:
    """Return the HTTP status an in-stream error code names, else 500."""
    if code is not None and code.isdigit() and 400 <= int(code) <= 599:
        return int(code)
    return 500


def embeddings(
    client: HttpClient,
    base_url: str,
    api_key: str | None,
    body: dict[str, Any],
    upstream_model: str,
    public_model: str,
    timeout_s: float,
) -> UpstreamResult:
    """Call ``POST {base_url}/embeddings`` and return the embeddings list.

    prompt_tokens comes from the response's usage, and completion_tokens is 0.
    """
    status_code, parsed = post_json(
        client,
        f"{base_url}/embeddings",
        _headers(api_key),
        build_body(body, upstream_model),
        timeout_s,
        parse_error,
    )
    if not isinstance(parsed, dict):
        raise UpstreamStatusError(
            "The provider returned an embeddings body that is not a JSON object.",
            status_code=502,
        )
    parsed["model"] = public_model
    usage = parsed.get("usage") or {}
    return UpstreamResult(
        body=parsed,
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=0,
        status_code=status_code,
    )
