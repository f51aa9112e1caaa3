"""``POST /v1/chat/completions`` and ``POST /v1/embeddings``: calls that run as jobs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from broker import response_cache
from broker.api.guards import enforce_rate_limit, plan_cache, remember
from broker.api.services import RequestOnlyRoute, principal, services
from broker.chat_request import parse_json_body, validate_chat_request
from broker.errors import InvalidRequest, PayloadTooLarge, from_job_error
from broker.jsonresponse import json_bytes

# The calls that run as jobs are the hot path: each endpoint reads its own request.
router = APIRouter(route_class=RequestOnlyRoute)

SSE_DONE = b"data: [DONE]\n\n"
# Maximum length of an Idempotency-Key, because the column stores 200 characters.
MAX_IDEMPOTENCY_KEY_CHARS = 200


async def _read_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    limit = services(request).settings.max_request_bytes
    if len(raw) > limit:
        raise PayloadTooLarge(f"The request body has {len(raw)} bytes; the limit is {limit}.")
    return parse_json_body(raw)


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is not None and not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_CHARS:
        raise InvalidRequest(
            f"The Idempotency-Key header must have 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters.",
            param="Idempotency-Key",
        )
    return key


def _served_headers(reply: dict[str, Any]) -> dict[str, str]:
    return {
        "x-broker-job-id": reply["job_id"],
        "x-broker-provider": str(reply.get("provider")),
        "x-broker-region": str(reply.get("region")),
        "x-broker-model": str(reply.get("model")),
    }


def _final_response(reply: dict[str, Any]) -> Response:
    headers = _served_headers(reply)
    if reply["status"] != "succeeded":
        error = from_job_error(reply.get("error") or {})
        error.headers.update(headers)
        raise error
    headers["x-broker-cost-micro-usd"] = str(reply.get("cost_micro_usd", 0))
    return Response(json_bytes(reply["response"]), media_type="application/json", headers=headers)


@router.post("/v1/chat/completions")
async def create_chat_completion(request: Request) -> Response:
    caller = await principal(request)
    body = await _read_body(request)
    cache_flag = response_cache.pop_cache_flag(body)
    chat = validate_chat_request(body)
    state = services(request)
    submission = state.intake.prepare_chat(body, chat, caller)
    request.state.model = submission.target.model.id
    submission.idempotency_key = _idempotency_key(request)
    limit_headers = await enforce_rate_limit(state, caller, submission)
    cache = await plan_cache(state, caller, request.headers, submission, cache_flag)
    if cache.entry is not None:
        return _cache_hit(cache.entry, submission, limit_headers, body)

    if not submission.stream:
        reply = await state.intake.run(caller, submission)
        response = _final_response(reply)
        response.headers.update(limit_headers)
        if cache.enabled and reply["status"] == "succeeded":
            await remember(state, caller, submission, reply)
            response.headers[response_cache.CACHE_HEADER] = "miss"
        return response

    job_id, messages = await state.intake.stream(caller, submission)
    target = submission.target
    headers = {
        "x-broker-job-id": job_id,
        "x-broker-provider": target.model.provider,
        "x-broker-region": target.region,
        "x-broker-model": target.model.id,
        "cache-control": "no-cache",
        **limit_headers,
    }
    return StreamingResponse(
        _sse(messages, _include_usage(body)), media_type="text/event-stream", headers=headers
    )


def _include_usage(body: dict[str, Any]) -> bool:
    return bool((body.get("stream_options") or {}).get("include_usage"))


def _cache_hit(
    entry: dict[str, Any], submission: Any, limit_headers: dict[str, str], body: dict[str, Any]
) -> Response:
    """Return the cached response: no job runs, and a hit is free (see README)."""
    headers = {response_cache.CACHE_HEADER: "hit", "x-broker-cost-micro-usd": "0", **limit_headers}
    completion = response_cache.hit_response(entry)
    if not submission.stream:
        return Response(json_bytes(completion), media_type="application/json", headers=headers)

    async def replay() -> AsyncIterator[dict[str, Any]]:
        for chunk in response_cache.replay_chunks(completion):
            yield {"type": "chunk", "chunk": chunk}
        yield {"type": "final", "status": "succeeded"}

    return StreamingResponse(
        _sse(replay(), _include_usage(body)), media_type="text/event-stream", headers=headers
    )


async def _sse(
    messages: AsyncIterator[dict[str, Any]], include_usage: bool
) -> AsyncIterator[bytes]:
    """Render job messages as OpenAI server-sent events, ending with ``[DONE]``."""
    async for message in messages:
        if message.get("type") == "chunk":
            chunk = message["chunk"]
            if not chunk.get("choices") and chunk.get("usage"):
                if include_usage:
                    yield b"data: " + json_bytes(chunk) + b"\n\n"
                continue
            if not include_usage:
                chunk.pop("usage", None)
            yield b"data: " + json_bytes(chunk) + b"\n\n"
            continue
        if message.get("status") not in ("succeeded", "cancelled"):
            error = from_job_error(message.get("error") or {})
            yield b"data: " + json_bytes(error.to_body()) + b"\n\n"
        yield SSE_DONE


@router.post("/v1/embeddings")
async def create_embeddings(request: Request) -> Response:
    caller = await principal(request)
    body = await _read_body(request)
    state = services(request)
    submission = state.intake.prepare_embeddings(body, caller)
    request.state.model = submission.target.model.id
    submission.idempotency_key = _idempotency_key(request)
    limit_headers = await enforce_rate_limit(state, caller, submission)
    response = _final_response(await state.intake.run(caller, submission))
    response.headers.update(limit_headers)
    return response
