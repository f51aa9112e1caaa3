"""Streamed responses: SSE encoding, chunk pacing and client disconnects."""

import asyncio
import contextlib
from typing import TypeVar

import orjson
from starlette.types import Receive, Scope, Send

from simulator.faults import wait_for_disconnect

SSE_MEDIA_TYPE = "text/event-stream; charset=utf-8"

T = TypeVar("T")


def data_event(payload: object, terminator: bytes = b"\n\n") -> bytes:
    """Encode one SSE event with only a data field."""
    return b"data: " + orjson.dumps(payload) + terminator


def named_event(name: str, payload: object) -> bytes:
    """Encode one SSE event with an event name and a data field."""
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def interleave(sequences: list[list[T]]) -> list[T]:
    """Merge lists round-robin: the first item of each, then the second of each, ..."""
    if len(sequences) == 1:
        return list(sequences[0])
    merged = []
    for position in range(max((len(items) for items in sequences), default=0)):
        merged.extend(items[position] for items in sequences if position < len(items))
    return merged


def split_multibyte_characters(chunks: list[bytes]) -> list[bytes]:
    """Cut every chunk that contains a multi-byte UTF-8 character inside that character.

    The first byte of the first multi-byte character stays with the head, and the rest
    goes into a separate chunk, so a client that decodes each HTTP chunk on its own
    instead of buffering bytes gets invalid UTF-8.
    """
    pieces = []
    for chunk in chunks:
        cut = next((index for index, byte in enumerate(chunk) if byte >= 0xC0), None)
        if cut is None:
            pieces.append(chunk)
        else:
            pieces.append(chunk[: cut + 1])
            pieces.append(chunk[cut + 1 :])
    return pieces


class EventStreamResponse:
    """ASGI response that sends pre-encoded chunks, pausing between them.

    Each chunk goes out with its own ``send`` call and so becomes its own HTTP chunk,
    and a client disconnect stops the stream at once and sets ``cancelled``. Without a
    chunk delay or multi-byte splitting the whole body goes out in one ``send`` instead,
    because clients see the same bytes and one write is much cheaper. A disconnect is
    then not detected.
    """

    def __init__(
        self,
        chunks: list[bytes],
        headers: dict[str, str],
        chunk_delay_s: float = 0.0,
        split_multibyte: bool = False,
        media_type: str = SSE_MEDIA_TYPE,
    ) -> None:
        self.status_code = 200
        self.chunks = split_multibyte_characters(chunks) if split_multibyte else chunks
        self.paced = chunk_delay_s > 0 or split_multibyte
        self.chunk_delay_s = chunk_delay_s
        self.cancelled = False
        raw_headers = [
            (b"content-type", media_type.encode()),
            (b"cache-control", b"no-cache"),
        ]
        raw_headers.extend((name.encode(), value.encode()) for name, value in headers.items())
        self.raw_headers = raw_headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        if not self.paced:
            await send({"type": "http.response.body", "body": b"".join(self.chunks)})
            return
        # uvicorn drops writes to a closed connection without raising, so a disconnect
        # is only visible through receive().
        watcher = asyncio.ensure_future(wait_for_disconnect(receive))
        sender = asyncio.ensure_future(self._send_chunks(send))
        try:
            done, _ = await asyncio.wait((watcher, sender), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not sender.done():
                sender.cancel()
                self.cancelled = True
                with contextlib.suppress(asyncio.CancelledError):
                    await sender
        if sender in done:
            sender.result()

    async def _send_chunks(self, send: Send) -> None:
        delay = self.chunk_delay_s
        for position, chunk in enumerate(self.chunks):
            if delay and position:
                await asyncio.sleep(delay)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
