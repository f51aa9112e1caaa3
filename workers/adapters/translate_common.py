"""Helpers shared by the adapters that serve OpenAI chat requests through other formats.

They cover the HTTP and error handling of one upstream call, a server-sent events
parser, OpenAI response and chunk builders, and readers for OpenAI request fields.
"""

from __future__ import annotations

import codecs
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import httpx
import orjson

from workers.adapters.base import (
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeout,
    UpstreamUnreachable,
    parse_retry_after,
)
from workers.upstream_http import HttpClient

# Maximum length of a provider error message kept in an exception, in characters.
MAX_ERROR_MESSAGE_CHARS = 500

# Parses a provider error body into (message, code, retry delay in s from the body).
ErrorParser = Callable[[Any], tuple[str | None, str | None, float | None]]


class UntranslatableRequest(UpstreamStatusError):
    """A request that the provider's wire format cannot express.

    It is raised before any upstream call, with status 400 so that it is not retried.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, status_code=400, code="unsupported_request")


def invalid_response_error(message: str) -> UpstreamStatusError:
    """Return the error for a 2xx response whose body the adapter cannot read."""
    return UpstreamStatusError(message, status_code=502)


# --- HTTP calls and errors ------------------------------------------------------------


@contextmanager
def upstream_call(timeout_s: float) -> Iterator[None]:
    """Translate httpx exceptions raised inside the block into UpstreamError subclasses.

    Wrap the whole call with it, including the iteration of a streamed body, so that no
    httpx exception reaches the caller.
    """
    try:
        yield
    except httpx.TimeoutException as exc:
        raise UpstreamTimeout(
            f"The provider did not respond within {timeout_s:g} s ({type(exc).__name__})."
        ) from exc
    except httpx.TransportError as exc:
        raise UpstreamUnreachable(
            f"The provider could not be reached: {type(exc).__name__}: {exc}"
        ) from exc
    except httpx.InvalidURL as exc:
        raise UpstreamError(f"The provider base URL is invalid: {exc}") from exc
    except (httpx.HTTPError, httpx.StreamError) as exc:
        raise UpstreamError(
            f"The provider's response could not be read: {type(exc).__name__}: {exc}"
        ) from exc


def post_json(
    client: HttpClient,
    url: str,
    headers: dict[str, str],
    payload: Any,
    timeout_s: float,
    parse_error: ErrorParser,
) -> tuple[int, Any]:
    """POST ``payload`` as JSON and return the response status and its decoded JSON body.

    Raises UpstreamStatusError for a status of 400 or more, with the message that
    ``parse_error`` finds in the body, and for a success body that is not JSON.
    """
    with upstream_call(timeout_s):
        response = client.post(
            url, headers=headers, content=orjson.dumps(payload), timeout=timeout_s
        )
    raise_for_status(response, parse_error)
    try:
        return response.status_code, orjson.loads(response.content)
    except orjson.JSONDecodeError as exc:
        raise invalid_response_error("The provider returned a body that is not JSON.") from exc


def raise_for_status(response: httpx.Response, parse_error: ErrorParser) -> None:
    """Raise UpstreamStatusError when ``response`` has a status of 400 or more.

    The body must already be read, so call ``response.read()`` first on a stream.
    The retry delay comes from the Retry-After header, else from the body.
    """
    if response.status_code < 400:
        return
    try:
        payload = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        payload = None
    message, code, body_retry_after_s = (None, None, None)
    if payload is not None:
        message, code, body_retry_after_s = parse_error(payload)
    if not message:
        message = response.text[:MAX_ERROR_MESSAGE_CHARS] or response.reason_phrase
    retry_after_s = parse_retry_after(response.headers.get("retry-after"))
    if retry_after_s is None:
        retry_after_s = body_retry_after_s
    raise UpstreamStatusError(
        message[:MAX_ERROR_MESSAGE_CHARS],
        status_code=response.status_code,
        code=code,
        retry_after_s=retry_after_s,
    )


def first_error_object(payload: Any) -> dict[str, Any]:
    """Return the ``error`` object of an error body, or an empty dict.

    Google APIs sometimes wrap the body in a one-element list, so that form is read too.
    """
    if isinstance(payload, list) and payload:
        payload = payload[0]
    if not isinstance(payload, dict):
        return {}
    error = payload.get("error")
    return error if isinstance(error, dict) else {}


# --- Server-sent events ---------------------------------------------------------------

LINE_BREAK = re.compile(r"\r\n|\r|\n")


class ServerSentEvent(NamedTuple):
    event: str
    data: str


def iter_sse(byte_chunks: Iterable[bytes]) -> Iterator[ServerSentEvent]:
    """Parse a text/event-stream body into events, as the WHATWG HTML standard defines.

    Bytes are decoded incrementally, so a multi-byte UTF-8 character split across two
    chunks stays intact. Lines may end in CRLF, LF or CR. Comments and the ``id`` and
    ``retry`` fields are ignored, and an event that the body ends before completing is
    dropped. Raises UpstreamStatusError (502) for bytes that are not valid UTF-8.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    pending = ""
    at_start = True
    event_name = ""
    data_lines: list[str] = []
    try:
        for chunk in byte_chunks:
            text = pending + decoder.decode(chunk)
            if at_start and text:
                # The standard strips one byte order mark at the start of the stream.
                text = text.removeprefix("\ufeff")
                at_start = False
            # A CR at the end may be the first half of a CRLF split across two chunks,
            # so it stays in ``pending`` until the next chunk shows what follows it.
            held_cr = text.endswith("\r")
            lines = LINE_BREAK.split(text[:-1] if held_cr else text)
            pending = lines.pop() + ("\r" if held_cr else "")
            for line in lines:
                if line == "":
                    if data_lines:
                        yield ServerSentEvent(event_name or "message", "\n".join(data_lines))
                    event_name = ""
                    data_lines = []
                    continue
                field, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if field == "data":
                    data_lines.append(value)
                elif field == "event":
                    event_name = value
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        raise invalid_response_error("The provider's stream is not valid UTF-8.") from exc
    if pending == "\r" and data_lines:
        # The body ended with the CR that completes the last event.
        yield ServerSentEvent(event_name or "message", "\n".join(data_lines))


def load_event_json(data: str) -> Any:
    """Decode the JSON data of one event, raising UpstreamStatusError (502) if invalid."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise invalid_response_error("The provider sent a stream event that is not JSON.") from exc


# --- OpenAI response shapes -----------------------------------------------------------


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def completion_body(
    completion_id: str,
    public_model: str,
    choices: list[dict[str, Any]],
    usage: dict[str, Any],
) -> dict[str, Any]:
    """Build an OpenAI ``chat.completion`` object."""
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": public_model,
        "choices": choices,
        "usage": usage,
    }


def assistant_message(text: str | None, tool_calls: list[dict[str, Any]]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


def function_tool_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


@dataclass
class ChunkBuilder:
    """Builds the ``chat.completion.chunk`` objects of one stream, which share an id."""

    public_model: str
    completion_id: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        self.completion_id = self.completion_id or new_completion_id()
        self.created = self.created or int(time.time())

    def _envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.public_model,
            "choices": choices,
        }

    def chunk(
        self,
        delta: dict[str, Any],
        index: int = 0,
        finish_reason: str | None = None,
        logprobs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        choice = {
            "index": index,
            "delta": delta,
            "finish_reason": finish_reason,
            "logprobs": logprobs,
        }
        return self._envelope([choice])

    def role_chunk(self, index: int = 0) -> dict[str, Any]:
        return self.chunk({"role": "assistant", "content": ""}, index)

    def tool_call_chunks(
        self,
        tool_index: int,
        call_id: str,
        name: str,
        arguments: str,
        index: int = 0,
        extra: dict[str, Any] | None = None,
    ) -> list[dict[str, Any]]:
        """Return the opening chunk of a tool call and, if any, one with its arguments.

        ``extra`` contains provider fields to add to the opening tool call object.
        """
        opening = {
            "index": tool_index,
            "id": call_id,
            "type": "function",
            "function": {"name": name, "arguments": ""},
            **(extra or {}),
        }
        chunks = [self.chunk({"tool_calls": [opening]}, index)]
        if arguments:
            chunks.append(self.arguments_chunk(tool_index, arguments, index))
        return chunks

    def arguments_chunk(self, tool_index: int, fragment: str, index: int = 0) -> dict[str, Any]:
        delta = {"tool_calls": [{"index": tool_index, "function": {"arguments": fragment}}]}
        return self.chunk(delta, index)

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {**self._envelope([]), "usage": usage}


# --- OpenAI request fields ------------------------------------------------------------


def content_parts(content: Any) -> list[dict[str, Any]]:
    """Return message content as a list of parts, wrapping a plain string."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list) and all(isinstance(part, dict) for part in content):
        return content
    raise UntranslatableRequest(
        "Message content must be a string, null or a list of content part objects."
    )


def content_text(content: Any) -> str:
    """Return the text parts of message content joined without separator."""
    return "".join(
        str(part.get("text", "")) for part in content_parts(content) if part.get("type") == "text"
    )


def parse_data_url(url: str) -> tuple[str, str] | None:
    """Return (media type, base64 data) of a ``data:`` URL, or None for other URLs.

    Raises UntranslatableRequest for a data URL that is not base64-encoded.
    """
    if not url.startswith("data:"):
        return None
    header, separator, data = url.removeprefix("data:").partition(",")
    media_type, *parameters = header.split(";")
    if not separator or "base64" not in parameters:
        raise UntranslatableRequest(
            "A data URL in the request must have the form data:<media type>;base64,<data>."
        )
    return media_type or "application/octet-stream", data


def max_output_tokens(body: dict[str, Any]) -> int | None:
    """Return max_completion_tokens, else the older max_tokens, else None."""
    value = body.get("max_completion_tokens")
    if value is None:
        value = body.get("max_tokens")
    return value


def stop_sequences(body: dict[str, Any]) -> list[str] | None:
    stop = body.get("stop")
    if stop is None:
        return None
    return [stop] if isinstance(stop, str) else list(stop)


def function_tools(body: dict[str, Any]) -> list[dict[str, Any]]:
    """Return the request's tools after checking that each is a named function tool.

    Raises UntranslatableRequest for a tool of another type, such as ``custom``.
    """
    tools = body.get("tools") or []
    if not isinstance(tools, list):
        raise UntranslatableRequest("tools must be a list of function tools.")
    for tool in tools:
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
            raise UntranslatableRequest(
                f"Only function tools can be sent to this provider, not {kind!r} tools."
            )
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise UntranslatableRequest("Each function tool needs a function object with a name.")
    return tools


def named_tool_choice(tool_choice: Any) -> str | None:
    """Return the function name of a ``{"type": "function", ...}`` tool_choice, else None."""
    if isinstance(tool_choice, dict):
        function = tool_choice.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return function["name"]
        raise UntranslatableRequest(
            "tool_choice must be 'auto', 'none', 'required' or "
            '{"type": "function", "function": {"name": ...}}.'
        )
    return None


def decode_arguments(arguments: Any, tool_name: str) -> Any:
    """Decode the JSON ``arguments`` string of an assistant tool call."""
    if isinstance(arguments, dict):
        return arguments
    if arguments in (None, ""):
        return {}
    try:
        return orjson.loads(arguments)
    except (orjson.JSONDecodeError, TypeError) as exc:
        raise UntranslatableRequest(
            f"The arguments of an assistant call to the tool {tool_name!r} are not valid JSON."
        ) from exc


def response_format_schema(body: dict[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
    """Return the response_format type (None for text) and its JSON schema, if any."""
    response_format = body.get("response_format")
    if not isinstance(response_format, dict):
        return None, None
    kind = response_format.get("type")
    if kind == "json_object":
        return kind, None
    if kind == "json_schema":
        definition = response_format.get("json_schema") or {}
        schema = definition.get("schema") if isinstance(definition, dict) else None
        return kind, schema if isinstance(schema, dict) else None
    if kind in (None, "text"):
        return None, None
    raise UntranslatableRequest(
        f"response_format type {kind!r} is not supported; use text, json_object or json_schema."
    )


def json_text(value: Any) -> str:
    """Serialize ``value`` as compact JSON, keeping the key order."""
    return orjson.dumps(value).decode()
