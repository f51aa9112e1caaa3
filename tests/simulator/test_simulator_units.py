"""Token counting, reply generation, schema sampling, URLs and config, without a server."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from simulator.__main__ import build_parser
from simulator.config import SimulatorConfig
from simulator.content import (
    FINISH_LENGTH,
    FINISH_SAFETY,
    FINISH_STOP,
    FINISH_STOP_SEQUENCE,
    FINISH_TOOL_CALLS,
    SAFETY_MARKER,
    TOOLS_NONE,
    ReplyRequest,
    ToolSpec,
    chunk_text,
    compose_text,
    contains_cjk,
    plan_choices,
)
from simulator.schema import sample_value
from simulator.streaming import split_multibyte_characters
from simulator.tokens import TOKEN_PATTERN, count_tokens, truncate_to_tokens
from simulator.urls import base_urls

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("", 0),
        ("hello world", 2),
        ("Hello, world!", 4),
        ("snake_case_name", 1),
        ("你好世界", 1),
        ("你好 🚀", 2),
        ("a\n\nb", 2),
    ],
)
def test_count_tokens_cases(text: str, tokens: int) -> None:
    assert count_tokens(text) == tokens


def test_tokens_never_exceed_utf8_bytes() -> None:
    for seed in range(500):
        text, _ = compose_text(seed, seed % 2 == 0)
        assert count_tokens(text) <= len(text.encode("utf-8"))


def test_truncate_keeps_token_prefix() -> None:
    assert truncate_to_tokens("one, two three", 2) == ("one,", True)
    assert truncate_to_tokens("one two", 2) == ("one two", False)
    assert truncate_to_tokens("one two ", 2) == ("one two ", False)
    assert truncate_to_tokens("one two", 5) == ("one two", False)
    assert truncate_to_tokens("one two", 0) == ("", True)
    assert truncate_to_tokens("  ", 0) == ("", False)
    assert truncate_to_tokens("", 3) == ("", False)


def test_reply_length_within_bounds() -> None:
    lengths = set()
    for seed in range(2000):
        text, token_ends = compose_text(seed, seed % 2 == 0)
        assert len(token_ends) == count_tokens(text)
        assert [match.end() for match in TOKEN_PATTERN.finditer(text)] == list(token_ends)
        lengths.add(len(token_ends))

    assert min(lengths) >= 8
    assert max(lengths) <= 120
    assert len(lengths) > 50


def test_chunks_join_to_text() -> None:
    for seed in range(200):
        text, _ = compose_text(seed, seed % 3 == 0)
        for offset in range(8):
            chunks = chunk_text(text, offset)
            assert "".join(chunks) == text
            assert all(1 <= count_tokens(chunk) <= 4 for chunk in chunks)


def test_same_request_same_reply() -> None:
    request = ReplyRequest(model="m", texts=["hello"])

    first = plan_choices(request, seed=1)[0]
    again = plan_choices(ReplyRequest(model="m", texts=["hello"]), seed=1)[0]
    other_seed = plan_choices(request, seed=2)[0]
    other_model = plan_choices(ReplyRequest(model="n", texts=["hello"]), seed=1)[0]

    assert first.text == again.text
    assert first.text != other_seed.text
    assert first.text != other_model.text


def test_cap_sets_length_finish() -> None:
    choice = plan_choices(ReplyRequest(model="m", texts=["x"], max_tokens=2), seed=0)[0]

    assert choice.finish == FINISH_LENGTH
    assert choice.completion_tokens == 2


def test_cap_above_length_keeps_stop() -> None:
    choice = plan_choices(ReplyRequest(model="m", texts=["x"], max_tokens=500), seed=0)[0]

    assert choice.finish == FINISH_STOP


def test_stop_sequence_finish() -> None:
    full = plan_choices(ReplyRequest(model="m", texts=["x"]), seed=0)[0].text
    stop = full.split()[1]

    choice = plan_choices(ReplyRequest(model="m", texts=["x"], stop=[stop]), seed=0)[0]

    assert choice.finish == FINISH_STOP_SEQUENCE
    assert choice.stop_sequence == stop
    assert choice.text == full[: full.index(stop)]


def test_cjk_reply_has_emoji() -> None:
    request = ReplyRequest(model="m", texts=["日本語で"], last_user_text="日本語で")

    text = plan_choices(request, seed=0)[0].text

    assert contains_cjk(text)
    assert any(len(char.encode("utf-8")) == 4 for char in text)


def test_safety_marker_blocks() -> None:
    choice = plan_choices(ReplyRequest(model="m", texts=[SAFETY_MARKER]), seed=0)[0]

    assert choice.finish == FINISH_SAFETY
    assert choice.text is None
    assert choice.completion_tokens == 0


def test_tools_only_on_user_turn() -> None:
    tools = [ToolSpec("lookup", {"type": "object", "properties": {"q": {"type": "string"}}})]

    on_user = plan_choices(ReplyRequest(model="m", texts=["x"], tools=tools), seed=0)[0]
    after_tool = plan_choices(
        ReplyRequest(model="m", texts=["x"], tools=tools, ends_with_user_turn=False), seed=0
    )[0]
    disabled = plan_choices(
        ReplyRequest(model="m", texts=["x"], tools=tools, tool_mode=TOOLS_NONE), seed=0
    )[0]

    assert on_user.finish == FINISH_TOOL_CALLS
    assert isinstance(on_user.tool_calls[0].arguments["q"], str)
    assert after_tool.tool_calls == []
    assert disabled.tool_calls == []


def test_schema_sample_satisfies_constraints() -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 30, "maxLength": 40},
            "kind": {"enum": ["a", "b"]},
            "count": {"type": "integer", "exclusiveMinimum": 2, "exclusiveMaximum": 4},
            "ratio": {"type": "number", "minimum": 0.5, "maximum": 0.6},
            "when": {"type": "string", "format": "date"},
            "items": {"type": "array", "items": {"$ref": "#/$defs/Item"}, "minItems": 2},
            "maybe": {"anyOf": [{"type": "null"}, {"type": "boolean"}]},
            "fixed": {"const": 42},
            "none": {"type": "array", "maxItems": 0, "items": {"type": "string"}},
        },
        "required": ["name"],
        "$defs": {
            "Item": {
                "type": "object",
                "properties": {"id": {"type": "integer"}, "next": {"$ref": "#/$defs/Item"}},
                "required": ["id"],
            }
        },
    }

    for seed in range(50):
        value = sample_value(schema, random.Random(seed))
        assert 30 <= len(value["name"]) <= 40
        assert value["kind"] in ("a", "b")
        assert value["count"] == 3
        assert 0.5 <= value["ratio"] <= 0.6
        assert len(value["when"]) == 10
        assert len(value["items"]) >= 2
        assert all(isinstance(item["id"], int) for item in value["items"])
        assert isinstance(value["maybe"], bool)
        assert value["fixed"] == 42
        assert value["none"] == []


def test_recursive_schema_terminates() -> None:
    schema = {
        "$defs": {"Node": {"type": "object", "properties": {"child": {"$ref": "#/$defs/Node"}}}},
        "$ref": "#/$defs/Node",
    }

    value = sample_value(schema, random.Random(0))

    assert isinstance(value, dict)


def test_split_multibyte_cuts_inside_character() -> None:
    chunks = split_multibyte_characters([b"data: abc\n\n", "data: x你y\n\n".encode()])

    assert chunks[0] == b"data: abc\n\n"
    assert len(chunks) == 3
    with pytest.raises(UnicodeDecodeError):
        chunks[1].decode("utf-8")
    assert b"".join(chunks[1:]).decode("utf-8") == "data: x你y\n\n"


@pytest.mark.parametrize(
    ("wire_format", "url"),
    [
        ("openai", "http://127.0.0.1:9101/deepseek/v1"),
        ("anthropic", "http://127.0.0.1:9101/deepseek"),
        ("gemini", "http://127.0.0.1:9101/deepseek/v1beta"),
    ],
)
def test_base_urls_per_format(wire_format: str, url: str) -> None:
    assert base_urls("127.0.0.1", 9101, "deepseek", wire_format) == url


def test_base_urls_unknown_format() -> None:
    with pytest.raises(ValueError, match="unknown wire format"):
        base_urls("127.0.0.1", 9101, "x", "soap")


def test_config_defaults() -> None:
    config = SimulatorConfig(region="us")

    assert config.latency_ms == 0
    assert config.retry_after_s == 1
    assert config.timeout_hang_s == 30
    assert config.quiet is True
    assert config.down is False


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValidationError):
        SimulatorConfig(region="us", fault_rate_500=2)
    with pytest.raises(ValidationError):
        SimulatorConfig(region="us", latency_ms=-1)
    with pytest.raises(ValidationError):
        SimulatorConfig(region="us", unknown=1)


def test_cli_sets_every_field() -> None:
    arguments = build_parser().parse_args(
        [
            "--region=hk",
            "--port=9200",
            "--latency-ms=5",
            "--jitter-ms=2",
            "--stream-chunk-delay-ms=3",
            "--fault-rate-429=0.1",
            "--fault-rate-500=0.2",
            "--fault-rate-timeout=0.3",
            "--retry-after-s=4",
            "--timeout-hang-s=1.5",
            "--down",
            "--split-multibyte",
            "--no-quiet",
            "--seed=9",
        ]
    )
    values = vars(arguments)
    assert values.pop("host") == "127.0.0.1"
    assert values.pop("port") == 9200

    config = SimulatorConfig(**values)

    assert config.model_dump() == {
        "region": "hk",
        "latency_ms": 5,
        "jitter_ms": 2,
        "stream_chunk_delay_ms": 3,
        "fault_rate_429": 0.1,
        "fault_rate_500": 0.2,
        "fault_rate_timeout": 0.3,
        "retry_after_s": 4,
        "timeout_hang_s": 1.5,
        "down": True,
        "split_multibyte": True,
        "quiet": False,
        "seed": 9,
    }
