"""Deterministic reply generation shared by every wire format.

Each format module turns its request into a ``ReplyRequest``, and ``plan_choices`` turns
that into the choices to send. The same model, prompt texts and seed always give the
same reply. Replies are 8 to 120 tokens of words from a fixed vocabulary, cut by the
request's output token cap and stop sequences.
"""

import functools
import hashlib
import random
import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from simulator.schema import sample_value
from simulator.tokens import count_tokens, split_into_chunks, truncate_to_tokens

# A prompt containing this text gets a reply blocked by the simulated safety filter.
SAFETY_MARKER = "[[simulate:safety]]"

MIN_REPLY_TOKENS = 8
MAX_REPLY_TOKENS = 120

# Format-neutral finish reasons. Each format module maps them to its own names.
FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_STOP_SEQUENCE = "stop_sequence"
FINISH_TOOL_CALLS = "tool_calls"
FINISH_SAFETY = "safety"

# Tool modes of a request.
TOOLS_AUTO = "auto"
TOOLS_NONE = "none"
TOOLS_REQUIRED = "required"
TOOLS_NAMED = "named"

WORDS = tuple(
    """
    the model returns a simulated answer for this request with tokens drawn from fixed
    vocabulary so tests can replay it every broker region stream upstream latency budget
    wallet route quota result value signal vector cache prompt context window batch queue
    worker pool retry limit policy metric trace span event record ledger invoice credit
    debit balance session client server header payload schema field index shard
    """.split()
)
CJK_WORDS = ("你好", "世界", "模型", "数据", "测试", "こんにちは", "データ", "안녕하세요")
EMOJI = ("🚀", "🌏", "🎉", "🙂", "📦")
CJK_PATTERN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")

# Tokens per stream chunk, cycled from an offset that depends on the reply.
CHUNK_GROUP_SIZES = (1, 3, 2, 4, 2, 1, 3, 4)


@dataclass(slots=True)
class ToolSpec:
    """A function the client offers, with the JSON schema of its arguments."""

    name: str
    parameters: Any


@dataclass(slots=True)
class ReplyRequest:
    """The parts of a generation request that shape the reply, in no wire format."""

    model: str
    texts: list[str]
    last_user_text: str = ""
    ends_with_user_turn: bool = True
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    n: int = 1
    json_object: bool = False
    json_schema: Any = None
    tools: list[ToolSpec] = field(default_factory=list)
    tool_mode: str = TOOLS_AUTO
    tool_name: str | None = None
    parallel_tool_calls: bool = False


@dataclass(slots=True)
class ToolCall:
    """One generated call of an offered tool."""

    name: str
    arguments: Any
    arguments_json: str


@dataclass(slots=True)
class Choice:
    """One generated reply: text or tool calls, with its finish reason and token count."""

    index: int
    text: str | None
    tool_calls: list[ToolCall]
    finish: str
    stop_sequence: str | None
    completion_tokens: int
    chunk_offset: int

    def text_chunks(self) -> tuple[str, ...]:
        """Split the text into stream chunks of 1 to 4 tokens."""
        return chunk_text(self.text or "", self.chunk_offset)


@functools.lru_cache(maxsize=4096)
def chunk_text(text: str, offset: int) -> tuple[str, ...]:
    """Split ``text`` into stream chunks, using the size cycle starting at ``offset``."""
    sizes = CHUNK_GROUP_SIZES[offset:] + CHUNK_GROUP_SIZES[:offset]
    return tuple(split_into_chunks(text, list(sizes)))


def contains_cjk(text: str) -> bool:
    """Return whether ``text`` contains Chinese, Japanese or Korean characters."""
    return CJK_PATTERN.search(text) is not None


def plan_choices(request: ReplyRequest, seed: int) -> list[Choice]:
    """Generate the ``request.n`` choices for ``request``."""
    digest = hashlib.blake2b(
        "\x00".join((request.model, str(seed), "\x1e".join(request.texts))).encode(),
        digest_size=16,
    ).digest()
    base = int.from_bytes(digest, "big")
    blocked = any(SAFETY_MARKER in text for text in request.texts)
    cjk = contains_cjk(request.last_user_text)
    calls_tools = (
        bool(request.tools) and request.tool_mode != TOOLS_NONE and request.ends_with_user_turn
    )
    choices = []
    for index in range(request.n):
        choice_seed = base + index
        offset = choice_seed % len(CHUNK_GROUP_SIZES)
        if blocked:
            choice = Choice(index, None, [], FINISH_SAFETY, None, 0, offset)
        elif calls_tools:
            choice = _tool_choice(request, index, choice_seed, offset)
        else:
            choice = _text_choice(request, index, choice_seed, offset, cjk)
        choices.append(choice)
    return choices


def _text_choice(
    request: ReplyRequest, index: int, choice_seed: int, offset: int, cjk: bool
) -> Choice:
    if request.json_schema is not None:
        value = sample_value(request.json_schema, random.Random(choice_seed))
        text = orjson.dumps(value).decode()
        tokens = count_tokens(text)
    elif request.json_object:
        text = orjson.dumps({"answer": compose_text(choice_seed, cjk)[0]}).decode()
        tokens = count_tokens(text)
    else:
        text, token_ends = compose_text(choice_seed, cjk)
        tokens = len(token_ends)

    finish = FINISH_STOP
    max_tokens = request.max_tokens
    if max_tokens is not None and tokens > max_tokens:
        if request.json_schema is None and not request.json_object:
            text = text[: token_ends[max_tokens - 1]]
        else:
            text, _ = truncate_to_tokens(text, max_tokens)
        tokens = max_tokens
        finish = FINISH_LENGTH
    matched = None
    stop_at = len(text)
    for sequence in request.stop:
        position = text.find(sequence)
        if 0 <= position < stop_at:
            stop_at, matched = position, sequence
    if matched is not None:
        text = text[:stop_at]
        tokens = count_tokens(text)
        finish = FINISH_STOP_SEQUENCE
    return Choice(index, text, [], finish, matched, tokens, offset)


def _tool_choice(request: ReplyRequest, index: int, choice_seed: int, offset: int) -> Choice:
    if request.tool_mode == TOOLS_NAMED:
        tools = [tool for tool in request.tools if tool.name == request.tool_name][:1]
    elif request.parallel_tool_calls:
        tools = request.tools[:2]
    else:
        tools = request.tools[:1]
    calls = []
    tokens = 0
    for position, tool in enumerate(tools):
        rng = random.Random(f"{choice_seed}:{position}:{tool.name}")
        arguments = sample_value(tool.parameters, rng)
        if not isinstance(arguments, dict):
            arguments = {}
        arguments_json = orjson.dumps(arguments).decode()
        calls.append(ToolCall(tool.name, arguments, arguments_json))
        tokens += count_tokens(tool.name) + count_tokens(arguments_json)
    # NOTE: the output token cap does not cut tool calls, although a real model's
    # arguments can be cut by it.
    return Choice(index, None, calls, FINISH_TOOL_CALLS, None, tokens, offset)


@functools.lru_cache(maxsize=4096)
def compose_text(seed: int, cjk: bool) -> tuple[str, tuple[int, ...]]:
    """Return the reply text for ``seed`` and the end offset of each of its tokens.

    The text has 8 to 120 tokens and ends with a period. With ``cjk`` it starts with a
    CJK word and an emoji and mixes in more CJK words, so that streams carry multi-byte
    UTF-8.
    """
    rng = random.Random(seed)
    length = rng.randint(MIN_REPLY_TOKENS, MAX_REPLY_TOKENS)
    # Every piece is one token, possibly with a separator before it: a word, a CJK
    # word, an emoji or a punctuation mark. The final period is the last piece.
    pieces: list[str] = []
    ends: list[int] = []
    size = 0

    def add(piece: str) -> None:
        nonlocal size
        pieces.append(piece)
        size += len(piece)
        ends.append(size)

    if cjk:
        add(rng.choice(CJK_WORDS))
        add(" " + rng.choice(EMOJI))
    separator = " " if pieces else ""
    capitalize = not pieces
    while len(pieces) < length - 1:
        if cjk and rng.random() < 0.2:
            word = rng.choice(CJK_WORDS)
        else:
            word = rng.choice(WORDS)
            if capitalize:
                word = word.capitalize()
        add(separator + word)
        separator = " "
        capitalize = False
        if len(pieces) < length - 1 and rng.random() < 0.1:
            if rng.random() < 0.5:
                add(",")
            else:
                add(".")
                capitalize = True
                separator = "\n" if rng.random() < 0.3 else " "
    add(".")
    return "".join(pieces), tuple(ends)
