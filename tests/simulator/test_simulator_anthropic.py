"""Anthropic Messages wire format, checked through the official anthropic SDK."""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import httpx
import pytest
from sim_harness import HOST, REGION, Simulator

from simulator.tokens import count_tokens
from simulator.urls import base_urls

pytestmark = pytest.mark.timeout(60)

MODEL = "sim-claude"
ANTHROPIC_HEADERS = {"x-api-key": "test-key", "anthropic-version": "2023-06-01"}
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Current weather of a city.",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
        },
        "required": ["city", "unit"],
    },
}
TIME_TOOL = {
    "name": "get_time",
    "input_schema": {"type": "object", "properties": {"zone": {"type": "string"}}},
}


@pytest.fixture
def client(simulator: Simulator) -> Iterator[anthropic.Anthropic]:
    base_url = base_urls(HOST, simulator.port, "anthropic", "anthropic")
    with anthropic.Anthropic(
        base_url=base_url, api_key="test-key", max_retries=0, timeout=10
    ) as sdk:
        yield sdk


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_message_parses(client: anthropic.Anthropic, simulator: Simulator) -> None:
    message = client.messages.create(
        model=MODEL, max_tokens=200, system="Be brief.", messages=ask("Hello there")
    )

    assert message.type == "message"
    assert message.role == "assistant"
    assert message.id.startswith("msg_")
    assert message.model == MODEL
    assert message.stop_reason == "end_turn"
    assert message.stop_sequence is None
    assert len(message.content) == 1
    block = message.content[0]
    assert block.type == "text"
    assert 8 <= count_tokens(block.text) <= 120
    expected_input = (count_tokens("Be brief.") + 4) + (count_tokens("Hello there") + 4) + 3
    assert message.usage.input_tokens == expected_input
    assert message.usage.output_tokens == count_tokens(block.text)
    assert message.usage.cache_creation_input_tokens == 0
    assert message.usage.cache_read_input_tokens == 0
    assert simulator.stats()["by_model"] == {MODEL: 1}


def test_region_header_on_message(client: anthropic.Anthropic) -> None:
    raw = client.messages.with_raw_response.create(model=MODEL, max_tokens=50, messages=ask("hi"))

    assert raw.headers["x-simulator-region"] == REGION


def test_max_tokens_cap_gives_max_tokens(client: anthropic.Anthropic) -> None:
    message = client.messages.create(model=MODEL, max_tokens=4, messages=ask("Long story"))

    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 4
    assert count_tokens(message.content[0].text) == 4


def test_stop_sequence_reported(client: anthropic.Anthropic) -> None:
    full = client.messages.create(model=MODEL, max_tokens=200, messages=ask("Stop here"))
    text = full.content[0].text
    stop = text.split()[3]

    cut = client.messages.create(
        model=MODEL, max_tokens=200, messages=ask("Stop here"), stop_sequences=[stop]
    )

    assert cut.stop_reason == "stop_sequence"
    assert cut.stop_sequence == stop
    assert cut.content[0].text == text[: text.index(stop)]


def test_tool_use_follows_schema(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model=MODEL, max_tokens=200, messages=ask("Weather in Oslo?"), tools=[WEATHER_TOOL]
    )

    assert message.stop_reason == "tool_use"
    assert len(message.content) == 1
    block = message.content[0]
    assert block.type == "tool_use"
    assert block.id.startswith("toolu_")
    assert block.name == "get_weather"
    assert isinstance(block.input["city"], str)
    assert block.input["unit"] in ("celsius", "fahrenheit")
    assert 1 <= block.input["days"] <= 7


def test_tool_choice_names_the_tool(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model=MODEL,
        max_tokens=200,
        messages=ask("What time is it?"),
        tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice={"type": "tool", "name": "get_time"},
    )

    assert [block.name for block in message.content] == ["get_time"]


def test_tool_result_gets_text(client: anthropic.Anthropic) -> None:
    first = client.messages.create(
        model=MODEL, max_tokens=200, messages=ask("Weather in Oslo?"), tools=[WEATHER_TOOL]
    )
    tool_use = first.content[0]
    messages = [
        *ask("Weather in Oslo?"),
        {"role": "assistant", "content": [block.model_dump() for block in first.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": tool_use.id, "content": "4 C"}],
        },
    ]

    second = client.messages.create(
        model=MODEL, max_tokens=200, messages=messages, tools=[WEATHER_TOOL]
    )

    assert second.stop_reason == "end_turn"
    assert second.content[0].type == "text"


def test_cache_control_writes_then_reads(client: anthropic.Anthropic) -> None:
    system = [
        {"type": "text", "text": "Long shared instructions " * 20},
        {"type": "text", "text": "Cached part ends here.", "cache_control": {"type": "ephemeral"}},
    ]
    prefix_tokens = 3 + 4 + count_tokens(system[0]["text"]) + count_tokens(system[1]["text"])

    first = client.messages.create(
        model=MODEL, max_tokens=50, system=system, messages=ask("First question")
    )
    second = client.messages.create(
        model=MODEL, max_tokens=50, system=system, messages=ask("Another question")
    )

    assert first.usage.cache_creation_input_tokens == prefix_tokens
    assert first.usage.cache_read_input_tokens == 0
    assert first.usage.input_tokens == count_tokens("First question") + 4
    assert second.usage.cache_creation_input_tokens == 0
    assert second.usage.cache_read_input_tokens == prefix_tokens
    assert second.usage.input_tokens == count_tokens("Another question") + 4


def test_stream_final_message_matches(client: anthropic.Anthropic) -> None:
    plain = client.messages.create(model=MODEL, max_tokens=200, messages=ask("Stream it"))

    with client.messages.stream(model=MODEL, max_tokens=200, messages=ask("Stream it")) as stream:
        deltas = list(stream.text_stream)
        final = stream.get_final_message()

    assert len(deltas) > 1
    assert "".join(deltas) == plain.content[0].text
    assert final.content[0].text == plain.content[0].text
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == plain.usage.output_tokens
    assert final.usage.input_tokens == plain.usage.input_tokens


def test_stream_event_order(http: httpx.Client) -> None:
    body = {"model": MODEL, "max_tokens": 50, "messages": ask("Order"), "stream": True}
    with http.stream("POST", "/anthropic/v1/messages", headers=ANTHROPIC_HEADERS, json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        names = [line[7:] for line in r.iter_lines() if line.startswith("event: ")]

    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert set(names[3:-3]) == {"content_block_delta"}
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]


def test_stream_tool_use_input(client: anthropic.Anthropic) -> None:
    plain = client.messages.create(
        model=MODEL, max_tokens=200, messages=ask("Weather?"), tools=[WEATHER_TOOL]
    )

    with client.messages.stream(
        model=MODEL, max_tokens=200, messages=ask("Weather?"), tools=[WEATHER_TOOL]
    ) as stream:
        final = stream.get_final_message()

    assert final.stop_reason == "tool_use"
    assert final.content[0].type == "tool_use"
    assert final.content[0].input == plain.content[0].input


def test_missing_max_tokens_gives_400(http: httpx.Client) -> None:
    response = http.post(
        "/anthropic/v1/messages",
        headers=ANTHROPIC_HEADERS,
        json={"model": MODEL, "messages": ask("hi")},
    )

    assert response.status_code == 400
    body = response.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]


def test_missing_version_header_gives_400(http: httpx.Client) -> None:
    response = http.post(
        "/anthropic/v1/messages",
        headers={"x-api-key": "test-key"},
        json={"model": MODEL, "max_tokens": 10, "messages": ask("hi")},
    )

    assert response.status_code == 400
    assert "anthropic-version" in response.json()["error"]["message"]


def test_missing_api_key_gives_401(http: httpx.Client) -> None:
    response = http.post(
        "/anthropic/v1/messages",
        headers={"anthropic-version": "2023-06-01"},
        json={"model": MODEL, "max_tokens": 10, "messages": ask("hi")},
    )

    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


def test_count_tokens_matches_usage(client: anthropic.Anthropic) -> None:
    message = client.messages.create(model=MODEL, max_tokens=20, messages=ask("Count me"))
    counted = client.messages.count_tokens(model=MODEL, messages=ask("Count me"))

    assert counted.input_tokens == message.usage.input_tokens


def test_models_list_parses(client: anthropic.Anthropic) -> None:
    models = client.models.list()

    assert models.data
    assert all(model.type == "model" for model in models.data)
