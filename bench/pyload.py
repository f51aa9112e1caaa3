"""Python load generator (asyncio, httpx): ``python -m bench.pyload --url URL --body FILE``.

It sends the same JSON body with ``concurrency`` requests in flight until ``--requests``
requests are done or ``--duration`` seconds have passed, then prints one JSON object.
With ``--stream`` it reads each response as server-sent events and also reports the
time to first token: the first event whose ``choices[0].delta.content`` is not empty.
Latencies are in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import uvloop

# Seconds one request may take before it counts as an error.
REQUEST_TIMEOUT_S = 60.0


@dataclass
class Tally:
    latencies_ms: list[float] = field(default_factory=list)
    first_token_ms: list[float] = field(default_factory=list)
    non2xx: int = 0
    errors: int = 0
    # Requests sent again, with the same Idempotency-Key, after a connection error.
    retries: int = 0
    first_retry_cause: str = ""
    first_failure: str = ""
    # Responses that arrived after the warm-up.
    counted: int = 0
    counted_from: float = 0.0


def percentile(values: list[float], share: float) -> float:
    """Return the ``share`` quantile (0 to 1) with linear interpolation; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    position = share * (len(ordered) - 1)
    lower = int(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


def summary(values: list[float]) -> dict[str, float]:
    return {
        name: percentile(values, share)
        for name, share in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))
    }


def _first_content_event(line: str) -> bool:
    if not line.startswith("data:"):
        return False
    payload = line[len("data:") :].strip()
    if not payload or payload == "[DONE]":
        return False
    try:
        choices = json.loads(payload).get("choices") or []
    except (ValueError, AttributeError):
        return False
    return any((choice.get("delta") or {}).get("content") for choice in choices)


async def send_one(
    client: httpx.AsyncClient,
    url: str,
    body: bytes,
    stream: bool,
    tally: Tally,
    retries: int = 0,
) -> None:
    """Send one request. With ``retries``, it carries an Idempotency-Key and is sent
    again with the same key after a connection error, as the openai SDK does."""
    headers = {"Idempotency-Key": uuid.uuid4().hex} if retries else {}
    for attempt in range(retries + 1):
        try:
            await _send_once(client, url, body, stream, tally, headers)
            return
        except httpx.TransportError as exc:
            if attempt == retries:
                tally.errors += 1
                tally.first_failure = tally.first_failure or f"{type(exc).__name__}: {exc}"
                return
            tally.retries += 1
            tally.first_retry_cause = tally.first_retry_cause or type(exc).__name__
        except httpx.HTTPError as exc:
            tally.errors += 1
            tally.first_failure = tally.first_failure or f"{type(exc).__name__}: {exc}"
            return


async def _send_once(
    client: httpx.AsyncClient,
    url: str,
    body: bytes,
    stream: bool,
    tally: Tally,
    headers: dict[str, str],
) -> None:
    started = time.perf_counter()
    async with client.stream("POST", url, content=body, headers=headers) as response:
        if not 200 <= response.status_code < 300:
            text = (await response.aread()).decode(errors="replace")
            tally.non2xx += 1
            if time.perf_counter() >= tally.counted_from:
                tally.counted += 1
            tally.first_failure = tally.first_failure or f"{response.status_code} {text[:300]}"
            return
        if stream:
            first_token_ms = None
            async for line in response.aiter_lines():
                if first_token_ms is None and _first_content_event(line):
                    first_token_ms = (time.perf_counter() - started) * 1000
            if first_token_ms is not None:
                tally.first_token_ms.append(first_token_ms)
        else:
            await response.aread()
    finished = time.perf_counter()
    tally.latencies_ms.append((finished - started) * 1000)
    if finished >= tally.counted_from:
        tally.counted += 1


async def drive(args: argparse.Namespace) -> dict[str, object]:
    body = Path(args.body).read_bytes()
    headers = {"Authorization": f"Bearer {args.api_key}", "Content-Type": "application/json"}
    limits = httpx.Limits(
        max_connections=args.concurrency, max_keepalive_connections=args.concurrency
    )
    tally = Tally()
    issued = 0
    started = time.perf_counter()
    tally.counted_from = started + args.warmup
    deadline = started + args.duration if args.duration else None

    async with httpx.AsyncClient(
        headers=headers, limits=limits, timeout=REQUEST_TIMEOUT_S
    ) as client:

        async def loop() -> None:
            nonlocal issued
            while True:
                if args.requests is not None and issued >= args.requests:
                    return
                if deadline is not None and time.perf_counter() >= deadline:
                    return
                issued += 1
                await send_one(client, args.url, body, args.stream, tally, args.retries)

        await asyncio.gather(*(loop() for _ in range(args.concurrency)))
    elapsed_s = time.perf_counter() - started
    return {
        "tool": "bench/pyload.py",
        "url": args.url,
        "concurrency": args.concurrency,
        "stream": args.stream,
        "duration_s": elapsed_s,
        "counted_duration_s": max(elapsed_s - args.warmup, 0.0),
        "counted": tally.counted,
        "requests": len(tally.latencies_ms) + tally.non2xx,
        "non2xx": tally.non2xx,
        "errors": tally.errors,
        "first_failure": tally.first_failure,
        "retries": tally.retries,
        "first_retry_cause": tally.first_retry_cause,
        "latency_ms": summary(tally.latencies_ms),
        "first_token_ms": summary(tally.first_token_ms),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pyload", description=__doc__)
    parser.add_argument("--url", required=True, help="URL to POST to")
    parser.add_argument("--body", required=True, help="file holding the JSON request body")
    parser.add_argument("--api-key", required=True, help="bearer token sent with each request")
    parser.add_argument("--concurrency", type=int, default=1, help="requests in flight")
    parser.add_argument("--requests", type=int, help="stop after this many requests")
    parser.add_argument("--duration", type=float, help="stop after this many seconds")
    parser.add_argument("--stream", action="store_true", help="read responses as SSE streams")
    parser.add_argument(
        "--retries",
        type=int,
        default=0,
        help="send a request again after a connection error, with the same Idempotency-Key",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=0.0,
        help="seconds at the start whose responses are left out of 'counted'",
    )
    args = parser.parse_args(argv)
    if args.requests is None and args.duration is None:
        parser.error("give --requests, --duration or both")
    result = uvloop.run(drive(args))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
