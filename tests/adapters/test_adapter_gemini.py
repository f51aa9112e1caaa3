"""Translation between OpenAI chat bodies and the Gemini API, without HTTP."""

from __future__ import annotations

from typing import Any

import pytest

from workers.adapters import gemini
from workers.adapters.base import UpstreamStatusError, UpstreamUnreachable
from workers.adapters.translate_common import ServerSentEvent, UntranslatableRequest

pytestmark = pytest.mark.timeout(30)

MODEL = "gemini-test"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
PNG_BASE64 = "iVBORw0KGgo="


def chat(*messages: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"model": "public-model", "messages": list(messages), **fields}


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def translate(body: dict[str, Any]) -> dict[str, Any]:
    return gemini.to_gemini_request(body, MODEL)


def assistant_call(call_id: str, arguments: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": arguments},
        **extra,
    }


# --- Requests -------------------------------------------------------------------------


def test_request_roles_and_system_instruction() -> None:
    body = chat(
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": "Answer in English."},
        user("Hi"),
        {"role": "assistant", "content": "Hello!"},
        user("Bye"),
    )

    assert translate(body) == {
        "systemInstruction": {"parts": [{"text": "Be brief."}, {"text": "Answer in English."}]},
        "contents": [
            {"role": "user", "parts": [{"text": "Hi"}]},
            {"role": "model", "parts": [{"text": "Hello!"}]},
            {"role": "user", "parts": [{"text": "Bye"}]},
        ],
    }


def test_request_images_inline_and_file_uri() -> None:
    body = chat(
        user(
            [
                {"type": "text", "text": "Compare these."},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_BASE64}"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.webp?x=1"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/image"}},
            ]
        )
    )

    assert translate(body)["contents"][0]["parts"] == [
        {"text": "Compare these."},
        {"inlineData": {"mimeType": "image/png", "data": PNG_BASE64}},
        {"fileData": {"mimeType": "image/webp", "fileUri": "https://example.com/a.webp?x=1"}},
        {"fileData": {"mimeType": "image/jpeg", "fileUri": "https://example.com/image"}},
    ]


def test_request_tools_and_schema_cleaned() -> None:
    request = translate(chat(user("Weather?"), tools=[WEATHER_TOOL]))

    assert request["tools"] == [
        {
            "functionDeclarations": [
                {
                    "name": "get_weather",
                    "description": "Current weather of a city.",
                    "parameters": {
                        "type": "object",
                        "properties": {"city": {"type": "string"}},
                        "required": ["city"],
                    },
                }
            ]
        }
    ]
    assert "toolConfig" not in request


def test_request_tool_without_properties_has_no_parameters() -> None:
    tool = {
        "type": "function",
        "function": {"name": "now", "parameters": {"type": "object", "properties": {}}},
    }

    assert translate(chat(user("Time?"), tools=[tool]))["tools"] == [
        {"functionDeclarations": [{"name": "now"}]}
    ]


@pytest.mark.parametrize(
    ("tool_choice", "expected"),
    [
        ("auto", {"mode": "AUTO"}),
        ("none", {"mode": "NONE"}),
        ("required", {"mode": "ANY"}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            {"mode": "ANY", "allowedFunctionNames": ["get_weather"]},
        ),
    ],
)
def test_request_tool_choice_forms(tool_choice: Any, expected: dict[str, Any]) -> None:
    body = chat(user("Weather?"), tools=[WEATHER_TOOL], tool_choice=tool_choice)

    assert translate(body)["toolConfig"] == {"functionCallingConfig": expected}


def test_request_tool_calls_and_results() -> None:
    signature = {"google": {"thought_signature": "c2lnbmF0dXJl"}}
    body = chat(
        user("Weather in Paris and Rome?"),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                assistant_call("call_1", '{"city": "Paris"}', extra_content=signature),
                assistant_call("call_2", '{"city": "Rome"}'),
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 18}'},
        {"role": "tool", "tool_call_id": "call_2", "content": "sunny"},
    )

    assert translate(body)["contents"][1:] == [
        {
            "role": "model",
            "parts": [
                {
                    "functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
                    "thoughtSignature": "c2lnbmF0dXJl",
                },
                {"functionCall": {"name": "get_weather", "args": {"city": "Rome"}}},
            ],
        },
        {
            "role": "user",
            "parts": [
                {"functionResponse": {"name": "get_weather", "response": {"celsius": 18}}},
                {"functionResponse": {"name": "get_weather", "response": {"content": "sunny"}}},
            ],
        },
    ]


def test_request_json_list_result_wrapped() -> None:
    body = chat(
        user("Cities?"),
        {"role": "assistant", "content": None, "tool_calls": [assistant_call("call_1", "{}")]},
        {"role": "tool", "tool_call_id": "call_1", "content": '["Paris", "Rome"]'},
    )

    assert translate(body)["contents"][-1]["parts"] == [
        {"functionResponse": {"name": "get_weather", "response": {"content": ["Paris", "Rome"]}}}
    ]


def test_request_unknown_tool_call_id_rejected() -> None:
    body = chat(user("Hi"), {"role": "tool", "tool_call_id": "call_9", "content": "x"})

    with pytest.raises(UntranslatableRequest):
        translate(body)


def test_request_generation_config() -> None:
    body = chat(
        user("Hi"),
        max_tokens=100,
        temperature=0.3,
        top_p=0.8,
        stop="END",
        n=2,
        seed=7,
        presence_penalty=0.1,
        frequency_penalty=0.2,
        logprobs=True,
        top_logprobs=3,
    )

    assert translate(body)["generationConfig"] == {
        "maxOutputTokens": 100,
        "temperature": 0.3,
        "topP": 0.8,
        "candidateCount": 2,
        "seed": 7,
        "presencePenalty": 0.1,
        "frequencyPenalty": 0.2,
        "logprobs": 3,
        "stopSequences": ["END"],
        "responseLogprobs": True,
    }


def test_request_json_object_sets_mime_type() -> None:
    body = chat(user("Hi"), response_format={"type": "json_object"})

    assert translate(body)["generationConfig"] == {"responseMimeType": "application/json"}


def test_request_json_schema_cleaned_recursively() -> None:
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "additionalProperties": {"type": "string"},
            "city": {"$ref": "#/$defs/City"},
            "tags": {"type": "array", "items": {"type": ["string", "null"]}},
            "choice": {"oneOf": [{"type": "integer"}, {"type": "string"}]},
        },
        "required": ["city"],
        "$defs": {
            "City": {
                "type": "object",
                "additionalProperties": False,
                "properties": {"name": {"type": "string"}},
            }
        },
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}}

    config = translate(chat(user("Hi"), response_format=response_format))["generationConfig"]

    assert config == {
        "responseMimeType": "application/json",
        "responseSchema": {
            "type": "object",
            "properties": {
                "additionalProperties": {"type": "string"},
                "city": {"type": "object", "properties": {"name": {"type": "string"}}},
                "tags": {"type": "array", "items": {"type": "string", "nullable": True}},
                "choice": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
            },
            "required": ["city"],
        },
    }


def test_request_recursive_schema_rejected() -> None:
    schema = {
        "type": "object",
        "properties": {"child": {"$ref": "#/$defs/Node"}},
        "$defs": {"Node": {"type": "object", "properties": {"child": {"$ref": "#/$defs/Node"}}}},
    }

    with pytest.raises(UntranslatableRequest):
        gemini.to_gemini_schema(schema)


def test_unsupported_parameters_listed() -> None:
    body = chat(user("Hi"), logit_bias={"1": 5}, parallel_tool_calls=False, n=2, seed=3)

    assert gemini.unsupported_parameters(body) == ["logit_bias", "parallel_tool_calls"]


# --- Responses ------------------------------------------------------------------------


def test_response_candidates_and_usage() -> None:
    data = {
        "candidates": [
            {
                "index": 0,
                "content": {
                    "role": "model",
                    "parts": [
                        {"text": "Planning the answer.", "thought": True},
                        {"text": "Hello"},
                        {"text": " world."},
                    ],
                },
                "finishReason": "STOP",
            }
        ],
        "usageMetadata": {
            "promptTokenCount": 40,
            "candidatesTokenCount": 5,
            "thoughtsTokenCount": 12,
            "cachedContentTokenCount": 32,
            "totalTokenCount": 57,
        },
        "responseId": "abc",
    }

    completion = gemini.from_gemini_response(data, "public-model")

    assert isinstance(completion.pop("created"), int)
    assert completion == {
        "id": "chatcmpl-abc",
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
            "prompt_tokens": 40,
            "completion_tokens": 17,
            "total_tokens": 57,
            "prompt_tokens_details": {"cached_tokens": 32},
            "completion_tokens_details": {"reasoning_tokens": 12},
        },
    }


def test_response_function_calls_become_tool_calls() -> None:
    data = {
        "candidates": [
            {
                "content": {
                    "role": "model",
                    "parts": [
                        {
                            "functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
                            "thoughtSignature": "c2ln",
                        },
                        {"functionCall": {"name": "get_weather", "args": {"city": "Rome"}}},
                    ],
                },
                "finishReason": "STOP",
            }
        ],
        "responseId": "r1",
    }

    choice = gemini.from_gemini_response(data, "public-model")["choices"][0]

    assert choice["message"] == {
        "role": "assistant",
        "content": None,
        "refusal": None,
        "tool_calls": [
            {
                "id": "call_r1_0",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                "extra_content": {"google": {"thought_signature": "c2ln"}},
            },
            {
                "id": "call_r1_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'},
            },
        ],
    }
    assert choice["finish_reason"] == "tool_calls"


@pytest.mark.parametrize(
    ("reason", "finish_reason"),
    [
        ("STOP", "stop"),
        ("MAX_TOKENS", "length"),
        ("SAFETY", "content_filter"),
        ("RECITATION", "content_filter"),
        ("BLOCKLIST", "content_filter"),
        ("PROHIBITED_CONTENT", "content_filter"),
        ("SPII", "content_filter"),
        ("OTHER", "stop"),
    ],
)
def test_response_finish_reasons(reason: str, finish_reason: str) -> None:
    data = {"candidates": [{"content": {"parts": [{"text": "x"}]}, "finishReason": reason}]}

    choice = gemini.from_gemini_response(data, "public-model")["choices"][0]

    assert choice["finish_reason"] == finish_reason


def test_response_blocked_prompt_is_content_filter() -> None:
    data = {
        "promptFeedback": {"blockReason": "SAFETY"},
        "usageMetadata": {"promptTokenCount": 9, "totalTokenCount": 9},
    }

    completion = gemini.from_gemini_response(data, "public-model")

    assert completion["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "", "refusal": None},
            "logprobs": None,
            "finish_reason": "content_filter",
        }
    ]
    assert completion["usage"]["prompt_tokens"] == 9
    assert completion["usage"]["completion_tokens"] == 0


def test_response_without_candidates_rejected() -> None:
    with pytest.raises(UpstreamStatusError) as caught:
        gemini.from_gemini_response({"usageMetadata": {}}, "public-model")

    assert caught.value.status_code == 502


def test_response_logprobs_translated() -> None:
    data = {
        "candidates": [
            {
                "content": {"parts": [{"text": "Hi"}]},
                "finishReason": "STOP",
                "logprobsResult": {
                    "chosenCandidates": [{"token": "Hi", "logProbability": -0.1}],
                    "topCandidates": [
                        {
                            "candidates": [
                                {"token": "Hi", "logProbability": -0.1},
                                {"token": "Hey", "logProbability": -2.5},
                            ]
                        }
                    ],
                },
            }
        ]
    }

    choice = gemini.from_gemini_response(data, "public-model")["choices"][0]

    assert choice["logprobs"] == {
        "content": [
            {
                "token": "Hi",
                "logprob": -0.1,
                "bytes": [72, 105],
                "top_logprobs": [
                    {"token": "Hi", "logprob": -0.1, "bytes": [72, 105]},
                    {"token": "Hey", "logprob": -2.5, "bytes": [72, 101, 121]},
                ],
            }
        ],
        "refusal": None,
    }


def test_error_body_with_retry_info() -> None:
    payload = {
        "error": {
            "code": 429,
            "message": "Quota exceeded.",
            "status": "RESOURCE_EXHAUSTED",
            "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"}],
        }
    }

    assert gemini.parse_error(payload) == ("Quota exceeded.", "RESOURCE_EXHAUSTED", 7.0)


def test_error_context_length_code() -> None:
    payload = [
        {
            "error": {
                "code": 400,
                "message": "The input token count (2000000) exceeds the maximum number of "
                "tokens allowed (1048576).",
                "status": "INVALID_ARGUMENT",
            }
        }
    ]

    assert gemini.parse_error(payload)[1] == "context_length_exceeded"


# --- Streams --------------------------------------------------------------------------


def data_event(data: str) -> ServerSentEvent:
    return ServerSentEvent("message", data)


def test_stream_text_function_call_and_usage() -> None:
    events = [
        data_event(
            '{"candidates":[{"content":{"role":"model","parts":[{"text":"Hel"}]}}],'
            '"usageMetadata":{"promptTokenCount":8,"candidatesTokenCount":1},"responseId":"s1"}'
        ),
        data_event(
            '{"candidates":[{"content":{"role":"model","parts":[{"text":"lo"},'
            '{"functionCall":{"name":"get_weather","args":{"city":"Paris"}}}]},'
            '"finishReason":"STOP"}],'
            '"usageMetadata":{"promptTokenCount":8,"candidatesTokenCount":6},"responseId":"s1"}'
        ),
    ]

    chunks = list(gemini.translate_gemini_stream(events, "public-model"))

    assert {chunk["id"] for chunk in chunks} == {"chatcmpl-s1"}
    deltas = [(c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for c in chunks[:-1]]
    assert deltas == [
        ({"role": "assistant", "content": ""}, None),
        ({"content": "Hel"}, None),
        ({"content": "lo"}, None),
        (
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_s1_0",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": ""},
                    }
                ]
            },
            None,
        ),
        ({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":"Paris"}'}}]}, None),
        ({}, "tool_calls"),
    ]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["prompt_tokens"] == 8
    assert chunks[-1]["usage"]["completion_tokens"] == 6


def test_stream_blocked_prompt() -> None:
    events = [
        data_event(
            '{"promptFeedback":{"blockReason":"PROHIBITED_CONTENT"},'
            '"usageMetadata":{"promptTokenCount":5}}'
        )
    ]

    chunks = list(gemini.translate_gemini_stream(events, "public-model"))

    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None, "content_filter"]
    assert chunks[-1]["usage"]["prompt_tokens"] == 5


def test_stream_error_object_raises() -> None:
    events = [
        data_event(
            '{"error":{"code":503,"message":"The model is overloaded.","status":"UNAVAILABLE"}}'
        )
    ]

    with pytest.raises(UpstreamStatusError) as caught:
        list(gemini.translate_gemini_stream(events, "public-model"))

    assert caught.value.status_code == 503
    assert caught.value.retryable is True


def test_stream_without_finish_reason_raises() -> None:
    events = [data_event('{"candidates":[{"content":{"parts":[{"text":"Hel"}]}}]}')]

    with pytest.raises(UpstreamUnreachable):
        list(gemini.translate_gemini_stream(events, "public-model"))


def test_embedding_request_per_input() -> None:
    body = {"model": "public-embed", "input": ["first", "second"], "dimensions": 8}

    assert gemini.to_gemini_embedding_request(body, "text-embedding-004") == {
        "requests": [
            {
                "model": "models/text-embedding-004",
                "content": {"parts": [{"text": "first"}]},
                "outputDimensionality": 8,
            },
            {
                "model": "models/text-embedding-004",
                "content": {"parts": [{"text": "second"}]},
                "outputDimensionality": 8,
            },
        ]
    }


def test_embedding_token_ids_rejected() -> None:
    with pytest.raises(UntranslatableRequest):
        gemini.to_gemini_embedding_request({"input": [[1, 2, 3]]}, "text-embedding-004")
