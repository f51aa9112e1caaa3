"""Gemini wire format, parsed with httpx and checked field by field."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import httpx
import pytest
from sim_harness import HOST, REGION, Simulator

from simulator.content import SAFETY_MARKER
from simulator.tokens import count_tokens
from simulator.urls import base_urls

pytestmark = pytest.mark.timeout(60)

MODEL = "sim-gemini-flash"
KEY_HEADER = {"x-goog-api-key": "test-key"}
WEATHER_DECLARATION = {
    "name": "get_weather",
    "description": "Current weather of a city.",
    "parameters": {
        "type": "OBJECT",
        "properties": {
            "city": {"type": "STRING"},
            "unit": {"type": "STRING", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "INTEGER", "minimum": 1, "maximum": 7},
        },
        "required": ["city", "unit"],
    },
}


@pytest.fixture
def gemini(simulator: Simulator) -> Iterator[httpx.Client]:
    base_url = base_urls(HOST, simulator.port, "google", "gemini")
    with httpx.Client(base_url=base_url, headers=KEY_HEADER, timeout=10) as client:
        yield client


def user(text: str) -> dict:
    return {"role": "user", "parts": [{"text": text}]}


def generate(client: httpx.Client, body: dict) -> dict:
    response = client.post(f"/models/{MODEL}:generateContent", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def read_sse(response: httpx.Response) -> list[dict]:
    """Parse an SSE body into the JSON objects of its data fields."""
    text = response.read().decode("utf-8")
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        data = [line[5:].lstrip() for line in block.split("\n") if line.startswith("data:")]
        if data:
            events.append(json.loads("\n".join(data)))
    return events


def test_generate_content_fields(gemini: httpx.Client, simulator: Simulator) -> None:
    body = {
        "systemInstruction": {"parts": [{"text": "Be brief."}]},
        "contents": [user("Hello Gemini")],
    }
    response = gemini.post(f"/models/{MODEL}:generateContent", json=body)

    assert response.status_code == 200
    assert response.headers["x-simulator-region"] == REGION
    result = response.json()
    assert set(result) == {"candidates", "usageMetadata", "modelVersion", "responseId"}
    assert result["modelVersion"] == MODEL
    [candidate] = result["candidates"]
    assert candidate["index"] == 0
    assert candidate["finishReason"] == "STOP"
    assert candidate["content"]["role"] == "model"
    [part] = candidate["content"]["parts"]
    text = part["text"]
    assert 8 <= count_tokens(text) <= 120
    usage = result["usageMetadata"]
    expected_prompt = (count_tokens("Be brief.") + 4) + (count_tokens("Hello Gemini") + 4) + 3
    assert usage["promptTokenCount"] == expected_prompt
    assert usage["candidatesTokenCount"] == count_tokens(text)
    assert usage["totalTokenCount"] == expected_prompt + count_tokens(text)
    assert simulator.stats()["by_model"] == {MODEL: 1}


def test_key_query_parameter_accepted(simulator: Simulator) -> None:
    base_url = base_urls(HOST, simulator.port, "google", "gemini")
    response = httpx.post(
        f"{base_url}/models/{MODEL}:generateContent",
        params={"key": "test-key"},
        json={"contents": [user("hi")]},
    )

    assert response.status_code == 200


def test_missing_key_rejected(simulator: Simulator) -> None:
    base_url = base_urls(HOST, simulator.port, "google", "gemini")
    response = httpx.post(
        f"{base_url}/models/{MODEL}:generateContent", json={"contents": [user("hi")]}
    )

    assert response.status_code == 403
    error = response.json()["error"]
    assert error["code"] == 403
    assert error["status"] == "PERMISSION_DENIED"
    assert error["message"]


def test_max_output_tokens_gives_max_tokens(gemini: httpx.Client) -> None:
    result = generate(
        gemini, {"contents": [user("Long")], "generationConfig": {"maxOutputTokens": 5}}
    )

    candidate = result["candidates"][0]
    assert candidate["finishReason"] == "MAX_TOKENS"
    assert count_tokens(candidate["content"]["parts"][0]["text"]) == 5
    assert result["usageMetadata"]["candidatesTokenCount"] == 5


def test_stop_sequence_cuts_text(gemini: httpx.Client) -> None:
    full = generate(gemini, {"contents": [user("Cut")]})
    text = full["candidates"][0]["content"]["parts"][0]["text"]
    stop = text.split()[2]

    cut = generate(
        gemini, {"contents": [user("Cut")], "generationConfig": {"stopSequences": [stop]}}
    )

    candidate = cut["candidates"][0]
    assert candidate["finishReason"] == "STOP"
    assert candidate["content"]["parts"][0]["text"] == text[: text.index(stop)]


def test_candidate_count_two(gemini: httpx.Client) -> None:
    result = generate(
        gemini, {"contents": [user("Two")], "generationConfig": {"candidateCount": 2}}
    )

    assert [candidate["index"] for candidate in result["candidates"]] == [0, 1]
    texts = [candidate["content"]["parts"][0]["text"] for candidate in result["candidates"]]
    assert texts[0] != texts[1]
    assert result["usageMetadata"]["candidatesTokenCount"] == sum(map(count_tokens, texts))


def test_inline_image_counts_fixed_tokens(gemini: httpx.Client) -> None:
    image = {"inlineData": {"mimeType": "image/png", "data": "AAAA"}}
    content = {"role": "user", "parts": [{"text": "What is this?"}, image]}

    result = generate(gemini, {"contents": [content]})

    prompt_tokens = count_tokens("What is this?") + 85 + 4 + 3
    assert result["usageMetadata"]["promptTokenCount"] == prompt_tokens


def test_function_call_follows_schema(gemini: httpx.Client) -> None:
    body = {
        "contents": [user("Weather in Oslo?")],
        "tools": [{"functionDeclarations": [WEATHER_DECLARATION]}],
    }

    result = generate(gemini, body)

    candidate = result["candidates"][0]
    assert candidate["finishReason"] == "STOP"
    [part] = candidate["content"]["parts"]
    call = part["functionCall"]
    assert call["name"] == "get_weather"
    assert isinstance(call["args"]["city"], str)
    assert call["args"]["unit"] in ("celsius", "fahrenheit")
    assert 1 <= call["args"]["days"] <= 7


def test_function_response_gets_text(gemini: httpx.Client) -> None:
    call = {"functionCall": {"name": "get_weather", "args": {"city": "Oslo", "unit": "celsius"}}}
    answer = {"functionResponse": {"name": "get_weather", "response": {"temperature": 4}}}
    body = {
        "contents": [
            user("Weather in Oslo?"),
            {"role": "model", "parts": [call]},
            {"role": "user", "parts": [answer]},
        ],
        "tools": [{"functionDeclarations": [WEATHER_DECLARATION]}],
    }

    result = generate(gemini, body)

    assert "text" in result["candidates"][0]["content"]["parts"][0]


def test_function_calling_mode_none(gemini: httpx.Client) -> None:
    body = {
        "contents": [user("Weather?")],
        "tools": [{"functionDeclarations": [WEATHER_DECLARATION]}],
        "toolConfig": {"functionCallingConfig": {"mode": "NONE"}},
    }

    result = generate(gemini, body)

    assert "text" in result["candidates"][0]["content"]["parts"][0]


def test_response_schema_gives_json(gemini: httpx.Client) -> None:
    schema = {
        "type": "OBJECT",
        "properties": {
            "title": {"type": "STRING"},
            "score": {"type": "NUMBER"},
            "tags": {"type": "ARRAY", "items": {"type": "STRING"}},
        },
        "required": ["title", "score", "tags"],
    }
    config = {"responseMimeType": "application/json", "responseSchema": schema}

    result = generate(gemini, {"contents": [user("Rate it")], "generationConfig": config})

    document = json.loads(result["candidates"][0]["content"]["parts"][0]["text"])
    assert isinstance(document["title"], str)
    assert isinstance(document["score"], float | int)
    assert all(isinstance(tag, str) for tag in document["tags"])


def test_json_mime_type_without_schema(gemini: httpx.Client) -> None:
    config = {"responseMimeType": "application/json"}

    result = generate(gemini, {"contents": [user("JSON please")], "generationConfig": config})

    document = json.loads(result["candidates"][0]["content"]["parts"][0]["text"])
    assert isinstance(document["answer"], str)


def test_safety_marker_blocks_reply(gemini: httpx.Client) -> None:
    result = generate(gemini, {"contents": [user(f"Tell me {SAFETY_MARKER} now")]})

    [candidate] = result["candidates"]
    assert candidate["finishReason"] == "SAFETY"
    assert "content" not in candidate
    assert result["usageMetadata"]["candidatesTokenCount"] == 0


def test_sse_stream_matches_plain(gemini: httpx.Client) -> None:
    body = {"contents": [user("Stream Gemini")]}
    plain = generate(gemini, body)
    plain_text = plain["candidates"][0]["content"]["parts"][0]["text"]

    with gemini.stream(
        "POST", f"/models/{MODEL}:streamGenerateContent", params={"alt": "sse"}, json=body
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = read_sse(response)

    assert len(chunks) > 1
    text = ""
    for chunk in chunks:
        assert chunk["modelVersion"] == MODEL
        [candidate] = chunk["candidates"]
        assert candidate["index"] == 0
        assert candidate["content"]["role"] == "model"
        text += candidate["content"]["parts"][0]["text"]
    assert text == plain_text
    assert all("finishReason" not in chunk["candidates"][0] for chunk in chunks[:-1])
    assert chunks[-1]["candidates"][0]["finishReason"] == "STOP"
    assert len({chunk["responseId"] for chunk in chunks}) == 1
    counts = [chunk["usageMetadata"]["candidatesTokenCount"] for chunk in chunks]
    assert counts == sorted(counts)
    assert chunks[-1]["usageMetadata"] == plain["usageMetadata"]


def test_stream_without_sse_is_json_array(gemini: httpx.Client) -> None:
    body = {"contents": [user("Array stream")]}
    plain = generate(gemini, body)

    response = gemini.post(f"/models/{MODEL}:streamGenerateContent", json=body)

    assert response.status_code == 200
    chunks = response.json()
    assert isinstance(chunks, list)
    text = "".join(chunk["candidates"][0]["content"]["parts"][0]["text"] for chunk in chunks)
    assert text == plain["candidates"][0]["content"]["parts"][0]["text"]


def test_embed_content_dimensions(gemini: httpx.Client) -> None:
    body = {"content": {"parts": [{"text": "embed me"}]}, "outputDimensionality": 32}

    response = gemini.post("/models/sim-embedding:embedContent", json=body)

    assert response.status_code == 200
    values = response.json()["embedding"]["values"]
    assert len(values) == 32
    assert math.isclose(math.sqrt(sum(value * value for value in values)), 1.0, rel_tol=1e-6)


def test_batch_embed_contents(gemini: httpx.Client) -> None:
    requests = [
        {"model": "models/sim-embedding", "content": {"parts": [{"text": text}]}}
        for text in ("one", "two", "one")
    ]

    response = gemini.post("/models/sim-embedding:batchEmbedContents", json={"requests": requests})

    assert response.status_code == 200
    embeddings = response.json()["embeddings"]
    assert len(embeddings) == 3
    assert all(len(item["values"]) == 256 for item in embeddings)
    assert embeddings[0] == embeddings[2]
    assert embeddings[0] != embeddings[1]


def test_unknown_action_gives_404(gemini: httpx.Client) -> None:
    response = gemini.post(f"/models/{MODEL}:predictLongRunning", json={})

    assert response.status_code == 404
    assert response.json()["error"]["status"] == "NOT_FOUND"


def test_missing_contents_gives_400(gemini: httpx.Client) -> None:
    response = gemini.post(f"/models/{MODEL}:generateContent", json={})

    assert response.status_code == 400
    assert response.json()["error"]["status"] == "INVALID_ARGUMENT"
