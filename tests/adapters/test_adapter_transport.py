"""HTTP handling of the adapters: SSE parsing, headers and error mapping, on mock transports."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest

from workers.adapters import anthropic, gemini, openai_stream
from workers.adapters.base import (
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from workers.adapters.translate_common import (
    ServerSentEvent,
    UntranslatableRequest,
    iter_sse,
    parse_data_url,
)

pytestmark = pytest.mark.timeout(30)

API_KEY = "secret-test-key"
BODY = {
    "model": "public-model",
    "region": "us",
    "messages": [{"role": "user", "content": "Tell me a secret prompt."}],
}
BASE_URL = "http://upstream.test"

# First bytes of a successful stream in each wire format, before a failure is injected.
STREAM_STARTS = {
    "openai": (
        openai_stream,
        b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m",'
        b'"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}\n\n',
    ),
    "anthropic": (
        anthropic,
        b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1",'
        b'"usage":{"input_tokens":3,"output_tokens":1}}}\n\n',
    ),
    "gemini": (
        gemini,
        b'data: {"candidates":[{"content":{"role":"model","parts":[{"text":"Hi"}]}}]}\r\n\r\n',
    ),
}


# --- Server-sent events ---------------------------------------------------------------


def split_at(raw: bytes, position: int) -> list[bytes]:
    return [raw[:position], raw[position:]]


def test_sse_reassembles_every_split_point() -> None:
    raw = (
        "event: greeting\r\ndata: 你好 🚀\r\n\r\n"
        ": a comment\nid: 7\nretry: 100\ndata: line one\ndata: line two\n\n"
        "data: cr only\r\r"
    ).encode()
    expected = [
        ServerSentEvent("greeting", "你好 🚀"),
        ServerSentEvent("message", "line one\nline two"),
        ServerSentEvent("message", "cr only"),
    ]

    for position in range(len(raw) + 1):
        assert list(iter_sse(split_at(raw, position))) == expected, position


def test_sse_strips_byte_order_mark() -> None:
    events = list(iter_sse([b"\xef\xbb", b"\xbfdata: first\n\n"]))

    assert events == [ServerSentEvent("message", "first")]


def test_sse_drops_incomplete_last_event() -> None:
    events = list(iter_sse([b"data: complete\n\ndata: cut off"]))

    assert events == [ServerSentEvent("message", "complete")]


def test_sse_rejects_invalid_utf8() -> None:
    with pytest.raises(UpstreamStatusError) as caught:
        list(iter_sse([b"data: \xff\xfe\n\n"]))

    assert caught.value.status_code == 502


def test_data_url_parsed() -> None:
    assert parse_data_url("data:image/gif;base64,R0lG") == ("image/gif", "R0lG")
    assert parse_data_url("https://example.com/a.gif") is None
    with pytest.raises(UntranslatableRequest):
        parse_data_url("data:image/gif,R0lG")


# --- Requests on the wire -------------------------------------------------------------


class RecordingTransport(httpx.MockTransport):
    """A mock transport that keeps the requests it received."""

    def __init__(self, handler: Callable[[httpx.Request], httpx.Response]) -> None:
        self.requests: list[httpx.Request] = []

        def record(request: httpx.Request) -> httpx.Response:
            request.read()
            self.requests.append(request)
            return handler(request)

        super().__init__(record)


def json_response(payload: Any, status: int = 200, **headers: str) -> httpx.Response:
    return httpx.Response(status, content=orjson.dumps(payload), headers=headers)


def test_anthropic_request_headers_and_url() -> None:
    reply = {
        "id": "msg_1",
        "content": [{"type": "text", "text": "Hi"}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 3, "output_tokens": 1},
    }
    transport = RecordingTransport(lambda request: json_response(reply))

    with httpx.Client(transport=transport) as client:
        result = anthropic.chat_completion(client, BASE_URL, API_KEY, BODY, "claude-x", "pub", 5)

    [request] = transport.requests
    assert str(request.url) == f"{BASE_URL}/v1/messages"
    assert request.headers["x-api-key"] == API_KEY
    assert request.headers["anthropic-version"] == "2023-06-01"
    assert request.headers["content-type"] == "application/json"
    assert orjson.loads(request.content)["model"] == "claude-x"
    assert result.prompt_tokens == 3
    assert result.completion_tokens == 1


def test_gemini_key_in_header_not_url() -> None:
    reply = {"candidates": [{"content": {"parts": [{"text": "Hi"}]}, "finishReason": "STOP"}]}

    def respond(request: httpx.Request) -> httpx.Response:
        if request.url.params.get("alt") == "sse":
            return httpx.Response(200, content=b"data: " + orjson.dumps(reply) + b"\r\n\r\n")
        return json_response(reply)

    transport = RecordingTransport(respond)

    with httpx.Client(transport=transport) as client:
        gemini.chat_completion(client, BASE_URL, API_KEY, BODY, "gemini-x", "pub", 5)
        list(gemini.stream_chat_completion(client, BASE_URL, API_KEY, BODY, "gemini-x", "pub", 5))

    plain, streamed = transport.requests
    assert str(plain.url) == f"{BASE_URL}/models/gemini-x:generateContent"
    assert str(streamed.url) == f"{BASE_URL}/models/gemini-x:streamGenerateContent?alt=sse"
    for request in transport.requests:
        assert request.headers["x-goog-api-key"] == API_KEY
        assert API_KEY not in str(request.url)


def test_openai_stream_forces_usage_and_strips_broker_fields() -> None:
    body = {**BODY, "stream_options": {"include_obfuscation": False}}

    upstream = openai_stream.stream_request_body(body, "gpt-x")

    assert upstream["model"] == "gpt-x"
    assert upstream["stream"] is True
    assert upstream["stream_options"] == {"include_obfuscation": False, "include_usage": True}
    assert "region" not in upstream


# --- Error mapping --------------------------------------------------------------------


class FailingStream(httpx.SyncByteStream):
    """A response body that sends ``first`` and then raises ``error``."""

    def __init__(self, first: bytes, error: Exception) -> None:
        self.first = first
        self.error = error

    def __iter__(self) -> Iterator[bytes]:
        yield self.first
        raise self.error


def call_stream(module: Any, transport: httpx.MockTransport) -> list[dict[str, Any]]:
    with httpx.Client(transport=transport) as client:
        return list(module.stream_chat_completion(client, BASE_URL, API_KEY, BODY, "up", "pub", 5))


@pytest.mark.parametrize("wire_format", sorted(STREAM_STARTS))
@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (httpx.ReadTimeout("timed out"), UpstreamTimeout),
        (httpx.RemoteProtocolError("peer closed connection"), UpstreamUnreachable),
    ],
)
def test_stream_failure_mid_body_mapped(
    wire_format: str, error: Exception, expected: type[UpstreamError]
) -> None:
    module, first = STREAM_STARTS[wire_format]
    transport = httpx.MockTransport(
        lambda request: httpx.Response(200, stream=FailingStream(first, error))
    )

    with pytest.raises(expected) as caught:
        call_stream(module, transport)

    assert caught.value.retryable is True
    assert API_KEY not in caught.value.message


@pytest.mark.parametrize("module", [anthropic, gemini, openai_stream])
def test_connect_error_mapped(module: Any) -> None:
    def reject_connection(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    transport = httpx.MockTransport(reject_connection)

    with pytest.raises(UpstreamUnreachable):
        call_stream(module, transport)
    if module is not openai_stream:
        with httpx.Client(transport=transport) as client, pytest.raises(UpstreamUnreachable):
            module.chat_completion(client, BASE_URL, API_KEY, BODY, "up", "pub", 5)


def test_status_error_reads_retry_after_header() -> None:
    body = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    transport = httpx.MockTransport(
        lambda request: json_response(body, 529, **{"retry-after": "12"})
    )

    with pytest.raises(UpstreamStatusError) as caught:
        call_stream(anthropic, transport)

    assert caught.value.status_code == 529
    assert caught.value.retryable is True
    assert caught.value.retry_after_s == 12.0
    assert caught.value.message == "Overloaded"


def test_status_error_reads_gemini_retry_info() -> None:
    body = {
        "error": {
            "code": 429,
            "message": "Quota exceeded.",
            "status": "RESOURCE_EXHAUSTED",
            "details": [
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "3.5s"}
            ],
        }
    }
    transport = httpx.MockTransport(lambda request: json_response(body, 429))

    with httpx.Client(transport=transport) as client, pytest.raises(UpstreamStatusError) as caught:
        gemini.chat_completion(client, BASE_URL, API_KEY, BODY, "gemini-x", "pub", 5)

    assert caught.value.retry_after_s == 3.5
    assert caught.value.client_status == 429


def test_context_length_error_not_retryable() -> None:
    body = {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "prompt is too long: 300000 tokens > 200000 maximum",
        },
    }
    transport = httpx.MockTransport(lambda request: json_response(body, 400))

    with httpx.Client(transport=transport) as client, pytest.raises(UpstreamStatusError) as caught:
        anthropic.chat_completion(client, BASE_URL, API_KEY, BODY, "claude-x", "pub", 5)

    assert caught.value.retryable is False
    assert caught.value.code == "context_length_exceeded"
    assert caught.value.client_status == 400


def test_non_json_error_body_kept_short() -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(502, text="<html>" * 500))

    with httpx.Client(transport=transport) as client, pytest.raises(UpstreamStatusError) as caught:
        gemini.chat_completion(client, BASE_URL, API_KEY, BODY, "gemini-x", "pub", 5)

    assert caught.value.status_code == 502
    assert len(caught.value.message) <= 500


def test_openai_stream_error_object_raises() -> None:
    raw = (
        STREAM_STARTS["openai"][1]
        + b'data: {"error":{"message":"Upstream model crashed.","type":"server_error",'
        + b'"code":null}}\n\n'
    )
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=raw))

    with pytest.raises(UpstreamStatusError) as caught:
        call_stream(openai_stream, transport)

    assert caught.value.status_code == 500
    assert caught.value.message == "Upstream model crashed."


def test_openai_stream_cut_before_finish_raises() -> None:
    transport = httpx.MockTransport(
        lambda request: httpx.Response(200, content=STREAM_STARTS["openai"][1])
    )

    with pytest.raises(UpstreamUnreachable):
        call_stream(openai_stream, transport)
