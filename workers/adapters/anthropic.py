"""Adapter that serves OpenAI chat completion requests through the Anthropic Messages API.

``to_anthropic_request`` and ``from_anthropic_response`` translate the bodies, and
``translate_anthropic_stream`` turns Messages stream events into OpenAI chunks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from workers.adapters.base import UpstreamResult, UpstreamStatusError, UpstreamUnreachable
from workers.adapters.translate_common import (
    ChunkBuilder,
    ServerSentEvent,
    UntranslatableRequest,
    assistant_message,
    completion_body,
    content_parts,
    decode_arguments,
    first_error_object,
    function_tool_call,
    function_tools,
    invalid_response_error,
    iter_sse,
    json_text,
    load_event_json,
    max_output_tokens,
    named_tool_choice,
    new_completion_id,
    parse_data_url,
    post_json,
    raise_for_status,
    response_format_schema,
    stop_sequences,
    upstream_call,
)
from workers.upstream_http import HttpClient

ANTHROPIC_VERSION = "2023-06-01"

# Anthropic requires max_tokens and OpenAI does not, so a request without an output
# limit gets this one. 4096 is the output limit of Claude 3 Haiku, the lowest of the
# Claude 3 and later models, so every one of them accepts it.
DEFAULT_MAX_TOKENS = 4096

# Anthropic has no response_format field. Anthropic's tool use guide gets JSON output
# by forcing a call of one tool whose input_schema is the wanted schema, so the adapter
# adds this tool and returns its input as the message content.
JSON_TOOL_NAME = "json_output"

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

# HTTP status of each error type, from Anthropic's API errors page.
ERROR_STATUSES = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 529,
}

# OpenAI parameters with no Messages API counterpart, flagged when set to a value that
# changes the output.
UNSUPPORTED_WHEN_TRUTHY = ("logprobs", "top_logprobs", "presence_penalty", "frequency_penalty")


def unsupported_parameters(body: dict[str, Any]) -> list[str]:
    """Return the OpenAI parameters in ``body`` that Anthropic cannot honour."""
    names = []
    n = body.get("n")
    if isinstance(n, int) and n > 1:
        names.append("n")
    names += [name for name in UNSUPPORTED_WHEN_TRUTHY if body.get(name)]
    if body.get("logit_bias"):
        names.append("logit_bias")
    if body.get("seed") is not None:
        names.append("seed")
    return names


# --- Request --------------------------------------------------------------------------


def to_anthropic_request(body: dict[str, Any], upstream_model: str) -> dict[str, Any]:
    """Translate an OpenAI chat completion body into a Messages API body.

    Raises UntranslatableRequest for content that Anthropic cannot take, such as audio.
    """
    limit = max_output_tokens(body)
    request: dict[str, Any] = {
        "model": upstream_model,
        "max_tokens": DEFAULT_MAX_TOKENS if limit is None else limit,
    }
    system_blocks, messages = _convert_messages(body.get("messages"))
    if system_blocks:
        request["system"] = _system_prompt(system_blocks)
    request["messages"] = messages

    tools = [_convert_tool(tool) for tool in function_tools(body)]
    tool_choice = _tool_choice(body) if tools else None
    json_tool = _json_tool(body)
    if json_tool is not None:
        if any(tool["name"] == JSON_TOOL_NAME for tool in tools):
            raise UntranslatableRequest(
                f"A tool named {JSON_TOOL_NAME!r} cannot be combined with response_format, "
                "because the adapter uses that name to request JSON output from Anthropic."
            )
        tool_choice = _json_tool_choice(tool_choice, has_client_tools=bool(tools))
        tools.append(json_tool)
    if tools:
        request["tools"] = tools
    if tool_choice is not None:
        request["tool_choice"] = tool_choice

    stop = stop_sequences(body)
    if stop:
        request["stop_sequences"] = stop
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            request[name] = body[name]
    user = body.get("user") or body.get("safety_identifier")
    if user:
        request["metadata"] = {"user_id": user}
    return request


def _convert_messages(messages: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Return the system text blocks and the Messages API messages of an OpenAI list."""
    if not isinstance(messages, list) or not messages:
        raise UntranslatableRequest("messages must be a non-empty list.")
    system: list[dict[str, Any]] = []
    converted: list[dict[str, Any]] = []
    for position, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role in ("system", "developer"):
            system += [_content_block(part) for part in content_parts(message.get("content"))]
        elif role == "user":
            content = message.get("content")
            if not isinstance(content, str):
                content = [_content_block(part) for part in content_parts(content)]
            converted.append({"role": "user", "content": content})
        elif role == "assistant":
            content = _assistant_content(message)
            if content:
                converted.append({"role": "assistant", "content": content})
        elif role == "tool":
            _append_tool_result(converted, message)
        else:
            raise UntranslatableRequest(
                f"messages[{position}].role {role!r} cannot be sent to Anthropic; use system, "
                "developer, user, assistant or tool."
            )
    return system, converted


def _system_prompt(blocks: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """Return the system prompt as one string, or as blocks when any carries cache_control."""
    if any(block.get("type") != "text" for block in blocks):
        raise UntranslatableRequest("System and developer messages may contain only text.")
    if any("cache_control" in block for block in blocks):
        return blocks
    return "\n\n".join(block["text"] for block in blocks)


def _content_block(part: dict[str, Any]) -> dict[str, Any]:
    """Translate one OpenAI content part into an Anthropic content block."""
    kind = part.get("type")
    if kind == "text":
        block: dict[str, Any] = {"type": "text", "text": str(part.get("text", ""))}
    elif kind == "image_url":
        block = {"type": "image", "source": _image_source(part.get("image_url"))}
    elif kind == "file":
        block = {"type": "document", "source": _document_source(part.get("file"))}
    else:
        raise UntranslatableRequest(f"Content parts of type {kind!r} cannot be sent to Anthropic.")
    if "cache_control" in part:
        block["cache_control"] = part["cache_control"]
    return block


def _image_source(image_url: Any) -> dict[str, Any]:
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str):
        raise UntranslatableRequest("An image_url part needs an image_url object with a url.")
    data_url = parse_data_url(url)
    if data_url is not None:
        media_type, data = data_url
        return {"type": "base64", "media_type": media_type, "data": data}
    if url.startswith(("https://", "http://")):
        return {"type": "url", "url": url}
    raise UntranslatableRequest("An image URL must be an http(s) URL or a base64 data URL.")


def _document_source(file: Any) -> dict[str, Any]:
    file_data = file.get("file_data") if isinstance(file, dict) else None
    data_url = parse_data_url(file_data) if isinstance(file_data, str) else None
    if data_url is None:
        raise UntranslatableRequest(
            "A file part can be sent to Anthropic only with file_data as a base64 data URL."
        )
    media_type, data = data_url
    return {"type": "base64", "media_type": media_type, "data": data}


def _assistant_content(message: dict[str, Any]) -> str | list[dict[str, Any]] | None:
    """Return the content of an assistant message, or None when it has none.

    Empty text is dropped because Anthropic rejects empty text blocks, which OpenAI
    clients send next to tool calls.
    """
    content = message.get("content")
    tool_calls = message.get("tool_calls") or []
    if isinstance(content, str) and not tool_calls:
        return content or None
    blocks = [
        _content_block(part)
        for part in content_parts(content)
        if part.get("type") != "text" or part.get("text")
    ]
    for call in tool_calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not call.get("id"):
            raise UntranslatableRequest("Each assistant tool call needs an id and a function.")
        name = str(function.get("name", ""))
        blocks.append(
            {
                "type": "tool_use",
                "id": call["id"],
                "name": name,
                "input": decode_arguments(function.get("arguments"), name),
            }
        )
    return blocks or None


def _append_tool_result(converted: list[dict[str, Any]], message: dict[str, Any]) -> None:
    """Add a tool message as a tool_result block, merging consecutive results into one turn.

    Anthropic expects all results for one assistant turn in the user message after it.
    """
    call_id = message.get("tool_call_id")
    if not call_id:
        raise UntranslatableRequest(
            "A tool message needs the tool_call_id of the assistant tool call it responds to."
        )
    content = message.get("content")
    if not isinstance(content, str):
        content = [_content_block(part) for part in content_parts(content)]
    block = {"type": "tool_result", "tool_use_id": call_id, "content": content}
    previous = converted[-1] if converted else None
    if (
        previous is not None
        and previous["role"] == "user"
        and isinstance(previous["content"], list)
        and all(item.get("type") == "tool_result" for item in previous["content"])
    ):
        previous["content"].append(block)
    else:
        converted.append({"role": "user", "content": [block]})


def _convert_tool(tool: dict[str, Any]) -> dict[str, Any]:
    function = tool["function"]
    converted: dict[str, Any] = {"name": function["name"]}
    if function.get("description"):
        converted["description"] = function["description"]
    converted["input_schema"] = function.get("parameters") or {"type": "object", "properties": {}}
    cache_control = tool.get("cache_control", function.get("cache_control"))
    if cache_control is not None:
        converted["cache_control"] = cache_control
    return converted


def _tool_choice(body: dict[str, Any]) -> dict[str, Any] | None:
    """Return the Anthropic tool_choice, or None to leave Anthropic's default (auto)."""
    choice = body.get("tool_choice")
    serial = body.get("parallel_tool_calls") is False
    if choice == "none":
        return {"type": "none"}
    if choice is None and not serial:
        return None
    if choice in (None, "auto"):
        converted: dict[str, Any] = {"type": "auto"}
    elif choice == "required":
        converted = {"type": "any"}
    else:
        name = named_tool_choice(choice)
        if name is None:
            raise UntranslatableRequest(f"tool_choice {choice!r} is not supported.")
        converted = {"type": "tool", "name": name}
    if serial:
        converted["disable_parallel_tool_use"] = True
    return converted


def _json_tool(body: dict[str, Any]) -> dict[str, Any] | None:
    """Return the tool that emulates response_format, or None when the body has none."""
    kind, schema = response_format_schema(body)
    if kind is None:
        return None
    if schema is None:
        return {
            "name": JSON_TOOL_NAME,
            "description": "Return the final answer as a JSON object.",
            "input_schema": {"type": "object"},
        }
    return {
        "name": JSON_TOOL_NAME,
        "description": "Return the final answer as JSON that follows this schema.",
        "input_schema": schema,
    }


def _json_tool_choice(
    client_choice: dict[str, Any] | None, has_client_tools: bool
) -> dict[str, Any]:
    """Return the tool_choice of a request that emulates response_format.

    Without client tools, or with tool_choice none, the JSON tool is forced. With client
    tools the model must call some tool: one of the client's, or the JSON tool for its
    final reply. A tool_choice that names a client tool is kept.
    """
    client_choice = client_choice or {"type": "auto"}
    if client_choice["type"] == "tool":
        return client_choice
    if not has_client_tools or client_choice["type"] == "none":
        choice: dict[str, Any] = {"type": "tool", "name": JSON_TOOL_NAME}
    else:
        choice = {"type": "any"}
    if client_choice.get("disable_parallel_tool_use"):
        choice["disable_parallel_tool_use"] = True
    return choice


def json_tool_name(body: dict[str, Any]) -> str | None:
    """Return the name of the tool that emulates the body's response_format, if any."""
    return JSON_TOOL_NAME if response_format_schema(body)[0] is not None else None


# --- Response -------------------------------------------------------------------------


def openai_usage(usage: dict[str, Any]) -> dict[str, Any]:
    """Translate Anthropic usage into OpenAI usage.

    Anthropic's input_tokens excludes the tokens read from and written to the prompt
    cache, so prompt_tokens adds them back. ``cache_creation_input_tokens`` is a broker
    extension, because OpenAI usage has no field for cache writes.
    """
    cache_read = int(usage.get("cache_read_input_tokens") or 0)
    cache_creation = int(usage.get("cache_creation_input_tokens") or 0)
    prompt_tokens = int(usage.get("input_tokens") or 0) + cache_read + cache_creation
    completion_tokens = int(usage.get("output_tokens") or 0)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cache_read},
        "cache_creation_input_tokens": cache_creation,
    }


def from_anthropic_response(
    data: dict[str, Any], public_model: str, json_tool: str | None = None
) -> dict[str, Any]:
    """Translate a Messages API response into an OpenAI ``chat.completion`` object.

    ``json_tool`` names the tool that emulated response_format. Its input becomes the
    message content, and text blocks next to it are dropped so that the content parses
    as JSON.
    """
    texts: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    json_content = None
    for block in data.get("content") or []:
        kind = block.get("type")
        if kind == "text":
            texts.append(str(block.get("text", "")))
        elif kind == "tool_use" and json_tool is not None and block.get("name") == json_tool:
            json_content = json_text(block.get("input") or {})
        elif kind == "tool_use":
            arguments = json_text(block.get("input") or {})
            tool_calls.append(function_tool_call(block["id"], block["name"], arguments))
    if json_content is not None:
        content: str | None = json_content
    elif texts or not tool_calls:
        content = "".join(texts)
    else:
        content = None
    finish_reason = _finish_reason(data.get("stop_reason"), bool(tool_calls))
    message_id = data.get("id")
    choice = {
        "index": 0,
        "message": assistant_message(content, tool_calls),
        "logprobs": None,
        "finish_reason": finish_reason,
    }
    return completion_body(
        f"chatcmpl-{message_id}" if message_id else new_completion_id(),
        public_model,
        [choice],
        openai_usage(data.get("usage") or {}),
    )


def _finish_reason(stop_reason: str | None, called_client_tool: bool) -> str:
    finish_reason = FINISH_REASONS.get(stop_reason or "", "stop")
    if finish_reason == "tool_calls" and not called_client_tool:
        # Only the JSON tool was called, which the client sees as a finished reply.
        return "stop"
    return finish_reason


# --- Errors ---------------------------------------------------------------------------


def parse_error(payload: Any) -> tuple[str | None, str | None, float | None]:
    """Read the message and code of an Anthropic error body.

    The code is ``context_length_exceeded`` for a prompt that is too long, as OpenAI
    names it, and Anthropic's error type otherwise.
    """
    error = first_error_object(payload)
    message = error.get("message")
    code = error.get("type")
    if isinstance(message, str) and "prompt is too long" in message.lower():
        code = "context_length_exceeded"
    return message, code, None


def stream_error(payload: dict[str, Any]) -> UpstreamStatusError:
    """Return the exception for an ``error`` event inside a started stream."""
    message, code, _ = parse_error(payload)
    error_type = first_error_object(payload).get("type")
    return UpstreamStatusError(
        message or "Anthropic reported an error inside the stream.",
        status_code=ERROR_STATUSES.get(error_type, 500),
        code=code,
    )


# --- Calls ----------------------------------------------------------------------------


def _headers(api_key: str | None) -> dict[str, str]:
    headers = {"content-type": "application/json", "anthropic-version": ANTHROPIC_VERSION}
    if api_key:
        headers["x-api-key"] = api_key
    return headers


def chat_completion(
    client: HttpClient,
    base_url: str,
    api_key: str | None,
    body: dict[str, Any],
    upstream_model: str,
    public_model: str,
    timeout_s: float,
) -> UpstreamResult:
    """Call ``POST {base_url}/v1/messages`` and return the result as an OpenAI completion."""
    request = to_anthropic_request(body, upstream_model)
    status_code, data = post_json(
        client, f"{base_url}/v1/messages", _headers(api_key), request, timeout_s, parse_error
    )
    try:
        completion = from_anthropic_response(data, public_model, json_tool_name(body))
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise invalid_response_error(
            f"Anthropic returned a Messages response that could not be read: {exc!r}"
        ) from exc
    usage = completion["usage"]
    return UpstreamResult(
        body=completion,
        prompt_tokens=usage["prompt_tokens"],
        completion_tokens=usage["completion_tokens"],
        status_code=status_code,
    )


def stream_chat_completion(
    client: HttpClient,
    base_url: str,
    api_key: str | None,
    body: dict[str, Any],
    upstream_model: str,
    public_model: str,
    timeout_s: float,
) -> Iterator[dict[str, Any]]:
    """Stream ``POST {base_url}/v1/messages`` and yield OpenAI chunks.

    ``timeout_s`` applies to each read, not to the whole stream. Raises UpstreamError
    subclasses, also while iterating.
    """
    request = {**to_anthropic_request(body, upstream_model), "stream": True}
    with upstream_call(timeout_s):
        with client.stream(
            "POST",
            f"{base_url}/v1/messages",
            headers={**_headers(api_key), "accept": "text/event-stream"},
            content=orjson.dumps(request),
            timeout=timeout_s,
        ) as response:
            if response.status_code >= 400:
                response.read()
                raise_for_status(response, parse_error)
            events = iter_sse(response.iter_bytes())
            yield from translate_anthropic_stream(events, public_model, json_tool_name(body))


# --- Stream ---------------------------------------------------------------------------


@dataclass
class _Block:
    """One content block of a stream: what it becomes on the OpenAI side."""

    kind: str  # "text", "tool" (a client tool call), "json" (the JSON tool) or "ignored"
    tool_index: int = 0
    sent_arguments: bool = False


def translate_anthropic_stream(
    events: Iterable[ServerSentEvent], public_model: str, json_tool: str | None = None
) -> Iterator[dict[str, Any]]:
    """Translate Messages stream events into OpenAI chunks.

    The first chunk carries the assistant role. Text arrives as content deltas, client
    tool calls as tool_calls deltas (an opening with id and name, then argument
    fragments) and the JSON tool's input as content deltas. A chunk with the finish
    reason and a usage chunk without choices end the stream.

    Raises UpstreamStatusError for an error event and UpstreamUnreachable when the
    events end before the stop reason arrives.
    """
    builder = ChunkBuilder(public_model)
    usage: dict[str, Any] = {}
    blocks: dict[int, _Block] = {}
    tool_count = 0
    stop_reason = None
    for event in events:
        payload = load_event_json(event.data)
        if not isinstance(payload, dict):
            continue
        kind = payload.get("type") or event.event
        if kind == "error":
            raise stream_error(payload)
        if kind == "message_start":
            message = payload.get("message") or {}
            usage.update(message.get("usage") or {})
            if message.get("id"):
                builder.completion_id = f"chatcmpl-{message['id']}"
            yield builder.role_chunk()
        elif kind == "content_block_start":
            block = payload.get("content_block") or {}
            index = payload.get("index", len(blocks))
            if block.get("type") == "text":
                blocks[index] = _Block("text")
                if block.get("text"):
                    yield builder.chunk({"content": block["text"]})
            elif block.get("type") == "tool_use" and json_tool and block.get("name") == json_tool:
                blocks[index] = _Block("json")
            elif block.get("type") == "tool_use":
                blocks[index] = _Block("tool", tool_count)
                tool_count += 1
                yield from builder.tool_call_chunks(
                    blocks[index].tool_index, block.get("id", ""), block.get("name", ""), ""
                )
            else:
                blocks[index] = _Block("ignored")
        elif kind == "content_block_delta":
            yield from _delta_chunks(builder, blocks.get(payload.get("index")), payload)
        elif kind == "content_block_stop":
            block_state = blocks.get(payload.get("index"))
            if block_state is not None and not block_state.sent_arguments:
                # A call without arguments still needs a JSON object as its arguments.
                if block_state.kind == "tool":
                    yield builder.arguments_chunk(block_state.tool_index, "{}")
                elif block_state.kind == "json":
                    yield builder.chunk({"content": "{}"})
        elif kind == "message_delta":
            stop_reason = (payload.get("delta") or {}).get("stop_reason") or stop_reason
            # Counts in message_delta are cumulative, and absent ones keep earlier values.
            delta_usage = payload.get("usage") or {}
            usage.update((key, value) for key, value in delta_usage.items() if value is not None)
    # message_stop needs no handling: it is the last event, and reading on to the end of
    # the body lets the connection go back to the pool.
    if stop_reason is None:
        raise UpstreamUnreachable("The Anthropic stream ended before the message finished.")
    yield builder.chunk({}, finish_reason=_finish_reason(stop_reason, tool_count > 0))
    yield builder.usage_chunk(openai_usage(usage))


def _delta_chunks(
    builder: ChunkBuilder, block: _Block | None, payload: dict[str, Any]
) -> Iterator[dict[str, Any]]:
    delta = payload.get("delta") or {}
    if block is None or block.kind == "ignored":
        return
    if delta.get("type") == "text_delta" and block.kind == "text":
        if delta.get("text"):
            yield builder.chunk({"content": delta["text"]})
    elif delta.get("type") == "input_json_delta" and delta.get("partial_json"):
        block.sent_arguments = True
        if block.kind == "json":
            yield builder.chunk({"content": delta["partial_json"]})
        else:
            yield builder.arguments_chunk(block.tool_index, delta["partial_json"])
