"""Provider adapters, one module per wire format, looked up by the catalog's format name."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from workers.adapters import anthropic, gemini, openai, openai_stream
from workers.adapters.base import UpstreamResult

ChatCall = Callable[..., UpstreamResult]
StreamCall = Callable[..., Iterator[dict[str, Any]]]


@dataclass(frozen=True)
class Adapter:
    """The calls one wire format supports; ``None`` where the format has no such endpoint."""

    chat_completion: ChatCall
    stream_chat_completion: StreamCall
    embeddings: ChatCall | None
    unsupported_parameters: Callable[[dict[str, Any]], list[str]]


def _openai_unsupported(_body: dict[str, Any]) -> list[str]:
    # OpenAI-compatible providers receive the body as sent; they reject what they lack.
    return []


ADAPTERS: dict[str, Adapter] = {
    "openai": Adapter(
        openai.chat_completion,
        openai_stream.stream_chat_completion,
        openai_stream.embeddings,
        _openai_unsupported,
    ),
    "anthropic": Adapter(
        anthropic.chat_completion,
        anthropic.stream_chat_completion,
        None,
        anthropic.unsupported_parameters,
    ),
    "gemini": Adapter(
        gemini.chat_completion,
        gemini.stream_chat_completion,
        gemini.embeddings,
        gemini.unsupported_parameters,
    ),
}


def adapter_for(wire_format: str) -> Adapter | None:
    return ADAPTERS.get(wire_format)
