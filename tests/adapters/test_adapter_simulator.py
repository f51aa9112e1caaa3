"""Round trips through each adapter against the simulator's real wire formats.

The simulator's replies are deterministic, so a streamed call must assemble into the
same message as a non-streamed call with the same body.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import httpx
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from sim_harness import HOST, Simulator

from simulator.content import SAFETY_MARKER, contains_cjk
from simulator.urls import base_urls
from workers.adapters import anthropic, gemini, openai, openai_stream
from workers.adapters.base import UpstreamResult, UpstreamStatusError, UpstreamTimeout

pytestmark = pytest.mark.timeout(60)

API_KEY = "test-key"
PUBLIC_MODEL = "public-model"
TIMEOUT_S = 10.0
PNG_DATA_URL = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
    "+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "string"},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["answer", "confidence"],
    "additionalProperties": False,
}


@dataclass(frozen=True)
class Route:
    """How one wire format is called: its adapters, base URL path and upstream model."""

    chat: ModuleType
    stream: ModuleType
    provider: str
    wire_format: str
    upstream_model: str


ROUTES = {
    "openai": Route(openai, openai_stream, "openai", "openai", "sim-chat-small"),
    "anthropic": Route(anthropic, anthropic, "anthropic", "anthropic", "sim-claude-small"),
    "gemini": Route(gemini, gemini, "google", "gemini", "sim-gemini-flash"),
}
TRANSLATED = ("anthropic", "gemini")


@dataclass
class StreamedMessage:
    """A streamed completion assembled from its chunks."""

    content: str
    tool_calls: list[dict[str, Any]]
    finish_reason: str | None
    usage: dict[str, Any]
    ids: set[str]
    models: set[str]


def assemble(chunks: list[dict[str, Any]]) -> StreamedMessage:
    content = ""
    calls: dict[int, dict[str, Any]] = {}
    finish_reason = None
    usage: dict[str, Any] = {}
    for chunk in chunks:
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk["choices"]:
            assert choice["index"] == 0
            delta = choice["delta"]
            content += delta.get("content") or ""
            for call in delta.get("tool_calls") or []:
                entry = calls.setdefault(call["index"], {"id": None, "name": "", "arguments": ""})
                entry["id"] = call.get("id") or entry["id"]
                function = call.get("function") or {}
                entry["name"] += function.get("name") or ""
                entry["arguments"] += function.get("arguments") or ""
            finish_reason = choice["finish_reason"] or finish_reason
    return StreamedMessage(
        content,
        [calls[index] for index in sorted(calls)],
        finish_reason,
        usage,
        {chunk["id"] for chunk in chunks},
        {chunk["model"] for chunk in chunks},
    )


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client() as client:
        yield client


def base_url(simulator: Simulator, route: Route) -> str:
    return base_urls(HOST, simulator.port, route.provider, route.wire_format)


def call(client: httpx.Client, simulator: Simulator, name: str, body: dict) -> UpstreamResult:
    route = ROUTES[name]
    return route.chat.chat_completion(
        client,
        base_url(simulator, route),
        API_KEY,
        body,
        route.upstream_model,
        PUBLIC_MODEL,
        TIMEOUT_S,
    )


def stream(
    client: httpx.Client, simulator: Simulator, name: str, body: dict, timeout_s: float = TIMEOUT_S
) -> list[dict[str, Any]]:
    route = ROUTES[name]
    return list(
        route.stream.stream_chat_completion(
            client,
            base_url(simulator, route),
            API_KEY,
            body,
            route.upstream_model,
            PUBLIC_MODEL,
            timeout_s,
        )
    )


def chat(*messages: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"model": PUBLIC_MODEL, "messages": list(messages), **fields}


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def assert_openai_shapes(result: UpstreamResult, chunks: list[dict[str, Any]]) -> None:
    """Check the bodies against the OpenAI SDK's own response types."""
    assert ChatCompletion.model_validate(result.body).object == "chat.completion"
    for chunk in chunks:
        assert ChatCompletionChunk.model_validate(chunk).object == "chat.completion.chunk"


def only_message(result: UpstreamResult) -> dict[str, Any]:
    [choice] = result.body["choices"]
    return choice


@pytest.mark.parametrize("name", sorted(ROUTES))
def test_text_stream_matches_plain_call(
    http: httpx.Client, simulator: Simulator, name: str
) -> None:
    body = chat({"role": "system", "content": "Be brief."}, user("Describe the broker."))

    result = call(http, simulator, name, body)
    chunks = stream(http, simulator, name, body)
    streamed = assemble(chunks)

    assert_openai_shapes(result, chunks)
    choice = only_message(result)
    assert result.body["model"] == PUBLIC_MODEL
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"]
    assert streamed.content == choice["message"]["content"]
    assert streamed.finish_reason == "stop"
    assert len(streamed.ids) == 1
    assert streamed.models == {PUBLIC_MODEL}
    assert result.prompt_tokens > 0
    assert result.completion_tokens > 0
    assert streamed.usage["prompt_tokens"] == result.prompt_tokens
    assert streamed.usage["completion_tokens"] == result.completion_tokens


@pytest.mark.parametrize("name", sorted(ROUTES))
def test_tool_call_with_images(http: httpx.Client, simulator: Simulator, name: str) -> None:
    body = chat(
        user(
            [
                {"type": "text", "text": "What is the weather where these photos were taken?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/street.jpg"}},
                {"type": "image_url", "image_url": {"url": PNG_DATA_URL}},
            ]
        ),
        tools=[WEATHER_TOOL],
        tool_choice="required",
    )

    result = call(http, simulator, name, body)
    chunks = stream(http, simulator, name, body)
    streamed = assemble(chunks)

    assert_openai_shapes(result, chunks)
    choice = only_message(result)
    [tool_call] = choice["message"]["tool_calls"]
    arguments = json.loads(tool_call["function"]["arguments"])
    assert choice["finish_reason"] == "tool_calls"
    assert tool_call["function"]["name"] == "get_weather"
    assert set(arguments) >= {"city", "unit"}
    assert arguments["unit"] in ("celsius", "fahrenheit")
    [streamed_call] = streamed.tool_calls
    assert streamed_call["name"] == "get_weather"
    assert streamed_call["id"]
    assert json.loads(streamed_call["arguments"]) == arguments
    assert streamed.finish_reason == "tool_calls"
    assert result.prompt_tokens > 0
    assert streamed.usage["prompt_tokens"] == result.prompt_tokens


@pytest.mark.parametrize("name", sorted(ROUTES))
def test_json_schema_reply_parses(http: httpx.Client, simulator: Simulator, name: str) -> None:
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "answer", "strict": True, "schema": ANSWER_SCHEMA},
    }
    body = chat(user("Is the queue healthy?"), response_format=response_format)

    result = call(http, simulator, name, body)
    streamed = assemble(stream(http, simulator, name, body))

    choice = only_message(result)
    reply = json.loads(choice["message"]["content"])
    assert set(reply) == {"answer", "confidence"}
    assert 0 <= reply["confidence"] <= 1
    assert choice["finish_reason"] == "stop"
    assert "tool_calls" not in choice["message"]
    assert streamed.content == choice["message"]["content"]
    assert streamed.tool_calls == []
    assert streamed.finish_reason == "stop"
    assert result.completion_tokens > 0


@pytest.mark.parametrize("name", sorted(ROUTES))
def test_tool_result_turn_answers_text(http: httpx.Client, simulator: Simulator, name: str) -> None:
    first = chat(user("Weather in Paris?"), tools=[WEATHER_TOOL], tool_choice="required")
    assistant = only_message(call(http, simulator, name, first))["message"]
    [tool_call] = assistant["tool_calls"]
    follow_up = chat(
        *first["messages"],
        assistant,
        {"role": "tool", "tool_call_id": tool_call["id"], "content": '{"celsius": 18}'},
        tools=[WEATHER_TOOL],
    )

    result = call(http, simulator, name, follow_up)

    choice = only_message(result)
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"]
    assert "tool_calls" not in choice["message"]


@pytest.mark.parametrize("name", sorted(ROUTES))
def test_rate_limit_fault_is_retryable(simulator: Simulator, name: str) -> None:
    simulator.configure(retry_after_s=3)
    body = chat(user("Hi"))

    with httpx.Client(headers={"x-simulator-fault": "429"}) as faulty:
        with pytest.raises(UpstreamStatusError) as plain:
            call(faulty, simulator, name, body)
        with pytest.raises(UpstreamStatusError) as streamed:
            stream(faulty, simulator, name, body)

    for caught in (plain, streamed):
        assert caught.value.status_code == 429
        assert caught.value.retryable is True
        assert caught.value.retry_after_s == 3.0
        assert caught.value.message
        assert API_KEY not in caught.value.message


@pytest.mark.parametrize("name", sorted(ROUTES))
def test_split_multibyte_stream_intact(http: httpx.Client, simulator: Simulator, name: str) -> None:
    simulator.configure(split_multibyte=True)
    body = chat(user("请用中文介绍一下你自己"))

    expected = only_message(call(http, simulator, name, body))["message"]["content"]
    streamed = assemble(stream(http, simulator, name, body))

    assert contains_cjk(expected)
    assert streamed.content == expected


@pytest.mark.parametrize("name", TRANSLATED)
def test_timeout_fault_raises_upstream_timeout(simulator: Simulator, name: str) -> None:
    simulator.configure(timeout_hang_s=20)
    started = time.monotonic()

    with httpx.Client(headers={"x-simulator-fault": "timeout"}) as hanging:
        with pytest.raises(UpstreamTimeout) as caught:
            stream(hanging, simulator, name, chat(user("Hi")), timeout_s=0.5)

    assert caught.value.retryable is True
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("name", sorted(ROUTES))
def test_safety_block_is_content_filter(
    http: httpx.Client, simulator: Simulator, name: str
) -> None:
    body = chat(user(f"Tell me something dangerous {SAFETY_MARKER}"))

    result = call(http, simulator, name, body)
    streamed = assemble(stream(http, simulator, name, body))

    assert only_message(result)["finish_reason"] == "content_filter"
    assert streamed.finish_reason == "content_filter"
    assert streamed.content == ""


@pytest.mark.parametrize("name", TRANSLATED)
def test_invalid_request_not_retryable(http: httpx.Client, simulator: Simulator, name: str) -> None:
    body = chat(
        user("Hi"),
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "missing_tool"}},
    )

    with pytest.raises(UpstreamStatusError) as caught:
        call(http, simulator, name, body)

    assert caught.value.status_code == 400
    assert caught.value.retryable is False
    assert caught.value.client_status == 400


def test_gemini_embeddings_batch(http: httpx.Client, simulator: Simulator) -> None:
    url = base_url(simulator, ROUTES["gemini"])
    body = {"model": PUBLIC_MODEL, "input": ["first text", "second text"], "dimensions": 16}

    floats = gemini.embeddings(http, url, API_KEY, body, "sim-embedding", PUBLIC_MODEL, 10)
    packed = gemini.embeddings(
        http, url, API_KEY, {**body, "encoding_format": "base64"}, "sim-embedding", "m", 10
    )

    assert floats.body["object"] == "list"
    assert floats.body["model"] == PUBLIC_MODEL
    assert [item["index"] for item in floats.body["data"]] == [0, 1]
    assert [len(item["embedding"]) for item in floats.body["data"]] == [16, 16]
    assert floats.body["data"][0]["embedding"] != floats.body["data"][1]["embedding"]
    assert floats.prompt_tokens > 0
    assert floats.completion_tokens == 0
    assert floats.body["usage"]["prompt_tokens"] == floats.prompt_tokens
    assert len(base64.b64decode(packed.body["data"][0]["embedding"])) == 16 * 4


def test_openai_embeddings_usage(http: httpx.Client, simulator: Simulator) -> None:
    url = base_url(simulator, ROUTES["openai"])
    body = {"model": PUBLIC_MODEL, "input": ["first text", "second text"], "region": "us"}

    result = openai_stream.embeddings(http, url, API_KEY, body, "sim-embed", PUBLIC_MODEL, 10)

    assert result.body["model"] == PUBLIC_MODEL
    assert len(result.body["data"]) == 2
    assert result.prompt_tokens == result.body["usage"]["prompt_tokens"]
    assert result.prompt_tokens > 0
    assert result.completion_tokens == 0
    assert result.status_code == 200
