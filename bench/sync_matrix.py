"""Synchronous chat completions: requests per second and latency per target and setting."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.load import run_sync_load

CHAT_PATH = "/v1/chat/completions"
# The simulator serves OpenAI's wire format for the provider "openai" under this path.
SIMULATOR_CHAT_PATH = "/openai/v1/chat/completions"


@dataclass(frozen=True)
class Target:
    """An endpoint under load: the broker, the simulator itself, or the LiteLLM proxy.

    ``after_run`` runs after each load run, outside the timed part. The broker's waits
    until every job of the run has finished, so that no run's jobs spill into the next.
    """

    name: str
    url: str
    token: str
    after_run: Callable[[], None] | None = None


def warm_up(targets: Sequence[Target], body_path: Path, duration_s: float) -> None:
    """Send unrecorded load to each target, so that connections and caches are warm."""
    for target in targets:
        run_sync_load(target.url, body_path, target.token, 50, duration_s)
        if target.after_run is not None:
            target.after_run()


def run_matrix(
    targets: Sequence[Target],
    set_latency: Callable[[int], None],
    *,
    latencies_ms: Sequence[int],
    concurrencies: Sequence[int],
    rounds: int,
    duration_s: float,
    warmup_s: float,
    body_path: Path,
    log: Callable[[str], None],
) -> list[dict[str, object]]:
    """Run every target at every latency and concurrency, ``rounds`` times; return the rows.

    Each run lasts ``warmup_s + duration_s`` seconds, and its rate counts the responses
    after the warm-up.

    Within a round the targets take turns at each setting, in reverse order in every
    second round, so that neither side always runs on a machine just warmed by the other.
    """
    rows: list[dict[str, object]] = []
    try:
        for round_number in range(1, rounds + 1):
            ordered = list(targets) if round_number % 2 else list(reversed(targets))
            for latency_ms in latencies_ms:
                set_latency(latency_ms)
                for concurrency in concurrencies:
                    for target in ordered:
                        result = run_sync_load(
                            target.url,
                            body_path,
                            target.token,
                            concurrency,
                            duration_s,
                            warmup_s,
                        )
                        if target.after_run is not None:
                            target.after_run()
                        row = {
                            "target": target.name,
                            "latency_ms": latency_ms,
                            "round": round_number,
                            **result.to_dict(),
                        }
                        rows.append(row)
                        log(
                            f"sync round {round_number} latency {latency_ms} ms concurrency "
                            f"{concurrency} {target.name}: {result.requests_per_s:.0f} req/s, "
                            f"p50 {result.p50_ms:.1f} ms, p99 {result.p99_ms:.1f} ms, "
                            f"non-2xx {result.non2xx}, socket errors {result.socket_errors}"
                        )
    finally:
        set_latency(0)
    return rows
