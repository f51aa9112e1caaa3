"""bench/RESULTS.md, rendered from the raw results that bench/run.py stores as JSON.

A figure is the median over rounds, followed by the minimum and maximum in brackets
when there was more than one round.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

Row = dict[str, Any]


def _spread(values: Sequence[float], digits: int) -> str:
    if not values:
        return "n/a"
    median = f"{statistics.median(values):,.{digits}f}"
    if len(values) == 1:
        return median
    return f"{median} ({min(values):,.{digits}f} to {max(values):,.{digits}f})"


def _group(rows: Iterable[Row], *keys: str) -> dict[tuple, list[Row]]:
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for row in rows:
        groups[tuple(row[key] for key in keys)].append(row)
    return dict(sorted(groups.items(), key=lambda item: [str(k).zfill(6) for k in item[0]]))


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _median(rows: Sequence[Row], field: str) -> float:
    return statistics.median(row[field] for row in rows)


def sync_table(rows: Sequence[Row]) -> list[str]:
    body = []
    for (latency, concurrency, target), group in _group(
        rows, "latency_ms", "concurrency", "target"
    ).items():
        body.append(
            (
                str(latency),
                str(concurrency),
                target,
                _spread([r["requests_per_s"] for r in group], 0),
                _spread([r["p50_ms"] for r in group], 1),
                _spread([r["p90_ms"] for r in group], 1),
                _spread([r["p99_ms"] for r in group], 1),
                str(sum(r["non2xx"] for r in group)),
                str(sum(r["socket_errors"] for r in group)),
            )
        )
    headers = (
        "upstream latency ms",
        "concurrency",
        "target",
        "requests/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "non-2xx",
        "socket errors and timeouts",
    )
    return _table(headers, body)


def share_table(rows: Sequence[Row], subject: str, baseline: str = "direct") -> list[str]:
    """Compare ``subject`` with ``baseline`` at each setting, using the medians."""
    grouped = _group(rows, "latency_ms", "concurrency", "target")
    body = []
    for latency, concurrency in sorted({(key[0], key[1]) for key in grouped}):
        mine = grouped.get((latency, concurrency, subject))
        base = grouped.get((latency, concurrency, baseline))
        if not mine or not base:
            continue
        base_rate = _median(base, "requests_per_s")
        ratio = _median(mine, "requests_per_s") / base_rate if base_rate else 0.0
        body.append(
            (
                str(latency),
                str(concurrency),
                f"{ratio:.3f}",
                f"{_median(mine, 'p50_ms') - _median(base, 'p50_ms'):+,.1f}",
                f"{_median(mine, 'p99_ms') - _median(base, 'p99_ms'):+,.1f}",
            )
        )
    headers = (
        "upstream latency ms",
        "concurrency",
        f"requests/s, {subject} ÷ {baseline}",
        f"p50 ms, {subject} − {baseline}",
        f"p99 ms, {subject} − {baseline}",
    )
    return _table(headers, body)


def streaming_section(streaming: dict[str, Any] | None) -> list[str]:
    if streaming is None:
        return ["Not measured in this run."]
    lines = [
        f"Python client (bench/pyload.py), a fixed number of streamed requests per "
        f"concurrency; the simulator sends its chunks {streaming['chunk_delay_ms']} ms apart "
        "with upstream latency 0. Time to first token is the time to the first event "
        "with content.",
        "",
    ]
    if streaming.get("skipped_broker"):
        lines += [f"**Broker skipped.** {streaming['skipped_broker']}", ""]
    rows = streaming.get("rows", [])
    body = []
    for (concurrency, target), group in _group(rows, "concurrency", "target").items():
        body.append(
            (
                str(concurrency),
                target,
                str(sum(r["requests"] for r in group)),
                _spread([r["first_token_ms"]["p50"] for r in group], 1),
                _spread([r["first_token_ms"]["p99"] for r in group], 1),
                _spread([r["latency_ms"]["p50"] for r in group], 1),
                _spread([r["latency_ms"]["p99"] for r in group], 1),
                str(sum(r["non2xx"] + r["errors"] for r in group)),
            )
        )
    headers = (
        "concurrency",
        "target",
        "requests",
        "first token p50 ms",
        "first token p99 ms",
        "total p50 ms",
        "total p99 ms",
        "non-2xx and errors",
    )
    lines += _table(headers, body)
    grouped = _group(rows, "concurrency", "target")
    differences = []
    for concurrency in sorted({key[0] for key in grouped}):
        broker = grouped.get((concurrency, "broker"))
        direct = grouped.get((concurrency, "direct"))
        if not broker or not direct:
            continue

        def median_of(group: Sequence[Row], field: str) -> float:
            return statistics.median(r[field]["p50"] for r in group)

        first_token = median_of(broker, "first_token_ms") - median_of(direct, "first_token_ms")
        total = median_of(broker, "latency_ms") - median_of(direct, "latency_ms")
        differences.append((str(concurrency), f"{first_token:+,.1f}", f"{total:+,.1f}"))
    if differences:
        lines += [""] + _table(
            ("concurrency", "first token p50 ms, broker − direct", "total p50 ms, broker − direct"),
            differences,
        )
    return lines


def settled_section(
    rows: Sequence[Row], drain: dict[str, float] | None, purged: Sequence[int]
) -> list[str]:
    if not rows:
        return ["Not measured in this run."]
    first = rows[0]
    lines = []
    if drain:
        lines.append(
            f"After the synchronous and streaming runs the billing worker still had "
            f"{drain['backlog']:,} jobs to settle. With no load it settled "
            f"{drain['settled']:,} of them in {drain['elapsed_s']:.1f} s "
            f"({drain['settled_per_s']:.1f} per second; the benchmark waits at most "
            f"{drain['max_wait_s']:g} s, or until no job was settled for 120 s). Meanwhile "
            f"the billing queue went from {drain['billing_queue']['start']:,} to "
            f"{drain['billing_queue']['end']:,} waiting settle tasks. The measurements "
            "below run on a fresh system, so this backlog does not delay them."
        )
        if drain.get("never_finished"):
            lines[-1] += (
                f" {drain['never_finished']} jobs of those runs never finished, so they "
                "were never settled."
            )
        lines.append("")
    if purged:
        lines += [
            f"Once every job was settled, the benchmark removed the settle tasks still "
            f"waiting in the billing queue before each settlement round "
            f"({', '.join(f'{count:,}' for count in purged)}). Each was a repeat that the "
            "sweeper sends for a job left unsettled for 30 s; the billing worker would "
            "spend time on them without changing anything.",
            "",
        ]
    queues = [row["billing_queue"] for row in rows if "billing_queue" in row]
    if queues:
        lines += [
            "Settle tasks waiting in the billing queue: "
            + "; ".join(
                f"round {number}: {queue['start']:,} at the start, at most {queue['peak']:,}, "
                f"{queue['end']:,} when the last job was settled"
                for number, queue in enumerate(queues, start=1)
            )
            + ".",
            "",
        ]
    lines += [
        f"wrk at concurrency {first['concurrency']} against the broker, upstream latency "
        "0 ms. The clock starts with the load and stops at the first database poll that "
        "finds every job of the run settled (charge and release in the ledger), polled "
        "every 0.25 s.",
        "",
    ]
    body = [
        (
            _spread([r["jobs"] for r in rows], 0),
            _spread([r["settled_per_s"] for r in rows], 0),
            _spread([r["requests_per_s"] for r in rows], 0),
            _spread([r["settle_lag_s"] for r in rows], 2),
            _spread([r["peak_unsettled"] for r in rows], 0),
            str(sum(r["non2xx"] for r in rows)),
            str(sum(r.get("never_settled", 0) for r in rows)),
        )
    ]
    headers = (
        "jobs settled",
        "settled jobs/s",
        "responses/s during the load",
        "s from end of load to last settlement",
        "peak unsettled jobs",
        "non-2xx",
        "jobs never settled",
    )
    return lines + _table(headers, body)


def billing_section(rows: Sequence[Row]) -> list[str]:
    if not rows:
        return ["Not measured in this run."]
    first = rows[0]
    lines = [
        "The billing worker stops taking settle tasks (Celery's `cancel_consumer`), wrk "
        f"sends synchronous requests at concurrency {first['concurrency']}, and every job "
        "finishes. Then the worker takes tasks again (`add_consumer`). The rate is taken "
        "between the first and last `settled_at` on PostgreSQL. Settle tasks that run at "
        "the same time share one transaction.",
        "",
    ]
    queues = [row["billing_queue"] for row in rows if "billing_queue" in row]
    if queues:
        lines += [
            "Settle tasks waiting in the billing queue when the worker resumed, and when "
            "the last job was settled: "
            + "; ".join(f"{queue['start']:,} and {queue['end']:,}" for queue in queues)
            + ".",
            "",
        ]
    body = [
        (
            _spread([r["backlog"] for r in rows], 0),
            _spread([r["settled_per_s"] for r in rows], 0),
            _spread([r["span_s"] for r in rows], 2),
            _spread([r["elapsed_from_resume_s"] for r in rows], 2),
            str(sum(r["non2xx"] for r in rows)),
            str(sum(r.get("never_settled", 0) for r in rows)),
        )
    ]
    headers = (
        "jobs in the backlog",
        "settlements/s",
        "s first to last settlement",
        "s from the resume to the last settlement",
        "non-2xx",
        "jobs never settled",
    )
    return lines + _table(headers, body)


def profile_section(profile: dict[str, Any] | None) -> list[str]:
    if profile is None:
        return ["Not profiled yet; `bench/run.py --profile-only` adds this section."]
    if "skipped" in profile:
        return [f"Skipped: {profile['skipped']}."]
    lines = [
        f"Profiled on {profile['finished_at']} with `{profile['command']}`, in a run of "
        "its own on a fresh system. "
        f"py-spy sampled each process for {profile['duration_s']} s while wrk sent "
        f"synchronous requests at concurrency {profile['concurrency']} (upstream latency 0, "
        f"{profile['requests_per_s']:.0f} requests/s under the profiler). Command: "
        f"`{profile['pyspy_command']}`. Shares are of the samples in which the process ran Python "
        "code; idle time is left out.",
    ]
    for name, summary in profile["processes"].items():
        lines += ["", f"**{name}**", ""]
        if "error" in summary:
            lines.append(f"py-spy failed: {summary['error']}")
            continue
        lines.append(f"{summary['samples']} samples. Top frames by own time:")
        lines.append("")
        lines += _table(
            ("frame", "share"),
            ((f"`{f['frame']}`", f"{f['share']:.1%}") for f in summary["self"]),
        )
        if summary["project_inclusive"]:
            lines += ["", "Broker code, time including callees:", ""]
            lines += _table(
                ("frame", "share"),
                ((f"`{f['frame']}`", f"{f['share']:.1%}") for f in summary["project_inclusive"]),
            )
    return lines


def versions_table(versions: dict[str, str]) -> list[str]:
    return _table(("software", "version"), ((name, value) for name, value in versions.items()))


def litellm_section(litellm: dict[str, Any] | None) -> list[str]:
    if litellm is None:
        return [
            "Not measured yet: run `.venv/bin/python bench/run.py --litellm-only` (add "
            "`--quick` for one short round)."
        ]
    extent = "quick run, one round" if litellm["quick"] else f"{litellm['rounds']} rounds"
    lines = [
        f"Measured {litellm['finished_at']} with `{litellm['command']}` ({extent}), "
        f"LiteLLM {litellm['versions'].get('litellm', 'unknown')} in bench/.litellm-venv. "
        f"Proxy: `{litellm['proxy_command']}`, no database, a master key checked on each "
        "request, one model entry whose `api_base` is the simulator's `/openai/v1`. The "
        "simulator and wrk run alone beside it (no broker processes), and the direct rows "
        "were measured in the same run.",
        "",
    ]
    if litellm.get("error"):
        return lines + [f"**Failed:** {litellm['error']}"]
    lines += sync_table(litellm["sync"])
    lines += ["", "LiteLLM's share, from the medians above:", ""]
    lines += share_table(litellm["sync"], "litellm")
    return lines


def broker_vs_litellm(broker: dict[str, Any] | None, litellm: dict[str, Any] | None) -> list[str]:
    """Compare broker and LiteLLM through their ratios to direct, since runs differ."""
    if not broker or not litellm or litellm.get("error"):
        return []
    mine = _group(broker["sync"], "latency_ms", "concurrency", "target")
    theirs = _group(litellm["sync"], "latency_ms", "concurrency", "target")
    body = []
    for latency, concurrency in sorted({(k[0], k[1]) for k in theirs}):
        parts = [
            mine.get((latency, concurrency, "broker")),
            mine.get((latency, concurrency, "direct")),
            theirs.get((latency, concurrency, "litellm")),
            theirs.get((latency, concurrency, "direct")),
        ]
        if not all(parts):
            continue
        broker_rows, broker_direct, litellm_rows, litellm_direct = parts
        broker_rate = _median(broker_rows, "requests_per_s")
        litellm_rate = _median(litellm_rows, "requests_per_s")
        body.append(
            (
                str(latency),
                str(concurrency),
                f"{broker_rate:,.0f}",
                f"{litellm_rate:,.0f}",
                f"{broker_rate / _median(broker_direct, 'requests_per_s'):.3f}",
                f"{litellm_rate / _median(litellm_direct, 'requests_per_s'):.3f}",
                f"{_median(broker_rows, 'p50_ms'):,.1f}",
                f"{_median(litellm_rows, 'p50_ms'):,.1f}",
            )
        )
    if not body:
        return []
    headers = (
        "upstream latency ms",
        "concurrency",
        "broker requests/s",
        "LiteLLM requests/s",
        "broker ÷ its direct",
        "LiteLLM ÷ its direct",
        "broker p50 ms",
        "LiteLLM p50 ms",
    )
    return [
        "",
        "Broker against LiteLLM. They ran in separate phases, so compare their ratios to "
        "the direct figures of their own phase as well as the raw rates:",
        "",
        *_table(headers, body),
    ]


def _connections_line(results: dict[str, Any]) -> list[str]:
    connections = results.get("postgres_connections")
    if not connections:
        return []
    start, end = connections["start"], connections["end"]
    line = (
        f"- PostgreSQL on 127.0.0.1:5432, shared with other engineers' test databases: "
        f"max_connections {start['max_connections']}; {start['open']} connections open "
        f"before the run, {end['open']} after it"
    )
    if "peak_server" in end:
        line += (
            f"; at most {end['peak_broker_database']} connections to the benchmark's "
            f"database and {end['peak_server']} on the whole server during the run "
            "(sampled every 0.5 s)"
        )
    return [line + "."]


def before_after_section(before: dict[str, Any] | None, after: dict[str, Any] | None) -> list[str]:
    """Compare the broker's medians with those of the run in broker-before.json."""
    if before is None or after is None:
        return ["No earlier run is stored in bench/results/broker-before.json."]
    lines = [
        f"`before` is the run stored in `bench/results/broker-before.json` (broker commit "
        f"{before['versions'].get('broker commit', '?')}, "
        f"{'quick' if before['quick'] else 'full'} run, {before['finished_at']}); `after` "
        f"is this page's run (commit {after['versions'].get('broker commit', '?')}). Both "
        "ran on this machine with the same request.",
        "",
    ]
    body = []
    old = _group(
        [r for r in before["sync"] if r["target"] == "broker"], "latency_ms", "concurrency"
    )
    new = _group([r for r in after["sync"] if r["target"] == "broker"], "latency_ms", "concurrency")
    for key in sorted(set(old) & set(new)):
        latency, concurrency = key
        body.append(
            (
                f"synchronous, upstream {latency} ms, concurrency {concurrency}",
                f"{_median(old[key], 'requests_per_s'):,.0f} req/s, p50 "
                f"{_median(old[key], 'p50_ms'):,.1f} ms",
                f"{_median(new[key], 'requests_per_s'):,.0f} req/s, p50 "
                f"{_median(new[key], 'p50_ms'):,.1f} ms",
            )
        )
    for name, field, label in (
        ("settled", "settled_per_s", "settled jobs/s end to end"),
        ("billing", "settled_per_s", "billing settlements/s from a backlog"),
    ):
        if before.get(name) and after.get(name):
            body.append(
                (
                    label,
                    f"{_median(before[name], field):,.0f}",
                    f"{_median(after[name], field):,.0f}",
                )
            )
    return lines + _table(("measurement", "before", "after"), body)


def render(
    broker: dict[str, Any] | None,
    litellm: dict[str, Any] | None,
    profile: dict[str, Any] | None = None,
    scale: dict[str, Any] | None = None,
    before: dict[str, Any] | None = None,
) -> str:
    """Return the results page for the latest broker, LiteLLM, profile and scale runs."""
    main = broker or litellm
    if main is None:
        raise ValueError("no broker or LiteLLM results to render: run bench/run.py first")
    lines = ["# Benchmark results", ""]
    if main["quick"]:
        lines += [
            "> **Quick run**: one round of short load runs "
            f"({main['plan']['sync_duration_s']:g} s each). The figures show the order of "
            "magnitude only; `make bench` runs three rounds of longer runs and reports "
            "medians with their range.",
            "",
        ]
    lines += [
        f"Written by `bench/run.py` on {main['finished_at']}. Run `make bench` (three "
        "rounds) or `make bench-quick` (one short round) to measure again; the raw figures "
        "are in `bench/results/`.",
        "",
        "## Machine",
        "",
        f"- CPU: {main['machine']['cpu']}, {main['machine']['cores']} cores; memory "
        f"{main['machine']['memory_gib']} GiB; Linux {main['machine']['kernel']}.",
        f"- Load average (1, 5, 15 min) at the start {main['load_average']['start']}, at the "
        f"end {main['load_average']['end']}.",
        *_connections_line(main),
        "- The load generator runs on the same two cores as every process it measures "
        "(simulator, API, workers, Redis, PostgreSQL), and other engineers' test runs "
        "shared the machine, so part of each difference below is noise.",
        "",
    ]
    if broker is None:
        lines += ["No broker run is stored yet; `make bench-quick` makes one.", ""]
        lines += ["## LiteLLM reference", "", *litellm_section(litellm), ""]
        lines += ["## Where the broker's time goes", "", *profile_section(profile), ""]
        return "\n".join(lines)

    settings = broker["settings"]
    lines += ["## Versions", "", *versions_table(broker["versions"]), ""]
    if "uncommitted" in broker["versions"].get("broker commit", ""):
        lines += [
            "The working tree had uncommitted changes when this ran, so the figures "
            "describe that tree and not the commit alone.",
            "",
        ]
    lines += [
        "## Setup and commands",
        "",
        f"- Command: `{broker['command']}`.",
        f"- System: `start_system` with a private redis-server on a free port and a fresh "
        f"PostgreSQL database on 127.0.0.1:5432 (dropped afterwards); "
        f"{settings['api_workers']} API process (uvicorn, uvloop, httptools), two Celery "
        f"gevent workers per region, one per lane (interactive, batch), each with "
        f"{settings['worker_concurrency']} greenlets, the "
        f"billing worker with {settings['billing_concurrency']} greenlets, "
        "`BROKER_LOG_LEVEL=WARNING`.",
        f"- Request: `{broker['request_summary']}`. The simulator replies with at most that "
        "many tokens; `latency_ms` is set through `/_sim/config` on both regions.",
        f"- Synchronous load: {broker['load_generators']['sync']}, "
        f"{broker['plan']['warmup_s']:g} s of unrecorded load per target first. Each run "
        f"lasts {broker['plan']['run_warmup_s']:g} + {broker['plan']['sync_duration_s']:g} s; "
        f"requests/s counts the responses of the last {broker['plan']['sync_duration_s']:g} "
        "s only, because at concurrency 200 the broker's first responses take seconds, while "
        "the latency percentiles and error counts cover the whole run. Example: "
        f"`{broker['example_commands']['sync']}`. bench/post.lua counts a response as "
        "non-2xx; socket errors and timeouts (60 s) are counted apart.",
        f"- Streaming load: bench/pyload.py (asyncio, httpx, uvloop) in its own process, e.g. "
        f"`{broker['example_commands'].get('streaming', 'n/a')}`.",
        "- After each broker run the benchmark waits until every job of the run is "
        "settled, so no run's jobs still occupy the workers or the billing worker during "
        "the next, as no direct run's do: the settling of a saturating run's backlog "
        "would slow the single-request runs after it.",
        "",
        "## a. Synchronous chat completions",
        "",
        "`direct` is the same request sent straight to the simulator in the same run.",
        "",
        *sync_table(broker["sync"]),
        "",
        "The broker's share, from the medians above:",
        "",
        *share_table(broker["sync"], "broker"),
        *broker_vs_litellm(broker, litellm),
        "",
        "## b. Streaming: time to first token and total time",
        "",
        *streaming_section(broker.get("streaming")),
        "",
        "## c. Settled jobs per second",
        "",
        *settled_section(
            broker.get("settled", []), broker.get("drain"), broker.get("purged_repeats", [])
        ),
        "",
        "## d. Billing settlements per second (PostgreSQL)",
        "",
        *billing_section(broker.get("billing", [])),
        "",
        "## e. Upstream calls in flight in one worker",
        "",
        *in_flight_section(scale),
        "",
        "## f. A large batch, and interactive latency beside it",
        "",
        *batch_section(scale),
        "",
        "## Before and after the hot-path changes",
        "",
        *before_after_section(before, broker),
        "",
        "## LiteLLM reference",
        "",
        *litellm_section(litellm),
        "",
        "## Where the broker's time goes",
        "",
        *profile_section(profile),
        "",
    ]
    if broker.get("notes"):
        lines += ["## Notes", "", *(f"- {note}" for note in broker["notes"]), ""]
    return "\n".join(lines)


def _mib(kib: float) -> str:
    return f"{kib / 1024:,.0f} MiB"


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.1f}"


def _limits(pair: Sequence[int]) -> str:
    return f"{pair[0]:,} and {pair[1]:,}"


def _api_limit_sentence(row: Row) -> str:
    """Say whether one API process, creating jobs at its measured rate, caps the calls."""
    submit = row["submit"]
    latency_s = row["upstream_latency_ms"] / 1000
    reachable = submit["jobs_per_s"] * latency_s
    text = (
        f"The API created the jobs at {submit['jobs_per_s']:,.0f} per second (p50 "
        f"{submit['latency_ms']['p50']:,.1f} ms, p99 {submit['latency_ms']['p99']:,.1f} ms per "
        f"request). Jobs arriving at that rate, not from a queue, would keep about "
        f"{reachable:,.0f} calls in flight (rate × {latency_s:g} s). "
    )
    if submit.get("retries"):
        text += (
            f"{submit['retries']:,} requests lost their connection "
            f"({submit['first_retry_cause']}) and were sent again with the same "
            "Idempotency-Key, as the openai SDK does. "
        )
    if reachable < row["calls"]:
        return text + (
            f"That is fewer than {row['calls']:,}, so in steady operation the single API "
            "process, not the worker, sets the limit."
        )
    return text + "That is enough to fill the worker, so the API is not the limit here."


def in_flight_section(scale: dict[str, Any] | None) -> list[str]:
    if scale is None:
        return ["Not measured yet: run `.venv/bin/python bench/run.py --scale-only`."]
    row = scale["in_flight"]
    submit = row["submit"]
    files = row["open_files"]
    opened = scale["open_files"]
    lines = [
        f"Measured {scale['finished_at']} with `{scale['command']}`, on a system of its own. "
        f"The us worker ran with {row['calls']:,} greenlets (`--concurrency` and "
        "`BROKER_WORKER_CONCURRENCY`, which sizes its httpx pool), and both simulators "
        f"answered after {row['upstream_latency_ms']:,} ms. The worker stopped consuming its "
        f"interactive queue while a client process (bench/pyload.py, {submit['concurrency']} "
        f"connections) created {row['calls']:,} jobs with `POST /v1/jobs`, each pinned to "
        "region us. Then it consumed the queue again and took them all. The peaks are "
        "sampled every 0.25 s: the worker's `broker_jobs_in_flight` gauge and the "
        "simulator's `in_flight` from `/_sim/stats`.",
        "",
    ]
    body = [
        (
            f"{row['calls']:,}",
            f"{row['peak_worker_gauge']:,}",
            f"{row['peak_simulator_in_flight']:,}",
            f"{row['elapsed_s']:.1f}",
            f"{row['not_succeeded']:,}",
            _mib(row["worker_rss_kib"]["before"]),
            _mib(row["worker_rss_kib"]["at_peak"]),
            f"{row['rss_per_call_kib']:,.0f} KiB",
        )
    ]
    headers = (
        "jobs",
        "peak in flight, worker gauge",
        "peak in flight, simulator",
        "s from resume to last job finished",
        "jobs not succeeded",
        "worker RSS before",
        "worker RSS at peak",
        "RSS per call in flight",
    )
    if row.get("problems"):
        lines += [
            f"**Failed**: {'; '.join(row['problems'])}. First error in the worker's log: "
            f"`{row.get('first_worker_error') or 'none'}`. The figures below show how far "
            "the run got.",
            "",
        ]
    lines += _table(headers, body)
    statuses = ", ".join(f"{count:,} {status}" for status, count in row["statuses"].items())
    simulator = ", ".join(
        f"{count:,} × {code}" for code, count in row["simulator"]["by_status"].items()
    )
    lines += [
        "",
        f"Checks: jobs by status {statuses}; {row['settled']:,} of {row['calls']:,} settled; "
        f"the wallet matches its ledger ({row['wallet']['matches_ledger']}) with "
        f"{row['wallet']['held_micro_usd']} micro-USD still held; the simulator answered "
        f"{row['simulator']['requests']:,} requests ({simulator}).",
        "",
        _api_limit_sentence(row),
        "",
        f"Open files: about {files['needed_estimate']:,} needed (one socket per call plus "
        f"a margin). Soft and hard limits: worker {_limits(files['worker_limit'])}, simulator "
        f"{_limits(files['simulator_limit'])}; at most {files['worker_peak']:,} open in the "
        "worker and "
        f"{files['simulator_peak']:,} in the simulator. "
        + (
            f"The benchmark raised its own soft limit from {opened['soft']:,} to "
            f"{opened['raised_to']:,} before starting the system, which its processes inherit."
            if opened["raised"]
            else f"The soft limit ({opened['soft']:,}) was already high enough, so the "
            "benchmark left it alone."
        ),
    ]
    if row.get("sample_failures"):
        lines[-1] += (
            f" {row['sample_failures']} samples of the gauge failed (first: "
            f"{row['first_sample_failure']})."
        )
    return lines


def batch_section(scale: dict[str, Any] | None) -> list[str]:
    if scale is None:
        return ["Not measured yet: run `.venv/bin/python bench/run.py --scale-only`."]
    batch = scale["batch"]
    settings = scale["settings"]
    if "error" in batch:
        return [
            f"**Failed** with {batch['requests']:,} requests, so no figures were recorded: "
            f"{batch['error']}"
        ]
    counts = batch["request_counts"]
    at_stop = batch["at_stop"]
    lines = [
        f"{batch['requests']:,} chat requests in OpenAI's batch format "
        f"({batch['input_bytes'] / 1e6:,.1f} MB), uploaded with the `openai` SDK "
        "(`files.create`, `batches.create`), upstream latency 0. The billing worker runs "
        "the batches queue, so it validates the file and creates the jobs; the API only "
        f"stores the upload. At most {settings['batch_max_in_flight']} jobs of a batch are "
        "published at once, and each settlement publishes the next, so the billing worker "
        "paces the batch. Times come from the batch's status timestamps.",
        "",
    ]
    body = [
        (
            f"{batch['upload_s']:.1f}",
            _seconds(batch["validating_s"]),
            _seconds(batch["all_jobs_created_after_s"]),
            _seconds(batch["in_progress_s"]),
            _seconds(batch["finalizing_s"]),
            _seconds(batch["created_to_end_s"]),
            "n/a" if batch["jobs_per_s"] is None else f"{batch['jobs_per_s']:,.0f}",
            batch["final_status"],
        )
    ]
    headers = (
        "upload s",
        "validating to in_progress s",
        "in_progress to all jobs created s",
        "in_progress to finalizing s",
        "finalizing to end s",
        "created to end s",
        "completed jobs/s while in progress",
        "final status",
    )
    lines += _table(headers, body)
    if at_stop["outcome"] != "done":
        reason = (
            f"it was still running after the cap of {scale['plan']['batch_wait_max_s']:g} s"
            if at_stop["outcome"] == "cap"
            else "no request finished for 120 s"
        )
        lines += [
            "",
            f"**Cancelled**, because {reason}: {at_stop['completed']:,} requests had completed "
            f"and {at_stop['failed']:,} failed after {at_stop['seconds_in_progress']:,.0f} s in "
            "progress.",
        ]
    rss = batch["rss_kib"]
    lines += [
        "",
        "Resident memory (sampled every 0.25 s; the lifetime peak is the kernel's VmHWM):",
        "",
        *_table(
            (
                "process",
                "before the upload",
                "after the upload",
                "max while the batch ran",
                "lifetime peak",
            ),
            (
                (
                    name,
                    _mib(r["before"]),
                    _mib(r["after_upload"]),
                    _mib(r["max"]),
                    _mib(r["lifetime_peak"]),
                )
                for name, r in rss.items()
            ),
        ),
        "",
        f"Checks: request_counts {counts['completed']:,} completed + {counts['failed']:,} "
        f"failed of {counts['total']:,}; the output file has {batch['output_lines']:,} lines "
        f"with distinct custom_ids from the input ({batch['output_custom_ids_match']}) and "
        f"{batch['output_non_200']} non-200 responses; {batch['account_jobs']['total']:,} jobs "
        f"of the account, {batch['account_jobs']['never_settled']} never settled; the wallet "
        f"matches its ledger ({batch['wallet']['matches_ledger']}) with "
        f"{batch['wallet']['held_micro_usd']} micro-USD still held.",
        "",
    ]
    interactive = batch["interactive"]
    rows = [("no batch", interactive["baseline"]), ("batch in progress", interactive["during"])]
    lines += [
        f"Synchronous chat completions at concurrency {interactive['concurrency']} (wrk, "
        f"{scale['plan']['run_warmup_s']:g} s warm-up and {interactive['duration_s']:g} s "
        "counted; latencies over the whole run), first with no batch and then while the "
        "batch was in progress"
        + (
            "."
            if interactive["batch_ran_throughout"]
            else ", though the batch ended before the run did."
        ),
        "",
        *_table(
            (
                "interactive load",
                "requests/s",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "non-2xx",
                "socket errors",
            ),
            (
                (
                    label,
                    f"{r['requests_per_s']:,.0f}",
                    f"{r['p50_ms']:,.1f}",
                    f"{r['p90_ms']:,.1f}",
                    f"{r['p99_ms']:,.1f}",
                    str(r["non2xx"]),
                    str(r["socket_errors"]),
                )
                for label, r in rows
            ),
        ),
    ]
    return lines
