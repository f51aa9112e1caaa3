"""``POST /v1/chat/completions``: a synchronous call that runs as a job."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from broker.api.services import Caller, services
from broker.chat_request import parse_json_body, validate_chat_request
from broker.errors import InvalidRequest, PayloadTooLarge, from_job_error
from broker.jsonresponse import json_bytes

router = APIRouter()


@router.post("/v1/chat/completions")
async def create_chat_completion(request: Request, caller: Caller) -> Response:
    raw = await request.body()
    limit = services(request).settings.max_request_bytes
    if len(raw) > limit:
        raise PayloadTooLarge(f"The request body has {len(raw)} bytes; the limit is {limit}.")
    body = parse_json_body(raw)
    chat = validate_chat_request(body)
    if chat.stream:
        # TODO: relay stream chunks from a Redis stream as server-sent events.
        raise InvalidRequest(
            "Streaming is not supported by this broker yet; send the request with stream false.",
            param="stream",
        )

    reply = await services(request).intake.run_chat(caller, body, chat)
    headers = {
        "x-broker-job-id": reply["job_id"],
        "x-broker-provider": str(reply.get("provider")),
        "x-broker-region": str(reply.get("region")),
        "x-broker-model": str(reply.get("model")),
    }
    if reply["status"] != "succeeded":
        error = from_job_error(reply.get("error") or {})
        error.headers.update(headers)
        raise error
    headers["x-broker-cost-micro-usd"] = str(reply.get("cost_micro_usd", 0))
    return Response(json_bytes(reply["response"]), media_type="application/json", headers=headers)
