"""Streamed chat completions: time to first token and total time, broker and direct.

The simulator paces its chunks ``STREAM_CHUNK_DELAY_MS`` apart during this measurement,
so the total time covers a real stream and not one write. While the broker rejects
``stream: true`` with 400, only the direct figures are taken and the page gives the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import httpx

from bench.load import run_python_client
from bench.stack import BenchStack
from bench.sync_matrix import Target

# Milliseconds between two chunks of a simulated stream.
STREAM_CHUNK_DELAY_MS = 10


def probe_broker(target: Target, body_path: Path) -> str | None:
    """Send one streamed request to the broker; return why streaming is skipped, or None."""
    headers = {"Authorization": f"Bearer {target.token}", "Content-Type": "application/json"}
    response = httpx.post(target.url, content=body_path.read_bytes(), headers=headers, timeout=60)
    if target.after_run is not None:
        target.after_run()
    if 200 <= response.status_code < 300:
        return None
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:300]
    return (
        f"The broker answered {response.status_code} to a request with stream true "
        f'("{message}"), so the broker side was skipped. It runs once the broker streams.'
    )


def measure_streaming(
    stack: BenchStack,
    broker: Target,
    direct: Target,
    body_path: Path,
    *,
    requests_per_concurrency: dict[int, int],
    rounds: int,
    log: Callable[[str], None],
) -> dict[str, object]:
    """Measure both targets at each concurrency with a fixed number of streamed requests."""
    note = probe_broker(broker, body_path)
    if note is not None:
        log(f"streaming: {note}")
    targets: Sequence[Target] = (direct,) if note is not None else (direct, broker)
    rows: list[dict[str, object]] = []
    stack.configure_simulators(stream_chunk_delay_ms=STREAM_CHUNK_DELAY_MS)
    try:
        for round_number in range(1, rounds + 1):
            for concurrency, requests in requests_per_concurrency.items():
                for target in targets:
                    data = run_python_client(
                        target.url,
                        body_path,
                        target.token,
                        concurrency,
                        requests=requests,
                        stream=True,
                    )
                    if target.after_run is not None:
                        target.after_run()
                    rows.append({"target": target.name, "round": round_number, **data})
                    log(
                        f"streaming round {round_number} concurrency {concurrency} "
                        f"{target.name}: first token p50 {data['first_token_ms']['p50']:.1f} ms, "
                        f"total p50 {data['latency_ms']['p50']:.1f} ms, non-2xx {data['non2xx']}"
                    )
    finally:
        stack.configure_simulators(stream_chunk_delay_ms=0)
    return {"skipped_broker": note, "chunk_delay_ms": STREAM_CHUNK_DELAY_MS, "rows": rows}
