"""The demo's asynchronous part: a batch through the SDK, watched by a webhook receiver.

It registers a local receiver as a webhook endpoint and uploads
``examples/demo_batch.jsonl`` with ``client.files``. It runs the file with
``client.batches`` while a progress bar follows ``request_counts``, then waits for the
signed ``batch.completed`` event and prints the results and the cost at the batch
discount.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from broker.processes import free_port
from broker.tables import Job
from broker.webhook_receiver import WebhookReceiver

PROJECT_DIR = Path(__file__).resolve().parent.parent
DEFAULT_BATCH = PROJECT_DIR / "examples" / "demo_batch.jsonl"
# Seconds the batch may take from creation to its final status, and then to its event.
BATCH_TIMEOUT_S = 180.0
EVENT_TIMEOUT_S = 30.0
FINAL_STATUSES = ("completed", "failed", "expired", "cancelled")


@dataclass
class BatchDemoResult:
    ok: bool
    cost_micro_usd: int = 0


def _usd(micro_usd: int) -> str:
    return f"${micro_usd / 1_000_000:.6f}"


def _wait_with_progress(console: Console, client: openai.OpenAI, batch_id: str) -> object:
    """Poll the batch until it is final, showing request_counts as a progress bar."""
    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    deadline = time.monotonic() + BATCH_TIMEOUT_S
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("batch (validating)", total=None)
        while True:
            batch = client.batches.retrieve(batch_id)
            counts = batch.request_counts
            progress.update(
                task,
                description=f"batch ({batch.status})",
                total=counts.total or None,
                completed=counts.completed + counts.failed,
            )
            if batch.status in FINAL_STATUSES or time.monotonic() > deadline:
                return batch
            time.sleep(0.5)


def _results_table(output: list[dict], jobs: list[Job]) -> Table:
    by_id = {job.id: job for job in jobs}
    table = Table(title="Batch results by model")
    for header in ("model", "requests", "tokens in", "tokens out", "cost"):
        table.add_column(header, justify="left" if header == "model" else "right")
    groups: dict[str, list[Job]] = defaultdict(list)
    for line in output:
        job = by_id[line["response"]["request_id"]]
        groups[job.model].append(job)
    for model, group in sorted(groups.items()):
        table.add_row(
            model,
            str(len(group)),
            str(sum(job.prompt_tokens for job in group)),
            str(sum(job.completion_tokens for job in group)),
            _usd(sum(job.cost_micro_usd or 0 for job in group)),
        )
    return table


def run_batch_demo(
    console: Console,
    base_url: str,
    api_key: str,
    sessions: sessionmaker[Session],
    path: Path = DEFAULT_BATCH,
) -> BatchDemoResult:
    """Run one batch end to end and return whether every check passed, with its cost."""
    receiver = WebhookReceiver(port=free_port())
    receiver.start()
    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=60)
    try:
        registered = httpx.post(
            f"{base_url}/webhook_endpoints",
            json={"url": receiver.url},
            headers={"authorization": f"Bearer {api_key}"},
            timeout=30,
        )
        registered.raise_for_status()
        receiver.secret = registered.json()["secret"]
        with path.open("rb") as handle:
            uploaded = client.files.create(file=handle, purpose="batch")
        batch = client.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"source": path.name},
        )
        console.print(
            f"batch {batch.id}: {uploaded.bytes} bytes uploaded as {uploaded.id}; "
            f"webhook receiver at {receiver.url}"
        )
        batch = _wait_with_progress(console, client, batch.id)
        deadline = time.monotonic() + EVENT_TIMEOUT_S
        events = []
        while not events and time.monotonic() < deadline:
            events = [
                event
                for event in receiver.of_type(f"batch.{batch.status}")
                if event.payload["data"]["id"] == batch.id
            ]
            time.sleep(0.2)
        output = []
        if batch.output_file_id:
            content = client.files.content(batch.output_file_id).read()
            output = [json.loads(line) for line in content.splitlines() if line.strip()]
    except (openai.APIError, httpx.HTTPError, OSError) as exc:
        console.print(f"[bold red]batch demo failed:[/] {type(exc).__name__}: {exc}")
        return BatchDemoResult(ok=False)
    finally:
        receiver.stop()
        client.close()

    with sessions() as session:
        jobs = list(session.scalars(select(Job).where(Job.batch_id == batch.id)))
    cost = sum(job.cost_micro_usd or 0 for job in jobs)
    expected_ids = {json.loads(line)["custom_id"] for line in path.read_text().splitlines()}
    console.print(_results_table(output, jobs))
    counts = batch.request_counts
    console.print(
        f"batch {batch.id} {batch.status}: {counts.completed} of {counts.total} completed, "
        f"{counts.failed} failed; cost {_usd(cost)} at the batch discount"
    )
    if events:
        console.print(
            f"verified webhook event batch.{batch.status} (webhook-id {events[0].webhook_id}, "
            f"{receiver.rejected} rejected signatures)"
        )
    else:
        console.print(f"[red]no verified batch event within {EVENT_TIMEOUT_S:g} s[/]")
    ok = (
        batch.status == "completed"
        and counts.failed == 0
        and bool(events)
        and receiver.rejected == 0
        and {line["custom_id"] for line in output} == expected_ids
    )
    return BatchDemoResult(ok=ok, cost_micro_usd=cost)
