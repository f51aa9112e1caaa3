"""Settled jobs per second end to end, and the billing worker's settlements per second.

A job counts as settled once the billing worker has written its charge to the ledger,
which the benchmark reads as ``jobs.settled_at`` being set. Both measurements poll the
database every ``POLL_INTERVAL_S`` seconds, so a wall-clock time has that resolution.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.load import LoadResult, run_sync_load
from bench.stack import POLL_INTERVAL_S, BenchStack, JobCounts
from bench.sync_matrix import CHAT_PATH

# Seconds without a single job finished or settled after which a wait gives up. The
# sweeper queues up to 500 repeated settle tasks at once, which the billing worker can
# take a minute to get through before it reaches the next real one.
STALL_TIMEOUT_S = 120.0
# The same for jobs to finish, which takes milliseconds per job once the load stops.
FINISH_STALL_TIMEOUT_S = 30.0


def _wait_all_settled(
    stack: BenchStack, account_id: str, started: float
) -> tuple[JobCounts, float]:
    """Poll until every job of the account is settled; return the counts and seconds.

    The seconds run from ``started`` to the last settlement seen, so a stall at the
    end (a job that never finished) does not count as settling time.
    """
    counts = stack.wait_jobs(account_id, settled=True, stall_timeout_s=STALL_TIMEOUT_S)
    return counts, counts.changed_at - started


def _load_fields(load: LoadResult) -> dict[str, object]:
    return {
        "tool": load.tool,
        "command": load.command,
        "responses": load.requests,
        "requests_per_s": load.requests_per_s,
        "non2xx": load.non2xx,
        "socket_errors": load.socket_errors,
        "first_failure": load.first_failure,
    }


def measure_settled_rate(
    stack: BenchStack,
    body_path: Path,
    *,
    concurrency: int,
    duration_s: float,
    round_number: int,
    log: Callable[[str], None],
) -> dict[str, object]:
    """Load the broker for ``duration_s`` and time it from the start until all is settled."""
    account = stack.new_account(f"bench-settled-{round_number}")
    url = stack.api_url + CHAT_PATH

    peak_unsettled = 0
    queue_at_start = stack.billing_queue_length()
    peak_queue = queue_at_start
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(
            run_sync_load, url, body_path, account.api_key, concurrency, duration_s
        )
        while not future.done():
            counts = stack.job_counts(account.id)
            peak_unsettled = max(peak_unsettled, counts.total - counts.settled)
            peak_queue = max(peak_queue, stack.billing_queue_length())
            time.sleep(POLL_INTERVAL_S)
        load = future.result()
    load_s = time.monotonic() - started

    counts, elapsed_s = _wait_all_settled(stack, account.id, started)
    queue_at_end = stack.billing_queue_length()
    jobs = counts.settled
    row = {
        "round": round_number,
        "concurrency": concurrency,
        "jobs": jobs,
        "never_settled": counts.unsettled,
        "elapsed_s": elapsed_s,
        "settled_per_s": jobs / elapsed_s if elapsed_s > 0 else 0.0,
        "load_s": load_s,
        "settle_lag_s": elapsed_s - load_s,
        "peak_unsettled": peak_unsettled,
        "billing_queue": {"start": queue_at_start, "peak": peak_queue, "end": queue_at_end},
        **_load_fields(load),
    }
    log(
        f"settled round {round_number}: {jobs} jobs in {elapsed_s:.1f} s = "
        f"{row['settled_per_s']:.0f} settled/s, peak unsettled {peak_unsettled}, "
        f"non-2xx {load.non2xx}"
    )
    return row


def measure_billing_rate(
    stack: BenchStack,
    body_path: Path,
    *,
    concurrency: int,
    duration_s: float,
    round_number: int,
    log: Callable[[str], None],
) -> dict[str, object]:
    """Finish jobs while the billing worker takes no tasks, then time how fast it settles them.

    The rate is taken between the first and the last ``settled_at``. The wall-clock
    time from the resume command to the last settlement is reported beside it.
    """
    account = stack.new_account(f"bench-billing-{round_number}")
    url = stack.api_url + CHAT_PATH
    node = stack.pause_billing()
    try:
        load = run_sync_load(url, body_path, account.api_key, concurrency, duration_s)
        backlog = stack.wait_jobs(account.id, settled=False, stall_timeout_s=FINISH_STALL_TIMEOUT_S)
        if backlog.unfinished:
            log(f"billing round {round_number}: {backlog.unfinished} jobs never finished")
    finally:
        queue_at_start = stack.billing_queue_length()
        started = time.monotonic()
        stack.resume_billing(node)
    counts, elapsed_s = _wait_all_settled(stack, account.id, started)
    queue_at_end = stack.billing_queue_length()
    jobs = counts.settled
    span_s = stack.settlement_span_s(account.id)
    row = {
        "round": round_number,
        "concurrency": concurrency,
        "jobs": jobs,
        "never_settled": counts.unsettled,
        "backlog": backlog.finished - backlog.settled,
        "billing_queue": {"start": queue_at_start, "end": queue_at_end},
        "span_s": span_s,
        "settled_per_s": (jobs - 1) / span_s if span_s > 0 else 0.0,
        "elapsed_from_resume_s": elapsed_s,
        **_load_fields(load),
    }
    log(
        f"billing round {round_number}: {jobs} jobs settled in {span_s:.2f} s = "
        f"{row['settled_per_s']:.0f} settlements/s ({elapsed_s:.1f} s from the resume)"
    )
    return row
