"""The ``broker`` command: run each process, manage accounts, keys and wallets."""

from __future__ import annotations

import os
import sys
from decimal import Decimal, InvalidOperation

import typer
from rich.console import Console
from rich.table import Table

from broker.settings import get_settings

app = typer.Typer(
    help="Self-hosted LLM inference broker.", no_args_is_help=True, pretty_exceptions_enable=False
)
accounts_app = typer.Typer(help="Create accounts.", no_args_is_help=True)
keys_app = typer.Typer(help="Create API keys.", no_args_is_help=True)
wallet_app = typer.Typer(help="Top up and inspect wallets.", no_args_is_help=True)
app.add_typer(accounts_app, name="accounts")
app.add_typer(keys_app, name="keys")
billing_app = typer.Typer(help="Check and correct the ledger.", no_args_is_help=True)
app.add_typer(wallet_app, name="wallet")
app.add_typer(billing_app, name="billing")

# Largest dollar amount a command accepts; the ledger refuses larger entries anyway.
MAX_DOLLARS = Decimal(1_000_000)
# Messages each billing greenlet may hold before it runs them.
BILLING_PREFETCH_MULTIPLIER = 4

# Tables keep their width when the output is a file or a pipe (rich assumes 80 columns).
_WIDTH = None if sys.stdout.isatty() else 200
console = Console(width=_WIDTH)
errors = Console(stderr=True, width=_WIDTH)


def fail(message: str, code: int = 2) -> None:
    errors.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _preflight(*, redis: bool = True, database: bool = True) -> None:
    from broker.preflight import ServiceDown, check_database, check_redis

    settings = get_settings()
    try:
        if redis:
            check_redis(settings.redis_url)
        if database:
            check_database(settings.database_url)
    except ServiceDown as exc:
        fail(str(exc))


def _dollars_to_micro(text: str) -> int:
    from broker.catalog import to_micro_usd

    try:
        value = Decimal(text.lstrip("$"))
        if not value.is_finite() or abs(value) > MAX_DOLLARS:
            raise ValueError(text)
        amount = to_micro_usd(value)
    except (InvalidOperation, ValueError, OverflowError):
        fail(f"invalid dollar amount {text!r}: give a number such as 5.00")
    return amount


def _sessions():  # noqa: ANN202  (a sessionmaker; typed where used)
    from broker.db import make_engine, session_factory

    return session_factory(make_engine(get_settings().database_url, pool_size=1))


@app.command()
def api(
    host: str = typer.Option(None, help="Address to listen on [BROKER_API_HOST]."),
    port: int = typer.Option(None, help="TCP port [BROKER_API_PORT]."),
    workers: int = typer.Option(None, help="uvicorn processes [BROKER_API_WORKERS]."),
) -> None:
    """Run the intake API."""
    import uvicorn

    _preflight()
    settings = get_settings()
    uvicorn.run(
        "broker.api.app:create_app",
        factory=True,
        host=host or settings.api_host,
        port=port or settings.api_port,
        workers=workers or settings.api_workers,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )


def _exec_celery(argv: list[str], env: dict[str, str]) -> None:
    os.environ.update(env)
    # celery's own entry point applies gevent's monkey patching before anything else
    # imports sockets, which the pool needs.
    os.execvp(sys.executable, [sys.executable, "-m", "celery", "-A", "workers.worker", *argv])


@app.command()
def worker(
    region: str = typer.Option(..., help="Region whose queues this pool consumes."),
    concurrency: int = typer.Option(
        None, help="Upstream calls in flight per process [BROKER_WORKER_CONCURRENCY]."
    ),
    lanes: str = typer.Option("interactive,batch", help="Comma-separated lanes."),
    name: str = typer.Option(None, help="Celery node name; default <region>@<host>."),
    metrics_port: int = typer.Option(
        None, help="Serve this process's Prometheus metrics on this port."
    ),
) -> None:
    """Run a region-pinned worker pool: it consumes only ``*.<region>.*`` queues."""
    from broker.catalog import load_catalog

    _preflight()
    settings = get_settings()
    catalog = load_catalog(settings.catalog_path)
    if region not in catalog.regions:
        fail(f"unknown region {region!r}; the catalog has {', '.join(catalog.regions)}")
    queues = catalog.queues_for_region(region, tuple(lanes.split(",")))
    _exec_celery(
        [
            "worker",
            "-P",
            "gevent",
            "-c",
            str(concurrency or settings.worker_concurrency),
            "-Q",
            ",".join(queues),
            "-n",
            name or f"{region}@%h",
            "--without-mingle",
            "--without-gossip",
            "-l",
            settings.log_level,
        ],
        {
            "BROKER_WORKER_POOL": region,
            "BROKER_WORKER_REGION": region,
            "BROKER_WORKER_LANES": lanes,
            # The process sizes its HTTP clients and Redis pool from the setting.
            "BROKER_WORKER_CONCURRENCY": str(concurrency or settings.worker_concurrency),
            **({"BROKER_WORKER_METRICS_PORT": str(metrics_port)} if metrics_port else {}),
        },
    )


@app.command("billing-worker")
def billing_worker(
    concurrency: int = typer.Option(
        None, help="Settlements in flight [BROKER_BILLING_CONCURRENCY]."
    ),
) -> None:
    """Run the billing worker: it settles finished jobs against wallets, and also runs
    the batch tasks and webhook deliveries (the batches and webhooks queues)."""
    from workers.app import BATCHES_QUEUE, BILLING_QUEUE, WEBHOOKS_QUEUE

    _preflight()
    settings = get_settings()
    _exec_celery(
        [
            "worker",
            "-P",
            "gevent",
            "-c",
            str(concurrency or settings.billing_concurrency),
            "-Q",
            ",".join((BILLING_QUEUE, BATCHES_QUEUE, WEBHOOKS_QUEUE)),
            # Settle tasks take milliseconds. Kombu's Redis transport pauses fetching for up
            # to a second once a worker's prefetched messages are all taken, so a prefetch
            # of one per greenlet capped billing near 16 settlements a second. Settling is
            # idempotent, so a deep prefetch is safe; the greenlets running settle tasks
            # at once share one transaction.
            "--prefetch-multiplier",
            str(BILLING_PREFETCH_MULTIPLIER),
            "-n",
            "billing@%h",
            "--without-mingle",
            "--without-gossip",
            "-l",
            settings.log_level,
        ],
        {
            "BROKER_WORKER_POOL": "billing",
            "BROKER_BILLING_CONCURRENCY": str(concurrency or settings.billing_concurrency),
        },
    )


@app.command()
def flower(
    port: int = typer.Option(None, help="TCP port [BROKER_FLOWER_PORT]."),
    address: str = typer.Option("127.0.0.1", help="Address to listen on."),
) -> None:
    """Run Flower, the Celery monitor, behind basic auth [BROKER_FLOWER_BASIC_AUTH]."""
    _preflight(database=False)
    settings = get_settings()
    _exec_celery(
        [
            "flower",
            f"--port={port or settings.flower_port}",
            f"--address={address}",
        ],
        # Through the environment, so the password does not show in the process list.
        {"FLOWER_BASIC_AUTH": settings.flower_basic_auth.get_secret_value()},
    )


@app.command()
def simulator(
    region: str = typer.Option("us", help="Region this simulator stands for."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(9101, help="TCP port."),
    latency_ms: int = typer.Option(0, help="Added latency per call, milliseconds."),
    fault_rate_429: float = typer.Option(0.0, help="Share of calls that get a 429 response."),
    fault_rate_500: float = typer.Option(0.0, help="Share of calls that get a 500 response."),
    fault_rate_timeout: float = typer.Option(0.0, help="Share of calls that hang."),
) -> None:
    """Run the provider simulator for one region."""
    from simulator.app import run
    from simulator.config import SimulatorConfig

    run(
        SimulatorConfig(
            region=region,
            latency_ms=latency_ms,
            fault_rate_429=fault_rate_429,
            fault_rate_500=fault_rate_500,
            fault_rate_timeout=fault_rate_timeout,
        ),
        host,
        port,
    )


@app.command("simulator-env")
def simulator_env(
    us_port: int = typer.Option(9101, help="Port of the us simulator."),
    hk_port: int = typer.Option(9102, help="Port of the hk simulator."),
) -> None:
    """Print the settings that point every provider at local simulators, for `eval`."""
    import shlex

    from broker.system import SystemPorts, simulator_environment

    ports = SystemPorts(api=0, simulator_us=us_port, simulator_hk=hk_port)
    environment = simulator_environment(get_settings(), ports)
    for name in ("BROKER_BASE_URL_OVERRIDES", "BROKER_PROVIDER_KEYS"):
        print(f"export {name}={shlex.quote(environment[name])}")


@app.command()
def migrate() -> None:
    """Create or upgrade the database schema."""
    from broker.migrate import upgrade
    from broker.preflight import ServiceDown, check_database

    settings = get_settings()
    try:
        check_database(settings.database_url, require_schema=False)
    except ServiceDown as exc:
        fail(str(exc))
    upgrade(settings.database_url)
    console.print("database schema is current")


@accounts_app.command("create")
def accounts_create(
    name: str, balance: str = typer.Option("0", help="Opening top-up, USD.")
) -> None:
    """Create an account with a wallet, optionally topped up."""
    from broker.accounts import create_account
    from broker.jobstore import format_usd
    from broker.ledger import top_up

    _preflight(redis=False)
    amount = _dollars_to_micro(balance)
    with _sessions().begin() as session:
        account, wallet = create_account(session, name)
        if amount:
            top_up(session, account.id, amount, note="opening balance")
    console.print(f"account {account.id}  wallet {wallet.id}  balance {format_usd(amount)}")


@keys_app.command("create")
def keys_create(account_id: str, name: str = typer.Option("", help="Label for listings.")) -> None:
    """Create an API key; it is printed once and only its hash is stored."""
    from broker.accounts import create_api_key

    _preflight(redis=False)
    with _sessions().begin() as session:
        try:
            row, key = create_api_key(session, account_id, name)
        except LookupError as exc:
            fail(str(exc))
    errors.print(f"key {row.id} (prefix {row.prefix}); store it now, it is not shown again:")
    print(key)


@wallet_app.command("topup")
def wallet_topup(
    account_id: str,
    amount: str,
    idempotency_key: str = typer.Option(None, help="Applies the top-up once."),
) -> None:
    """Credit an account's wallet with AMOUNT US dollars."""
    from broker.ledger import LedgerError, top_up

    _preflight(redis=False)
    micro = _dollars_to_micro(amount)
    with _sessions().begin() as session:
        try:
            applied = top_up(
                session, account_id, micro, idempotency_key=idempotency_key, note="cli top-up"
            )
        except LedgerError as exc:
            fail(str(exc))
    console.print("credited" if applied else "already applied; nothing changed")


@wallet_app.command("show")
def wallet_show(account_id: str) -> None:
    """Show a wallet and check it against its ledger; exits 1 if they differ."""
    from sqlalchemy import select

    from broker.ledger import check_wallet
    from broker.tables import Wallet

    _preflight(redis=False)
    with _sessions()() as session:
        wallet_id = session.scalar(select(Wallet.id).where(Wallet.account_id == account_id))
        if wallet_id is None:
            fail(f"account {account_id} has no wallet")
        check = check_wallet(session, wallet_id)
    table = Table("", "wallet", "ledger")
    table.add_row(
        "balance (micro-USD)", str(check.balance_micro_usd), str(check.ledger_balance_micro_usd)
    )
    table.add_row("held (micro-USD)", str(check.held_micro_usd), str(check.ledger_held_micro_usd))
    console.print(table)
    if not check.ok:
        fail("the wallet does not match its ledger", code=1)


@billing_app.command("reconcile")
def billing_reconcile() -> None:
    """Check every wallet against its ledger; exits 1 if any differs."""
    from broker.ledger import check_all_wallets

    _preflight(redis=False)
    with _sessions()() as session:
        checks = check_all_wallets(session)
    bad = [check for check in checks if not check.ok]
    for check in bad:
        errors.print(
            f"wallet {check.wallet_id}: balance {check.balance_micro_usd} vs ledger "
            f"{check.ledger_balance_micro_usd}, held {check.held_micro_usd} vs ledger "
            f"{check.ledger_held_micro_usd} (micro-USD)"
        )
    console.print(f"{len(checks)} wallets checked, {len(bad)} differ from their ledger")
    if bad:
        raise typer.Exit(1)


@billing_app.command("adjust")
def billing_adjust(
    account_id: str,
    amount: str = typer.Argument(..., help="US dollars; negative to debit."),
    note: str = typer.Option(..., help="Why; stored with the entry."),
    idempotency_key: str = typer.Option(None, help="Applies the adjustment once."),
) -> None:
    """Correct a wallet's balance by AMOUNT US dollars with an adjustment entry."""
    from broker.ledger import LedgerError, credit

    _preflight(redis=False)
    sign = -1 if amount.startswith("-") else 1
    micro = sign * _dollars_to_micro(amount.lstrip("-"))
    with _sessions().begin() as session:
        try:
            applied = credit(
                session,
                account_id,
                micro,
                kind="adjustment",
                idempotency_key=idempotency_key,
                note=note,
            )
        except LedgerError as exc:
            fail(str(exc))
    console.print("adjusted" if applied else "already applied; nothing changed")


@billing_app.command("refund")
def billing_refund(
    job_id: str,
    amount: str = typer.Option(None, help="US dollars; the whole charge if omitted."),
    note: str = typer.Option("", help="Why; stored with the entry."),
) -> None:
    """Refund part or all of a settled job's charge."""
    from broker.ledger import LedgerError, refund_job

    _preflight(redis=False)
    micro = _dollars_to_micro(amount) if amount else None
    with _sessions().begin() as session:
        try:
            refunded = refund_job(session, job_id, micro, note)
        except LedgerError as exc:
            fail(str(exc))
    console.print(f"refunded {refunded} micro-USD")


def _announce_key(key_hash: str) -> None:
    import redis

    from broker.accounts import announce_key_change

    client = redis.Redis.from_url(get_settings().redis_url, socket_connect_timeout=2)
    announce_key_change(client, key_hash)
    client.close()


@keys_app.command("list")
def keys_list(account_id: str) -> None:
    """List an account's keys by prefix; the keys themselves are never stored."""
    from broker.accounts import describe_key, list_keys

    _preflight(redis=False)
    table = Table("id", "name", "prefix", "revoked", "expires", "monthly limit", "models", "region")
    with _sessions()() as session:
        for row in list_keys(session, account_id):
            info = describe_key(row)
            table.add_row(
                info["id"],
                info["name"],
                info["prefix"],
                str(info["revoked_at"] or ""),
                str(info["expires_at"] or ""),
                str(info["monthly_limit_micro_usd"] or ""),
                ",".join(info["allowed_models"] or []),
                info["region_pin"] or "",
            )
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str) -> None:
    """Revoke a key; every API process stops accepting it at once."""
    from broker.accounts import KeyNotFound, revoke_key

    _preflight(redis=False)
    with _sessions().begin() as session:
        try:
            key_hash = revoke_key(session, key_id).key_hash
        except KeyNotFound as exc:
            fail(str(exc))
    _announce_key(key_hash)
    console.print(f"revoked {key_id}")


@keys_app.command("rotate")
def keys_rotate(key_id: str) -> None:
    """Replace a key by a new one with the same limits; prints the new key once."""
    from broker.accounts import KeyNotFound, get_key, rotate_key

    _preflight(redis=False)
    with _sessions().begin() as session:
        try:
            old_hash = get_key(session, key_id).key_hash
            row, key = rotate_key(session, key_id)
        except KeyNotFound as exc:
            fail(str(exc))
    _announce_key(old_hash)
    errors.print(f"key {row.id} replaces {key_id}; store it now, it is not shown again:")
    print(key)


@keys_app.command("update")
def keys_update(
    key_id: str,
    monthly_limit: str = typer.Option(None, help="US dollars per calendar month; 'none' clears."),
    models: str = typer.Option(None, help="Comma-separated model ids; 'none' clears."),
    region: str = typer.Option(None, help="Region pin; 'none' clears."),
    expires: str = typer.Option(None, help="ISO 8601 time; 'none' clears."),
) -> None:
    """Set a key's monthly spending limit, allowed models, region pin or expiry."""
    from datetime import datetime

    from broker.accounts import KeyNotFound, update_key

    changes: dict[str, object] = {}
    if monthly_limit is not None:
        changes["monthly_limit_micro_usd"] = (
            None if monthly_limit == "none" else _dollars_to_micro(monthly_limit)
        )
    if models is not None:
        changes["allowed_models"] = None if models == "none" else models.split(",")
    if region is not None:
        changes["region_pin"] = None if region == "none" else region
    if expires is not None:
        try:
            changes["expires_at"] = None if expires == "none" else datetime.fromisoformat(expires)
        except ValueError:
            fail(f"invalid time {expires!r}: use ISO 8601, e.g. 2027-01-31T00:00:00+00:00")
    _preflight(redis=False)
    with _sessions().begin() as session:
        try:
            key_hash = update_key(session, key_id, **changes).key_hash
        except KeyNotFound as exc:
            fail(str(exc))
    _announce_key(key_hash)
    console.print(f"updated {key_id}")


@app.command()
def demo(
    requests: str = typer.Option(None, help="JSONL file of batch-format requests."),
    concurrency: int = typer.Option(32, help="Requests in flight at once."),
    keep_running: bool = typer.Option(False, help="Leave the system up after the run."),
) -> None:
    """Run the whole system on this machine against the simulator and drive it."""
    from broker.demo import run_demo

    raise typer.Exit(run_demo(requests, concurrency, keep_running))


if __name__ == "__main__":
    app()
