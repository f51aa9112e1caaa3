"""Operations through the running system: metrics, rate limits, response cache, Flower."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from harness import Stack
from sqlalchemy import func, select
from support import wait_for

from broker.processes import broker_command, free_port
from broker.tables import Job

FLOWER_AUTH = ("ops", "flower-password")


@pytest.fixture
def limited_api(stack: Stack) -> Iterator[str]:
    """A second API process on the same system, with per-key limits of 3 requests and
    10,000 tokens a minute."""
    port = free_port()
    stack.group.start(
        "api-limited",
        broker_command("api", "--port", str(port)),
        {"BROKER_RATE_LIMIT_RPM": "3", "BROKER_RATE_LIMIT_TPM": "10000"},
    )
    stack.group.wait_http("api-limited", f"http://127.0.0.1:{port}/healthz")
    yield f"http://127.0.0.1:{port}/v1"
    stack.group.stop("api-limited")


def test_metrics_labelled_after_traffic(stack: Stack) -> None:
    account = stack.new_account()
    stack.client(account.api_key).chat.completions.create(
        model="kimi-k2.6", max_tokens=20, messages=[{"role": "user", "content": "metrics"}]
    )
    text = httpx.get(f"http://127.0.0.1:{stack.ports.api}/metrics").text
    assert (
        'broker_requests_total{endpoint="/v1/chat/completions",model="kimi-k2.6",status="200"}'
    ) in text
    assert 'broker_request_duration_seconds_bucket{endpoint="/v1/chat/completions"' in text
    assert 'broker_queue_depth{queue="moonshot.hk.interactive"}' in text
    assert 'broker_circuit_state{target="moonshot.hk"} 0.0' in text


def test_rate_limit_counts_down_then_429(stack: Stack, limited_api: str) -> None:
    account = stack.new_account()
    client = openai.OpenAI(base_url=limited_api, api_key=account.api_key, max_retries=0)
    stack.clients.append(client)
    remaining = []
    for _ in range(3):
        raw = client.chat.completions.with_raw_response.create(
            model="deepseek-v4-flash", max_tokens=20, messages=[{"role": "user", "content": "a"}]
        )
        remaining.append(int(raw.headers["x-ratelimit-remaining-requests"]))
        assert raw.headers["x-ratelimit-limit-requests"] == "3"
        assert int(raw.headers["x-ratelimit-remaining-tokens"]) < 10_000
    assert remaining == [2, 1, 0]
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(
            model="deepseek-v4-flash", max_tokens=20, messages=[{"role": "user", "content": "a"}]
        )
    assert int(caught.value.response.headers["retry-after"]) >= 1
    assert caught.value.response.headers["x-ratelimit-remaining-requests"] == "0"
    with stack.sessions() as session:
        jobs = session.scalar(
            select(func.count()).select_from(Job).where(Job.account_id == account.id)
        )
    assert jobs == 3


def test_token_limit_rejects_oversized_request(stack: Stack, limited_api: str) -> None:
    account = stack.new_account()
    client = openai.OpenAI(base_url=limited_api, api_key=account.api_key, max_retries=0)
    stack.clients.append(client)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(
            model="gpt-5.4", max_tokens=20_000, messages=[{"role": "user", "content": "long"}]
        )


def test_cache_hit_same_body_and_free(stack: Stack) -> None:
    account = stack.new_account()
    client = stack.client(account.api_key)
    request = {
        "model": "glm-5.1",
        "max_tokens": 40,
        "extra_headers": {"x-broker-cache": "true"},
        "messages": [{"role": "user", "content": "Cache this answer."}],
    }
    first = client.chat.completions.with_raw_response.create(**request)
    second = client.chat.completions.with_raw_response.create(**request)
    assert first.headers["x-broker-cache"] == "miss"
    assert second.headers["x-broker-cache"] == "hit"
    assert second.headers["x-broker-cost-micro-usd"] == "0"
    assert second.parse().choices[0].message.content == first.parse().choices[0].message.content
    usage = second.parse().usage
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens
    with stack.sessions() as session:
        jobs = session.scalar(
            select(func.count()).select_from(Job).where(Job.account_id == account.id)
        )
    assert jobs == 1

    other = stack.new_account()
    miss = stack.client(other.api_key).chat.completions.with_raw_response.create(**request)
    assert miss.headers["x-broker-cache"] == "miss"


def test_flower_lists_workers_and_tasks(stack: Stack) -> None:
    port = free_port()
    stack.group.start(
        "flower",
        broker_command("flower", "--port", str(port)),
        {"BROKER_FLOWER_BASIC_AUTH": ":".join(FLOWER_AUTH)},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        stack.group.wait_until(
            "flower",
            lambda: (
                httpx.get(f"{base}/api/workers", auth=FLOWER_AUTH, timeout=5).status_code == 200
            ),
            60,
        )
        assert httpx.get(f"{base}/api/workers", timeout=5).status_code == 401

        def workers() -> dict:
            return httpx.get(f"{base}/api/workers?refresh=1", auth=FLOWER_AUTH, timeout=10).json()

        names = wait_for(workers, timeout_s=30, what="Flower to see the workers")
        assert any(name.startswith("us@") for name in names)
        assert any(name.startswith("hk@") for name in names)

        account = stack.new_account()
        client = stack.client(account.api_key)
        secret_prompt = "a prompt that must never appear in Flower"

        # Flower turns on the workers' task events a few seconds after it starts, so a
        # job run before then is not listed: send one per look until one is.
        def task_for_job() -> dict | None:
            raw = client.chat.completions.with_raw_response.create(
                model="grok-4.1-fast",
                max_tokens=20,
                messages=[{"role": "user", "content": secret_prompt}],
            )
            job_id = raw.headers["x-broker-job-id"]
            # The task's events arrive after the reply; give them a moment each look.
            for _ in range(10):
                tasks = httpx.get(f"{base}/api/tasks", auth=FLOWER_AUTH, timeout=10).json()
                listed = next(
                    (t for t in tasks.values() if job_id in (t.get("kwargs") or "")), None
                )
                if listed is not None:
                    return listed
                time.sleep(0.2)
            return None

        task = wait_for(task_for_job, timeout_s=30, what="Flower to list the job's task")
        assert task["name"] == "broker.run_job"
        assert "grok-4.1-fast" in task["kwargs"]
        assert secret_prompt not in str(task)
    finally:
        stack.group.stop("flower")
