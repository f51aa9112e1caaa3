"""Every wire format through the queue: streaming, tools, images, JSON output, embeddings."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest
from harness import Stack
from sqlalchemy import func, select
from support import wait_for

from broker.tables import Job, LedgerEntry

# One model per wire format, all served by the simulator.
FORMAT_MODELS = {
    "openai": "gpt-5.4-mini",
    "anthropic": "claude-haiku-4-5",
    "gemini": "gemini-3.1-flash",
}
# A one-pixel PNG as a data URL: an image part every format can carry.
PIXEL_PNG = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4"
    "nGNgYGD4DwABBAEAwS2OUAAAAABJRU5ErkJggg=="
)
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["c", "f"]},
            },
            "required": ["city"],
        },
    },
}
ANSWER_SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "answer",
        "schema": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "score": {"type": "integer"}},
            "required": ["city", "score"],
            "additionalProperties": False,
        },
    },
}


def settled_job(stack: Stack, job_id: str) -> Job:
    def load() -> Job | None:
        with stack.sessions() as session:
            job = session.get(Job, job_id)
            return job if job is not None and job.settled_at is not None else None

    return wait_for(load, what=f"settlement of {job_id}")


@pytest.fixture
def simulator_config(stack: Stack) -> Iterator[callable]:
    """Change both simulator regions' settings for one test, restoring them afterwards."""
    changed: dict[str, object] = {}

    def apply(**fields: object) -> None:
        changed.update(fields)
        for region in ("us", "hk"):
            httpx.post(f"{stack.simulator_url(region)}/_sim/config", json=fields).raise_for_status()

    yield apply
    defaults = {"stream_chunk_delay_ms": 0, "split_multibyte": False}
    restore = {key: defaults[key] for key in changed if key in defaults}
    if restore:
        apply(**restore)


@pytest.mark.parametrize("wire_format", FORMAT_MODELS)
def test_stream_matches_plain_reply(stack: Stack, wire_format: str) -> None:
    account = stack.new_account()
    client = stack.client(account.api_key)
    request = {
        "model": FORMAT_MODELS[wire_format],
        "max_tokens": 120,
        "messages": [{"role": "user", "content": "Describe a queue in one line."}],
    }

    plain = client.chat.completions.create(**request)
    chunks = list(
        client.chat.completions.create(
            **request, stream=True, stream_options={"include_usage": True}
        )
    )

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] in ("stop", "length")


@pytest.mark.parametrize("wire_format", FORMAT_MODELS)
@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_with_image_part(stack: Stack, wire_format: str, stream: bool) -> None:
    account = stack.new_account()
    client = stack.client(account.api_key)
    request = {
        "model": FORMAT_MODELS[wire_format],
        "max_tokens": 200,
        "tools": [WEATHER_TOOL],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is the weather where this photo was taken?"},
                    {"type": "image_url", "image_url": {"url": PIXEL_PNG}},
                ],
            }
        ],
    }
    if stream:
        calls: dict[int, dict[str, str]] = {}
        for chunk in client.chat.completions.create(**request, stream=True):
            for choice in chunk.choices:
                for call in choice.delta.tool_calls or ():
                    merged = calls.setdefault(call.index, {"name": "", "arguments": ""})
                    merged["name"] += call.function.name or ""
                    merged["arguments"] += call.function.arguments or ""
        name, arguments = calls[0]["name"], calls[0]["arguments"]
    else:
        reply = client.chat.completions.create(**request)
        assert reply.choices[0].finish_reason == "tool_calls"
        call = reply.choices[0].message.tool_calls[0]
        name, arguments = call.function.name, call.function.arguments
    assert name == "get_weather"
    assert isinstance(json.loads(arguments)["city"], str)


@pytest.mark.parametrize("wire_format", FORMAT_MODELS)
def test_json_schema_output_parses(stack: Stack, wire_format: str) -> None:
    account = stack.new_account()
    reply = stack.client(account.api_key).chat.completions.create(
        model=FORMAT_MODELS[wire_format],
        max_tokens=200,
        response_format=ANSWER_SCHEMA,
        messages=[{"role": "user", "content": "Pick a city and score it."}],
    )
    document = json.loads(reply.choices[0].message.content)
    assert isinstance(document["city"], str)
    assert isinstance(document["score"], int)


def test_streamed_usage_charged_once(stack: Stack) -> None:
    account = stack.new_account()
    stream = stack.client(account.api_key).chat.completions.with_raw_response.create(
        model="claude-haiku-4-5",
        max_tokens=100,
        stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Count to five."}],
    )
    job_id = stream.headers["x-broker-job-id"]
    usage = [c.usage for c in stream.parse() if c.usage][-1]

    job = settled_job(stack, job_id)
    # claude-haiku-4-5 costs $0.95 and $4.75 per million tokens; round up once per job.
    exact = usage.prompt_tokens * 950_000 + usage.completion_tokens * 4_750_000
    expected = (exact + 999_999) // 1_000_000
    assert job.status == "succeeded"
    assert job.cost_micro_usd == expected
    with stack.sessions() as session:
        charges = session.scalars(
            select(LedgerEntry.amount_micro_usd).where(
                LedgerEntry.job_id == job_id, LedgerEntry.kind == "charge"
            )
        ).all()
    assert charges == [-expected]


def test_disconnect_cancels_upstream(stack: Stack, simulator_config: callable) -> None:
    simulator_config(stream_chunk_delay_ms=200)
    before = httpx.get(f"{stack.simulator_url('us')}/_sim/stats").json()["cancelled"]
    account = stack.new_account()
    with httpx.stream(
        "POST",
        f"{stack.api_url}/chat/completions",
        headers={"authorization": f"Bearer {account.api_key}"},
        json={
            "model": "gpt-5.4",
            "max_tokens": 300,
            "stream": True,
            "messages": [{"role": "user", "content": "Tell a long story."}],
        },
        timeout=30,
    ) as response:
        job_id = response.headers["x-broker-job-id"]
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert "chat.completion.chunk" in first

    job = settled_job(stack, job_id)
    assert job.status == "cancelled"
    wait_for(
        lambda: httpx.get(f"{stack.simulator_url('us')}/_sim/stats").json()["cancelled"] > before,
        what="the simulator to see the call cancelled",
    )


def test_split_multibyte_text_arrives_intact(stack: Stack, simulator_config: callable) -> None:
    simulator_config(split_multibyte=True)
    account = stack.new_account()
    client = stack.client(account.api_key)
    request = {
        "model": "qwen3-max",
        "max_tokens": 120,
        "messages": [{"role": "user", "content": "请用中文介绍一下消息队列 🚀"}],
    }
    plain = client.chat.completions.create(**request).choices[0].message.content
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(**request, stream=True)
        if c.choices
    )
    assert streamed == plain
    assert any("\u4e00" <= ch <= "\u9fff" for ch in streamed)


def test_unsupported_parameter_named_or_dropped(stack: Stack) -> None:
    account = stack.new_account()
    client = stack.client(account.api_key)
    request = {
        "model": "claude-haiku-4-5",
        "max_tokens": 50,
        "logit_bias": {"50256": -100},
        "messages": [{"role": "user", "content": "hi"}],
    }
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**request)
    assert caught.value.body["param"] == "logit_bias"
    reply = client.chat.completions.create(**request, extra_body={"drop_params": True})
    assert reply.choices[0].message.content


@pytest.mark.parametrize("model", ["text-embedding-3-small", "gemini-embedding-001"])
def test_embeddings_billed_per_input_token(stack: Stack, model: str) -> None:
    account = stack.new_account()
    raw = stack.client(account.api_key).embeddings.with_raw_response.create(
        model=model, input=["first text", "second text"]
    )
    result = raw.parse()
    assert len(result.data) == 2
    assert len(result.data[0].embedding) > 0
    assert result.usage.prompt_tokens > 0
    job = settled_job(stack, raw.headers["x-broker-job-id"])
    assert job.status == "succeeded"
    assert job.cost_micro_usd == int(raw.headers["x-broker-cost-micro-usd"])
    assert job.completion_tokens == 0


def test_embeddings_reject_chat_model(stack: Stack) -> None:
    account = stack.new_account()
    with pytest.raises(openai.BadRequestError) as caught:
        stack.client(account.api_key).embeddings.create(model="gpt-5.4", input="x")
    assert caught.value.body["param"] == "model"


def test_embeddings_reject_stream(stack: Stack) -> None:
    account = stack.new_account()
    response = httpx.post(
        f"{stack.api_url}/embeddings",
        headers={"authorization": f"Bearer {account.api_key}"},
        json={"model": "text-embedding-3-small", "input": "x", "stream": True},
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "stream"
    with stack.sessions() as session:
        assert (
            session.scalar(
                select(func.count()).select_from(Job).where(Job.account_id == account.id)
            )
            == 0
        )
