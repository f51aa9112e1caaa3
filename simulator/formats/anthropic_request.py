"""Request parsing, validation and prompt token counting for the Anthropic format."""

import hashlib
from typing import Any

import orjson
from starlette.requests import Request

from simulator.content import (
    TOOLS_AUTO,
    TOOLS_NAMED,
    TOOLS_NONE,
    TOOLS_REQUIRED,
    ToolSpec,
)
from simulator.formats.common import invalid, json_text
from simulator.tokens import (
    IMAGE_TOKENS,
    MESSAGE_OVERHEAD_TOKENS,
    REPLY_PRIMING_TOKENS,
    count_tokens,
)

MEDIA_BLOCKS = frozenset({"image", "document"})


class PromptSummary:
    """Texts and token counts of a Messages request, with its cache_control prefix.

    The cached prefix runs up to and including the last block that carries
    ``cache_control``, in the order tools, system, messages. A top-level
    ``cache_control`` marks the whole prompt. Tool definitions add no tokens.
    """

    def __init__(self, body: dict) -> None:
        self.texts: list[str] = []
        self.tokens = REPLY_PRIMING_TOKENS
        self.last_user_text = ""
        self.cached_prefix_tokens = 0
        self.cached_prefix_key = b""
        # Hashing every block costs time, so it happens only when something is marked.
        self._hash = None
        if _has_cache_control(body):
            self._hash = hashlib.blake2b(str(body.get("model")).encode(), digest_size=16)

        for tool in body.get("tools") or []:
            self._add_item(tool, [], 0)
        system = body.get("system")
        if system is not None:
            self.tokens += MESSAGE_OVERHEAD_TOKENS
            for block in _blocks(system, "system"):
                self._add_block(block, "system")
        for position, message in enumerate(body["messages"]):
            self.tokens += MESSAGE_OVERHEAD_TOKENS
            label = f"messages.{position}.content"
            texts_before = len(self.texts)
            for block in _blocks(message.get("content"), label):
                self._add_block(block, label)
            if message.get("role") == "user":
                self.last_user_text = "\n".join(self.texts[texts_before:])

        if body.get("cache_control") is not None:
            self._mark_prefix()

    def _add_block(self, block: Any, label: str) -> None:
        if not isinstance(block, dict):
            raise invalid(f"{label}: each content block must be an object")
        block_type = block.get("type")
        texts: list[str] = []
        media = 0
        if block_type == "text":
            texts.append(str(block.get("text", "")))
        elif block_type in MEDIA_BLOCKS:
            media = 1
        elif block_type == "tool_use":
            texts += [str(block.get("name", "")), json_text(block.get("input", {}))]
        elif block_type == "tool_result":
            inner = block.get("content")
            if isinstance(inner, str):
                texts.append(inner)
            for part in inner if isinstance(inner, list) else []:
                if isinstance(part, dict) and part.get("type") == "text":
                    texts.append(str(part.get("text", "")))
                elif isinstance(part, dict) and part.get("type") in MEDIA_BLOCKS:
                    media += 1
        elif block_type in ("thinking", "redacted_thinking"):
            texts.append(str(block.get("thinking", "")))
        else:
            raise invalid(f"{label}: unsupported content block type {block_type!r}")
        self._add_item(block, texts, media)

    def _add_item(self, item: dict, texts: list[str], media: int) -> None:
        self.texts.extend(texts)
        self.tokens += sum(count_tokens(text) for text in texts) + media * IMAGE_TOKENS
        if self._hash is not None:
            self._hash.update(orjson.dumps(item, option=orjson.OPT_SORT_KEYS))
            if item.get("cache_control") is not None:
                self._mark_prefix()

    def _mark_prefix(self) -> None:
        self.cached_prefix_tokens = self.tokens
        self.cached_prefix_key = self._hash.copy().digest()


def _blocks(content: Any, label: str) -> list:
    """Return the content blocks of a system prompt or message, wrapping a plain string."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise invalid(f"{label}: Input should be a string or a list of content blocks")
    return content


def _has_cache_control(body: dict) -> bool:
    if body.get("cache_control") is not None:
        return True
    items: list[Any] = list(body.get("tools") or [])
    system = body.get("system")
    if isinstance(system, list):
        items.extend(system)
    for message in body["messages"]:
        content = message.get("content")
        if isinstance(content, list):
            items.extend(content)
    return any(isinstance(item, dict) and item.get("cache_control") is not None for item in items)


def check_request(request: Request, body: dict) -> None:
    if not request.headers.get("anthropic-version"):
        raise invalid("anthropic-version: header is required")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise invalid("model: Field required")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages: Field required and must be a non-empty list")
    for position, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise invalid(f"messages.{position}.role: Input should be 'user' or 'assistant'")


def has_tool_result(message: dict) -> bool:
    content = message.get("content")
    return isinstance(content, list) and any(
        isinstance(block, dict) and block.get("type") == "tool_result" for block in content
    )


def parse_tools(value: Any) -> list[ToolSpec]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise invalid("tools: Input should be a valid list")
    tools = []
    for position, tool in enumerate(value):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise invalid(f"tools.{position}.name: Field required")
        schema = tool.get("input_schema")
        if schema is None and tool.get("type", "custom") != "custom":
            # Server tools such as web search have no input schema and are not called.
            continue
        if not isinstance(schema, dict):
            raise invalid(f"tools.{position}.input_schema: Field required")
        tools.append(ToolSpec(tool["name"], schema))
    return tools


def parse_tool_choice(value: Any, tools: list[ToolSpec]) -> tuple[str, str | None, bool]:
    """Return the tool mode, the named tool and whether to make two parallel calls.

    Two tools are called only when ``disable_parallel_tool_use`` is explicitly false.
    """
    if value is None:
        return TOOLS_AUTO, None, False
    choice_type = value.get("type") if isinstance(value, dict) else None
    parallel = value.get("disable_parallel_tool_use") is False if choice_type else False
    if choice_type == "auto":
        return TOOLS_AUTO, None, parallel
    if choice_type == "any":
        return TOOLS_REQUIRED, None, parallel
    if choice_type == "none":
        return TOOLS_NONE, None, False
    if choice_type == "tool":
        name = value.get("name")
        if name not in {tool.name for tool in tools}:
            raise invalid(f"tool_choice.name: no tool named {name!r} in tools")
        return TOOLS_NAMED, name, False
    raise invalid("tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'")
