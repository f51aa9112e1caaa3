"""OpenAI Chat Completions, Embeddings and Models wire format."""

import time
from typing import Any

import orjson
from starlette.requests import Request
from starlette.routing import Route

from simulator.content import (
    FINISH_LENGTH,
    FINISH_SAFETY,
    FINISH_TOOL_CALLS,
    Choice,
    chunk_text,
    plan_choices,
)
from simulator.embeddings import (
    DEFAULT_DIMENSIONS,
    MAX_DIMENSIONS,
    embedding_base64,
    embedding_vector,
)
from simulator.formats.common import invalid, optional_int
from simulator.formats.openai_request import parse_chat_request, parse_embedding_inputs
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
from simulator.streaming import EventStreamResponse, data_event, interleave

MODELS = ("sim-chat-small", "sim-chat-large", "sim-embed")
FINISH_REASONS = {
    FINISH_LENGTH: "length",
    FINISH_TOOL_CALLS: "tool_calls",
    FINISH_SAFETY: "content_filter",
}
DONE_EVENT = b"data: [DONE]\n\n"

# Status, "type" and "code" of each error kind.
ERRORS = {
    ERROR_INVALID_REQUEST: (400, "invalid_request_error", None),
    ERROR_AUTHENTICATION: (401, "invalid_request_error", "invalid_api_key"),
    ERROR_NOT_FOUND: (404, "invalid_request_error", "not_found"),
    ERROR_RATE_LIMIT: (429, "requests", "rate_limit_exceeded"),
    ERROR_SERVER: (500, "server_error", None),
    ERROR_OVERLOADED: (503, "server_error", "engine_overloaded"),
    ERROR_UNAVAILABLE: (503, "server_error", "service_unavailable"),
}


class OpenAIFormat(WireFormat):
    name = "openai"

    def authentication_error(self, request: Request) -> str | None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return (
                "Missing or invalid API key. Send it in the Authorization header as 'Bearer <key>'."
            )
        return None

    def error_body(self, error: RequestRejected) -> tuple[int, Any]:
        status, error_type, code = ERRORS[error.kind]
        return status, {
            "error": {
                "message": error.message,
                "type": error_type,
                "param": error.param,
                "code": code,
            }
        }


OPENAI = OpenAIFormat()


def routes(state: SimulatorState) -> list[Route]:
    return [
        Route(
            "/{provider}/v1/chat/completions",
            ProviderEndpoint(state, OPENAI, chat_completions),
            methods=["POST"],
        ),
        Route(
            "/{provider}/v1/embeddings",
            ProviderEndpoint(state, OPENAI, embeddings),
            methods=["POST"],
        ),
    ]


def models_endpoint(state: SimulatorState) -> ProviderEndpoint:
    return ProviderEndpoint(state, OPENAI, list_models)


async def list_models(request: Request, state: SimulatorState) -> Any:
    provider = request.path_params["provider"]
    data = [
        {"id": model, "object": "model", "created": 1700000000, "owned_by": provider}
        for model in MODELS
    ]
    return json_response(state, {"object": "list", "data": data})


async def chat_completions(request: Request, state: SimulatorState) -> Any:
    body = await read_json_object(request)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("Missing required parameter: 'model'.", "model")
    state.stats.count_model(model)
    reply_request, prompt_tokens = parse_chat_request(body, model)
    stream = body.get("stream") is True
    stream_options = body.get("stream_options")
    if stream_options is not None and not stream:
        raise invalid(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            "stream_options",
        )
    include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True

    await apply_faults_and_latency(request, state, OPENAI)
    config = state.config
    choices = plan_choices(reply_request, config.seed)
    completion_tokens = sum(choice.completion_tokens for choice in choices)
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }
    envelope = {
        "id": state.new_id("chatcmpl-"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": f"fp_sim_{config.region}",
    }
    if stream:
        events = stream_events(envelope, choices, usage if include_usage else None)
        return EventStreamResponse(
            events,
            state.response_headers(),
            config.stream_chunk_delay_ms / 1000,
            config.split_multibyte,
        )
    envelope["choices"] = [
        {
            "index": choice.index,
            "message": _message(choice, envelope["id"]),
            "logprobs": None,
            "finish_reason": _finish_reason(choice),
        }
        for choice in choices
    ]
    envelope["usage"] = usage
    envelope["service_tier"] = "default"
    return json_response(state, envelope)


def _finish_reason(choice: Choice) -> str:
    return FINISH_REASONS.get(choice.finish, "stop")


def _tool_call_id(response_id: str, choice: Choice, position: int) -> str:
    return f"call_{response_id.rpartition('-')[2]}_{choice.index}_{position}"


def _message(choice: Choice, response_id: str) -> dict:
    message: dict[str, Any] = {
        "role": "assistant",
        "content": choice.text,
        "refusal": None,
        "annotations": [],
    }
    if choice.tool_calls:
        message["tool_calls"] = [
            {
                "id": _tool_call_id(response_id, choice, position),
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments_json},
            }
            for position, call in enumerate(choice.tool_calls)
        ]
    return message


def stream_events(envelope: dict, choices: list[Choice], usage: dict | None) -> list[bytes]:
    """Encode the chunks of a streamed completion, choices interleaved round-robin.

    With ``usage`` every chunk carries ``"usage": null`` and a final chunk with no
    choices carries the usage, as with ``stream_options.include_usage``.
    """
    base = {**envelope, "object": "chat.completion.chunk"}
    if usage is not None:
        base["usage"] = None
    # Every chunk shares the envelope, so it is encoded once and only the choice differs.
    head = b"data: " + orjson.dumps(base)[:-1] + b',"choices":['
    deltas = interleave([_choice_deltas(choice, envelope["id"]) for choice in choices])
    events = [head + orjson.dumps(delta) + b"]}\n\n" for delta in deltas]
    if usage is not None:
        events.append(data_event({**base, "choices": [], "usage": usage}))
    events.append(DONE_EVENT)
    return events


def _choice_deltas(choice: Choice, response_id: str) -> list[dict]:
    def chunk(delta: dict, finish_reason: str | None = None) -> dict:
        return {
            "index": choice.index,
            "delta": delta,
            "logprobs": None,
            "finish_reason": finish_reason,
        }

    if choice.tool_calls:
        deltas = [chunk({"role": "assistant", "content": None, "refusal": None})]
        for position, call in enumerate(choice.tool_calls):
            opening = {
                "index": position,
                "id": _tool_call_id(response_id, choice, position),
                "type": "function",
                "function": {"name": call.name, "arguments": ""},
            }
            deltas.append(chunk({"tool_calls": [opening]}))
            for piece in chunk_text(call.arguments_json, choice.chunk_offset):
                argument_delta = {"index": position, "function": {"arguments": piece}}
                deltas.append(chunk({"tool_calls": [argument_delta]}))
    else:
        deltas = [chunk({"role": "assistant", "content": "", "refusal": None})]
        deltas.extend(chunk({"content": piece}) for piece in choice.text_chunks())
    deltas.append(chunk({}, _finish_reason(choice)))
    return deltas


async def embeddings(request: Request, state: SimulatorState) -> Any:
    body = await read_json_object(request)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("Missing required parameter: 'model'.", "model")
    state.stats.count_model(model)
    inputs, prompt_tokens = parse_embedding_inputs(body.get("input"))
    dimensions = optional_int(body, "dimensions", 1, MAX_DIMENSIONS) or DEFAULT_DIMENSIONS
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise invalid(
            f"Invalid value for 'encoding_format': {encoding!r}. Supported values are: "
            "'float' and 'base64'.",
            "encoding_format",
        )
    await apply_faults_and_latency(request, state, OPENAI)
    seed = state.config.seed
    encode = embedding_base64 if encoding == "base64" else embedding_vector
    data = [
        {"object": "embedding", "index": index, "embedding": encode(model, text, dimensions, seed)}
        for index, text in enumerate(inputs)
    ]
    usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    return json_response(state, {"object": "list", "data": data, "model": model, "usage": usage})
