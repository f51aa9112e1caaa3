"""Upstream calls in flight in one region worker while the simulator takes 2 s to respond.

The us worker is replaced by one with a greenlet (and an httpx connection) per call,
and stops consuming its interactive queue. A separate client process creates every job
through ``POST /v1/jobs``, so they wait in Redis. The worker then consumes the queue
again and takes them all at once, so the worker's own limit shows, not the rate at
which one API process accepts jobs. That rate is measured too, because in steady
operation it caps the calls in flight at rate × upstream latency.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench import procstat
from bench.load import run_python_client
from bench.settlement import FINISH_STALL_TIMEOUT_S, STALL_TIMEOUT_S
from bench.stack import BenchError, BenchStack
from broker.catalog import queue_name
from broker.processes import broker_command, free_port

UPSTREAM_LATENCY_MS = 2000
REGION = "us"
# Provider of the benchmark's model, and the lane of jobs created through the API.
PROVIDER = "openai"
LANE = "interactive"
WORKER_NODE_PREFIX = f"{REGION}@"
JOBS_PATH = "/v1/jobs"
# Requests the job-creating client keeps open at once: far fewer than the calls, and
# enough that one API process, not the client, sets the rate.
SUBMIT_CONCURRENCY = 50
# Times the job-creating client sends a request again after a connection error.
SUBMIT_RETRIES = 2
SAMPLE_INTERVAL_S = 0.25
# Descriptors a process needs besides one socket per call: Redis, PostgreSQL, logs,
# shared libraries and the listening sockets. An estimate with room to spare.
FILE_DESCRIPTOR_MARGIN = 1024
GAUGE_PATTERN = re.compile(
    r'^broker_jobs_in_flight\{pool="' + REGION + r'"\} ([0-9.e+]+)$', re.MULTILINE
)


def file_descriptors_needed(calls: int) -> int:
    """Return the open-files limit that the worker and the simulator each need."""
    return calls + FILE_DESCRIPTOR_MARGIN


@dataclass
class Peaks:
    """Largest values seen by ``InFlightSampler``; RSS in KiB."""

    worker_gauge: int = 0
    simulator_in_flight: int = 0
    worker_rss_kib: int = 0
    # Worker RSS in the sample with the largest gauge value.
    worker_rss_at_peak_kib: int = 0
    worker_open_files: int = 0
    simulator_open_files: int = 0
    failures: int = 0
    first_failure: str = ""


class InFlightSampler:
    """Samples the worker's in-flight gauge, the simulator's in-flight count and the
    worker's memory and descriptors every ``SAMPLE_INTERVAL_S`` seconds, in a thread."""

    def __init__(self, metrics_url: str, stats_url: str, worker_pid: int, simulator_pid: int):
        self.metrics_url = metrics_url
        self.stats_url = stats_url
        self.worker_pid = worker_pid
        self.simulator_pid = simulator_pid
        self.peaks = Peaks()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="in-flight-sampler", daemon=True)

    def __enter__(self) -> InFlightSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._stop.is_set():
                self._sample(client)
                self._stop.wait(SAMPLE_INTERVAL_S)

    def _sample(self, client: httpx.Client) -> None:
        peaks = self.peaks
        rss = procstat.rss_kib(self.worker_pid)
        peaks.worker_rss_kib = max(peaks.worker_rss_kib, rss)
        peaks.worker_open_files = max(peaks.worker_open_files, procstat.open_files(self.worker_pid))
        peaks.simulator_open_files = max(
            peaks.simulator_open_files, procstat.open_files(self.simulator_pid)
        )
        try:
            gauge = read_gauge(client.get(self.metrics_url).text)
            simulator = client.get(self.stats_url).json()["in_flight"]
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            # A busy worker serves its metrics page late, so the next sample tries again.
            peaks.failures += 1
            peaks.first_failure = peaks.first_failure or f"{type(exc).__name__}: {exc}"
            return
        if gauge > peaks.worker_gauge:
            peaks.worker_gauge = gauge
            peaks.worker_rss_at_peak_kib = rss
        peaks.simulator_in_flight = max(peaks.simulator_in_flight, simulator)


def read_gauge(text: str) -> int:
    """Return the us pool's ``broker_jobs_in_flight`` from a Prometheus text page."""
    match = GAUGE_PATTERN.search(text)
    # prometheus-client leaves a labelled gauge out until its first use.
    return int(float(match.group(1))) if match else 0


def start_wide_worker(stack: BenchStack, calls: int) -> int:
    """Replace the us worker by one with ``calls`` greenlets and a metrics port; return the port.

    The concurrency goes in through the environment as well as ``--concurrency``,
    because the worker sizes its httpx connection pool from the setting
    (workers/context.py), and ``--concurrency`` sets only Celery's pool.
    """
    port = free_port()
    stack.group.stop(f"worker-{REGION}")
    argv = broker_command("worker", "--region", REGION, "--concurrency", str(calls))
    argv += ["--metrics-port", str(port)]
    stack.group.start(f"worker-{REGION}", argv, extra_env={"BROKER_WORKER_CONCURRENCY": str(calls)})
    stack.group.wait_http(f"worker-{REGION}", f"http://127.0.0.1:{port}/metrics")
    return port


def submit_jobs(
    stack: BenchStack, body: dict[str, Any], api_key: str, calls: int, workdir: Path
) -> dict[str, Any]:
    """Create ``calls`` jobs through the API from a client process; return its figures."""
    envelope = {
        "endpoint": "/v1/chat/completions",
        # Pinned, so that every job goes to the one worker under test.
        "body": {**body, "region_pin": REGION},
    }
    path = workdir / "job.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(envelope))
    # A client retries a request whose connection broke, with the same Idempotency-Key,
    # as the openai SDK does; the page reports how many were retried.
    result = run_python_client(
        stack.api_url + JOBS_PATH,
        path,
        api_key,
        SUBMIT_CONCURRENCY,
        requests=calls,
        retries=SUBMIT_RETRIES,
    )
    if result["non2xx"] or result["errors"]:
        raise BenchError(
            f"creating {calls} jobs failed for {result['non2xx']} non-2xx responses and "
            f"{result['errors']} client errors; first: {result['first_failure']}"
        )
    return result


def measure_in_flight(
    stack: BenchStack,
    body: dict[str, Any],
    *,
    calls: int,
    max_wait_s: float,
    workdir: Path,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Run ``calls`` jobs at once through one us worker; return the figures and checks."""
    account = stack.new_account("bench-in-flight")
    log(f"in flight: starting a us worker with {calls} greenlets")
    metrics_port = start_wide_worker(stack, calls)
    worker_pid = stack.group.processes[f"worker-{REGION}"].pid
    simulator_pid = stack.group.processes[f"simulator-{REGION}"].pid
    limits = {
        "worker": procstat.open_files_limit(worker_pid),
        "simulator": procstat.open_files_limit(simulator_pid),
    }
    needed = file_descriptors_needed(calls)
    for name, (soft, _hard) in limits.items():
        if soft < needed:
            raise BenchError(
                f"the {name} may open {soft} files but {calls} calls need about {needed}"
            )
    queue = queue_name(PROVIDER, REGION, LANE)
    node = stack.pause_queue(queue, WORKER_NODE_PREFIX)
    stack.configure_simulators(latency_ms=UPSTREAM_LATENCY_MS)
    try:
        log(f"in flight: creating {calls} jobs through POST /v1/jobs")
        submitted = submit_jobs(stack, body, account.api_key, calls, workdir)
        waiting = queued_jobs(stack, queue)
        if waiting != calls:
            raise BenchError(f"{waiting} jobs wait in {queue}, expected {calls}")
        stats_url = stack.simulator_url(REGION) + "/_sim/stats"
        httpx.post(stack.simulator_url(REGION) + "/_sim/reset", timeout=10).raise_for_status()
        rss_before = procstat.rss_kib(worker_pid)
        sampler = InFlightSampler(
            f"http://127.0.0.1:{metrics_port}/metrics", stats_url, worker_pid, simulator_pid
        )
        with sampler:
            started = time.monotonic()
            stack.resume_queue(queue, node)
            log(f"in flight: the worker consumes {queue} again; waiting for {calls} jobs")
            finished = stack.wait_jobs(
                account.id,
                settled=False,
                stall_timeout_s=FINISH_STALL_TIMEOUT_S,
                max_wait_s=max_wait_s,
            )
        elapsed_s = finished.changed_at - started
        simulator_stats = httpx.get(stats_url, timeout=10).json()
    finally:
        stack.configure_simulators(latency_ms=0)
    log("in flight: waiting for the billing worker to settle every job")
    settled = stack.wait_jobs(account.id, settled=True, stall_timeout_s=STALL_TIMEOUT_S)
    statuses = stack.job_statuses(account.id)
    wallet = stack.wallet_check(account.wallet_id)
    peaks = sampler.peaks
    row = {
        "calls": calls,
        "upstream_latency_ms": UPSTREAM_LATENCY_MS,
        "submit": {
            "concurrency": SUBMIT_CONCURRENCY,
            "jobs": submitted["requests"],
            "elapsed_s": submitted["duration_s"],
            "jobs_per_s": submitted["requests"] / submitted["duration_s"],
            "latency_ms": submitted["latency_ms"],
            "retries": submitted.get("retries", 0),
            "first_retry_cause": submitted.get("first_retry_cause", ""),
            "command": submitted["command"],
        },
        "peak_worker_gauge": peaks.worker_gauge,
        "peak_simulator_in_flight": peaks.simulator_in_flight,
        "elapsed_s": elapsed_s,
        "finished": finished.finished,
        "settled": settled.settled,
        "statuses": statuses,
        "not_succeeded": calls - statuses.get("succeeded", 0),
        "simulator": {
            "requests": simulator_stats["requests"],
            "by_status": simulator_stats["by_status"],
        },
        "wallet": {
            "matches_ledger": wallet.ok,
            "held_micro_usd": wallet.held_micro_usd,
        },
        "worker_rss_kib": {
            "before": rss_before,
            "at_peak": peaks.worker_rss_at_peak_kib,
            "max": peaks.worker_rss_kib,
        },
        "rss_per_call_kib": (
            (peaks.worker_rss_at_peak_kib - rss_before) / peaks.worker_gauge
            if peaks.worker_gauge
            else 0.0
        ),
        "open_files": {
            "needed_estimate": needed,
            "worker_limit": limits["worker"],
            "simulator_limit": limits["simulator"],
            "worker_peak": peaks.worker_open_files,
            "simulator_peak": peaks.simulator_open_files,
        },
        "sample_failures": peaks.failures,
        "first_sample_failure": peaks.first_failure,
    }
    row["problems"] = _problems(row)
    if row["problems"]:
        row["first_worker_error"] = first_log_error(stack, f"worker-{REGION}")
    log(
        f"in flight: peak {peaks.worker_gauge} in the worker, {peaks.simulator_in_flight} at "
        f"the simulator; {calls} jobs in {elapsed_s:.1f} s, {row['not_succeeded']} not "
        f"succeeded; worker RSS {rss_before / 1024:.0f} -> {peaks.worker_rss_kib / 1024:.0f} MiB"
    )
    return row


def queued_jobs(stack: BenchStack, queue: str) -> int:
    """Return the number of jobs in the task messages waiting in ``queue``.

    Jobs created together share a ``run_jobs`` message, so the list's length counts
    messages, not jobs.
    """
    jobs = 0
    for raw in stack.redis.lrange(queue, 0, -1):
        message = json.loads(raw)
        _args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        jobs += len(kwargs["jobs"]) if "jobs" in kwargs else 1
    return jobs


def first_log_error(stack: BenchStack, name: str) -> str:
    """Return the first CRITICAL or ERROR line of a process's log, or an empty string."""
    path = stack.group.log_dir / f"{name}.log"
    if not path.exists():
        return ""
    with path.open(errors="replace") as handle:
        for line in handle:
            if "CRITICAL/" in line or "ERROR/" in line:
                return line.strip()
    return ""


def _problems(row: dict[str, Any]) -> list[str]:
    """Return what makes the run fall short or the figures contradict each other."""
    calls = row["calls"]
    problems = []
    if row["finished"] != calls:
        problems.append(f"{calls - row['finished']} of {calls} jobs never finished")
    if row["settled"] != calls:
        problems.append(f"{calls - row['settled']} of {calls} jobs were never settled")
    if not row["wallet"]["matches_ledger"]:
        problems.append("the account's wallet does not match its ledger")
    if row["wallet"]["held_micro_usd"] != 0 and row["settled"] == calls:
        problems.append(
            f"{row['wallet']['held_micro_usd']} micro-USD stay held after every job settled"
        )
    if row["peak_worker_gauge"] == 0:
        problems.append(
            f"no sample of the worker's in-flight gauge succeeded: {row['first_sample_failure']}"
        )
    return problems
