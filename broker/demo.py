"""The demo: the whole system on this machine, driven by the official openai SDK."""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import func, select

from broker.accounts import create_account, create_api_key
from broker.db import make_engine, session_factory
from broker.demo_batch import run_batch_demo
from broker.ledger import check_wallet, top_up
from broker.migrate import upgrade
from broker.preflight import ServiceDown, check_database, check_redis
from broker.processes import ProcessGroup, StartupFailed, free_port
from broker.settings import Settings, get_settings
from broker.system import SystemPorts, start_system
from broker.tables import Job, LedgerEntry

PROJECT_DIR = Path(__file__).resolve().parent.parent
DEFAULT_REQUESTS = PROJECT_DIR / "examples" / "demo_requests.jsonl"
# The demo account's opening balance: five dollars, in micro-dollars.
DEMO_BALANCE_MICRO_USD = 5_000_000
# Seconds to wait for the billing worker to settle every job after the last reply.
SETTLE_TIMEOUT_S = 60.0

# Tables keep their width when the output is a file or a pipe (rich assumes 80 columns).
console = Console(width=None if sys.stdout.isatty() else 200)


@dataclass
class Outcome:
    custom_id: str
    model: str
    ok: bool
    latency_s: float
    provider: str = "?"
    region: str = "?"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_micro_usd: int = 0
    error: str = ""


def load_requests(path: Path) -> list[dict[str, Any]]:
    """Read an OpenAI batch-format JSONL file of chat completion requests."""
    requests = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        entry = json.loads(line)
        if entry.get("url") != "/v1/chat/completions":
            raise ValueError(f"{path}:{number}: only /v1/chat/completions lines are supported")
        requests.append(entry)
    return requests


async def _send_one(client: openai.AsyncOpenAI, entry: dict[str, Any]) -> Outcome:
    body = dict(entry["body"])
    model = body.pop("model")
    messages = body.pop("messages")
    extra = {key: body.pop(key) for key in ("region",) if key in body}
    started = time.perf_counter()
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model=model, messages=messages, extra_body=extra or None, **body
        )
        completion = raw.parse()
    except openai.APIError as exc:
        return Outcome(
            entry["custom_id"],
            model,
            False,
            time.perf_counter() - started,
            error=f"{type(exc).__name__}: {exc}",
        )
    usage = completion.usage
    return Outcome(
        entry["custom_id"],
        model,
        True,
        time.perf_counter() - started,
        provider=raw.headers.get("x-broker-provider", "?"),
        region=raw.headers.get("x-broker-region", "?"),
        prompt_tokens=usage.prompt_tokens if usage else 0,
        completion_tokens=usage.completion_tokens if usage else 0,
        cost_micro_usd=int(raw.headers.get("x-broker-cost-micro-usd", "0")),
    )


async def drive(
    base_url: str, api_key: str, requests: list[dict[str, Any]], concurrency: int
) -> list[Outcome]:
    """Send every request through the SDK, ``concurrency`` at a time, with a progress bar."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)
    gate = asyncio.Semaphore(concurrency)
    outcomes: list[Outcome] = []
    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("chat completions", total=len(requests))

        async def guarded(entry: dict[str, Any]) -> None:
            async with gate:
                outcomes.append(await _send_one(client, entry))
            progress.advance(task)

        await asyncio.gather(*(guarded(entry) for entry in requests))
    await client.close()
    return outcomes


def _percentile(values: list[float], share: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(share * 100) - 1]


def _usd(micro_usd: int) -> str:
    return f"${micro_usd / 1_000_000:.6f}"


def summary_table(outcomes: list[Outcome]) -> Table:
    table = Table(title="Requests by model, provider and region")
    for header in (
        "model",
        "provider",
        "region",
        "requests",
        "failed",
        "p50 ms",
        "p99 ms",
        "tokens in",
        "tokens out",
        "cost",
    ):
        table.add_column(header, justify="left" if header in ("model", "provider") else "right")
    groups: dict[tuple[str, str, str], list[Outcome]] = defaultdict(list)
    for outcome in outcomes:
        groups[(outcome.model, outcome.provider, outcome.region)].append(outcome)
    for (model, provider, region), group in sorted(groups.items()):
        latencies = [o.latency_s * 1000 for o in group]
        table.add_row(
            model,
            provider,
            region,
            str(len(group)),
            str(sum(not o.ok for o in group)),
            f"{_percentile(latencies, 0.5):.0f}",
            f"{_percentile(latencies, 0.99):.0f}",
            str(sum(o.prompt_tokens for o in group)),
            str(sum(o.completion_tokens for o in group)),
            _usd(sum(o.cost_micro_usd for o in group)),
        )
    latencies = [o.latency_s * 1000 for o in outcomes]
    table.add_row(
        "all",
        "",
        "",
        str(len(outcomes)),
        str(sum(not o.ok for o in outcomes)),
        f"{_percentile(latencies, 0.5):.0f}",
        f"{_percentile(latencies, 0.99):.0f}",
        str(sum(o.prompt_tokens for o in outcomes)),
        str(sum(o.completion_tokens for o in outcomes)),
        _usd(sum(o.cost_micro_usd for o in outcomes)),
        style="bold",
    )
    return table


def wait_settled(settings: Settings, account_id: str, timeout_s: float) -> int:
    """Wait until every job of the account is settled; returns how many are not."""
    sessions = session_factory(make_engine(settings.database_url, pool_size=1))
    deadline = time.monotonic() + timeout_s
    while True:
        with sessions() as session:
            unsettled = (
                session.scalar(
                    select(func.count())
                    .select_from(Job)
                    .where(Job.account_id == account_id, Job.settled_at.is_(None))
                )
                or 0
            )
        if unsettled == 0 or time.monotonic() > deadline:
            return unsettled
        time.sleep(0.2)


def run_demo(requests_path: str | None, concurrency: int, keep_running: bool) -> int:
    """Run the demo end to end; returns the process exit code."""
    settings = get_settings()
    path = Path(requests_path) if requests_path else DEFAULT_REQUESTS
    try:
        check_redis(settings.redis_url)
        check_database(settings.database_url, require_schema=False)
        requests = load_requests(path)
    except (ServiceDown, OSError, ValueError) as exc:
        console.print(f"[bold red]error:[/] {exc}")
        return 2

    upgrade(settings.database_url)
    ports = SystemPorts(
        api=free_port(), simulator_us=free_port(), simulator_hk=free_port(), flower=free_port()
    )
    group = ProcessGroup(log_dir=Path("var") / "demo-logs", env={})
    try:
        console.print(f"starting the system (logs in {group.log_dir}/) ...")
        start_system(group, settings, ports)
        console.print(
            f"API at http://127.0.0.1:{ports.api}/v1, Flower at "
            f"http://127.0.0.1:{ports.flower}/ (user and password from "
            "BROKER_FLOWER_BASIC_AUTH)"
        )
        return _run_workload(settings, ports, requests, concurrency, keep_running)
    except StartupFailed as exc:
        console.print(f"[bold red]error:[/] {exc}")
        return 1
    finally:
        group.stop_all()


def _run_workload(
    settings: Settings,
    ports: SystemPorts,
    requests: list[dict[str, Any]],
    concurrency: int,
    keep_running: bool,
) -> int:
    sessions = session_factory(make_engine(settings.database_url, pool_size=1))
    with sessions.begin() as session:
        account, wallet = create_account(session, "demo")
        top_up(session, account.id, DEMO_BALANCE_MICRO_USD, note="demo opening balance")
        _, api_key = create_api_key(session, account.id, "demo")
    console.print(
        f"account {account.id} with {_usd(DEMO_BALANCE_MICRO_USD)}; sending "
        f"{len(requests)} requests, {concurrency} at a time"
    )

    started = time.perf_counter()
    outcomes = asyncio.run(
        drive(f"http://127.0.0.1:{ports.api}/v1", api_key, requests, concurrency)
    )
    elapsed_s = time.perf_counter() - started
    unsettled = wait_settled(settings, account.id, SETTLE_TIMEOUT_S)

    console.print(summary_table(outcomes))
    failed = [o for o in outcomes if not o.ok]
    for outcome in failed[:10]:
        console.print(f"[red]failed[/] {outcome.custom_id} ({outcome.model}): {outcome.error}")
    reported = sum(o.cost_micro_usd for o in outcomes)
    console.print(
        f"{len(outcomes)} requests in {elapsed_s:.1f} s "
        f"({len(outcomes) / elapsed_s:.1f} per second)"
    )

    # The asynchronous part: a batch through the Files and Batch APIs, with a webhook.
    batch = run_batch_demo(console, f"http://127.0.0.1:{ports.api}/v1", api_key, sessions)
    reported += batch.cost_micro_usd
    unsettled = wait_settled(settings, account.id, SETTLE_TIMEOUT_S)

    with sessions() as session:
        check = check_wallet(session, wallet.id)
        charged = -(
            session.scalar(
                select(func.coalesce(func.sum(LedgerEntry.amount_micro_usd), 0)).where(
                    LedgerEntry.wallet_id == wallet.id, LedgerEntry.kind == "charge"
                )
            )
            or 0
        )

    console.print(
        f"wallet before {_usd(DEMO_BALANCE_MICRO_USD)}, after "
        f"{_usd(check.balance_micro_usd)}, held {_usd(check.held_micro_usd)}"
    )
    console.print(
        f"ledger: balance {_usd(check.balance_micro_usd)} = sum of entries "
        f"{_usd(check.ledger_balance_micro_usd)}: {'ok' if check.ok else 'MISMATCH'}; "
        f"charged {_usd(charged)}, responses and batch reported {_usd(reported)}: "
        f"{'ok' if charged == reported else 'MISMATCH'}"
    )
    ok = (
        not failed
        and batch.ok
        and unsettled == 0
        and check.ok
        and check.held_micro_usd == 0
        and charged == reported
        and check.balance_micro_usd == DEMO_BALANCE_MICRO_USD - charged
    )
    if unsettled:
        console.print(f"[red]{unsettled} jobs were not settled within {SETTLE_TIMEOUT_S:g} s[/]")
    if keep_running:
        console.print(f"the system keeps running; API key: {api_key}. Press Ctrl+C to stop.")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    console.print("[bold green]demo passed[/]" if ok else "[bold red]demo failed[/]")
    return 0 if ok else 1
