"""Translation between OpenAI chat bodies and the Anthropic Messages API, without HTTP."""

from __future__ import annotations

from typing import Any

import pytest

from workers.adapters import anthropic
from workers.adapters.base import UpstreamStatusError, UpstreamUnreachable
from workers.adapters.translate_common import ServerSentEvent, UntranslatableRequest

pytestmark = pytest.mark.timeout(30)

MODEL = "claude-test"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
WEATHER_SCHEMA = WEATHER_TOOL["function"]["parameters"]
ANTHROPIC_WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Current weather of a city.",
    "input_schema": WEATHER_SCHEMA,
}
PNG_BASE64 = "iVBORw0KGgo="


def chat(*messages: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"model": "public-model", "messages": list(messages), **fields}


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def translate(body: dict[str, Any]) -> dict[str, Any]:
    return anthropic.to_anthropic_request(body, MODEL)


def without_created(completion: dict[str, Any]) -> dict[str, Any]:
    assert isinstance(completion.pop("created"), int)
    return completion


# --- Requests -------------------------------------------------------------------------


def test_request_minimal_gets_default_max_tokens() -> None:
    assert translate(chat(user("Hi"))) == {
        "model": MODEL,
        "max_tokens": 4096,
        "messages": [{"role": "user", "content": "Hi"}],
    }


def test_request_system_and_developer_join() -> None:
    body = chat(
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Answer in English."}]},
        user("Hi"),
    )

    assert translate(body)["system"] == "Be brief.\n\nAnswer in English."


def test_request_system_cache_control_keeps_blocks() -> None:
    body = chat(
        {
            "role": "system",
            "content": [
                {"type": "text", "text": "Long policy.", "cache_control": {"type": "ephemeral"}}
            ],
        },
        {"role": "system", "content": "Be brief."},
        user("Hi"),
    )

    assert translate(body)["system"] == [
        {"type": "text", "text": "Long policy.", "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "Be brief."},
    ]


def test_request_images_url_and_base64() -> None:
    body = chat(
        user(
            [
                {"type": "text", "text": "Compare these."},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                {
                    "type": "image_url",
                    "image_url": {"url": f"data:image/png;base64,{PNG_BASE64}", "detail": "low"},
                },
            ]
        )
    )

    assert translate(body)["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare these."},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": PNG_BASE64},
                },
            ],
        }
    ]


def test_request_pdf_file_becomes_document() -> None:
    part = {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0="}}

    assert translate(chat(user([part])))["messages"][0]["content"] == [
        {
            "type": "document",
            "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="},
        }
    ]


def test_request_tools_translated() -> None:
    request = translate(chat(user("Weather in Paris?"), tools=[WEATHER_TOOL]))

    assert request["tools"] == [ANTHROPIC_WEATHER_TOOL]
    assert "tool_choice" not in request


def test_request_tool_without_parameters_gets_empty_schema() -> None:
    tool = {"type": "function", "function": {"name": "now"}}

    assert translate(chat(user("Time?"), tools=[tool]))["tools"] == [
        {"name": "now", "input_schema": {"type": "object", "properties": {}}}
    ]


@pytest.mark.parametrize(
    ("tool_choice", "expected"),
    [
        ("auto", {"type": "auto"}),
        ("none", {"type": "none"}),
        ("required", {"type": "any"}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            {"type": "tool", "name": "get_weather"},
        ),
    ],
)
def test_request_tool_choice_forms(tool_choice: Any, expected: dict[str, Any]) -> None:
    body = chat(user("Weather?"), tools=[WEATHER_TOOL], tool_choice=tool_choice)

    assert translate(body)["tool_choice"] == expected


@pytest.mark.parametrize(
    ("tool_choice", "expected"),
    [
        (None, {"type": "auto", "disable_parallel_tool_use": True}),
        ("required", {"type": "any", "disable_parallel_tool_use": True}),
        ("none", {"type": "none"}),
    ],
)
def test_request_parallel_tool_calls_false(tool_choice: Any, expected: dict[str, Any]) -> None:
    body = chat(user("Weather?"), tools=[WEATHER_TOOL], parallel_tool_calls=False)
    if tool_choice is not None:
        body["tool_choice"] = tool_choice

    assert translate(body)["tool_choice"] == expected


def test_request_tool_results_merge_into_one_turn() -> None:
    body = chat(
        user("Weather in Paris and Rome?"),
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                },
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "24 C"}]},
        user("Thanks."),
    )

    assert translate(body)["messages"] == [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": [
                {
                    "type": "tool_use",
                    "id": "call_1",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                },
                {
                    "type": "tool_use",
                    "id": "call_2",
                    "name": "get_weather",
                    "input": {"city": "Rome"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "18 C"},
                {
                    "type": "tool_result",
                    "tool_use_id": "call_2",
                    "content": [{"type": "text", "text": "24 C"}],
                },
            ],
        },
        {"role": "user", "content": "Thanks."},
    ]


def test_request_assistant_text_stays_string() -> None:
    body = chat(user("Hi"), {"role": "assistant", "content": "Hello!"}, user("Bye"))

    assert translate(body)["messages"][1] == {"role": "assistant", "content": "Hello!"}


@pytest.mark.parametrize(
    ("stop", "expected"),
    [("END", ["END"]), (["END", "STOP"], ["END", "STOP"])],
)
def test_request_stop_sequences(stop: Any, expected: list[str]) -> None:
    assert translate(chat(user("Hi"), stop=stop))["stop_sequences"] == expected


def test_request_sampling_limits_and_user() -> None:
    body = chat(
        user("Hi"),
        max_tokens=100,
        max_completion_tokens=50,
        temperature=0.2,
        top_p=0.9,
        user="customer-7",
    )

    request = translate(body)

    assert request["max_tokens"] == 50
    assert request["temperature"] == 0.2
    assert request["top_p"] == 0.9
    assert request["metadata"] == {"user_id": "customer-7"}


def test_request_cache_control_passes_through() -> None:
    marker = {"type": "ephemeral"}
    body = chat(
        user([{"type": "text", "text": "Long document.", "cache_control": marker}]),
        tools=[{**WEATHER_TOOL, "cache_control": marker}],
    )

    request = translate(body)

    assert request["messages"][0]["content"] == [
        {"type": "text", "text": "Long document.", "cache_control": marker}
    ]
    assert request["tools"] == [{**ANTHROPIC_WEATHER_TOOL, "cache_control": marker}]


def test_request_json_schema_forces_json_tool() -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    response_format = {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}}

    request = translate(chat(user("Hi"), response_format=response_format))

    assert request["tools"] == [
        {
            "name": "json_output",
            "description": "Return the final answer as JSON that follows this schema.",
            "input_schema": schema,
        }
    ]
    assert request["tool_choice"] == {"type": "tool", "name": "json_output"}


def test_request_json_object_forces_object_tool() -> None:
    request = translate(chat(user("Hi"), response_format={"type": "json_object"}))

    assert request["tools"][0]["input_schema"] == {"type": "object"}
    assert request["tool_choice"] == {"type": "tool", "name": "json_output"}


def test_request_json_with_client_tools_requires_a_tool() -> None:
    body = chat(user("Hi"), tools=[WEATHER_TOOL], response_format={"type": "json_object"})

    request = translate(body)

    assert [tool["name"] for tool in request["tools"]] == ["get_weather", "json_output"]
    assert request["tool_choice"] == {"type": "any"}


def test_request_json_tool_name_collision_rejected() -> None:
    tool = {"type": "function", "function": {"name": "json_output"}}
    body = chat(user("Hi"), tools=[tool], response_format={"type": "json_object"})

    with pytest.raises(UntranslatableRequest) as caught:
        translate(body)

    assert caught.value.retryable is False
    assert caught.value.client_status == 400


@pytest.mark.parametrize(
    "part",
    [
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
        {"type": "image_url", "image_url": {"url": "ftp://example.com/a.png"}},
        {"type": "image_url", "image_url": {"url": "data:image/png,not-base64"}},
    ],
)
def test_request_untranslatable_parts_rejected(part: dict[str, Any]) -> None:
    with pytest.raises(UntranslatableRequest):
        translate(chat(user([part])))


def test_request_invalid_tool_arguments_rejected() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}
    body = chat(user("Hi"), {"role": "assistant", "content": None, "tool_calls": [call]})

    with pytest.raises(UntranslatableRequest):
        translate(body)


def test_unsupported_parameters_listed() -> None:
    body = chat(
        user("Hi"),
        n=2,
        logprobs=True,
        top_logprobs=3,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        logit_bias={"50256": -100},
        seed=0,
        temperature=0.5,
    )

    assert anthropic.unsupported_parameters(body) == [
        "n",
        "logprobs",
        "top_logprobs",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "seed",
    ]


def test_unsupported_parameters_ignores_defaults() -> None:
    body = chat(user("Hi"), n=1, logprobs=False, presence_penalty=0, logit_bias={})

    assert anthropic.unsupported_parameters(body) == []


# --- Responses ------------------------------------------------------------------------


def message(content: list[dict[str, Any]], stop_reason: str, **usage: int) -> dict[str, Any]:
    return {
        "id": "msg_01",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 5, **usage},
    }


def test_response_text_and_cache_usage() -> None:
    data = message(
        [{"type": "text", "text": "Hello"}, {"type": "text", "text": " world."}],
        "end_turn",
        cache_read_input_tokens=100,
        cache_creation_input_tokens=20,
    )

    assert without_created(anthropic.from_anthropic_response(data, "public-model")) == {
        "id": "chatcmpl-msg_01",
        "object": "chat.completion",
        "model": "public-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello world.", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 130,
            "completion_tokens": 5,
            "total_tokens": 135,
            "prompt_tokens_details": {"cached_tokens": 100},
            "cache_creation_input_tokens": 20,
        },
    }


def test_response_tool_use_becomes_tool_calls() -> None:
    data = message(
        [
            {"type": "text", "text": "Checking."},
            {
                "type": "tool_use",
                "id": "toolu_1",
                "name": "get_weather",
                "input": {"city": "Paris"},
            },
        ],
        "tool_use",
    )

    choice = anthropic.from_anthropic_response(data, "public-model")["choices"][0]

    assert choice["message"] == {
        "role": "assistant",
        "content": "Checking.",
        "refusal": None,
        "tool_calls": [
            {
                "id": "toolu_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
            }
        ],
    }
    assert choice["finish_reason"] == "tool_calls"


def test_response_json_tool_becomes_content() -> None:
    data = message(
        [{"type": "tool_use", "id": "toolu_1", "name": "json_output", "input": {"answer": "yes"}}],
        "tool_use",
    )

    choice = anthropic.from_anthropic_response(data, "public-model", "json_output")["choices"][0]

    assert choice["message"] == {
        "role": "assistant",
        "content": '{"answer":"yes"}',
        "refusal": None,
    }
    assert choice["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("stop_reason", "finish_reason"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("refusal", "content_filter"),
    ],
)
def test_response_finish_reasons(stop_reason: str, finish_reason: str) -> None:
    data = message([{"type": "text", "text": "x"}], stop_reason)

    choice = anthropic.from_anthropic_response(data, "public-model")["choices"][0]

    assert choice["finish_reason"] == finish_reason


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (
            {"type": "error", "error": {"type": "rate_limit_error", "message": "Slow down."}},
            "rate_limit_error",
        ),
        (
            {
                "type": "error",
                "error": {
                    "type": "invalid_request_error",
                    "message": "prompt is too long: 210000 tokens > 200000 maximum",
                },
            },
            "context_length_exceeded",
        ),
    ],
)
def test_error_body_parsed(payload: dict[str, Any], code: str) -> None:
    message_text, parsed_code, retry_after_s = anthropic.parse_error(payload)

    assert message_text == payload["error"]["message"]
    assert parsed_code == code
    assert retry_after_s is None


# --- Streams --------------------------------------------------------------------------


def event(name: str, data: str) -> ServerSentEvent:
    return ServerSentEvent(name, data)


TEXT_AND_TOOL_STREAM = [
    event(
        "message_start",
        '{"type":"message_start","message":{"id":"msg_9","usage":'
        '{"input_tokens":12,"cache_read_input_tokens":4,"output_tokens":1}}}',
    ),
    event(
        "content_block_start",
        '{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}',
    ),
    event("ping", '{"type":"ping"}'),
    event(
        "content_block_delta",
        '{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Let me"}}',
    ),
    event(
        "content_block_delta",
        '{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":" check."}}',
    ),
    event("content_block_stop", '{"type":"content_block_stop","index":0}'),
    event(
        "content_block_start",
        '{"type":"content_block_start","index":1,"content_block":'
        '{"type":"tool_use","id":"toolu_7","name":"get_weather","input":{}}}',
    ),
    event(
        "content_block_delta",
        '{"type":"content_block_delta","index":1,"delta":'
        '{"type":"input_json_delta","partial_json":"{\\"city\\": "}}',
    ),
    event(
        "content_block_delta",
        '{"type":"content_block_delta","index":1,"delta":'
        '{"type":"input_json_delta","partial_json":"\\"Paris\\"}"}}',
    ),
    event("content_block_stop", '{"type":"content_block_stop","index":1}'),
    event(
        "message_delta",
        '{"type":"message_delta","delta":{"stop_reason":"tool_use"},"usage":{"output_tokens":9}}',
    ),
    event("message_stop", '{"type":"message_stop"}'),
]


def choice_deltas(chunks: list[dict[str, Any]]) -> list[tuple[dict[str, Any], str | None]]:
    return [
        (chunk["choices"][0]["delta"], chunk["choices"][0]["finish_reason"]) for chunk in chunks
    ]


def test_stream_text_and_tool_call_chunks() -> None:
    chunks = list(anthropic.translate_anthropic_stream(TEXT_AND_TOOL_STREAM, "public-model"))

    assert {chunk["id"] for chunk in chunks} == {"chatcmpl-msg_9"}
    assert {chunk["model"] for chunk in chunks} == {"public-model"}
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    assert choice_deltas(chunks[:-1]) == [
        ({"role": "assistant", "content": ""}, None),
        ({"content": "Let me"}, None),
        ({"content": " check."}, None),
        (
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "toolu_7",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": ""},
                    }
                ]
            },
            None,
        ),
        ({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}, None),
        ({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}, None),
        ({}, "tool_calls"),
    ]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {
        "prompt_tokens": 16,
        "completion_tokens": 9,
        "total_tokens": 25,
        "prompt_tokens_details": {"cached_tokens": 4},
        "cache_creation_input_tokens": 0,
    }


def test_stream_tool_without_arguments_gets_empty_object() -> None:
    events = [
        TEXT_AND_TOOL_STREAM[0],
        TEXT_AND_TOOL_STREAM[6],
        event("content_block_stop", '{"type":"content_block_stop","index":1}'),
        TEXT_AND_TOOL_STREAM[-2],
        TEXT_AND_TOOL_STREAM[-1],
    ]

    chunks = list(anthropic.translate_anthropic_stream(events, "public-model"))

    assert chunks[2]["choices"][0]["delta"] == {
        "tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]
    }


def test_stream_json_tool_streams_content() -> None:
    events = [
        TEXT_AND_TOOL_STREAM[0],
        event(
            "content_block_start",
            '{"type":"content_block_start","index":0,"content_block":'
            '{"type":"tool_use","id":"toolu_8","name":"json_output","input":{}}}',
        ),
        event(
            "content_block_delta",
            '{"type":"content_block_delta","index":0,"delta":'
            '{"type":"input_json_delta","partial_json":"{\\"a\\":1}"}}',
        ),
        event("content_block_stop", '{"type":"content_block_stop","index":0}'),
        TEXT_AND_TOOL_STREAM[-2],
        TEXT_AND_TOOL_STREAM[-1],
    ]

    chunks = list(anthropic.translate_anthropic_stream(events, "public-model", "json_output"))

    assert choice_deltas(chunks[:-1]) == [
        ({"role": "assistant", "content": ""}, None),
        ({"content": '{"a":1}'}, None),
        ({}, "stop"),
    ]


@pytest.mark.parametrize(
    ("error_type", "status", "retryable"),
    [
        ("overloaded_error", 529, True),
        ("rate_limit_error", 429, True),
        ("api_error", 500, True),
        ("invalid_request_error", 400, False),
    ],
)
def test_stream_error_event_raises(error_type: str, status: int, retryable: bool) -> None:
    events = [
        TEXT_AND_TOOL_STREAM[0],
        event(
            "error",
            f'{{"type":"error","error":{{"type":"{error_type}","message":"Failed."}}}}',
        ),
    ]

    with pytest.raises(UpstreamStatusError) as caught:
        list(anthropic.translate_anthropic_stream(events, "public-model"))

    assert caught.value.status_code == status
    assert caught.value.retryable is retryable
    assert caught.value.message == "Failed."


def test_stream_cut_before_stop_raises() -> None:
    with pytest.raises(UpstreamUnreachable):
        list(anthropic.translate_anthropic_stream(TEXT_AND_TOOL_STREAM[:5], "public-model"))
