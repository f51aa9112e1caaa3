"""Streamed jobs: relay upstream chunks to the waiting API process as they arrive.

Each chunk is pushed onto the API process's reply list, where its single reader hands
it to the request's server-sent event stream. The worker also assembles the chunks into
one chat completion, which becomes the job's stored response. A client that goes away
sets a cancel key; the worker checks it between chunks and closes the upstream call.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from workers.adapters.base import UpstreamError

# Seconds between checks of the cancel key while chunks flow.
CANCEL_CHECK_INTERVAL_S = 0.25


def cancel_key(job_id: str) -> str:
    return f"broker:cancel:{job_id}"


class StreamAssembler:
    """Folds OpenAI chunks into the chat completion they add up to."""

    def __init__(self) -> None:
        self.id: str | None = None
        self.created: int | None = None
        self.model: str | None = None
        self.choices: dict[int, dict[str, Any]] = {}
        self.usage: dict[str, Any] | None = None
        self.chunks = 0

    def add(self, chunk: dict[str, Any]) -> None:
        self.chunks += 1
        self.id = self.id or chunk.get("id")
        self.created = self.created or chunk.get("created")
        self.model = self.model or chunk.get("model")
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            self._add_choice(choice)

    def _add_choice(self, choice: dict[str, Any]) -> None:
        index = choice.get("index", 0)
        state = self.choices.setdefault(
            index, {"content": [], "tool_calls": {}, "finish_reason": None, "role": "assistant"}
        )
        delta = choice.get("delta") or {}
        if delta.get("content"):
            state["content"].append(delta["content"])
        for call in delta.get("tool_calls") or ():
            merged = state["tool_calls"].setdefault(
                call.get("index", 0),
                {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
            )
            merged["id"] = merged["id"] or call.get("id")
            function = call.get("function") or {}
            merged["function"]["name"] += function.get("name") or ""
            merged["function"]["arguments"] += function.get("arguments") or ""
        if choice.get("finish_reason"):
            state["finish_reason"] = choice["finish_reason"]

    @property
    def prompt_tokens(self) -> int:
        return int((self.usage or {}).get("prompt_tokens") or 0)

    @property
    def completion_tokens(self) -> int:
        return int((self.usage or {}).get("completion_tokens") or 0)

    def completion(self) -> dict[str, Any]:
        choices = []
        for index in sorted(self.choices):
            state = self.choices[index]
            message: dict[str, Any] = {"role": "assistant", "content": "".join(state["content"])}
            if state["tool_calls"]:
                message["tool_calls"] = [
                    state["tool_calls"][i] for i in sorted(state["tool_calls"])
                ]
                if not message["content"]:
                    message["content"] = None
            choices.append(
                {
                    "index": index,
                    "message": message,
                    "finish_reason": state["finish_reason"],
                    "logprobs": None,
                }
            )
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self.usage,
        }


def relay_stream(ctx: Any, spec: dict[str, Any], chunks: Any) -> tuple[StreamAssembler, bool]:
    """Push every chunk to the reply list; returns the assembly and whether it was cancelled.

    An ``UpstreamError`` from the adapter propagates, made non-retryable once part of the
    answer reached the client, because another attempt would repeat that part.
    """
    assembler = StreamAssembler()
    reply_to = spec.get("reply_to")
    key = cancel_key(spec["job_id"])
    next_check = time.monotonic() + CANCEL_CHECK_INTERVAL_S
    try:
        for chunk in chunks:
            assembler.add(chunk)
            if reply_to:
                message = {"job_id": spec["job_id"], "type": "chunk", "chunk": chunk}
                ctx.redis.rpush(reply_to, orjson.dumps(message))
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + CANCEL_CHECK_INTERVAL_S
                if ctx.redis.exists(key):
                    return assembler, True
    except UpstreamError as exc:
        if assembler.chunks:
            exc.retryable = False
        raise
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    return assembler, False
