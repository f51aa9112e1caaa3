"""Prometheus metrics of the API and the workers.

The recording helpers (``observe_request`` and the rest) only update in-process values,
so the hot path never waits on Redis. Two families are read from Redis when Prometheus
scrapes instead: ``broker_queue_depth`` (LLEN of each Celery queue) and
``broker_circuit_state`` (the keys ``broker.circuits`` writes).

Processes: with ``PROMETHEUS_MULTIPROC_DIR`` set before the first import of
``prometheus_client``, every process writes its values to files in that directory and
any one scrape endpoint reports the sum over all of them (prometheus-client's
multiprocess mode). The directory must be emptied before the processes start. Without
the variable each process keeps its own registry and needs its own scrape target: the
API serves ``GET /metrics`` and each worker process calls
``start_worker_metrics_server``.

Label values must come from a bounded set. Callers pass a catalog model id as ``model``,
or ``UNKNOWN_MODEL`` for a name the catalog does not contain, so that clients cannot add
series by sending made-up model names.
"""

from __future__ import annotations

import gzip
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import start_http_server as _start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.multiprocess import mark_process_dead as _mark_process_dead
from prometheus_client.registry import Collector
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool

from broker.circuits import _key as circuit_key

logger = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Seconds a scrape waits for Redis before it reports the Redis-backed families empty.
SCRAPE_REDIS_TIMEOUT_S = 0.5

# Label value for a model name that is not in the catalog.
UNKNOWN_MODEL = "unknown"

# End-to-end and upstream durations: LLM calls take from tens of milliseconds (cached
# or tiny) to the 600 s job limit.
LATENCY_BUCKETS_S = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0
)  # fmt: skip
# Time between publishing a job and a worker starting it.
QUEUE_WAIT_BUCKETS_S = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0
)  # fmt: skip

# Values of ``broker_circuit_state``.
CIRCUIT_CLOSED = 0
CIRCUIT_HALF_OPEN = 1
CIRCUIT_OPEN = 2

# kombu's Redis transport (kombu 5.x) keeps a queue's messages of priority 0 in a list
# named after the queue, and higher priorities in lists named queue + "\x06\x16" + step.
KOMBU_PRIORITY_SEPARATOR = "\x06\x16"
KOMBU_PRIORITY_STEPS = (3, 6, 9)

# The metrics this process records. In multiprocess mode the values also go to files,
# and scrapes read those files instead of this registry.
REGISTRY = CollectorRegistry()

REQUESTS = Counter(
    "broker_requests_total",
    "Requests answered by the API, by endpoint, model and HTTP status.",
    ["endpoint", "model", "status"],
    registry=REGISTRY,
)
REQUEST_DURATION = Histogram(
    "broker_request_duration_seconds",
    "Seconds from receiving a request to sending its response (end of stream included).",
    ["endpoint"],
    buckets=LATENCY_BUCKETS_S,
    registry=REGISTRY,
)
QUEUE_WAIT = Histogram(
    "broker_queue_wait_seconds",
    "Seconds a job waited in its Celery queue before a worker started it.",
    ["queue"],
    buckets=QUEUE_WAIT_BUCKETS_S,
    registry=REGISTRY,
)
UPSTREAM_DURATION = Histogram(
    "broker_upstream_duration_seconds",
    "Seconds of one upstream attempt, by provider and region.",
    ["provider", "region"],
    buckets=LATENCY_BUCKETS_S,
    registry=REGISTRY,
)
JOBS_IN_FLIGHT = Gauge(
    "broker_jobs_in_flight",
    "Jobs a worker pool is running now.",
    ["pool"],
    multiprocess_mode="livesum",
    registry=REGISTRY,
)
RETRIES = Counter(
    "broker_retries_total",
    "Upstream attempts repeated on the same target after a transient error.",
    ["provider", "region"],
    registry=REGISTRY,
)
FAILOVERS = Counter(
    "broker_failovers_total",
    "Jobs handed from one target (provider.region) to another.",
    ["from_target", "to_target"],
    registry=REGISTRY,
)
TOKENS = Counter(
    "broker_tokens_total",
    "Tokens billed, by model and direction (input: prompt, output: completion).",
    ["model", "direction"],
    registry=REGISTRY,
)
COST = Counter(
    "broker_cost_micro_usd_total",
    "Micro-dollars charged to wallets, by model.",
    ["model"],
    registry=REGISTRY,
)


# --- Recording helpers for the hot path: no I/O -----------------------------------------


def observe_request(endpoint: str, model: str, status: int | str, duration_s: float) -> None:
    """Count one completed request and record its end-to-end duration."""
    REQUESTS.labels(endpoint, model or UNKNOWN_MODEL, str(status)).inc()
    REQUEST_DURATION.labels(endpoint).observe(duration_s)


def observe_queue_wait(queue: str, wait_s: float) -> None:
    """Record how long a job waited in ``queue``; negative clock skew counts as 0."""
    QUEUE_WAIT.labels(queue).observe(max(0.0, wait_s))


def observe_upstream(provider: str, region: str, duration_s: float) -> None:
    """Record the duration of one upstream attempt, successful or not."""
    UPSTREAM_DURATION.labels(provider, region).observe(duration_s)


def count_retry(provider: str, region: str) -> None:
    RETRIES.labels(provider, region).inc()


def count_failover(from_target: str, to_target: str) -> None:
    FAILOVERS.labels(from_target, to_target).inc()


def count_tokens(model: str, prompt_tokens: int, completion_tokens: int) -> None:
    """Count the tokens of one finished job: prompt as input, completion as output."""
    model = model or UNKNOWN_MODEL
    TOKENS.labels(model, "input").inc(max(0, prompt_tokens))
    TOKENS.labels(model, "output").inc(max(0, completion_tokens))


def count_cost(model: str, cost_micro_usd: int) -> None:
    """Count the charge of one settled job."""
    COST.labels(model or UNKNOWN_MODEL).inc(max(0, cost_micro_usd))


@contextmanager
def job_in_flight(pool: str) -> Iterator[None]:
    """Count a job as running in ``pool`` for the duration of the block."""
    gauge = JOBS_IN_FLIGHT.labels(pool)
    gauge.inc()
    try:
        yield
    finally:
        gauge.dec()


# --- Families read from Redis at scrape time --------------------------------------------


class _FailureLog:
    """Logs the first scrape failure of a run and then one in every 100, with a count."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.failures = 0

    def record(self, exc: Exception) -> None:
        self.failures += 1
        if self.failures == 1 or self.failures % 100 == 0:
            logger.warning(
                "could not read %s from Redis for a metrics scrape (%d failures so far): %s",
                self.what,
                self.failures,
                exc,
            )


class QueueDepthCollector(Collector):
    """``broker_queue_depth{queue}``: messages waiting in each Celery queue.

    Messages a worker has reserved but not yet acknowledged are not counted.
    """

    def __init__(self, client: redis.Redis, queues: Callable[[], Iterable[str]]) -> None:
        self.client = client
        self.queues = queues
        self._failures = _FailureLog("queue depths")

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "broker_queue_depth",
            "Messages waiting in a Celery queue; a message may carry several jobs.",
            labels=["queue"],
        )
        queues = sorted(set(self.queues()))
        try:
            pipe = self.client.pipeline(transaction=False)
            for queue in queues:
                pipe.llen(queue)
                for step in KOMBU_PRIORITY_STEPS:
                    pipe.llen(f"{queue}{KOMBU_PRIORITY_SEPARATOR}{step}")
            lengths = pipe.execute()
        except RedisError as exc:
            self._failures.record(exc)
            yield family
            return
        per_queue = 1 + len(KOMBU_PRIORITY_STEPS)
        for index, queue in enumerate(queues):
            family.add_metric([queue], sum(lengths[index * per_queue : (index + 1) * per_queue]))
        yield family


class CircuitStateCollector(Collector):
    """``broker_circuit_state{target}``: 0 closed, 1 half-open, 2 open."""

    def __init__(self, client: redis.Redis, targets: Callable[[], Iterable[str]]) -> None:
        self.client = client
        self.targets = targets
        self._failures = _FailureLog("circuit states")

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "broker_circuit_state",
            "Circuit breaker of a target (provider.region): 0 closed, 1 half-open, 2 open.",
            labels=["target"],
        )
        targets = sorted(set(self.targets()))
        keys = [circuit_key(t, part) for t in targets for part in ("open", "tripped")]
        try:
            values = self.client.mget(keys) if keys else []
        except RedisError as exc:
            self._failures.record(exc)
            yield family
            return
        for index, target in enumerate(targets):
            is_open, tripped = values[2 * index], values[2 * index + 1]
            if is_open:
                state = CIRCUIT_OPEN
            elif tripped:
                state = CIRCUIT_HALF_OPEN
            else:
                state = CIRCUIT_CLOSED
            family.add_metric([target], state)
        yield family


def scrape_client(redis_url: str) -> redis.Redis:
    """Return a Redis client whose calls give up after ``SCRAPE_REDIS_TIMEOUT_S``."""
    return redis.Redis.from_url(
        redis_url,
        socket_timeout=SCRAPE_REDIS_TIMEOUT_S,
        socket_connect_timeout=SCRAPE_REDIS_TIMEOUT_S,
    )


def catalog_queues(catalog: Any, extra: Sequence[str] = ()) -> list[str]:
    """Return every job queue of a ``broker.catalog.Catalog``, plus ``extra`` queues."""
    queues = [queue for region in catalog.regions for queue in catalog.queues_for_region(region)]
    return queues + list(extra)


def catalog_targets(catalog: Any) -> list[str]:
    """Return every ``provider.region`` target of a ``broker.catalog.Catalog``."""
    return [
        f"{provider.id}.{region}"
        for provider in catalog.providers.values()
        for region in provider.regions
    ]


# --- Exposition ---------------------------------------------------------------------


class _RegistryCollector(Collector):
    """Exposes another registry's metrics inside the scrape registry."""

    def __init__(self, source: CollectorRegistry) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        return self.source.collect()


def multiprocess_enabled() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


def mark_process_dead(pid: int | None = None) -> None:
    """Drop a stopped process's ``livesum`` gauge values in multiprocess mode.

    Call it when a process stops (this process by default). Without it, a gauge such as
    ``broker_jobs_in_flight`` keeps counting the jobs a dead process was running.
    Counters and histograms keep their totals either way.
    """
    if multiprocess_enabled():
        _mark_process_dead(pid if pid is not None else os.getpid())


def scrape_registry(
    redis_client: redis.Redis | None = None,
    queues: Callable[[], Iterable[str]] | Iterable[str] = (),
    targets: Callable[[], Iterable[str]] | Iterable[str] = (),
) -> CollectorRegistry:
    """Build the registry a scrape reads: recorded metrics plus the Redis-backed families.

    Recorded metrics come from every process sharing ``PROMETHEUS_MULTIPROC_DIR`` when it
    is set, else from this process. The Redis-backed families are added only when
    ``redis_client`` is given. Serve them from one scrape target only, because every
    process reading the same Redis reports the same values.
    """
    registry = CollectorRegistry()
    if multiprocess_enabled():
        MultiProcessCollector(registry)
    else:
        registry.register(_RegistryCollector(REGISTRY))
    if redis_client is not None:
        registry.register(QueueDepthCollector(redis_client, _as_source(queues)))
        registry.register(CircuitStateCollector(redis_client, _as_source(targets)))
    return registry


def _as_source(names: Callable[[], Iterable[str]] | Iterable[str]) -> Callable[[], Iterable[str]]:
    if callable(names):
        return names
    fixed = list(names)
    return lambda: fixed


def render(registry: CollectorRegistry, accept: str | None = None) -> tuple[bytes, str]:
    """Return the exposition body and its content type, in the format ``accept`` prefers."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type


class MetricsApp:
    """ASGI app serving ``GET /metrics`` from a scrape registry.

    Collection runs in a worker thread, because the Redis-backed families make blocking
    Redis calls (each bounded by the client's socket timeout).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return
        headers = {
            name.decode("latin-1").lower(): value.decode("latin-1")
            for name, value in scope.get("headers", [])
        }
        if scope.get("method") not in ("GET", "HEAD"):
            await _send(send, 405, b"Method Not Allowed\n", "text/plain", {"allow": "GET, HEAD"})
            return
        started = time.monotonic()
        body, content_type = await run_in_threadpool(render, self.registry, headers.get("accept"))
        extra = {}
        if gzip_accepted(headers.get("accept-encoding", "")):
            body = gzip.compress(body)
            extra["content-encoding"] = "gzip"
        if scope.get("method") == "HEAD":
            body = b""
        logger.debug("metrics scrape took %.3f s", time.monotonic() - started)
        await _send(send, 200, body, content_type, extra)


async def _send(
    send: Callable, status: int, body: bytes, content_type: str, extra: dict[str, str]
) -> None:
    headers = [(b"content-type", content_type.encode("latin-1"))]
    headers += [(name.encode("latin-1"), value.encode("latin-1")) for name, value in extra.items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def metrics_app(
    redis_url: str | None = None,
    queues: Callable[[], Iterable[str]] | Iterable[str] = (),
    targets: Callable[[], Iterable[str]] | Iterable[str] = (),
) -> MetricsApp:
    """Return the ASGI app for the API's ``GET /metrics``.

    With ``redis_url`` the scrape also reads ``broker_queue_depth`` for ``queues`` and
    ``broker_circuit_state`` for ``targets`` (``provider.region`` names) from Redis.
    """
    client = scrape_client(redis_url) if redis_url else None
    return MetricsApp(scrape_registry(client, queues, targets))


def start_worker_metrics_server(
    port: int, addr: str = "127.0.0.1", registry: CollectorRegistry | None = None
) -> Any:
    """Serve this worker process's metrics on ``addr:port`` from a daemon thread.

    Returns the server object, whose ``shutdown()`` stops it. Without
    ``PROMETHEUS_MULTIPROC_DIR`` each worker process needs its own port. With it, every
    server reports the sum over all processes, so only one of them should be scraped.
    """
    server, _thread = _start_http_server(port, addr, registry=registry or scrape_registry())
    logger.info("worker metrics listening on http://%s:%d/metrics", addr, port)
    return server
