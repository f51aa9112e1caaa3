"""Stream framing, split multi-byte characters, client disconnects and statistics."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import anthropic
import httpx
import openai
import pytest
from sim_harness import HOST, REGION, Simulator

from simulator.content import contains_cjk
from simulator.urls import base_urls

pytestmark = pytest.mark.timeout(60)

CJK_PROMPT = "请用中文介绍一下你自己"
OPENAI_HEADERS = {"Authorization": "Bearer test-key"}


def chat_body(text: str, **extra: object) -> dict:
    return {"model": "sim-chat", "messages": [{"role": "user", "content": text}], **extra}


def openai_sse_text(raw: bytes) -> str:
    """Concatenate the content deltas of an OpenAI SSE body."""
    text = ""
    for block in raw.decode("utf-8").split("\n\n"):
        if not block.startswith("data: ") or block == "data: [DONE]":
            continue
        for choice in json.loads(block[6:])["choices"]:
            text += choice["delta"].get("content") or ""
    return text


def wait_for_stats(simulator: Simulator, condition, timeout_s: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = simulator.stats()
        if condition(stats):
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"stats did not reach the expected state: {stats}")
        time.sleep(0.05)


@pytest.fixture
def split_streams(simulator: Simulator) -> Iterator[Simulator]:
    simulator.configure(split_multibyte=True)
    yield simulator


def test_split_multibyte_reassembles_exactly(http: httpx.Client, split_streams: Simulator) -> None:
    plain = http.post(
        "/openai/v1/chat/completions", headers=OPENAI_HEADERS, json=chat_body(CJK_PROMPT)
    )
    expected = plain.json()["choices"][0]["message"]["content"]
    assert contains_cjk(expected)

    with http.stream(
        "POST",
        "/openai/v1/chat/completions",
        headers=OPENAI_HEADERS,
        json=chat_body(CJK_PROMPT, stream=True),
    ) as response:
        raw_chunks = list(response.iter_raw())

    undecodable = 0
    for chunk in raw_chunks:
        try:
            chunk.decode("utf-8")
        except UnicodeDecodeError:
            undecodable += 1
    assert undecodable > 0
    assert openai_sse_text(b"".join(raw_chunks)) == expected


def test_split_multibyte_openai_sdk_stream(split_streams: Simulator) -> None:
    base_url = base_urls(HOST, split_streams.port, "openai", "openai")
    messages = [{"role": "user", "content": CJK_PROMPT}]
    with openai.OpenAI(base_url=base_url, api_key="k", max_retries=0, timeout=10) as client:
        expected = client.chat.completions.create(model="sim-chat", messages=messages)
        stream = client.chat.completions.create(model="sim-chat", messages=messages, stream=True)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)

    assert text == expected.choices[0].message.content


def test_split_multibyte_anthropic_sdk_stream(split_streams: Simulator) -> None:
    base_url = base_urls(HOST, split_streams.port, "anthropic", "anthropic")
    messages = [{"role": "user", "content": CJK_PROMPT}]
    with anthropic.Anthropic(base_url=base_url, api_key="k", max_retries=0, timeout=10) as client:
        expected = client.messages.create(model="sim-claude", max_tokens=200, messages=messages)
        with client.messages.stream(
            model="sim-claude", max_tokens=200, messages=messages
        ) as stream:
            text = "".join(stream.text_stream)

    assert text == expected.content[0].text
    assert contains_cjk(text)


def test_split_multibyte_gemini_stream(http: httpx.Client, split_streams: Simulator) -> None:
    path = "/google/v1beta/models/sim-gemini-flash:streamGenerateContent"
    body = {"contents": [{"role": "user", "parts": [{"text": CJK_PROMPT}]}]}
    with http.stream(
        "POST", path, params={"alt": "sse"}, headers={"x-goog-api-key": "k"}, json=body
    ) as response:
        raw = b"".join(response.iter_raw())

    text = ""
    for block in raw.decode("utf-8").split("\r\n\r\n"):
        if block.startswith("data: "):
            text += json.loads(block[6:])["candidates"][0]["content"]["parts"][0]["text"]
    assert contains_cjk(text)
    assert any(ord(char) >= 0x1F300 for char in text)


def test_chunk_delay_paces_stream(http: httpx.Client, simulator: Simulator) -> None:
    simulator.configure(stream_chunk_delay_ms=20)

    started = time.monotonic()
    with http.stream(
        "POST",
        "/openai/v1/chat/completions",
        headers=OPENAI_HEADERS,
        json=chat_body("Pace me", stream=True, max_tokens=12),
    ) as response:
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    elapsed = time.monotonic() - started

    assert elapsed >= 0.02 * (len(events) - 1)


def test_disconnect_mid_stream_counts_cancelled(http: httpx.Client, simulator: Simulator) -> None:
    simulator.configure(stream_chunk_delay_ms=200)

    with http.stream(
        "POST",
        "/openai/v1/chat/completions",
        headers=OPENAI_HEADERS,
        json=chat_body("Long stream", stream=True),
    ) as response:
        first = next(response.iter_raw())
        assert first.startswith(b"data: ")

    stats = wait_for_stats(simulator, lambda s: s["cancelled"] == 1 and s["in_flight"] == 0)
    assert stats["by_status"] == {"200": 1}


def test_disconnect_during_latency_counts_cancelled(simulator: Simulator) -> None:
    simulator.configure(latency_ms=5000)

    with httpx.Client(base_url=simulator.url, timeout=0.3) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            impatient.post(
                "/openai/v1/chat/completions", headers=OPENAI_HEADERS, json=chat_body("Slow")
            )

    stats = wait_for_stats(
        simulator, lambda s: s["cancelled"] == 1 and s["in_flight"] == 0, timeout_s=3
    )
    assert stats["by_status"] == {}


def test_stats_count_provider_model_status(http: httpx.Client, simulator: Simulator) -> None:
    http.post("/openai/v1/chat/completions", headers=OPENAI_HEADERS, json=chat_body("a"))
    http.post("/deepseek/v1/chat/completions", headers=OPENAI_HEADERS, json=chat_body("b"))
    http.post("/deepseek/v1/chat/completions", json=chat_body("no key"))
    http.post(
        "/anthropic/v1/messages",
        headers={"x-api-key": "k", "anthropic-version": "2023-06-01"},
        json={
            "model": "sim-claude",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": "c"}],
        },
    )

    stats = simulator.stats()
    assert stats["requests"] == 4
    assert stats["in_flight"] == 0
    assert stats["cancelled"] == 0
    assert stats["by_provider"] == {"openai": 1, "deepseek": 2, "anthropic": 1}
    assert stats["by_model"] == {"sim-chat": 2, "sim-claude": 1}
    assert stats["by_status"] == {"200": 3, "401": 1}

    http.post("/_sim/reset")
    assert simulator.stats()["requests"] == 0


def test_health_reports_region(http: httpx.Client) -> None:
    response = http.get("/_sim/health")

    assert response.json() == {"status": "ok", "region": REGION}
    assert response.headers["x-simulator-region"] == REGION
