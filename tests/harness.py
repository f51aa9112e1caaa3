"""The running system for tests: a private Redis, a test database, every process.

Redis: a private ``redis-server`` on a free port, so tests may flush or stop it without
touching the machine's shared instance. PostgreSQL: a fresh database on the shared
server, dropped at the end. SQLite: a file in the test's temporary folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import psycopg
import pytest
import redis
from sqlalchemy.orm import Session, sessionmaker

from broker.accounts import create_account, create_api_key
from broker.db import make_engine, session_factory
from broker.ledger import top_up
from broker.migrate import upgrade
from broker.processes import ProcessGroup, free_port
from broker.settings import Settings
from broker.system import SystemPorts, start_system

# Operator credentials the test systems run with.
ADMIN_TOKEN = "test-admin-token"
STRIPE_WEBHOOK_SECRET = "whsec_test_secret"
# Server the PostgreSQL tests create their databases on; override for another server.
PG_ADMIN_URL = os.environ.get("BROKER_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
BACKENDS = ("sqlite", "postgresql")


@dataclass
class RedisServer:
    url: str
    port: int
    process: subprocess.Popen[bytes]
    workdir: Path

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


def start_redis(workdir: Path, port: int | None = None) -> RedisServer:
    """Start a private redis-server that keeps nothing on disk."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed; the tests need its binary")
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
            "--logfile",
            str(workdir / "redis.log"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = RedisServer(f"redis://127.0.0.1:{port}/0", port, process, workdir)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with server.client() as client:
                client.ping()
            return server
        except redis.ConnectionError:
            time.sleep(0.05)
    process.kill()
    pytest.fail(f"private redis-server on port {port} did not start")


def create_database(backend: str, tmp_path: Path) -> tuple[str, object]:
    """Create an empty database; returns its URL and a handle for ``drop_database``."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'broker.db'}", None
    name = f"broker_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    admin = psycopg.conninfo.conninfo_to_dict(PG_ADMIN_URL)
    host, port = admin.get("host", "127.0.0.1"), admin.get("port", 5432)
    user = admin.get("user", "postgres")
    return f"postgresql://{user}@{host}:{port}/{name}", name


def drop_database(handle: object) -> None:
    if handle is None:
        return
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{handle}" WITH (FORCE)')


@dataclass
class Account:
    id: str
    wallet_id: str
    api_key: str


@dataclass
class Stack:
    """A running system: simulator regions, API, region workers and billing worker."""

    backend: str
    settings: Settings
    ports: SystemPorts
    group: ProcessGroup
    sessions: sessionmaker[Session]
    redis: redis.Redis
    accounts: list[Account] = field(default_factory=list)
    clients: list[openai.OpenAI] = field(default_factory=list)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.api}/v1"

    def simulator_url(self, region: str) -> str:
        port = self.ports.simulator_us if region == "us" else self.ports.simulator_hk
        return f"http://127.0.0.1:{port}"

    def admin(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        """Call the admin API with the operator's token."""
        return httpx.request(
            method,
            f"http://127.0.0.1:{self.ports.api}/admin{path}",
            headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=30,
            **kwargs,
        )

    def new_account(self, balance_micro_usd: int = 5_000_000) -> Account:
        with self.sessions.begin() as session:
            account, wallet = create_account(session, "test")
            if balance_micro_usd:
                top_up(session, account.id, balance_micro_usd, note="test opening balance")
            _, key = create_api_key(session, account.id, "test")
        created = Account(account.id, wallet.id, key)
        self.accounts.append(created)
        return created

    def client(self, api_key: str, timeout_s: float = 60) -> openai.OpenAI:
        """Return an SDK client for the API; it is closed when the test ends."""
        client = openai.OpenAI(
            base_url=self.api_url, api_key=api_key, max_retries=0, timeout=timeout_s
        )
        self.clients.append(client)
        return client

    def close_clients(self) -> None:
        while self.clients:
            self.clients.pop().close()


@contextmanager
def running_stack(
    backend: str, redis_url: str, tmp_path: Path, env: dict[str, str] | None = None
) -> Iterator[Stack]:
    """Start the whole system on a new database; stop it and drop the database after."""
    database_url, handle = create_database(backend, tmp_path)
    upgrade(database_url)
    settings = Settings(database_url=database_url, redis_url=redis_url)
    ports = SystemPorts(api=free_port(), simulator_us=free_port(), simulator_hk=free_port())
    group = ProcessGroup(
        log_dir=tmp_path / "logs",
        env={
            "BROKER_LOG_LEVEL": "INFO",
            "BROKER_ADMIN_TOKEN": ADMIN_TOKEN,
            "BROKER_STRIPE_WEBHOOK_SECRET": STRIPE_WEBHOOK_SECRET,
            "BROKER_FILE_STORE_PATH": str(tmp_path / "files"),
            **(env or {}),
        },
    )
    engine = make_engine(database_url, pool_size=2)
    client = redis.Redis.from_url(redis_url)
    try:
        start_system(group, settings, ports)
        yield Stack(backend, settings, ports, group, session_factory(engine), client)
    finally:
        client.close()
        group.stop_all()
        engine.dispose()
        drop_database(handle)
