"""Per-process resources of a worker: catalog, database, Redis and the HTTP client."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache

import httpx
import redis
from sqlalchemy.orm import Session, sessionmaker

from broker.catalog import Catalog, load_catalog
from broker.db import BlockingStatementConnection, is_sqlite, make_engine, session_factory
from broker.ratelimit import ProviderGate, parse_provider_limits
from broker.redis_clients import sync_client
from broker.settings import Settings, get_settings
from workers.settle_sender import SettleSender
from workers.upstream_http import UpstreamClient

# Seconds to open a TCP connection to a provider; the rest of the call has its own limit.
CONNECT_TIMEOUT_S = 10.0
# Calls in flight on one HTTP client before the next client takes calls. httpcore 1.0
# scans every connection of a pool, polling each idle socket, whenever a request starts
# or ends, so one pool of hundreds of connections costs more CPU per call than the call
# itself. Calls are spread over several clients so that each pool stays small.
CALLS_PER_CLIENT = 8


@dataclass
class WorkerContext:
    settings: Settings
    catalog: Catalog
    sessions: sessionmaker[Session]
    redis: redis.Redis
    http_clients: list[UpstreamClient]
    gate: ProviderGate
    # The outcome writer's own connection, on PostgreSQL only (workers.dispatch).
    outcome_statements: BlockingStatementConnection | None
    # Calls in flight on each of http_clients. Greenlets share one thread and do not
    # switch inside http_client's bookkeeping, so plain integers suffice.
    calls_in_flight: list[int] = field(init=False)
    settle_sender: SettleSender = field(init=False)

    def __post_init__(self) -> None:
        self.calls_in_flight = [0] * len(self.http_clients)
        self.settle_sender = SettleSender(self.redis)

    @contextmanager
    def http_client(self) -> Iterator[UpstreamClient]:
        """Lend an HTTP client for one call: the first with fewer than CALLS_PER_CLIENT
        calls in flight, else the least busy one.

        Filling the clients in order keeps the calls of a quiet worker on one client,
        whose connections stay alive between calls. A client picked at random got so
        few calls that httpx closed its idle connections (after 5 s), and most calls
        opened a new connection, with a TLS handshake on a real provider.
        """
        counts = self.calls_in_flight
        index = next((i for i, n in enumerate(counts) if n < CALLS_PER_CLIENT), None)
        if index is None:
            index = counts.index(min(counts))
        counts[index] += 1
        try:
            yield self.http_clients[index]
        finally:
            counts[index] -= 1

    def provider_key(self, provider_id: str) -> str | None:
        secret = self.settings.provider_keys.get(provider_id)
        return secret.get_secret_value() if secret else None


@lru_cache(maxsize=1)
def get_context() -> WorkerContext:
    """Build the context on first use, inside the worker process (after any fork)."""
    settings = get_settings()
    slots = max(settings.worker_concurrency, 10)
    clients = max(1, slots // CALLS_PER_CLIENT)
    # Each client may open a connection for every call of the process (max_connections),
    # so a call never waits for a connection, and keeps at most 2 × CALLS_PER_CLIENT
    # of them alive between calls.
    ssl_context = httpx.create_ssl_context()
    http_clients = [
        UpstreamClient(
            httpx.Timeout(settings.upstream_timeout_s, connect=CONNECT_TIMEOUT_S),
            httpx.Limits(max_connections=slots, max_keepalive_connections=2 * CALLS_PER_CLIENT),
            ssl_context,
        )
        for _ in range(clients)
    ]
    # One connection per greenlet at most, and some for the sweeper and heartbeats.
    client = sync_client(settings.redis_url, slots + 32)
    # A slot outlives the longest job, so only a crashed worker's slots time out.
    gate = ProviderGate(
        client, parse_provider_limits(settings.provider_limits), lease_s=settings.job_timeout_s + 60
    )
    return WorkerContext(
        settings=settings,
        catalog=load_catalog(settings.catalog_path, settings.base_url_overrides),
        sessions=session_factory(
            make_engine(
                settings.database_url,
                pool_size=settings.db_pool_size,
                max_overflow=settings.db_max_overflow,
            )
        ),
        redis=client,
        http_clients=http_clients,
        gate=gate,
        outcome_statements=None
        if is_sqlite(settings.database_url)
        else BlockingStatementConnection(settings.database_url),
    )
