"""The system under test: a private Redis, a fresh PostgreSQL database, every process.

Everything listens on 127.0.0.1 and is stopped, and the database dropped, when the
context managers below exit, also on Ctrl+C or an error.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import psycopg
import redis
from celery import Celery
from sqlalchemy import Engine, func, select

from broker.accounts import create_account, create_api_key
from broker.db import make_engine, session_factory
from broker.ledger import WalletCheck, check_wallet, top_up
from broker.migrate import upgrade
from broker.processes import ProcessGroup, broker_command, free_port
from broker.settings import Settings
from broker.system import SystemPorts, start_system
from broker.tables import Job

# Server the benchmark creates its database on; it needs trust auth for this user.
PG_ADMIN_URL = os.environ.get(
    "BROKER_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
# Opening balance of each benchmark account: one million dollars, in micro-dollars,
# so that no request of any run is rejected with 402.
BENCH_BALANCE_MICRO_USD = 1_000_000_000_000
# Seconds to wait for the billing worker to respond to a remote control command.
CONTROL_TIMEOUT_S = 10.0
# Celery node name prefix of the billing worker (``broker billing-worker`` runs it as
# billing@<host>).
BILLING_NODE_PREFIX = "billing@"
# Seconds between two reads of the job counts while waiting for settlement.
POLL_INTERVAL_S = 0.25
SIMULATOR_REGIONS = ("us", "hk")
# Redis lists of the Celery queue "billing": kombu keeps one list per priority step and
# names all but the default one with a separator and the step (kombu 5.x, Redis
# transport).
BILLING_QUEUE_KEYS = ("billing", *(f"billing\x06\x16{step}" for step in (3, 6, 9)))


class BenchError(RuntimeError):
    """A service the benchmark needs is missing or did not start."""


@dataclass(frozen=True)
class Account:
    id: str
    wallet_id: str
    api_key: str


@dataclass(frozen=True)
class JobCounts:
    total: int
    finished: int
    settled: int
    # time.monotonic() of the last change seen by BenchStack.wait_jobs.
    changed_at: float = 0.0

    @property
    def unfinished(self) -> int:
        return self.total - self.finished

    @property
    def unsettled(self) -> int:
        return self.total - self.settled


def start_private_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start a redis-server on a free port that keeps nothing on disk; return it and its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchError("redis-server is not installed: run apt-get install -y redis-server")
    port = free_port()
    # Absolute, because redis-server changes into --dir before it opens --logfile.
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
    argv += ["no", "--dir", str(workdir), "--logfile", str(workdir / "redis.log")]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with redis.Redis.from_url(url) as client:
                client.ping()
            return process, url
        except redis.ConnectionError:
            time.sleep(0.05)
    process.kill()
    process.wait()
    raise BenchError(f"the private redis-server on port {port} did not start within 10 s")


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def create_database() -> tuple[str, str]:
    """Create an empty PostgreSQL database; return its URL and its name."""
    name = f"broker_bench_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        raise BenchError(
            f"PostgreSQL at {PG_ADMIN_URL} is unreachable ({exc}); start it or set "
            "BROKER_BENCH_PG_URL"
        ) from exc
    admin = psycopg.conninfo.conninfo_to_dict(PG_ADMIN_URL)
    host, port = admin.get("host", "127.0.0.1"), admin.get("port", 5432)
    user = admin.get("user", "postgres")
    return f"postgresql://{user}@{host}:{port}/{name}", name


def drop_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def postgres_version() -> str:
    with psycopg.connect(PG_ADMIN_URL, connect_timeout=5) as connection:
        row = connection.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "unknown"


def postgres_connections() -> dict[str, int]:
    """Return the server's connection limit and how many connections are open now."""
    with psycopg.connect(PG_ADMIN_URL, connect_timeout=5) as connection:
        limit = connection.execute("SHOW max_connections").fetchone()
        in_use = connection.execute("SELECT count(*) FROM pg_stat_activity").fetchone()
    return {"max_connections": int(limit[0]), "open": int(in_use[0])}


def configure_simulator(base_url: str, **changes: object) -> None:
    """Change a running simulator's config (for example ``latency_ms``) through /_sim/config."""
    response = httpx.post(f"{base_url}/_sim/config", json=changes, timeout=10)
    response.raise_for_status()


class ConnectionSampler:
    """Samples the open PostgreSQL connections, of one database and in all, in a thread."""

    def __init__(self, database: str, interval_s: float = 0.5) -> None:
        self.database = database
        self.interval_s = interval_s
        self.peak_own = 0
        self.peak_total = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pg-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        query = "SELECT count(*) FILTER (WHERE datname = %s), count(*) FROM pg_stat_activity"
        while not self._stop.is_set():
            try:
                # A new connection per sample, so the sampler never keeps one of the
                # few slots that the broker may need.
                with psycopg.connect(PG_ADMIN_URL, connect_timeout=5) as connection:
                    own, total = connection.execute(query, (self.database,)).fetchone()
                self.peak_own = max(self.peak_own, own)
                self.peak_total = max(self.peak_total, total)
            except psycopg.OperationalError:
                # The server is full; that is what the peak already shows.
                self.failures += 1
            self._stop.wait(self.interval_s)


@dataclass
class BenchStack:
    """A running broker on PostgreSQL, with the handles the measurements need."""

    settings: Settings
    ports: SystemPorts
    group: ProcessGroup
    engine: Engine
    connections: ConnectionSampler
    redis: redis.Redis

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.api}"

    def simulator_url(self, region: str = "us") -> str:
        port = self.ports.simulator_us if region == "us" else self.ports.simulator_hk
        return f"http://127.0.0.1:{port}"

    def configure_simulators(self, **changes: object) -> None:
        for region in SIMULATOR_REGIONS:
            configure_simulator(self.simulator_url(region), **changes)

    def new_account(self, name: str) -> Account:
        sessions = session_factory(self.engine)
        with sessions.begin() as session:
            account, wallet = create_account(session, name)
            top_up(session, account.id, BENCH_BALANCE_MICRO_USD, note="benchmark balance")
            _, key = create_api_key(session, account.id, name)
        return Account(account.id, wallet.id, key)

    def job_counts(self, account_id: str) -> JobCounts:
        query = select(
            func.count(),
            func.count().filter(Job.finished_at.is_not(None)),
            func.count(Job.settled_at),
        ).where(Job.account_id == account_id)
        with self.engine.connect() as connection:
            total, finished, settled = connection.execute(query).one()
        return JobCounts(total, finished, settled)

    def job_statuses(self, account_id: str) -> dict[str, int]:
        """Return the number of the account's jobs in each status."""
        query = (
            select(Job.status, func.count())
            .where(Job.account_id == account_id)
            .group_by(Job.status)
        )
        with self.engine.connect() as connection:
            return {status: count for status, count in connection.execute(query).all()}

    def wallet_check(self, wallet_id: str) -> WalletCheck:
        """Compare the wallet's balance and held amount with the sums of its ledger."""
        with session_factory(self.engine)() as session:
            return check_wallet(session, wallet_id)

    def check_processes(self) -> None:
        """Raise BenchError if any process of the system has exited."""
        for name, process in self.group.processes.items():
            if process.poll() is not None:
                raise BenchError(
                    f"{name} exited with code {process.returncode}:\n{self.group.log_tail(name)}"
                )

    def wait_jobs(
        self,
        account_id: str,
        *,
        settled: bool,
        stall_timeout_s: float,
        allowed_open: int = 0,
        max_wait_s: float | None = None,
    ) -> JobCounts:
        """Wait until at most ``allowed_open`` jobs of the account are unfinished (or unsettled).

        Returns early, with more jobs open, when none was finished (or settled) for
        ``stall_timeout_s`` seconds, because a job whose worker failed to record its
        outcome stays open, or after ``max_wait_s`` seconds in all. ``changed_at`` of
        the result is the ``time.monotonic()`` of the last progress seen. Raises
        BenchError when a process of the system exited.
        """
        progress = -1
        started = last_progress_at = time.monotonic()
        while True:
            counts = self.job_counts(account_id)
            done = counts.settled if settled else counts.finished
            if done != progress:
                progress, last_progress_at = done, time.monotonic()
            if counts.total - done <= allowed_open:
                return replace(counts, changed_at=last_progress_at)
            self.check_processes()
            now = time.monotonic()
            if now - last_progress_at > stall_timeout_s or (
                max_wait_s is not None and now - started > max_wait_s
            ):
                return replace(counts, changed_at=last_progress_at)
            time.sleep(POLL_INTERVAL_S)

    def settlement_span_s(self, account_id: str) -> float:
        """Return the seconds between the account's first and last settlement."""
        query = select(func.min(Job.settled_at), func.max(Job.settled_at)).where(
            Job.account_id == account_id
        )
        with self.engine.connect() as connection:
            first, last = connection.execute(query).one()
        if first is None or last is None:
            return 0.0
        return (last - first).total_seconds()

    def billing_queue_length(self) -> int:
        """Return the number of settle tasks waiting in Redis for the billing worker."""
        return sum(self.redis.llen(key) for key in BILLING_QUEUE_KEYS)

    def unsettled_finished_jobs(self) -> int:
        """Return the number of finished jobs of every account that are not settled yet."""
        query = select(func.count()).where(Job.finished_at.is_not(None), Job.settled_at.is_(None))
        with self.engine.connect() as connection:
            return connection.execute(query).scalar_one()

    def purge_billing_queue(self) -> int:
        """Delete the waiting settle tasks; return how many there were.

        Call it only when every finished job is settled: each waiting task is then a
        repeat (the sweeper sends one for every job left unsettled for 30 s), which the
        billing worker would spend time on without changing anything.
        """
        removed = self.billing_queue_length()
        self.redis.delete(*BILLING_QUEUE_KEYS)
        return removed

    def pause_billing(self) -> str:
        """Make the billing worker stop taking settle tasks; return its Celery node name.

        Celery's ``cancel_consumer`` goes to every worker, because the node name is
        not known yet; those that do not consume "billing" ignore it. A remote command
        is used instead of a restart, since a restarted process would load whatever code
        is on disk by then and its start-up would count as settling time.
        """
        return self.pause_queue("billing", BILLING_NODE_PREFIX)

    def resume_billing(self, node: str) -> None:
        """Make the billing worker ``node`` take settle tasks again (``add_consumer``)."""
        self.resume_queue("billing", node)

    def pause_queue(self, queue: str, node_prefix: str) -> str:
        """Make the worker whose node name starts with ``node_prefix`` stop consuming
        ``queue`` (Celery's ``cancel_consumer``, sent to every worker); return its node name.
        """
        replies = self._control("cancel_consumer", queue, reply=True, timeout=CONTROL_TIMEOUT_S)
        nodes = [node for reply in replies for node in reply]
        matching = [node for node in nodes if node.startswith(node_prefix)]
        if not matching:
            raise BenchError(
                f"no worker named {node_prefix}* responded to cancel_consumer {queue!r} within "
                f"{CONTROL_TIMEOUT_S:g} s; answers: {replies}"
            )
        return matching[0]

    def resume_queue(self, queue: str, node: str) -> None:
        """Make the worker ``node`` consume ``queue`` again (``add_consumer``)."""
        replies = self._control(
            "add_consumer",
            queue,
            destination=[node],
            reply=True,
            limit=1,
            timeout=CONTROL_TIMEOUT_S,
        )
        if not replies:
            raise BenchError(
                f"{node} did not respond to add_consumer {queue!r} within {CONTROL_TIMEOUT_S:g} s"
            )

    def _control(self, command: str, queue: str, **options: object) -> list[dict[str, object]]:
        app = Celery("bench-control", broker=self.settings.redis_url)
        try:
            return getattr(app.control, command)(queue, **options) or []
        finally:
            app.close()


def _new_group(log_dir: Path) -> ProcessGroup:
    # WARNING keeps per-request log lines out of the measured processes.
    return ProcessGroup(log_dir=log_dir, env={"BROKER_LOG_LEVEL": "WARNING"})


@contextmanager
def running_stack(workdir: Path, api_workers: int) -> Iterator[BenchStack]:
    """Start Redis, a fresh database and the whole broker; stop and drop all on exit."""
    redis_process, redis_url = start_private_redis(workdir / "redis")
    group = _new_group(workdir / "logs")
    group.env["BROKER_API_WORKERS"] = str(api_workers)
    # Uploaded and generated files stay with the run's logs, not in the project's var/.
    group.env["BROKER_FILE_STORE_PATH"] = str((workdir / "files").resolve())
    database_name = None
    engine = None
    sampler = None
    client = redis.Redis.from_url(redis_url)
    try:
        database_url, database_name = create_database()
        upgrade(database_url)
        settings = Settings(database_url=database_url, redis_url=redis_url)
        ports = SystemPorts(api=free_port(), simulator_us=free_port(), simulator_hk=free_port())
        engine = make_engine(database_url, pool_size=2)
        sampler = ConnectionSampler(database_name)
        sampler.start()
        start_system(group, settings, ports, lane_pools=True)
        yield BenchStack(settings, ports, group, engine, sampler, client)
    finally:
        if sampler is not None:
            sampler.stop()
        group.stop_all()
        client.close()
        if engine is not None:
            engine.dispose()
        if database_name is not None:
            drop_database(database_name)
        stop_process(redis_process)


@contextmanager
def running_simulator(workdir: Path) -> Iterator[str]:
    """Start one simulator region (us) alone; yield its base URL and stop it on exit."""
    group = _new_group(workdir / "logs")
    port = free_port()
    try:
        group.start(
            "simulator-us", broker_command("simulator", "--region", "us", "--port", str(port))
        )
        url = f"http://127.0.0.1:{port}"
        group.wait_http("simulator-us", f"{url}/_sim/health")
        yield url
    finally:
        group.stop_all()
