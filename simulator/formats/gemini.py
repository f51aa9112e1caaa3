"""Gemini API (generativelanguage v1beta) wire format."""

from typing import Any

import orjson
from starlette.requests import Request
from starlette.routing import Route

from simulator.content import (
    FINISH_LENGTH,
    FINISH_SAFETY,
    Choice,
    plan_choices,
)
from simulator.embeddings import DEFAULT_DIMENSIONS, MAX_DIMENSIONS, embedding_vector
from simulator.formats.common import invalid, optional_int
from simulator.formats.gemini_request import content_texts, parse_generate_request
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
from simulator.streaming import EventStreamResponse, interleave
from simulator.tokens import (
    count_tokens,
)

MODELS = ("sim-gemini-flash", "sim-gemini-pro", "sim-embedding")
FINISH_REASONS = {FINISH_LENGTH: "MAX_TOKENS", FINISH_SAFETY: "SAFETY"}
SSE_TERMINATOR = b"\r\n\r\n"
BLOCKED_SAFETY_RATINGS = [
    {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": True}
]

ERRORS = {
    ERROR_INVALID_REQUEST: (400, "INVALID_ARGUMENT"),
    ERROR_AUTHENTICATION: (403, "PERMISSION_DENIED"),
    ERROR_NOT_FOUND: (404, "NOT_FOUND"),
    ERROR_RATE_LIMIT: (429, "RESOURCE_EXHAUSTED"),
    ERROR_SERVER: (500, "INTERNAL"),
    ERROR_OVERLOADED: (503, "UNAVAILABLE"),
    ERROR_UNAVAILABLE: (503, "UNAVAILABLE"),
}


class GeminiFormat(WireFormat):
    name = "gemini"

    def authentication_error(self, request: Request) -> str | None:
        key = request.headers.get("x-goog-api-key") or request.query_params.get("key")
        if not key or not key.strip():
            return (
                "Method doesn't allow unregistered callers. Send an API key in the "
                "x-goog-api-key header or the key query parameter."
            )
        return None

    def error_body(self, error: RequestRejected) -> tuple[int, Any]:
        status, status_name = ERRORS[error.kind]
        body: dict[str, Any] = {"code": status, "message": error.message, "status": status_name}
        if error.retry_after_s is not None:
            # Google APIs state the retry delay in a RetryInfo detail.
            body["details"] = [
                {
                    "@type": "type.googleapis.com/google.rpc.RetryInfo",
                    "retryDelay": f"{error.retry_after_s}s",
                }
            ]
        return status, {"error": body}


GEMINI = GeminiFormat()


def routes(state: SimulatorState) -> list[Route]:
    return [
        Route(
            "/{provider}/v1beta/models",
            ProviderEndpoint(state, GEMINI, list_models),
            methods=["GET"],
        ),
        Route(
            "/{provider}/v1beta/models/{target}",
            ProviderEndpoint(state, GEMINI, model_action),
            methods=["POST"],
        ),
    ]


async def list_models(request: Request, state: SimulatorState) -> Any:
    models = [
        {
            "name": f"models/{model}",
            "version": "001",
            "displayName": model,
            "supportedGenerationMethods": (
                ["embedContent"]
                if "embedding" in model
                else ["generateContent", "streamGenerateContent", "countTokens"]
            ),
        }
        for model in MODELS
    ]
    return json_response(state, {"models": models})


async def model_action(request: Request, state: SimulatorState) -> Any:
    """Dispatch ``models/{model}:{action}`` to the action's handler."""
    model, _, action = request.path_params["target"].rpartition(":")
    if not model:
        raise RequestRejected(
            ERROR_NOT_FOUND,
            "The path must have the form models/{model}:{method}, for example "
            "models/gemini-2.0-flash:generateContent.",
        )
    handler = ACTIONS.get(action)
    if handler is None:
        raise RequestRejected(
            ERROR_NOT_FOUND,
            f"Method {action!r} is not found for models/{model}. Supported methods are: "
            f"{', '.join(ACTIONS)}.",
        )
    body = await read_json_object(request)
    state.stats.count_model(model)
    return await handler(request, state, model, body)


def _usage(prompt_tokens: int, candidate_tokens: int) -> dict:
    return {
        "promptTokenCount": prompt_tokens,
        "candidatesTokenCount": candidate_tokens,
        "totalTokenCount": prompt_tokens + candidate_tokens,
    }


async def generate_content(request: Request, state: SimulatorState, model: str, body: dict) -> Any:
    reply_request, prompt_tokens = parse_generate_request(body, model)
    await apply_faults_and_latency(request, state, GEMINI)
    config = state.config
    choices = plan_choices(reply_request, config.seed)
    response_id = state.new_id("resp-")
    candidates = [_candidate(choice, _parts(choice)) for choice in choices]
    completion_tokens = sum(choice.completion_tokens for choice in choices)
    return json_response(
        state,
        {
            "candidates": candidates,
            "usageMetadata": _usage(prompt_tokens, completion_tokens),
            "modelVersion": model,
            "responseId": response_id,
        },
    )


async def stream_generate_content(
    request: Request, state: SimulatorState, model: str, body: dict
) -> Any:
    """Stream GenerateContentResponse chunks, as SSE with ``alt=sse`` and as one JSON
    array otherwise.

    Every chunk carries usageMetadata with the candidate tokens sent so far.
    """
    reply_request, prompt_tokens = parse_generate_request(body, model)
    await apply_faults_and_latency(request, state, GEMINI)
    config = state.config
    choices = plan_choices(reply_request, config.seed)
    response_id = state.new_id("resp-")
    chunks = _stream_chunks(choices, prompt_tokens, model, response_id)
    if request.query_params.get("alt") == "sse":
        events = [b"data: " + chunk + SSE_TERMINATOR for chunk in chunks]
        media_type = "text/event-stream"
    else:
        events = [b"[" + chunks[0]]
        events += [b",\r\n" + chunk for chunk in chunks[1:]]
        events.append(b"]")
        media_type = "application/json"
    return EventStreamResponse(
        events,
        state.response_headers(),
        config.stream_chunk_delay_ms / 1000,
        config.split_multibyte,
        media_type,
    )


def _stream_chunks(
    choices: list[Choice], prompt_tokens: int, model: str, response_id: str
) -> list[bytes]:
    """Encode the GenerateContentResponse objects of a stream, candidates round-robin."""
    steps_per_choice = []
    for choice in choices:
        if choice.text:
            pieces = choice.text_chunks()
            steps = [
                (choice, piece, position == len(pieces) - 1)
                for position, piece in enumerate(pieces)
            ]
        else:
            # Function calls and blocked replies arrive whole in a single chunk.
            steps = [(choice, None, True)]
        steps_per_choice.append(steps)

    tail = b',"modelVersion":' + orjson.dumps(model) + b',"responseId":'
    tail += orjson.dumps(response_id) + b"}"
    chunks = []
    sent_tokens = 0
    for choice, piece, last in interleave(steps_per_choice):
        if piece is not None:
            sent_tokens += count_tokens(piece)
            parts = [{"text": piece}]
        else:
            sent_tokens += choice.completion_tokens
            parts = _parts(choice)
        candidate = orjson.dumps(_candidate(choice, parts, last))
        usage = orjson.dumps(_usage(prompt_tokens, sent_tokens))
        chunks.append(b'{"candidates":[' + candidate + b'],"usageMetadata":' + usage + tail)
    return chunks


def _parts(choice: Choice) -> list[dict]:
    if choice.tool_calls:
        return [
            {"functionCall": {"name": call.name, "args": call.arguments}}
            for call in choice.tool_calls
        ]
    if choice.text is None:
        return []
    return [{"text": choice.text}]


def _candidate(choice: Choice, parts: list[dict], final: bool = True) -> dict:
    candidate: dict[str, Any] = {"index": choice.index}
    if choice.finish == FINISH_SAFETY:
        candidate["safetyRatings"] = BLOCKED_SAFETY_RATINGS
    else:
        candidate["content"] = {"role": "model", "parts": parts}
    if final:
        candidate["finishReason"] = FINISH_REASONS.get(choice.finish, "STOP")
    return candidate


async def count_content_tokens(
    request: Request, state: SimulatorState, model: str, body: dict
) -> Any:
    request_body = body.get("generateContentRequest") or body
    _, prompt_tokens = parse_generate_request(request_body, model)
    return json_response(state, {"totalTokens": prompt_tokens})


def _embedding_values(request_body: dict, model: str, seed: int, prefix: str) -> dict:
    """Return the ContentEmbedding of one embedding request.

    ``prefix`` is the request's path in the body, for error messages.
    """
    texts, _ = content_texts(request_body.get("content"), f"{prefix}content")
    if not texts:
        raise invalid(f"Invalid value at '{prefix}content': no text part to embed.")
    dimensions = optional_int(
        request_body, "outputDimensionality", 1, MAX_DIMENSIONS, f"{prefix}outputDimensionality"
    )
    vector = embedding_vector(model, "\n".join(texts), dimensions or DEFAULT_DIMENSIONS, seed)
    return {"values": vector}


async def embed_content(request: Request, state: SimulatorState, model: str, body: dict) -> Any:
    seed = state.config.seed
    embedding = _embedding_values(body, model, seed, "")
    await apply_faults_and_latency(request, state, GEMINI)
    return json_response(state, {"embedding": embedding})


async def batch_embed_contents(
    request: Request, state: SimulatorState, model: str, body: dict
) -> Any:
    requests = body.get("requests")
    if not isinstance(requests, list) or not requests:
        raise invalid("* BatchEmbedContentsRequest.requests: requests is not specified")
    seed = state.config.seed
    embeddings = []
    for position, item in enumerate(requests):
        if not isinstance(item, dict):
            raise invalid(f"Invalid value at 'requests[{position}]': expected an object.")
        embeddings.append(_embedding_values(item, model, seed, f"requests[{position}]."))
    await apply_faults_and_latency(request, state, GEMINI)
    return json_response(state, {"embeddings": embeddings})


ACTIONS = {
    "generateContent": generate_content,
    "streamGenerateContent": stream_generate_content,
    "countTokens": count_content_tokens,
    "embedContent": embed_content,
    "batchEmbedContents": batch_embed_contents,
}
