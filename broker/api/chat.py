"""``POST /v1/chat/completions`` and ``POST /v1/embeddings``: calls that run as jobs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from broker.api.services import Caller, services
from broker.chat_request import parse_json_body, validate_chat_request
from broker.errors import InvalidRequest, PayloadTooLarge, from_job_error
from broker.jsonresponse import json_bytes

router = APIRouter()

SSE_DONE = b"data: [DONE]\n\n"
# Longest Idempotency-Key accepted; the column holds 200 characters.
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
async def create_chat_completion(request: Request, caller: Caller) -> Response:
    body = await _read_body(request)
    chat = validate_chat_request(body)
    intake = services(request).intake
    submission = intake.prepare_chat(body, chat, caller)
    submission.idempotency_key = _idempotency_key(request)
    if not submission.stream:
        return _final_response(await intake.run(caller, submission))

    job_id, messages = await intake.stream(caller, submission)
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    target = submission.target
    headers = {
        "x-broker-job-id": job_id,
        "x-broker-provider": target.model.provider,
        "x-broker-region": target.region,
        "x-broker-model": target.model.id,
        "cache-control": "no-cache",
    }
    return StreamingResponse(
        _sse(messages, include_usage), media_type="text/event-stream", headers=headers
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
async def create_embeddings(request: Request, caller: Caller) -> Response:
    body = await _read_body(request)
    intake = services(request).intake
    submission = intake.prepare_embeddings(body, caller)
    submission.idempotency_key = _idempotency_key(request)
    return _final_response(await intake.run(caller, submission))
