"""A large batch through the Files and Batch APIs, and interactive latency beside it.

The input file is uploaded and the batch created with the ``openai`` SDK, as a client
would. The billing worker consumes the batches queue, so it validates the file and
creates the jobs. The API only stores the upload. The RSS of both is sampled.
The upstream latency is 0, so the broker sets the pace. Synchronous chat completions at
a small concurrency are timed before the batch and again while it runs.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
from sqlalchemy import func, select

from bench import procstat
from bench.inflight import first_log_error
from bench.load import LoadResult, run_sync_load
from bench.settlement import STALL_TIMEOUT_S
from bench.stack import BenchError, BenchStack
from bench.sync_matrix import CHAT_PATH
from broker.tables import Batch, Job, as_utc

ENDPOINT = "/v1/chat/completions"
FINAL_STATUSES = ("completed", "failed", "expired", "cancelled")
# Synchronous requests in flight while the interactive latency is measured.
INTERACTIVE_CONCURRENCY = 10
SAMPLE_INTERVAL_S = 0.25
# Seconds between two reads of the batch's progress from the database.
PROGRESS_INTERVAL_S = 1.0
# Seconds a cancelled batch gets to reach its final status.
CANCEL_WAIT_S = 60.0
# Seconds the SDK waits for one response, because uploading 100,000 lines takes a while.
CLIENT_TIMEOUT_S = 600.0


def write_input(path: Path, body: dict[str, Any], requests: int) -> int:
    """Write ``requests`` lines in OpenAI's batch input format; return the file's bytes.

    Each line has a slightly different prompt, so that no cache can serve it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    system, user = body["messages"][0], body["messages"][-1]
    with path.open("w") as handle:
        for number in range(requests):
            question = {"role": "user", "content": f"{user['content']} (request {number})"}
            line = {
                "custom_id": f"request-{number}",
                "method": "POST",
                "url": ENDPOINT,
                "body": {**body, "messages": [system, question]},
            }
            handle.write(json.dumps(line) + "\n")
    return path.stat().st_size


@dataclass
class Progress:
    """Observations of ``BatchSampler``: RSS in KiB, times from ``time.monotonic()``."""

    rss_max_kib: dict[str, int] = field(default_factory=dict)
    status: str = "validating"
    jobs_created: int = 0
    all_jobs_created_at: float | None = None
    completed: int = 0
    failed: int = 0
    # The last time completed + failed grew.
    changed_at: float = 0.0


class BatchSampler:
    """Samples the RSS of the given processes and, less often, the batch's progress."""

    def __init__(
        self, stack: BenchStack, batch_id: str, account_id: str, pids: dict[str, int]
    ) -> None:
        self.stack = stack
        self.batch_id = batch_id
        self.account_id = account_id
        self.pids = pids
        self.progress = Progress(rss_max_kib={name: 0 for name in pids})
        self.progress.changed_at = time.monotonic()
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="batch-sampler", daemon=True)

    def __enter__(self) -> BatchSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        next_progress = 0.0
        try:
            while not self._stop.is_set():
                for name, pid in self.pids.items():
                    rss = procstat.rss_kib(pid)
                    self.progress.rss_max_kib[name] = max(self.progress.rss_max_kib[name], rss)
                if time.monotonic() >= next_progress:
                    self._read_progress()
                    next_progress = time.monotonic() + PROGRESS_INTERVAL_S
                self._stop.wait(SAMPLE_INTERVAL_S)
        except BaseException as exc:  # noqa: BLE001  (re-raised by the measuring thread)
            self.error = exc

    def _read_progress(self) -> None:
        progress = self.progress
        with self.stack.engine.connect() as connection:
            status, total, completed, failed = connection.execute(
                select(Batch.status, Batch.total, Batch.completed, Batch.failed).where(
                    Batch.id == self.batch_id
                )
            ).one()
            if progress.all_jobs_created_at is None and status != "validating":
                progress.jobs_created = connection.execute(
                    select(func.count()).select_from(Job).where(Job.batch_id == self.batch_id)
                ).scalar_one()
                if total and progress.jobs_created >= total:
                    progress.all_jobs_created_at = time.monotonic()
        if completed + failed != progress.completed + progress.failed:
            progress.changed_at = time.monotonic()
        progress.status, progress.completed, progress.failed = status, completed, failed


def _load_fields(load: LoadResult) -> dict[str, Any]:
    return {
        "command": load.command,
        "responses": load.responses,
        "requests_per_s": load.requests_per_s,
        "p50_ms": load.p50_ms,
        "p90_ms": load.p90_ms,
        "p99_ms": load.p99_ms,
        "non2xx": load.non2xx,
        "socket_errors": load.socket_errors,
        "first_failure": load.first_failure,
    }


def _batch_row(stack: BenchStack, batch_id: str) -> Batch:
    with stack.engine.connect() as connection:
        return connection.execute(select(Batch).where(Batch.id == batch_id)).one()


def _seconds(start: Any, end: Any) -> float | None:
    if start is None or end is None:
        return None
    return (as_utc(end) - as_utc(start)).total_seconds()


def _wait_status(
    sampler: BatchSampler, statuses: tuple[str, ...], stack: BenchStack, max_wait_s: float
) -> bool:
    """Wait until the sampled status is one of ``statuses``; return False after ``max_wait_s``."""
    deadline = time.monotonic() + max_wait_s
    while sampler.progress.status not in statuses:
        if sampler.error is not None:
            raise BenchError(f"reading the batch's progress failed: {sampler.error}")
        stack.check_processes()
        if time.monotonic() > deadline:
            return False
        time.sleep(SAMPLE_INTERVAL_S)
    return True


def _wait_done(sampler: BatchSampler, stack: BenchStack, deadline: float) -> str:
    """Wait for the batch to end; return "done", "cap" (deadline passed) or "stalled"."""
    while sampler.progress.status not in FINAL_STATUSES:
        if sampler.error is not None:
            raise BenchError(f"reading the batch's progress failed: {sampler.error}")
        stack.check_processes()
        now = time.monotonic()
        if now > deadline:
            return "cap"
        if now - sampler.progress.changed_at > STALL_TIMEOUT_S:
            return "stalled"
        time.sleep(SAMPLE_INTERVAL_S)
    return "done"


def measure_batch(
    stack: BenchStack,
    body: dict[str, Any],
    body_path: Path,
    *,
    requests: int,
    interactive_s: float,
    warmup_s: float,
    max_wait_s: float,
    workdir: Path,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Run a batch of ``requests`` lines and interactive load beside it; return the figures.

    Stops waiting ``max_wait_s`` seconds after the batch went in progress, records how
    far it got, and cancels it.
    """
    stack.configure_simulators(latency_ms=0)
    account = stack.new_account("bench-batch")
    chat_url = stack.api_url + CHAT_PATH
    log(f"batch: interactive load at concurrency {INTERACTIVE_CONCURRENCY}, no batch running")
    baseline = run_sync_load(
        chat_url, body_path, account.api_key, INTERACTIVE_CONCURRENCY, interactive_s, warmup_s
    )
    input_path = workdir / "batch-input.jsonl"
    input_bytes = write_input(input_path, body, requests)
    pids = {name: stack.group.processes[name].pid for name in ("api", "billing")}
    rss_before = {name: procstat.rss_kib(pid) for name, pid in pids.items()}
    client = openai.OpenAI(
        base_url=stack.api_url + "/v1",
        api_key=account.api_key,
        max_retries=0,
        timeout=CLIENT_TIMEOUT_S,
    )
    try:
        log(f"batch: uploading {requests} lines ({input_bytes / 1e6:.1f} MB)")
        upload_started = time.monotonic()
        with input_path.open("rb") as handle:
            stored = client.files.create(file=handle, purpose="batch")
        upload_s = time.monotonic() - upload_started
        rss_after_upload = {name: procstat.rss_kib(pid) for name, pid in pids.items()}
        batch = client.batches.create(
            input_file_id=stored.id, endpoint=ENDPOINT, completion_window="24h"
        )
        with BatchSampler(stack, batch.id, account.id, pids) as sampler:
            figures = _run_batch(
                stack,
                client,
                sampler,
                batch.id,
                chat_url=chat_url,
                body_path=body_path,
                api_key=account.api_key,
                interactive_s=interactive_s,
                warmup_s=warmup_s,
                max_wait_s=max_wait_s,
                log=log,
            )
        final = client.batches.retrieve(batch.id)
        output = _read_output(client, final.output_file_id)
    finally:
        client.close()
        input_path.unlink(missing_ok=True)
    log("batch: waiting for every job of the account to settle")
    settled = stack.wait_jobs(account.id, settled=True, stall_timeout_s=STALL_TIMEOUT_S)
    wallet = stack.wallet_check(account.wallet_id)
    row = _database_times(stack, batch.id)
    interactive = figures.pop("interactive")
    result = {
        "requests": requests,
        "input_bytes": input_bytes,
        "upload_s": upload_s,
        **row,
        **figures,
        "final_status": final.status,
        "request_counts": final.request_counts.model_dump(),
        "output_lines": len(output),
        "output_custom_ids_match": _custom_ids_match(output, final.request_counts.completed),
        "output_non_200": sum(1 for line in output if line["response"]["status_code"] != 200),
        "account_jobs": {"total": settled.total, "never_settled": settled.unsettled},
        "statuses": stack.job_statuses(account.id),
        "wallet": {"matches_ledger": wallet.ok, "held_micro_usd": wallet.held_micro_usd},
        "rss_kib": {
            name: {
                "before": rss_before[name],
                "after_upload": rss_after_upload[name],
                "max": sampler.progress.rss_max_kib[name],
                "lifetime_peak": procstat.peak_rss_kib(pid),
            }
            for name, pid in pids.items()
        },
        "interactive": {
            "concurrency": INTERACTIVE_CONCURRENCY,
            "duration_s": interactive_s,
            "baseline": _load_fields(baseline),
            **interactive,
        },
    }
    _check(result)
    return result


def _run_batch(
    stack: BenchStack,
    client: openai.OpenAI,
    sampler: BatchSampler,
    batch_id: str,
    *,
    chat_url: str,
    body_path: Path,
    api_key: str,
    interactive_s: float,
    warmup_s: float,
    max_wait_s: float,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Follow the batch from validation to its end, with interactive load while it runs."""
    if not _wait_status(sampler, ("in_progress", *FINAL_STATUSES), stack, max_wait_s):
        raise BenchError(f"batch {batch_id} was still validating after {max_wait_s:g} s")
    if sampler.progress.status == "failed":
        errors = client.batches.retrieve(batch_id).errors
        raise BenchError(f"batch {batch_id} failed validation: {errors}")
    in_progress_at = time.monotonic()
    log(f"batch: in progress; interactive load for {warmup_s + interactive_s:g} s beside it")
    during = run_sync_load(
        chat_url, body_path, api_key, INTERACTIVE_CONCURRENCY, interactive_s, warmup_s
    )
    ran_throughout = sampler.progress.status == "in_progress"
    log("batch: waiting for it to complete")
    outcome = _wait_done(sampler, stack, in_progress_at + max_wait_s)
    at_stop = {
        "outcome": outcome,
        "completed": sampler.progress.completed,
        "failed": sampler.progress.failed,
        "seconds_in_progress": time.monotonic() - in_progress_at,
    }
    if outcome != "done":
        log(
            f"batch: {outcome} after {at_stop['seconds_in_progress']:.0f} s with "
            f"{at_stop['completed']} completed; cancelling it"
        )
        client.batches.cancel(batch_id)
        if not _wait_status(sampler, FINAL_STATUSES, stack, CANCEL_WAIT_S):
            raise BenchError(
                f"batch {batch_id} {outcome} with {at_stop['completed']} of its requests "
                f"completed and did not end within {CANCEL_WAIT_S:g} s of its cancel. Jobs "
                f"in each status: {stack.job_statuses(sampler.account_id)}. "
                + _first_worker_error(stack)
            )
    progress = sampler.progress
    all_created_s = (
        progress.all_jobs_created_at - in_progress_at
        if progress.all_jobs_created_at is not None
        else None
    )
    return {
        "at_stop": at_stop,
        "all_jobs_created_after_s": all_created_s,
        "interactive": {"during": _load_fields(during), "batch_ran_throughout": ran_throughout},
    }


def _first_worker_error(stack: BenchStack) -> str:
    """Name the first CRITICAL or ERROR line of the us and billing workers' logs."""
    for name in ("worker-us", "billing"):
        line = first_log_error(stack, name)
        if line:
            return f"First error in the {name} log: {line}"
    return "The us and billing worker logs show no error."


def _database_times(stack: BenchStack, batch_id: str) -> dict[str, Any]:
    """Return the batch's phases in seconds, from the status timestamps it stores."""
    batch = _batch_row(stack, batch_id)
    end = batch.completed_at or batch.cancelled_at or batch.expired_at
    running_s = _seconds(batch.in_progress_at, batch.finalizing_at)
    return {
        "batch_id": batch_id,
        "validating_s": _seconds(batch.created_at, batch.in_progress_at),
        "in_progress_s": running_s,
        "finalizing_s": _seconds(batch.finalizing_at, end),
        "created_to_end_s": _seconds(batch.created_at, end),
        "jobs_per_s": batch.completed / running_s if running_s else None,
    }


def _read_output(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    content = client.files.content(file_id).read()
    return [json.loads(line) for line in content.splitlines() if line.strip()]


def _custom_ids_match(output: list[dict[str, Any]], completed: int) -> bool:
    """Return whether the output has ``completed`` distinct custom_ids, all from the input."""
    ids = {line["custom_id"] for line in output}
    return len(ids) == len(output) == completed and all(
        custom_id.startswith("request-") for custom_id in ids
    )


def _check(result: dict[str, Any]) -> None:
    """Raise BenchError when the batch's counts do not add up, so nothing is recorded."""
    counts = result["request_counts"]
    problems = []
    if counts["total"] != result["requests"]:
        problems.append(f"request_counts.total is {counts['total']}, expected {result['requests']}")
    if counts["completed"] + counts["failed"] != counts["total"]:
        problems.append(f"completed + failed differ from total: {counts}")
    if result["final_status"] == "completed" and counts["failed"]:
        problems.append(f"{counts['failed']} requests failed")
    if result["output_lines"] != counts["completed"] or not result["output_custom_ids_match"]:
        problems.append(
            f"the output file has {result['output_lines']} lines for {counts['completed']} "
            "completed requests, or custom_ids that repeat or are not from the input"
        )
    if result["output_non_200"]:
        problems.append(f"{result['output_non_200']} output lines have a status other than 200")
    if result["account_jobs"]["never_settled"]:
        problems.append(f"{result['account_jobs']['never_settled']} jobs were never settled")
    if not result["wallet"]["matches_ledger"] or result["wallet"]["held_micro_usd"]:
        problems.append(f"the wallet is off after settlement: {result['wallet']}")
    if problems:
        raise BenchError("the batch measurement is invalid: " + "; ".join(problems))
