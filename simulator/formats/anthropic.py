"""Anthropic Messages wire format."""

from typing import Any

import orjson
from starlette.requests import Request
from starlette.routing import Route

from simulator.content import (
    FINISH_LENGTH,
    FINISH_SAFETY,
    FINISH_STOP_SEQUENCE,
    FINISH_TOOL_CALLS,
    Choice,
    ReplyRequest,
    chunk_text,
    plan_choices,
)
from simulator.formats.anthropic_request import (
    PromptSummary,
    check_request,
    has_tool_result,
    parse_tool_choice,
    parse_tools,
)
from simulator.formats.common import invalid, optional_int, string_list
from simulator.pipeline import (
    ERROR_AUTHENTICATION,
    ERROR_INVALID_REQUEST,
    ERROR_NOT_FOUND,
    ERROR_OVERLOADED,
    ERROR_RATE_LIMIT,
    ERROR_SERVER,
    ERROR_UNAVAILABLE,
    ProviderEndpoint,
    RequestRejected,
    WireFormat,
    apply_faults_and_latency,
    json_response,
    read_json_object,
)
from simulator.state import SimulatorState
from simulator.streaming import EventStreamResponse, named_event

MODELS = ("sim-claude-small", "sim-claude-large")
STOP_REASONS = {
    FINISH_LENGTH: "max_tokens",
    FINISH_STOP_SEQUENCE: "stop_sequence",
    FINISH_TOOL_CALLS: "tool_use",
    FINISH_SAFETY: "refusal",
}
ERRORS = {
    ERROR_INVALID_REQUEST: (400, "invalid_request_error"),
    ERROR_AUTHENTICATION: (401, "authentication_error"),
    ERROR_NOT_FOUND: (404, "not_found_error"),
    ERROR_RATE_LIMIT: (429, "rate_limit_error"),
    ERROR_SERVER: (500, "api_error"),
    ERROR_OVERLOADED: (529, "overloaded_error"),
    ERROR_UNAVAILABLE: (503, "api_error"),
}


class AnthropicFormat(WireFormat):
    name = "anthropic"
    # Anthropic reports part of its server-side failures as 529 overloaded_error.
    overloaded_share = 0.5

    def authentication_error(self, request: Request) -> str | None:
        # The x-api-key header is the documented way, but the anthropic Python SDK
        # (2.17) sends its api_key as a Bearer token, so both are accepted.
        if request.headers.get("x-api-key", "").strip():
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return None
        return "x-api-key header is required (or Authorization: Bearer <key>)"

    def error_body(self, error: RequestRejected) -> tuple[int, Any]:
        status, error_type = ERRORS[error.kind]
        return status, {"type": "error", "error": {"type": error_type, "message": error.message}}


ANTHROPIC = AnthropicFormat()


def routes(state: SimulatorState) -> list[Route]:
    return [
        Route(
            "/{provider}/v1/messages",
            ProviderEndpoint(state, ANTHROPIC, messages),
            methods=["POST"],
        ),
        Route(
            "/{provider}/v1/messages/count_tokens",
            ProviderEndpoint(state, ANTHROPIC, count_message_tokens),
            methods=["POST"],
        ),
    ]


def models_endpoint(state: SimulatorState) -> ProviderEndpoint:
    return ProviderEndpoint(state, ANTHROPIC, list_models)


async def list_models(request: Request, state: SimulatorState) -> Any:
    data = [
        {
            "type": "model",
            "id": model,
            "display_name": model,
            "created_at": "2025-01-01T00:00:00Z",
        }
        for model in MODELS
    ]
    return json_response(
        state, {"data": data, "has_more": False, "first_id": MODELS[0], "last_id": MODELS[-1]}
    )


async def count_message_tokens(request: Request, state: SimulatorState) -> Any:
    body = await read_json_object(request)
    check_request(request, body)
    parse_tools(body.get("tools"))
    return json_response(state, {"input_tokens": PromptSummary(body).tokens})


async def messages(request: Request, state: SimulatorState) -> Any:
    body = await read_json_object(request)
    check_request(request, body)
    model = body["model"]
    state.stats.count_model(model)
    if body.get("max_tokens") is None:
        raise invalid("max_tokens: Field required")
    max_tokens = optional_int(body, "max_tokens", 1)
    tools = parse_tools(body.get("tools"))
    prompt = PromptSummary(body)
    last_message = body["messages"][-1]
    tool_mode, tool_name, parallel = parse_tool_choice(body.get("tool_choice"), tools)
    reply_request = ReplyRequest(
        model=model,
        texts=prompt.texts,
        last_user_text=prompt.last_user_text,
        ends_with_user_turn=last_message["role"] == "user" and not has_tool_result(last_message),
        max_tokens=max_tokens,
        stop=string_list(body.get("stop_sequences"), "stop_sequences"),
        tools=tools,
        tool_mode=tool_mode,
        tool_name=tool_name,
        parallel_tool_calls=parallel,
    )

    await apply_faults_and_latency(request, state, ANTHROPIC)
    config = state.config
    choice = plan_choices(reply_request, config.seed)[0]
    usage = _usage(state, prompt, model)
    message_id = state.new_id("msg_")
    content = _content_blocks(choice, message_id)
    stop_reason = STOP_REASONS.get(choice.finish, "end_turn")
    if body.get("stream") is True:
        events = _stream_events(message_id, model, choice, content, stop_reason, usage)
        return EventStreamResponse(
            events,
            state.response_headers(),
            config.stream_chunk_delay_ms / 1000,
            config.split_multibyte,
        )
    usage["output_tokens"] = choice.completion_tokens
    return json_response(
        state,
        {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": choice.stop_sequence,
            "usage": usage,
        },
    )


def _usage(state: SimulatorState, prompt: PromptSummary, model: str) -> dict:
    """Return the input side of the usage, splitting off the cached prefix.

    The first request with a given prefix writes it to the cache, and later ones read
    it. NOTE: unlike the real API, prefixes below the minimum cacheable length are
    cached too.
    """
    cached = prompt.cached_prefix_tokens
    creation = read = 0
    if cached:
        if state.prompt_cache.record(prompt.cached_prefix_key):
            read = cached
        else:
            creation = cached
    return {
        "input_tokens": prompt.tokens - cached,
        "cache_creation_input_tokens": creation,
        "cache_read_input_tokens": read,
        "output_tokens": 0,
    }


def _content_blocks(choice: Choice, message_id: str) -> list[dict]:
    if choice.tool_calls:
        suffix = message_id.removeprefix("msg_")
        return [
            {
                "type": "tool_use",
                "id": f"toolu_{suffix}_{position}",
                "name": call.name,
                "input": call.arguments,
            }
            for position, call in enumerate(choice.tool_calls)
        ]
    if choice.text is None:
        return []
    return [{"type": "text", "text": choice.text}]


def _stream_events(
    message_id: str,
    model: str,
    choice: Choice,
    content: list[dict],
    stop_reason: str,
    usage: dict,
) -> list[bytes]:
    """Encode a Messages stream.

    The events are message_start, each content block's start, deltas and stop (with a
    ping after the first block start), message_delta and message_stop.
    """
    start_usage = {**usage, "output_tokens": 1}
    message = {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": start_usage,
    }
    events = [named_event("message_start", {"type": "message_start", "message": message})]
    ping = named_event("ping", {"type": "ping"})
    if not content:
        events.append(ping)
    for index, block in enumerate(content):
        if block["type"] == "tool_use":
            opening = {**block, "input": {}}
            pieces = chunk_text(orjson.dumps(block["input"]).decode(), choice.chunk_offset)
            deltas = [{"type": "input_json_delta", "partial_json": piece} for piece in pieces]
        else:
            opening = {"type": "text", "text": ""}
            deltas = [{"type": "text_delta", "text": piece} for piece in choice.text_chunks()]
        events.append(
            named_event(
                "content_block_start",
                {"type": "content_block_start", "index": index, "content_block": opening},
            )
        )
        if index == 0:
            events.append(ping)
        for delta in deltas:
            events.append(
                named_event(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": index, "delta": delta},
                )
            )
        events.append(
            named_event("content_block_stop", {"type": "content_block_stop", "index": index})
        )
    events.append(
        named_event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": choice.stop_sequence},
                "usage": {"output_tokens": choice.completion_tokens},
            },
        )
    )
    events.append(named_event("message_stop", {"type": "message_stop"}))
    return events
