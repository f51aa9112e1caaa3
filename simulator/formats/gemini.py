"""Gemini API (generativelanguage v1beta) wire format."""

from typing import Any

import orjson
from starlette.requests import Request
from starlette.routing import Route

from simulator.content import (
    FINISH_LENGTH,
    FINISH_SAFETY,
    TOOLS_AUTO,
    TOOLS_NAMED,
    TOOLS_NONE,
    TOOLS_REQUIRED,
    Choice,
    ReplyRequest,
    ToolSpec,
    plan_choices,
)
from simulator.embeddings import DEFAULT_DIMENSIONS, MAX_DIMENSIONS, embedding_vector
from simulator.formats.common import invalid, json_text, optional_int, string_list
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
    IMAGE_TOKENS,
    MESSAGE_OVERHEAD_TOKENS,
    REPLY_PRIMING_TOKENS,
    count_tokens,
)

MODELS = ("sim-gemini-flash", "sim-gemini-pro", "sim-embedding")
FINISH_REASONS = {FINISH_LENGTH: "MAX_TOKENS", FINISH_SAFETY: "SAFETY"}
MEDIA_PARTS = ("inlineData", "fileData")
# Events end with CRLF CRLF, which SSE allows, so that clients whose parser only
# accepts LF line ends fail here.
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


def parse_generate_request(body: dict, model: str) -> tuple[ReplyRequest, int]:
    """Check a generateContent request and return its reply request and prompt tokens."""
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        raise invalid("* GenerateContentRequest.contents: contents is not specified")
    texts: list[str] = []
    prompt_tokens = REPLY_PRIMING_TOKENS
    system = body.get("systemInstruction")
    if system is not None:
        system_texts, media = _content_texts(system, "systemInstruction")
        texts.extend(system_texts)
        prompt_tokens += _tokens(system_texts, media)
    last_user_text = ""
    for position, content in enumerate(contents):
        content_texts, media = _content_texts(content, f"contents[{position}]")
        texts.extend(content_texts)
        prompt_tokens += _tokens(content_texts, media)
        if content.get("role", "user") == "user":
            last_user_text = "\n".join(content_texts)

    last = contents[-1]
    last_parts = last.get("parts") or []
    ends_with_user_turn = last.get("role", "user") == "user" and not any(
        isinstance(part, dict) and "functionResponse" in part for part in last_parts
    )
    config = body.get("generationConfig") or {}
    if not isinstance(config, dict):
        raise invalid("Invalid value at 'generation_config': expected an object.")
    json_object = config.get("responseMimeType") == "application/json"
    schema = config.get("responseSchema") or config.get("responseJsonSchema")
    tools = _tools(body.get("tools"))
    tool_mode, tool_name = _tool_config(body.get("toolConfig"), tools)
    reply_request = ReplyRequest(
        model=model,
        texts=texts,
        last_user_text=last_user_text,
        ends_with_user_turn=ends_with_user_turn,
        max_tokens=optional_int(
            config, "maxOutputTokens", 1, label="generationConfig.maxOutputTokens"
        ),
        stop=string_list(
            config.get("stopSequences"), "generationConfig.stopSequences", max_items=5
        ),
        n=optional_int(config, "candidateCount", 1, 8, label="generationConfig.candidateCount")
        or 1,
        json_object=json_object,
        json_schema=schema if json_object and schema else None,
        tools=tools,
        tool_mode=tool_mode,
        tool_name=tool_name,
    )
    return reply_request, prompt_tokens


def _tokens(texts: list[str], media: int) -> int:
    return (
        MESSAGE_OVERHEAD_TOKENS + sum(count_tokens(text) for text in texts) + media * IMAGE_TOKENS
    )


def _content_texts(content: Any, label: str) -> tuple[list[str], int]:
    """Return the texts of one Content object and its number of media parts."""
    if not isinstance(content, dict) or not isinstance(content.get("parts"), list):
        raise invalid(f"Invalid value at '{label}': expected an object with a parts list.")
    texts = []
    media = 0
    for part in content["parts"]:
        if not isinstance(part, dict):
            raise invalid(f"Invalid value at '{label}.parts': each part must be an object.")
        if isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif any(key in part for key in MEDIA_PARTS):
            media += 1
        elif isinstance(part.get("functionCall"), dict):
            call = part["functionCall"]
            texts += [str(call.get("name", "")), json_text(call.get("args", {}))]
        elif isinstance(part.get("functionResponse"), dict):
            response = part["functionResponse"]
            texts += [str(response.get("name", "")), json_text(response.get("response", {}))]
    return texts, media


def _tools(value: Any) -> list[ToolSpec]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise invalid("Invalid value at 'tools': expected a list.")
    tools = []
    for tool in value:
        declarations = tool.get("functionDeclarations") if isinstance(tool, dict) else None
        for declaration in declarations or []:
            if not isinstance(declaration, dict) or not isinstance(declaration.get("name"), str):
                raise invalid("Invalid value at 'tools.function_declarations': name is required.")
            schema = declaration.get("parameters") or declaration.get("parametersJsonSchema")
            tools.append(ToolSpec(declaration["name"], schema or {"type": "object"}))
    return tools


def _tool_config(value: Any, tools: list[ToolSpec]) -> tuple[str, str | None]:
    settings = value.get("functionCallingConfig") if isinstance(value, dict) else None
    if not isinstance(settings, dict):
        return TOOLS_AUTO, None
    mode = str(settings.get("mode", "AUTO")).upper()
    if mode == "NONE":
        return TOOLS_NONE, None
    allowed = settings.get("allowedFunctionNames")
    if mode in ("ANY", "VALIDATED") and isinstance(allowed, list) and allowed:
        if allowed[0] not in {tool.name for tool in tools}:
            raise invalid(f"Function {allowed[0]!r} in allowedFunctionNames is not declared.")
        return TOOLS_NAMED, allowed[0]
    return (TOOLS_REQUIRED if mode == "ANY" else TOOLS_AUTO), None


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
    texts, _ = _content_texts(request_body.get("content"), f"{prefix}content")
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
