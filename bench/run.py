"""Benchmark the broker on PostgreSQL against its simulator, with LiteLLM as a reference.

    .venv/bin/python bench/run.py                  # three rounds per measurement
    .venv/bin/python bench/run.py --quick          # one short round, about two minutes
    .venv/bin/python bench/run.py --litellm-only   # only the LiteLLM reference matrix
    .venv/bin/python bench/run.py --scale-only     # only calls in flight and batch scale

Each run stores its raw figures in bench/results/ (broker.json, scale.json,
litellm.json) and renders bench/RESULTS.md from the latest of each. Every process it
starts is stopped, and its database dropped, when it ends, fails or is interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

PROJECT_DIR = Path(__file__).resolve().parent.parent
# Run as a script (python bench/run.py), Python puts bench/ first on the path, where its
# modules would shadow top-level ones. The project directory takes its place, so that
# ``bench`` imports as a package.
if sys.path and Path(sys.path[0]).resolve() == PROJECT_DIR / "bench":
    sys.path[0] = str(PROJECT_DIR)
elif str(PROJECT_DIR) not in sys.path:
    sys.path.insert(0, str(PROJECT_DIR))

from bench import environment, procstat, report  # noqa: E402
from bench.batch_scale import measure_batch  # noqa: E402
from bench.cpu_profile import profile_under_load  # noqa: E402
from bench.inflight import file_descriptors_needed, measure_in_flight  # noqa: E402
from bench.litellm_proxy import (  # noqa: E402
    LiteLLMUnavailable,
    installed_version,
    proxy_command,
    running_proxy,
)
from bench.load import LoadGeneratorFailed, wrk_available, wrk_version  # noqa: E402
from bench.settlement import (  # noqa: E402
    FINISH_STALL_TIMEOUT_S,
    STALL_TIMEOUT_S,
    measure_billing_rate,
    measure_settled_rate,
)
from bench.stack import (  # noqa: E402
    BenchError,
    BenchStack,
    configure_simulator,
    postgres_connections,
    postgres_version,
    running_simulator,
    running_stack,
)
from bench.streaming import measure_streaming  # noqa: E402
from bench.sync_matrix import CHAT_PATH, SIMULATOR_CHAT_PATH, Target, run_matrix, warm_up  # noqa: E402
from broker.processes import StartupFailed  # noqa: E402
from broker.system import SIMULATOR_PROVIDER_KEY  # noqa: E402

RESULTS_DIR = PROJECT_DIR / "bench" / "results"
RESULTS_PAGE = PROJECT_DIR / "bench" / "RESULTS.md"
# An OpenAI model whose upstream name equals its public name, so that one body serves
# the broker, the simulator and LiteLLM alike.
MODEL = "gpt-5.4-nano"
MAX_TOKENS = 64
REQUEST_BODY = {
    "model": MODEL,
    "messages": [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Explain in two sentences why a gateway queues requests."},
    ],
    "max_tokens": MAX_TOKENS,
}
STREAM_BODY = {**REQUEST_BODY, "stream": True, "stream_options": {"include_usage": True}}
LATENCIES_MS = (0, 200)
BROKER_CONCURRENCIES = (1, 50, 200)
LITELLM_CONCURRENCIES = (50, 200)
# Concurrency of the settlement measurements and of the profile.
SETTLEMENT_CONCURRENCY = 200


@dataclass(frozen=True)
class Plan:
    """Rounds and durations (seconds) of one benchmark run."""

    rounds: int
    # Unrecorded load sent to each target once, before its first run.
    warmup_s: float
    # Start of every synchronous run whose responses the rate leaves out: at concurrency
    # 200 the broker's first responses take seconds, and counting from zero would lower
    # the rate of a short run by that much.
    run_warmup_s: float
    sync_duration_s: float
    settled_duration_s: float
    billing_duration_s: float
    profile_duration_s: int
    # Maximum seconds to wait for the billing worker to settle the backlog of the
    # synchronous and streaming runs.
    drain_max_s: float
    # Streamed requests sent per concurrency.
    stream_requests: dict[int, int]
    # Jobs that one us worker runs at once against a simulator responding after 2 s, and
    # the maximum seconds to wait for them to finish.
    in_flight_calls: int
    in_flight_wait_max_s: float
    # Lines of the batch input file, the seconds of each interactive run beside it, and
    # the maximum seconds to wait, once it is in progress, before it is cancelled.
    batch_requests: int
    batch_interactive_s: float
    batch_wait_max_s: float


QUICK = Plan(
    rounds=1,
    warmup_s=2,
    run_warmup_s=3,
    sync_duration_s=3,
    settled_duration_s=6,
    billing_duration_s=4,
    profile_duration_s=10,
    drain_max_s=120,
    stream_requests={1: 20, 50: 200},
    in_flight_calls=1000,
    in_flight_wait_max_s=120,
    batch_requests=10_000,
    batch_interactive_s=5,
    batch_wait_max_s=300,
)
FULL = Plan(
    rounds=3,
    warmup_s=3,
    run_warmup_s=3,
    sync_duration_s=8,
    settled_duration_s=10,
    billing_duration_s=6,
    profile_duration_s=20,
    drain_max_s=300,
    stream_requests={1: 50, 50: 500},
    in_flight_calls=5000,
    in_flight_wait_max_s=300,
    batch_requests=100_000,
    batch_interactive_s=10,
    batch_wait_max_s=1200,
)


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _command_line() -> str:
    interpreter = os.path.relpath(sys.executable, PROJECT_DIR)
    return " ".join([interpreter, *sys.argv])


def _write_body(path: Path, body: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body))
    return path


class FinishWaiter:
    """Waits after each broker run until every job of the account that can be settled is.

    So each run starts on a quiet system, as each direct run does: a billing worker
    still settling the previous run's thousands of jobs took CPU from the next run
    and doubled the latency of the single-request runs after the saturating ones.
    Jobs that stay unsettled (their worker failed to record the outcome, or their
    settlement failed) are counted in ``stuck`` and not waited for again.
    """

    def __init__(self, stack: BenchStack, account_id: str) -> None:
        self.stack = stack
        self.account_id = account_id
        self.stuck = 0

    def __call__(self) -> None:
        counts = self.stack.wait_jobs(
            self.account_id,
            settled=True,
            stall_timeout_s=FINISH_STALL_TIMEOUT_S,
            allowed_open=self.stuck,
        )
        if counts.unsettled > self.stuck:
            log(f"warning: {counts.unsettled} jobs of {self.account_id} were never settled")
            self.stuck = counts.unsettled


def purge_repeated_settlements(stack: BenchStack) -> int:
    """Clear the billing queue of repeated settle tasks before a settlement measurement.

    Only when every finished job is settled, so that no task that would still change a
    wallet is removed; returns how many tasks were removed.
    """
    if stack.unsettled_finished_jobs():
        return 0
    removed = stack.purge_billing_queue()
    if removed:
        log(f"removed {removed} repeated settle tasks from the billing queue")
    return removed


def drain_settlements(stack: BenchStack, waiter: FinishWaiter, max_wait_s: float) -> dict:
    """Give the billing worker up to ``max_wait_s`` to settle the account's backlog.

    Returns the backlog, how many of it were settled in how many seconds, and the
    billing queue's length before and after.
    """
    counts = stack.job_counts(waiter.account_id)
    backlog = counts.finished - counts.settled
    queue_at_start = stack.billing_queue_length()
    started = time.monotonic()
    final = stack.wait_jobs(
        waiter.account_id,
        settled=True,
        stall_timeout_s=STALL_TIMEOUT_S,
        allowed_open=waiter.stuck,
        max_wait_s=max_wait_s,
    )
    elapsed_s = max(final.changed_at - started, 0.0)
    settled = final.settled - counts.settled
    log(f"settled {settled} of a backlog of {backlog} settlements in {elapsed_s:.1f} s")
    return {
        "backlog": backlog,
        "settled": settled,
        "elapsed_s": elapsed_s,
        "max_wait_s": max_wait_s,
        "settled_per_s": settled / elapsed_s if elapsed_s > 0 else 0.0,
        "never_finished": waiter.stuck,
        "billing_queue": {"start": queue_at_start, "end": stack.billing_queue_length()},
    }


def measure_broker(plan: Plan, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Run measurements a to d and return the results.

    The synchronous and streaming runs share one system. The settlement measurements get
    a fresh one, so that the billing backlog of the first cannot delay them.
    """
    body = _write_body(workdir / "body.json", REQUEST_BODY)
    stream_body = _write_body(workdir / "body-stream.json", STREAM_BODY)
    load_start = environment.load_average()
    connections_start = postgres_connections()
    notes: list[str] = []
    if not wrk_available():
        notes.append(
            "wrk is not installed (apt-get install -y wrk), so the Python client drove "
            "the synchronous load; on two shared cores it may limit the rates itself."
        )
    log("starting the system (private Redis, fresh PostgreSQL database, every process)")
    with running_stack(workdir, args.api_workers) as stack:
        account = stack.new_account("bench-sync")
        waiter = FinishWaiter(stack, account.id)
        broker = Target("broker", stack.api_url + CHAT_PATH, account.api_key, waiter)
        direct = Target(
            "direct", stack.simulator_url("us") + SIMULATOR_CHAT_PATH, SIMULATOR_PROVIDER_KEY
        )

        def set_latency(latency_ms: int) -> None:
            stack.configure_simulators(latency_ms=latency_ms)

        log("warming up")
        warm_up((direct, broker), body, plan.warmup_s)
        sync_rows = run_matrix(
            (direct, broker),
            set_latency,
            latencies_ms=LATENCIES_MS,
            concurrencies=BROKER_CONCURRENCIES,
            rounds=plan.rounds,
            duration_s=plan.sync_duration_s,
            warmup_s=plan.run_warmup_s,
            body_path=body,
            log=log,
        )
        streaming = measure_streaming(
            stack,
            broker,
            direct,
            stream_body,
            requests_per_concurrency=plan.stream_requests,
            rounds=plan.rounds,
            log=log,
        )
        log("waiting for the billing worker to settle the backlog of the runs so far")
        drain = drain_settlements(stack, waiter, plan.drain_max_s)
        postgres = postgres_version()
    connections_end = postgres_connections()
    connections_end["peak_broker_database"] = stack.connections.peak_own
    connections_end["peak_server"] = stack.connections.peak_total

    # A fresh system, so that the backlog above does not delay these settlements.
    log("starting a fresh system for the settlement measurements")
    with running_stack(workdir / "settlement", args.api_workers) as stack:
        purged: list[int] = []
        settled = []
        for number in range(1, plan.rounds + 1):
            purged.append(purge_repeated_settlements(stack))
            settled.append(
                measure_settled_rate(
                    stack,
                    body,
                    concurrency=SETTLEMENT_CONCURRENCY,
                    duration_s=plan.settled_duration_s,
                    round_number=number,
                    log=log,
                )
            )
        billing = []
        for number in range(1, plan.rounds + 1):
            purged.append(purge_repeated_settlements(stack))
            billing.append(
                measure_billing_rate(
                    stack,
                    body,
                    concurrency=SETTLEMENT_CONCURRENCY,
                    duration_s=plan.billing_duration_s,
                    round_number=number,
                    log=log,
                )
            )
        settings = {
            "api_workers": args.api_workers,
            "worker_concurrency": stack.settings.worker_concurrency,
            "billing_concurrency": stack.settings.billing_concurrency,
        }
        connections_end["peak_broker_database"] = max(
            connections_end["peak_broker_database"], stack.connections.peak_own
        )
        connections_end["peak_server"] = max(
            connections_end["peak_server"], stack.connections.peak_total
        )
    streaming_rows = streaming["rows"]
    return {
        "kind": "broker",
        "quick": args.quick,
        "rounds": plan.rounds,
        "plan": asdict(plan),
        "finished_at": _now(),
        "command": _command_line(),
        "machine": environment.machine(),
        "load_average": {"start": load_start, "end": environment.load_average()},
        "postgres_connections": {"start": connections_start, "end": connections_end},
        "versions": environment.versions(postgres),
        "settings": settings,
        "request_summary": (
            f"model {MODEL}, {len(REQUEST_BODY['messages'])} messages, max_tokens {MAX_TOKENS}"
        ),
        "load_generators": {
            "sync": f"wrk ({wrk_version()}) with bench/post.lua"
            if wrk_available()
            else "bench/pyload.py",
            "streaming": "bench/pyload.py",
        },
        "example_commands": {
            "sync": next(r["command"] for r in sync_rows if r["target"] == "broker"),
            **({"streaming": streaming_rows[0]["command"]} if streaming_rows else {}),
        },
        "sync": sync_rows,
        "streaming": streaming,
        "drain": drain,
        "purged_repeats": purged,
        "settled": settled,
        "billing": billing,
        "notes": notes,
    }


def measure_scale(plan: Plan, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Measure calls in flight in one worker, then a large batch, each on a fresh system."""
    load_start = environment.load_average()
    connections_start = postgres_connections()
    calls = plan.in_flight_calls
    try:
        # Before the system starts, so that the worker and the simulator inherit it.
        open_files = procstat.raise_open_files_limit(file_descriptors_needed(calls))
    except ValueError as exc:
        raise BenchError(str(exc)) from exc
    if open_files["raised"]:
        log(f"raised the open-files limit from {open_files['soft']} to {open_files['raised_to']}")
    log("starting a system for the calls in flight")
    with running_stack(workdir / "in-flight", args.api_workers) as stack:
        in_flight = measure_in_flight(
            stack,
            REQUEST_BODY,
            calls=calls,
            max_wait_s=plan.in_flight_wait_max_s,
            workdir=workdir / "in-flight",
            log=log,
        )
        peak_connections = stack.connections.peak_total
    body = _write_body(workdir / "batch" / "body.json", REQUEST_BODY)
    log("starting a fresh system for the batch")
    with running_stack(workdir / "batch", args.api_workers) as stack:
        settings = {
            "api_workers": args.api_workers,
            "worker_concurrency": stack.settings.worker_concurrency,
            "batch_max_in_flight": stack.settings.batch_max_in_flight,
            "batch_chunk_size": stack.settings.batch_chunk_size,
        }
        try:
            batch = measure_batch(
                stack,
                REQUEST_BODY,
                body,
                requests=plan.batch_requests,
                interactive_s=plan.batch_interactive_s,
                warmup_s=plan.run_warmup_s,
                max_wait_s=plan.batch_wait_max_s,
                workdir=workdir / "batch",
                log=log,
            )
        except BenchError as exc:
            # The figures of the calls in flight stay valid, so they are stored with it.
            log(f"error: {exc}")
            batch = {"requests": plan.batch_requests, "error": str(exc)}
        peak_connections = max(peak_connections, stack.connections.peak_total)
    return {
        "kind": "scale",
        "quick": args.quick,
        "plan": asdict(plan),
        "finished_at": _now(),
        "command": _command_line(),
        "machine": environment.machine(),
        "load_average": {"start": load_start, "end": environment.load_average()},
        "postgres_connections": {
            "start": connections_start,
            "end": postgres_connections(),
            "peak_server": peak_connections,
        },
        "open_files": open_files,
        "settings": settings,
        "in_flight": in_flight,
        "batch": batch,
    }


def measure_profile(plan: Plan, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Profile the broker's processes under synchronous load; return the top frames."""
    body = _write_body(workdir / "body.json", REQUEST_BODY)
    log("starting the system (private Redis, fresh PostgreSQL database, every process)")
    with running_stack(workdir, args.api_workers) as stack:
        account = stack.new_account("bench-profile")
        waiter = FinishWaiter(stack, account.id)
        broker = Target("broker", stack.api_url + CHAT_PATH, account.api_key, waiter)
        warm_up((broker,), body, plan.warmup_s)
        profile = profile_under_load(
            stack,
            body,
            account.api_key,
            concurrency=SETTLEMENT_CONCURRENCY,
            duration_s=plan.profile_duration_s,
            workdir=workdir / "profile",
            after_run=waiter,
            log=log,
        )
    return {
        "kind": "profile",
        "finished_at": _now(),
        "command": _command_line(),
        "machine": environment.machine(),
        **profile,
    }


def measure_litellm(plan: Plan, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Run the synchronous matrix against LiteLLM and the simulator; return the results."""
    workdir = workdir / "litellm"
    body = _write_body(workdir / "body.json", REQUEST_BODY)
    load_start = environment.load_average()
    rows: list[dict[str, Any]] = []
    error = None
    log("starting a simulator and the LiteLLM proxy")
    with running_simulator(workdir) as simulator_url:
        direct = Target("direct", simulator_url + SIMULATOR_CHAT_PATH, SIMULATOR_PROVIDER_KEY)

        def set_latency(latency_ms: int) -> None:
            configure_simulator(simulator_url, latency_ms=latency_ms)

        try:
            with running_proxy(workdir, MODEL, MODEL, simulator_url) as proxy:
                litellm = Target("litellm", proxy.url + CHAT_PATH, proxy.master_key)
                warm_up((direct, litellm), body, plan.warmup_s)
                rows = run_matrix(
                    (direct, litellm),
                    set_latency,
                    latencies_ms=LATENCIES_MS,
                    concurrencies=LITELLM_CONCURRENCIES,
                    rounds=plan.rounds,
                    duration_s=plan.sync_duration_s,
                    warmup_s=plan.run_warmup_s,
                    body_path=body,
                    log=log,
                )
        except LiteLLMUnavailable as exc:
            error = str(exc)
            log(f"LiteLLM reference skipped: {error}")
    versions = {"litellm": installed_version() if error is None else "unavailable"}
    return {
        "kind": "litellm",
        "quick": args.quick,
        "rounds": plan.rounds,
        "plan": asdict(plan),
        "finished_at": _now(),
        "command": _command_line(),
        "machine": environment.machine(),
        "load_average": {"start": load_start, "end": environment.load_average()},
        "versions": versions,
        "proxy_command": proxy_command(),
        "sync": rows,
        "error": error,
    }


def _save(name: str, results: dict[str, Any]) -> None:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(results, indent=1, default=str))


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick", action="store_true", help="one round of short runs instead of three rounds"
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "--with-litellm",
        action="store_true",
        help="also measure the LiteLLM proxy (installs bench/.litellm-venv on first use)",
    )
    scope.add_argument(
        "--profile-only",
        action="store_true",
        help="only sample the API, the us worker and the billing worker under load with "
        "py-spy; keep the stored broker figures",
    )
    scope.add_argument(
        "--scale-only",
        action="store_true",
        help="only measure calls in flight in one worker and a large batch; keep the "
        "other stored figures",
    )
    scope.add_argument(
        "--broker-only",
        action="store_true",
        help="only measure the broker's requests, streaming and settlement (a to d); keep "
        "the stored scale, LiteLLM and profile figures",
    )
    scope.add_argument(
        "--litellm-only",
        action="store_true",
        help="measure only the LiteLLM proxy and the simulator; keep the stored broker figures",
    )
    parser.add_argument(
        "--api-workers", type=int, default=1, help="uvicorn processes of the broker's API"
    )
    parser.add_argument(
        "--in-flight-calls",
        type=int,
        help="jobs run at once in the calls-in-flight measurement (default: 1000 with "
        "--quick, else 5000)",
    )
    parser.add_argument(
        "--batch-requests",
        type=int,
        help="lines of the batch input file (default: 10000 with --quick, else 100000)",
    )
    return parser.parse_args(argv)


def choose_plan(args: argparse.Namespace) -> Plan:
    """Return the quick or full plan, with the sizes given on the command line."""
    plan = QUICK if args.quick else FULL
    if args.in_flight_calls is not None:
        plan = replace(plan, in_flight_calls=args.in_flight_calls)
    if args.batch_requests is not None:
        plan = replace(plan, batch_requests=args.batch_requests)
    return plan


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    plan = choose_plan(args)
    failed = False
    workdir = PROJECT_DIR / "var" / "bench" / datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    signal.signal(signal.SIGTERM, _raise_interrupt)
    log(f"logs and request bodies in {workdir}")
    try:
        if args.profile_only:
            _save("profile", measure_profile(plan, args, workdir))
        elif not (args.litellm_only or args.scale_only):
            _save("broker", measure_broker(plan, args, workdir))
        if not (args.profile_only or args.litellm_only or args.broker_only):
            scale = measure_scale(plan, args, workdir)
            _save("scale", scale)
            failed = bool(scale["in_flight"]["problems"]) or "error" in scale["batch"]
        if args.with_litellm or args.litellm_only:
            _save("litellm", measure_litellm(plan, args, workdir))
    except KeyboardInterrupt:
        log("interrupted; every process this run started has been stopped")
        return 130
    except (BenchError, StartupFailed, LoadGeneratorFailed) as exc:
        log(f"error: {exc}")
        return 1
    broker, litellm = _load("broker"), _load("litellm")
    if broker is None and litellm is None:
        log("no broker or LiteLLM figures stored yet, so bench/RESULTS.md is not written")
        return 0
    RESULTS_PAGE.write_text(
        report.render(broker, litellm, _load("profile"), _load("scale"), _load("broker-before"))
    )
    log(f"wrote {RESULTS_PAGE.relative_to(PROJECT_DIR)}")
    if failed:
        log("error: a scale measurement failed; its section of bench/RESULTS.md says why")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
