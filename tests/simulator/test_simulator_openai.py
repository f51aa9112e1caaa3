"""OpenAI wire format, checked through the official openai SDK."""

from __future__ import annotations

import base64
import json
import math
import struct
from collections.abc import Iterator

import httpx
import openai
import pytest
from pydantic import BaseModel
from sim_harness import HOST, REGION, Simulator

from simulator.content import contains_cjk
from simulator.tokens import count_tokens
from simulator.urls import base_urls

pytestmark = pytest.mark.timeout(60)

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
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
                "hourly": {"type": "boolean"},
                "thresholds": {"type": "array", "items": {"type": "number"}, "minItems": 2},
                "location": {
                    "type": "object",
                    "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                    "required": ["lat", "lon"],
                },
            },
            "required": ["city", "unit"],
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string"}},
            "required": ["zone"],
        },
    },
}


class Address(BaseModel):
    street: str
    number: int


class Person(BaseModel):
    name: str
    age: int
    tags: list[str]
    address: Address


@pytest.fixture
def client(simulator: Simulator) -> Iterator[openai.OpenAI]:
    base_url = base_urls(HOST, simulator.port, "deepseek", "openai")
    with openai.OpenAI(base_url=base_url, api_key="test-key", max_retries=0, timeout=10) as sdk:
        yield sdk


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_plain_completion_parses(client: openai.OpenAI, simulator: Simulator) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say hello to the broker."},
    ]
    completion = client.chat.completions.create(model="sim-chat", messages=messages)

    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "sim-chat"
    assert REGION in (completion.system_fingerprint or "")
    assert len(completion.choices) == 1
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    text = choice.message.content
    assert text
    assert 8 <= count_tokens(text) <= 120
    expected_prompt = sum(count_tokens(m["content"]) + 4 for m in messages) + 3
    assert completion.usage.prompt_tokens == expected_prompt
    assert completion.usage.completion_tokens == count_tokens(text)
    assert completion.usage.total_tokens == expected_prompt + count_tokens(text)
    assert simulator.stats()["by_provider"] == {"deepseek": 1}


def test_same_prompt_same_reply(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(model="sim-chat", messages=ask("Repeat me"))
    second = client.chat.completions.create(model="sim-chat", messages=ask("Repeat me"))
    other = client.chat.completions.create(model="sim-chat", messages=ask("Something else"))

    assert first.choices[0].message.content == second.choices[0].message.content
    assert first.choices[0].message.content != other.choices[0].message.content
    assert first.id != second.id


def test_region_header_on_response(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model="sim-chat", messages=ask("hi"))

    assert raw.headers["x-simulator-region"] == REGION


def test_image_part_counts_fixed_tokens(client: openai.OpenAI) -> None:
    content = [
        {"type": "text", "text": "Describe this picture."},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
    ]
    completion = client.chat.completions.create(
        model="sim-chat", messages=[{"role": "user", "content": content}]
    )

    assert completion.usage.prompt_tokens == count_tokens("Describe this picture.") + 85 + 4 + 3


def test_max_tokens_cap_gives_length(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="sim-chat", messages=ask("Write a long essay."), max_completion_tokens=3
    )

    choice = completion.choices[0]
    assert choice.finish_reason == "length"
    assert count_tokens(choice.message.content) == 3
    assert completion.usage.completion_tokens == 3


def test_stop_sequence_cuts_reply(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model="sim-chat", messages=ask("Stop test"))
    text = full.choices[0].message.content
    stop = text.split()[2]

    cut = client.chat.completions.create(model="sim-chat", messages=ask("Stop test"), stop=[stop])

    choice = cut.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.content == text[: text.index(stop)]
    assert cut.usage.completion_tokens == count_tokens(choice.message.content)


def test_cjk_prompt_gets_cjk_and_emoji(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="sim-chat", messages=ask("请用中文回答这个问题")
    )

    text = completion.choices[0].message.content
    assert contains_cjk(text)
    assert any(ord(char) >= 0x1F300 for char in text)


def test_tool_call_follows_schema(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="sim-chat", messages=ask("Weather in Oslo?"), tools=[WEATHER_TOOL, TIME_TOOL]
    )

    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.type == "function"
    assert call.id.startswith("call_")
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert isinstance(arguments["city"], str)
    assert arguments["unit"] in ("celsius", "fahrenheit")
    assert isinstance(arguments["days"], int)
    assert 1 <= arguments["days"] <= 7
    assert isinstance(arguments["hourly"], bool)
    assert len(arguments["thresholds"]) >= 2
    assert all(isinstance(value, float | int) for value in arguments["thresholds"])
    assert set(arguments["location"]) == {"lat", "lon"}
    assert completion.usage.completion_tokens == (
        count_tokens("get_weather") + count_tokens(call.function.arguments)
    )


def test_parallel_tool_calls_call_two(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="sim-chat",
        messages=ask("Weather and time in Oslo?"),
        tools=[WEATHER_TOOL, TIME_TOOL],
        parallel_tool_calls=True,
    )

    calls = completion.choices[0].message.tool_calls
    assert [call.function.name for call in calls] == ["get_weather", "get_time"]
    assert len({call.id for call in calls}) == 2


def test_named_tool_choice_is_called(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="sim-chat",
        messages=ask("What time is it?"),
        tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )

    calls = completion.choices[0].message.tool_calls
    assert [call.function.name for call in calls] == ["get_time"]
    assert isinstance(json.loads(calls[0].function.arguments)["zone"], str)


def test_tool_choice_none_gives_text(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="sim-chat", messages=ask("Weather?"), tools=[WEATHER_TOOL], tool_choice="none"
    )

    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.tool_calls is None
    assert choice.message.content


def test_tool_result_gets_text_answer(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(
        model="sim-chat", messages=ask("Weather in Oslo?"), tools=[WEATHER_TOOL]
    )
    call = first.choices[0].message.tool_calls[0]
    messages = [
        *ask("Weather in Oslo?"),
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 4}'},
    ]

    second = client.chat.completions.create(
        model="sim-chat", messages=messages, tools=[WEATHER_TOOL]
    )

    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content
    assert second.choices[0].message.tool_calls is None


def test_json_schema_parses_into_model(client: openai.OpenAI) -> None:
    completion = client.chat.completions.parse(
        model="sim-chat", messages=ask("Invent a person."), response_format=Person
    )

    person = completion.choices[0].message.parsed
    assert isinstance(person, Person)
    assert isinstance(person.address, Address)
    assert completion.choices[0].finish_reason == "stop"


def test_json_object_mode_returns_answer(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="sim-chat",
        messages=ask("Reply in JSON."),
        response_format={"type": "json_object"},
    )

    document = json.loads(completion.choices[0].message.content)
    assert isinstance(document["answer"], str)
    assert document["answer"]


def test_n_two_gives_two_choices(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model="sim-chat", messages=ask("Two"), n=2)

    assert [choice.index for choice in completion.choices] == [0, 1]
    texts = [choice.message.content for choice in completion.choices]
    assert texts[0] != texts[1]
    assert completion.usage.completion_tokens == sum(count_tokens(text) for text in texts)


def test_stream_matches_plain_reply(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(model="sim-chat", messages=ask("Stream this"))

    stream = client.chat.completions.create(
        model="sim-chat",
        messages=ask("Stream this"),
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)

    content_chunks = [chunk for chunk in chunks if chunk.choices]
    assert content_chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in content_chunks)
    assert text == plain.choices[0].message.content
    assert len(content_chunks) >= count_tokens(text) / 4
    assert content_chunks[-1].choices[0].finish_reason == "stop"
    assert all(chunk.usage is None for chunk in content_chunks)
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens == count_tokens(text)
    assert usage_chunk.usage.prompt_tokens == plain.usage.prompt_tokens
    assert len({chunk.id for chunk in chunks}) == 1


def test_stream_n_two_interleaves_choices(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(model="sim-chat", messages=ask("Two streams"), n=2)

    stream = client.chat.completions.create(
        model="sim-chat", messages=ask("Two streams"), n=2, stream=True
    )
    texts = ["", ""]
    indexes = []
    for chunk in stream:
        for choice in chunk.choices:
            indexes.append(choice.index)
            texts[choice.index] += choice.delta.content or ""

    assert texts == [choice.message.content for choice in plain.choices]
    assert indexes[:2] == [0, 1]


def test_stream_without_usage_option(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(model="sim-chat", messages=ask("No usage"), stream=True)
    )

    assert all(chunk.choices for chunk in chunks)
    assert all(chunk.usage is None for chunk in chunks)


def test_stream_tool_call_deltas(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(
        model="sim-chat", messages=ask("Weather?"), tools=[WEATHER_TOOL]
    )
    stream = client.chat.completions.create(
        model="sim-chat", messages=ask("Weather?"), tools=[WEATHER_TOOL], stream=True
    )

    name = ""
    arguments = ""
    finish_reasons = []
    for chunk in stream:
        for choice in chunk.choices:
            finish_reasons.append(choice.finish_reason)
            for delta in choice.delta.tool_calls or []:
                assert delta.index == 0
                if delta.function.name:
                    name += delta.function.name
                arguments += delta.function.arguments or ""

    expected = plain.choices[0].message.tool_calls[0].function
    assert name == expected.name
    assert json.loads(arguments) == json.loads(expected.arguments)
    assert finish_reasons[-1] == "tool_calls"


def test_embeddings_float_and_base64(client: openai.OpenAI) -> None:
    as_float = client.embeddings.create(
        model="sim-embed", input=["first text", "second text"], encoding_format="float"
    )
    # Without encoding_format the SDK requests base64 and decodes it.
    as_base64 = client.embeddings.create(model="sim-embed", input=["first text", "second text"])

    assert [item.index for item in as_float.data] == [0, 1]
    vector = as_float.data[0].embedding
    assert len(vector) == 256
    assert math.isclose(math.sqrt(sum(value * value for value in vector)), 1.0, rel_tol=1e-6)
    assert as_float.data[0].embedding != as_float.data[1].embedding
    for decoded, exact in zip(as_base64.data, as_float.data, strict=True):
        assert len(decoded.embedding) == 256
        assert all(
            math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7)
            for a, b in zip(decoded.embedding, exact.embedding, strict=True)
        )
    expected_tokens = count_tokens("first text") + count_tokens("second text")
    assert as_float.usage.prompt_tokens == expected_tokens
    assert as_float.usage.total_tokens == expected_tokens


def test_embedding_dimensions_honoured(client: openai.OpenAI, simulator: Simulator) -> None:
    result = client.embeddings.create(
        model="sim-embed", input="short", dimensions=64, encoding_format="float"
    )
    assert len(result.data[0].embedding) == 64

    raw = httpx.post(
        f"{simulator.url}/openai/v1/embeddings",
        headers={"Authorization": "Bearer test-key"},
        json={"model": "sim-embed", "input": "short", "dimensions": 8, "encoding_format": "base64"},
    )
    packed = base64.b64decode(raw.json()["data"][0]["embedding"])
    assert len(struct.unpack("<8f", packed)) == 8


def test_models_list_parses(client: openai.OpenAI) -> None:
    models = client.models.list()

    assert models.data
    assert all(model.object == "model" for model in models.data)
    assert all(model.owned_by == "deepseek" for model in models.data)


def test_missing_key_gives_401(http: httpx.Client) -> None:
    response = http.post(
        "/openai/v1/chat/completions", json={"model": "sim-chat", "messages": ask("hi")}
    )

    assert response.status_code == 401
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "invalid_api_key"


def test_sdk_raises_authentication_error(simulator: Simulator) -> None:
    base_url = base_urls(HOST, simulator.port, "openai", "openai")
    not_bearer = {"Authorization": "Basic dGVzdDp0ZXN0"}
    with openai.OpenAI(
        base_url=base_url, api_key="test-key", default_headers=not_bearer, max_retries=0
    ) as sdk:
        with pytest.raises(openai.AuthenticationError):
            sdk.chat.completions.create(model="sim-chat", messages=ask("hi"))


def test_missing_messages_gives_400(http: httpx.Client) -> None:
    response = http.post(
        "/openai/v1/chat/completions",
        headers={"Authorization": "Bearer test-key"},
        json={"model": "sim-chat"},
    )

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "messages"
