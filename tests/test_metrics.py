"""Prometheus metrics: recording helpers, Redis-backed collectors and exposition."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from fastapi import FastAPI
from harness import RedisServer, start_redis
from prometheus_client.parser import text_string_to_metric_families

from broker import metrics
from broker.catalog import load_catalog
from broker.circuits import FAILURE_THRESHOLD, CircuitBreaker, _key
from broker.processes import free_port
from broker.settings import DEFAULT_CATALOG_PATH

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    started = start_redis(tmp_path_factory.mktemp("redis-metrics"))
    yield started
    started.process.terminate()
    started.process.wait(10)


@pytest.fixture
def client(server: RedisServer) -> Iterator[redis.Redis]:
    connection = server.client()
    connection.flushdb()
    yield connection
    connection.close()


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Parse an exposition into {(sample name, labels): value}."""
    parsed = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            parsed[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return parsed


def scrape(registry) -> dict[tuple[str, frozenset], float]:
    body, _ = metrics.render(registry)
    return samples(body.decode())


def labels(**values: str) -> frozenset:
    return frozenset(values.items())


def test_request_helper_records_labels() -> None:
    metrics.observe_request("/v1/chat/completions", "test-model-a", 200, 0.3)
    metrics.observe_request("/v1/chat/completions", "test-model-a", 429, 0.01)
    metrics.observe_request("/v1/embeddings", "", 404, 0.02)
    found = scrape(metrics.scrape_registry())
    chat = labels(endpoint="/v1/chat/completions", model="test-model-a", status="200")
    assert found[("broker_requests_total", chat)] == 1
    denied = labels(endpoint="/v1/chat/completions", model="test-model-a", status="429")
    assert found[("broker_requests_total", denied)] == 1
    unknown = labels(endpoint="/v1/embeddings", model="unknown", status="404")
    assert found[("broker_requests_total", unknown)] == 1
    bucket = labels(endpoint="/v1/chat/completions", le="0.5")
    assert found[("broker_request_duration_seconds_bucket", bucket)] >= 2


def test_worker_helpers_record_labels() -> None:
    metrics.observe_queue_wait("test.us.interactive", 0.2)
    metrics.observe_queue_wait("test.us.interactive", -1.0)
    metrics.observe_upstream("testprov", "us", 1.5)
    metrics.count_retry("testprov", "us")
    metrics.count_retry("testprov", "us")
    metrics.count_failover("testprov.us", "testprov.hk")
    metrics.count_tokens("test-model-b", 120, 30)
    metrics.count_cost("test-model-b", 45)
    found = scrape(metrics.scrape_registry())
    queue = labels(queue="test.us.interactive")
    assert found[("broker_queue_wait_seconds_count", queue)] == 2
    assert found[("broker_queue_wait_seconds_sum", queue)] == pytest.approx(0.2)
    upstream = labels(provider="testprov", region="us")
    assert found[("broker_upstream_duration_seconds_count", upstream)] == 1
    assert found[("broker_retries_total", upstream)] == 2
    failover = labels(from_target="testprov.us", to_target="testprov.hk")
    assert found[("broker_failovers_total", failover)] == 1
    assert found[("broker_tokens_total", labels(model="test-model-b", direction="input"))] == 120
    assert found[("broker_tokens_total", labels(model="test-model-b", direction="output"))] == 30
    assert found[("broker_cost_micro_usd_total", labels(model="test-model-b"))] == 45


def test_jobs_in_flight_gauge_returns_to_zero() -> None:
    key = ("broker_jobs_in_flight", labels(pool="test-pool"))
    with metrics.job_in_flight("test-pool"):
        with metrics.job_in_flight("test-pool"):
            assert scrape(metrics.scrape_registry())[key] == 2
    assert scrape(metrics.scrape_registry())[key] == 0
    with pytest.raises(RuntimeError), metrics.job_in_flight("test-pool"):
        raise RuntimeError("job failed")
    assert scrape(metrics.scrape_registry())[key] == 0


def test_queue_depth_reads_redis(client: redis.Redis) -> None:
    client.rpush("openai.us.interactive", b"a", b"b", b"c")
    # kombu stores priority 3 messages in a list with a suffix.
    client.rpush("openai.us.interactive\x06\x163", b"d", b"e")
    client.rpush("billing", b"f")
    registry = metrics.scrape_registry(
        client, queues=["openai.us.interactive", "openai.us.batch", "billing"]
    )
    found = scrape(registry)
    assert found[("broker_queue_depth", labels(queue="openai.us.interactive"))] == 5
    assert found[("broker_queue_depth", labels(queue="openai.us.batch"))] == 0
    assert found[("broker_queue_depth", labels(queue="billing"))] == 1
    client.lpop("billing")
    assert scrape(registry)[("broker_queue_depth", labels(queue="billing"))] == 0


def test_circuit_state_reads_redis(client: redis.Redis) -> None:
    breaker = CircuitBreaker(client)
    for _ in range(FAILURE_THRESHOLD):
        breaker.record_failure("openai.us")
    breaker.record_failure("deepseek.hk")
    registry = metrics.scrape_registry(
        client, targets=lambda: ["openai.us", "deepseek.hk", "qwen.hk"]
    )
    found = scrape(registry)
    assert found[("broker_circuit_state", labels(target="openai.us"))] == metrics.CIRCUIT_OPEN
    closed = metrics.CIRCUIT_CLOSED
    assert found[("broker_circuit_state", labels(target="deepseek.hk"))] == closed
    assert found[("broker_circuit_state", labels(target="qwen.hk"))] == closed
    # When the cool-down key expires the circuit is half-open until a probe succeeds.
    client.delete(_key("openai.us", "open"))
    found = scrape(registry)
    half_open = metrics.CIRCUIT_HALF_OPEN
    assert found[("broker_circuit_state", labels(target="openai.us"))] == half_open
    breaker.record_success("openai.us")
    found = scrape(registry)
    assert found[("broker_circuit_state", labels(target="openai.us"))] == closed


def test_redis_down_leaves_families_empty() -> None:
    # Nothing listens on this port, so every Redis call fails at once.
    unreachable = metrics.scrape_client(f"redis://127.0.0.1:{free_port()}/0")
    registry = metrics.scrape_registry(unreachable, queues=["billing"], targets=["openai.us"])
    body, _ = metrics.render(registry)
    text = body.decode()
    assert "# TYPE broker_queue_depth gauge" in text
    assert 'broker_queue_depth{queue="billing"}' not in text
    assert 'broker_circuit_state{target="openai.us"}' not in text
    # The recorded metrics are still served.
    assert "# TYPE broker_requests_total counter" in text


def test_catalog_lists_queues_and_targets() -> None:
    catalog = load_catalog(DEFAULT_CATALOG_PATH)
    queues = metrics.catalog_queues(catalog, extra=["billing"])
    targets = metrics.catalog_targets(catalog)
    assert "billing" in queues
    assert any(queue.endswith(".interactive") for queue in queues)
    assert len(queues) == len(set(queues))
    for provider in catalog.providers.values():
        for region in provider.regions:
            assert f"{provider.id}.{region}" in targets
            assert f"{provider.id}.{region}.batch" in queues


def test_metrics_app_serves_exposition(server: RedisServer, client: redis.Redis) -> None:
    client.rpush("openai.us.interactive", b"a")
    app = FastAPI()
    app.add_route(
        "/metrics",
        metrics.metrics_app(server.url, queues=["openai.us.interactive"], targets=["openai.us"]),
        include_in_schema=False,
    )

    async def fetch() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            plain = await http.get("/metrics")
            zipped = await http.get("/metrics", headers={"accept-encoding": "gzip"})
            posted = await http.post("/metrics")
            return plain, zipped, posted

    plain, zipped, posted = asyncio.run(fetch())
    assert plain.status_code == 200
    assert plain.headers["content-type"].startswith("text/plain")
    found = samples(plain.text)
    assert found[("broker_queue_depth", labels(queue="openai.us.interactive"))] == 1
    assert found[("broker_circuit_state", labels(target="openai.us"))] == 0
    assert zipped.headers["content-encoding"] == "gzip"
    assert "broker_queue_depth" in zipped.text
    assert posted.status_code == 405


def test_worker_server_serves_metrics() -> None:
    metrics.count_retry("worker-test", "us")
    port = free_port()
    server = metrics.start_worker_metrics_server(port)
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    finally:
        server.shutdown()
        server.server_close()
    assert response.status_code == 200
    found = samples(response.text)
    assert found[("broker_retries_total", labels(provider="worker-test", region="us"))] == 1
    # Workers serve only what they recorded: the Redis-backed families belong to the API.
    assert "broker_queue_depth" not in response.text


RECORD_SCRIPT = textwrap.dedent(
    """
    import sys
    from broker import metrics
    metrics.observe_request("/v1/chat/completions", "mp-model", 200, 0.5)
    metrics.count_tokens("mp-model", 10, 5)
    metrics.count_cost("mp-model", 7)
    metrics.JOBS_IN_FLIGHT.labels("mp-pool").inc()
    if len(sys.argv) > 1:
        metrics.mark_process_dead()
    """
)

SCRAPE_SCRIPT = textwrap.dedent(
    """
    import sys
    from broker import metrics
    body, _ = metrics.render(metrics.scrape_registry())
    sys.stdout.write(body.decode())
    """
)


def test_multiprocess_mode_sums_processes(tmp_path: Path) -> None:
    directory = tmp_path / "prometheus"
    directory.mkdir()
    env = {**os.environ, metrics.MULTIPROC_ENV: str(directory)}
    # The third recorder marks itself dead on exit, as a stopping process should.
    commands = [[], [], ["--mark-dead"]]
    recorders = [
        subprocess.Popen([sys.executable, "-c", RECORD_SCRIPT, *extra], cwd=REPO, env=env)
        for extra in commands
    ]
    for recorder in recorders:
        assert recorder.wait(60) == 0
    scraped = subprocess.run(
        [sys.executable, "-c", SCRAPE_SCRIPT],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    found = samples(scraped.stdout)
    chat = labels(endpoint="/v1/chat/completions", model="mp-model", status="200")
    assert found[("broker_requests_total", chat)] == 3
    assert found[("broker_tokens_total", labels(model="mp-model", direction="input"))] == 30
    assert found[("broker_cost_micro_usd_total", labels(model="mp-model"))] == 21
    bucket = labels(endpoint="/v1/chat/completions", le="0.5")
    assert found[("broker_request_duration_seconds_bucket", bucket)] == 3
    # livesum drops the gauge of the process marked dead and keeps the other two.
    assert found[("broker_jobs_in_flight", labels(pool="mp-pool"))] == 2
