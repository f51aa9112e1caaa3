"""Anthropic Messages wire format."""

import hashlib
from typing import Any

import orjson
from starlette.requests import Request
from starlette.routing import Route

from simulator.content import (
    FINISH_LENGTH,
    FINISH_SAFETY,
    FINISH_STOP_SEQUENCE,
    FINISH_TOOL_CALLS,
    TOOLS_AUTO,
    TOOLS_NAMED,
    TOOLS_NONE,
    TOOLS_REQUIRED,
    Choice,
    ReplyRequest,
    ToolSpec,
    chunk_text,
    plan_choices,
)
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
from simulator.streaming import EventStreamResponse, named_event
from simulator.tokens import (
    IMAGE_TOKENS,
    MESSAGE_OVERHEAD_TOKENS,
    REPLY_PRIMING_TOKENS,
    count_tokens,
)

MODELS = ("sim-claude-small", "sim-claude-large")
STOP_REASONS = {
    FINISH_LENGTH: "max_tokens",
    FINISH_STOP_SEQUENCE: "stop_sequence",
    FINISH_TOOL_CALLS: "tool_use",
    FINISH_SAFETY: "refusal",
}
MEDIA_BLOCKS = frozenset({"image", "document"})

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


class PromptSummary:
    """Texts and token counts of a Messages request, with its cache_control prefix.

    The cached prefix runs up to and including the last block that carries
    ``cache_control``, in the order tools, system, messages. A top-level
    ``cache_control`` marks the whole prompt. Tool definitions add no tokens.
    """

    def __init__(self, body: dict) -> None:
        self.texts: list[str] = []
        self.tokens = REPLY_PRIMING_TOKENS
        self.last_user_text = ""
        self.cached_prefix_tokens = 0
        self.cached_prefix_key = b""
        # Hashing every block costs time, so it happens only when something is marked.
        self._hash = None
        if _has_cache_control(body):
            self._hash = hashlib.blake2b(str(body.get("model")).encode(), digest_size=16)

        for tool in body.get("tools") or []:
            self._add_item(tool, [], 0)
        system = body.get("system")
        if system is not None:
            self.tokens += MESSAGE_OVERHEAD_TOKENS
            for block in _blocks(system, "system"):
                self._add_block(block, "system")
        for position, message in enumerate(body["messages"]):
            self.tokens += MESSAGE_OVERHEAD_TOKENS
            label = f"messages.{position}.content"
            texts_before = len(self.texts)
            for block in _blocks(message.get("content"), label):
                self._add_block(block, label)
            if message.get("role") == "user":
                self.last_user_text = "\n".join(self.texts[texts_before:])

        if body.get("cache_control") is not None:
            self._mark_prefix()

    def _add_block(self, block: Any, label: str) -> None:
        if not isinstance(block, dict):
            raise invalid(f"{label}: each content block must be an object")
        block_type = block.get("type")
        texts: list[str] = []
        media = 0
        if block_type == "text":
            texts.append(str(block.get("text", "")))
        elif block_type in MEDIA_BLOCKS:
            media = 1
        elif block_type == "tool_use":
            texts += [str(block.get("name", "")), json_text(block.get("input", {}))]
        elif block_type == "tool_result":
            inner = block.get("content")
            if isinstance(inner, str):
                texts.append(inner)
            for part in inner if isinstance(inner, list) else []:
                if isinstance(part, dict) and part.get("type") == "text":
                    texts.append(str(part.get("text", "")))
                elif isinstance(part, dict) and part.get("type") in MEDIA_BLOCKS:
                    media += 1
        elif block_type in ("thinking", "redacted_thinking"):
            texts.append(str(block.get("thinking", "")))
        else:
            raise invalid(f"{label}: unsupported content block type {block_type!r}")
        self._add_item(block, texts, media)

    def _add_item(self, item: dict, texts: list[str], media: int) -> None:
        self.texts.extend(texts)
        self.tokens += sum(count_tokens(text) for text in texts) + media * IMAGE_TOKENS
        if self._hash is not None:
            self._hash.update(orjson.dumps(item, option=orjson.OPT_SORT_KEYS))
            if item.get("cache_control") is not None:
                self._mark_prefix()

    def _mark_prefix(self) -> None:
        self.cached_prefix_tokens = self.tokens
        self.cached_prefix_key = self._hash.copy().digest()


def _blocks(content: Any, label: str) -> list:
    """Return the content blocks of a system prompt or message, wrapping a plain string."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise invalid(f"{label}: Input should be a string or a list of content blocks")
    return content


def _has_cache_control(body: dict) -> bool:
    if body.get("cache_control") is not None:
        return True
    items: list[Any] = list(body.get("tools") or [])
    system = body.get("system")
    if isinstance(system, list):
        items.extend(system)
    for message in body["messages"]:
        content = message.get("content")
        if isinstance(content, list):
            items.extend(content)
    return any(isinstance(item, dict) and item.get("cache_control") is not None for item in items)


def _check_request(request: Request, body: dict) -> None:
    if not request.headers.get("anthropic-version"):
        raise invalid("anthropic-version: header is required")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise invalid("model: Field required")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages: Field required and must be a non-empty list")
    for position, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise invalid(f"messages.{position}.role: Input should be 'user' or 'assistant'")


async def count_message_tokens(request: Request, state: SimulatorState) -> Any:
    body = await read_json_object(request)
    _check_request(request, body)
    _tools(body.get("tools"))
    return json_response(state, {"input_tokens": PromptSummary(body).tokens})


async def messages(request: Request, state: SimulatorState) -> Any:
    body = await read_json_object(request)
    _check_request(request, body)
    model = body["model"]
    state.stats.count_model(model)
    if body.get("max_tokens") is None:
        raise invalid("max_tokens: Field required")
    max_tokens = optional_int(body, "max_tokens", 1)
    tools = _tools(body.get("tools"))
    prompt = PromptSummary(body)
    last_message = body["messages"][-1]
    tool_mode, tool_name, parallel = _tool_choice(body.get("tool_choice"), tools)
    reply_request = ReplyRequest(
        model=model,
        texts=prompt.texts,
        last_user_text=prompt.last_user_text,
        ends_with_user_turn=last_message["role"] == "user" and not _has_tool_result(last_message),
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


def _has_tool_result(message: dict) -> bool:
    content = message.get("content")
    return isinstance(content, list) and any(
        isinstance(block, dict) and block.get("type") == "tool_result" for block in content
    )


def _tools(value: Any) -> list[ToolSpec]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise invalid("tools: Input should be a valid list")
    tools = []
    for position, tool in enumerate(value):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise invalid(f"tools.{position}.name: Field required")
        schema = tool.get("input_schema")
        if schema is None and tool.get("type", "custom") != "custom":
            # Server tools such as web search have no input schema and are not called.
            continue
        if not isinstance(schema, dict):
            raise invalid(f"tools.{position}.input_schema: Field required")
        tools.append(ToolSpec(tool["name"], schema))
    return tools


def _tool_choice(value: Any, tools: list[ToolSpec]) -> tuple[str, str | None, bool]:
    """Return the tool mode, the named tool and whether to make two parallel calls.

    Two tools are called only when ``disable_parallel_tool_use`` is explicitly false.
    """
    if value is None:
        return TOOLS_AUTO, None, False
    choice_type = value.get("type") if isinstance(value, dict) else None
    parallel = value.get("disable_parallel_tool_use") is False if choice_type else False
    if choice_type == "auto":
        return TOOLS_AUTO, None, parallel
    if choice_type == "any":
        return TOOLS_REQUIRED, None, parallel
    if choice_type == "none":
        return TOOLS_NONE, None, False
    if choice_type == "tool":
        name = value.get("name")
        if name not in {tool.name for tool in tools}:
            raise invalid(f"tool_choice.name: no tool named {name!r} in tools")
        return TOOLS_NAMED, name, False
    raise invalid("tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'")


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
