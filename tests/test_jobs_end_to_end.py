"""Asynchronous jobs through the whole system: submit, poll, list, cancel."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from async_support import chat_line, ledger_ok, wallet
from harness import Stack
from sqlalchemy import select
from support import wait_for

from broker.processes import broker_command
from broker.tables import Attempt, LedgerEntry

# deepseek-v4-flash catalog prices, micro-dollars per million tokens.
FLASH_PRICES = (135_800, 271_600)
OPENING = 5_000_000


def api(stack: Stack, api_key: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(
        method,
        f"{stack.api_url}{path}",
        headers={"authorization": f"Bearer {api_key}", **kwargs.pop("headers", {})},
        timeout=30,
        **kwargs,
    )


def submit(stack: Stack, api_key: str, body: dict[str, Any], **envelope: Any) -> httpx.Response:
    return api(
        stack,
        api_key,
        "POST",
        "/jobs",
        json={"endpoint": "/v1/chat/completions", "body": body, **envelope},
    )


def settled_job(stack: Stack, api_key: str, job_id: str, timeout_s: float = 60) -> dict:
    return wait_for(
        lambda: (
            (job := api(stack, api_key, "GET", f"/jobs/{job_id}").json())["cost_micro_usd"]
            is not None
            and job
        ),
        timeout_s=timeout_s,
        what=f"settlement of {job_id}",
    )


def test_async_job_round_trip(stack: Stack) -> None:
    account = stack.new_account(OPENING)
    response = submit(stack, account.api_key, chat_line("a")["body"], metadata={"ticket": "42"})
    assert response.status_code == 202
    created = response.json()
    assert created["object"] == "job"
    assert created["status"] in ("queued", "running", "succeeded")
    assert created["metadata"] == {"ticket": "42"}
    assert created["model"] == "deepseek-v4-flash"

    job = settled_job(stack, account.api_key, created["id"])
    assert job["status"] == "succeeded"
    assert job["result"]["choices"][0]["message"]["content"]
    usage = job["usage"]
    exact = usage["prompt_tokens"] * FLASH_PRICES[0] + usage["completion_tokens"] * FLASH_PRICES[1]
    assert job["cost_micro_usd"] == -(-exact // 1_000_000)
    assert job["served"]["provider"] == "deepseek"
    assert len(job["attempts"]) == 1
    assert job["attempts"][0]["status_code"] == 200
    assert job["error"] is None
    state = wallet(stack, account.wallet_id)
    assert state.balance_micro_usd == OPENING - job["cost_micro_usd"]
    assert state.held_micro_usd == 0


def test_embeddings_job_succeeds(stack: Stack) -> None:
    account = stack.new_account(OPENING)
    response = api(
        stack,
        account.api_key,
        "POST",
        "/jobs",
        json={
            "endpoint": "/v1/embeddings",
            "body": {"model": "text-embedding-3-small", "input": ["one", "two"]},
        },
    )
    assert response.status_code == 202
    job = settled_job(stack, account.api_key, response.json()["id"])
    assert job["status"] == "succeeded"
    assert len(job["result"]["data"]) == 2


def test_jobs_list_filters_and_pages(stack: Stack) -> None:
    account = stack.new_account(OPENING)
    ids = [
        submit(stack, account.api_key, chat_line(f"list-{n}", model=model)["body"]).json()["id"]
        for n, model in enumerate(("deepseek-v4-flash", "qwen3-max", "deepseek-v4-flash"))
    ]
    flash = api(stack, account.api_key, "GET", "/jobs", params={"model": "deepseek-v4-flash"})
    assert [job["id"] for job in flash.json()["data"]] == [ids[2], ids[0]]

    first = api(stack, account.api_key, "GET", "/jobs", params={"limit": 2}).json()
    assert [job["id"] for job in first["data"]] == [ids[2], ids[1]]
    assert first["has_more"] is True
    assert first["first_id"] == ids[2]
    assert first["last_id"] == ids[1]
    rest = api(
        stack, account.api_key, "GET", "/jobs", params={"limit": 2, "after": first["last_id"]}
    ).json()
    assert [job["id"] for job in rest["data"]] == [ids[0]]
    assert rest["has_more"] is False

    for job_id in ids:
        settled_job(stack, account.api_key, job_id)
    done = api(stack, account.api_key, "GET", "/jobs", params={"status": "succeeded"}).json()
    assert len(done["data"]) == 3
    bad = api(stack, account.api_key, "GET", "/jobs", params={"status": "done"})
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "status"


def test_job_idempotency_key_returns_same_job(stack: Stack) -> None:
    account = stack.new_account(OPENING)
    body = chat_line("same")["body"]
    headers = {"idempotency-key": "job-key-1"}
    first = api(
        stack,
        account.api_key,
        "POST",
        "/jobs",
        json={"endpoint": "/v1/chat/completions", "body": body},
        headers=headers,
    )
    again = api(
        stack,
        account.api_key,
        "POST",
        "/jobs",
        json={"endpoint": "/v1/chat/completions", "body": body},
        headers=headers,
    )
    assert first.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    changed = api(
        stack,
        account.api_key,
        "POST",
        "/jobs",
        json={"endpoint": "/v1/chat/completions", "body": {**body, "max_tokens": 5}},
        headers=headers,
    )
    assert changed.status_code == 409


def test_concurrent_idempotency_key_one_job(stack: Stack) -> None:
    """Copies of one keyed request, sent at once with unkeyed ones, share the API's job
    transactions: every copy gets the same job, and only that job reserves money."""
    account = stack.new_account(OPENING)
    body = chat_line("concurrent")["body"]
    copies = 8

    async def post(client: httpx.AsyncClient, key: str | None) -> httpx.Response:
        headers = {"authorization": f"Bearer {account.api_key}"}
        if key is not None:
            headers["idempotency-key"] = key
        return await client.post(
            f"{stack.api_url}/jobs",
            json={"endpoint": "/v1/chat/completions", "body": body},
            headers=headers,
        )

    async def all_of_them() -> list[httpx.Response]:
        keys = [key for _ in range(copies) for key in ("concurrent-key", None)]
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(*(post(client, key) for key in keys))

    responses = asyncio.run(all_of_them())

    assert [r.status_code for r in responses] == [202] * (2 * copies)
    keyed_ids = {r.json()["id"] for r in responses[0::2]}
    unkeyed_ids = {r.json()["id"] for r in responses[1::2]}
    assert len(keyed_ids) == 1
    assert len(unkeyed_ids) == copies
    job_ids = keyed_ids | unkeyed_ids
    for job_id in job_ids:
        settled_job(stack, account.api_key, job_id)
    with stack.sessions() as session:
        holds = session.scalars(
            select(LedgerEntry.job_id).where(
                LedgerEntry.wallet_id == account.wallet_id, LedgerEntry.kind == "hold"
            )
        ).all()
    assert sorted(holds) == sorted(job_ids)
    assert ledger_ok(stack, account.wallet_id)
    assert wallet(stack, account.wallet_id).held_micro_usd == 0


@pytest.mark.parametrize(
    ("envelope", "status", "param"),
    [
        ({"endpoint": "/v1/images/generations", "body": {}}, 400, "endpoint"),
        ({"endpoint": "/v1/chat/completions", "body": "hi"}, 400, "body"),
        (
            {"endpoint": "/v1/chat/completions", "body": {"model": "qwen3-max"}},
            400,
            "body.messages",
        ),
        (
            {
                "endpoint": "/v1/chat/completions",
                "body": {**chat_line("s")["body"], "stream": True},
            },
            400,
            "body.stream",
        ),
        (
            {"endpoint": "/v1/chat/completions", "body": chat_line("m", model="nope")["body"]},
            404,
            "body.model",
        ),
        (
            {"endpoint": "/v1/chat/completions", "body": chat_line("x")["body"], "metadata": [1]},
            400,
            "metadata",
        ),
    ],
)
def test_invalid_job_gets_error_naming_param(
    stack: Stack, envelope: dict, status: int, param: str
) -> None:
    account = stack.new_account(OPENING)
    response = api(stack, account.api_key, "POST", "/jobs", json=envelope)
    assert response.status_code == status
    assert response.json()["error"]["param"] == param


def test_cancel_queued_job_releases_hold(stack: Stack) -> None:
    account = stack.new_account(OPENING)
    stack.group.stop("worker-hk")
    try:
        created = submit(stack, account.api_key, chat_line("queued")["body"]).json()
        assert wallet(stack, account.wallet_id).held_micro_usd > 0
        cancelled = api(stack, account.api_key, "POST", f"/jobs/{created['id']}/cancel")
        assert cancelled.status_code == 200
        assert cancelled.json()["status"] == "cancelled"
        assert cancelled.json()["error"]["code"] == "cancelled"
        job = settled_job(stack, account.api_key, created["id"])
        assert job["cost_micro_usd"] == 0
    finally:
        stack.group.start("worker-hk", broker_command("worker", "--region", "hk"))
        stack.group.wait_worker("worker-hk", stack.settings.redis_url, "hk")
    state = wallet(stack, account.wallet_id)
    assert state.held_micro_usd == 0
    assert state.balance_micro_usd == OPENING
    assert ledger_ok(stack, account.wallet_id)
    # The worker that came back drops the cancelled job's message.
    wait_for(lambda: stack.redis.llen("deepseek.hk.interactive") == 0, what="the hk queue")
    again = api(stack, account.api_key, "GET", f"/jobs/{created['id']}").json()
    assert again["status"] == "cancelled"
    assert again["attempts"] == []
    with stack.sessions() as session:
        kinds = session.scalars(
            select(LedgerEntry.kind).where(LedgerEntry.job_id == created["id"])
        ).all()
    assert sorted(kinds) == ["hold", "release"]
    repeat = api(stack, account.api_key, "POST", f"/jobs/{created['id']}/cancel")
    assert repeat.status_code == 200


def test_cancel_running_job_is_charged(stack: Stack) -> None:
    account = stack.new_account(OPENING)
    config = f"{stack.simulator_url('hk')}/_sim/config"
    httpx.post(config, json={"latency_ms": 1500}).raise_for_status()
    try:
        created = submit(stack, account.api_key, chat_line("running")["body"]).json()
        wait_for(
            lambda: (
                api(stack, account.api_key, "GET", f"/jobs/{created['id']}").json()["status"]
                == "running"
            ),
            what="the job to start",
        )
        response = api(stack, account.api_key, "POST", f"/jobs/{created['id']}/cancel")
        assert response.status_code == 200
        assert response.json()["status"] == "running"
        job = settled_job(stack, account.api_key, created["id"])
    finally:
        httpx.post(config, json={"latency_ms": 0}).raise_for_status()
    assert job["status"] == "cancelled"
    assert job["result"] is not None
    assert job["cost_micro_usd"] > 0
    state = wallet(stack, account.wallet_id)
    assert state.balance_micro_usd == OPENING - job["cost_micro_usd"]
    assert state.held_micro_usd == 0
    finished = api(stack, account.api_key, "POST", f"/jobs/{created['id']}/cancel")
    assert finished.status_code == 200
    with stack.sessions() as session:
        attempts = session.scalars(select(Attempt).where(Attempt.job_id == created["id"])).all()
    assert len(attempts) == 1


def test_cancel_finished_job_conflicts(stack: Stack) -> None:
    account = stack.new_account(OPENING)
    created = submit(stack, account.api_key, chat_line("done")["body"]).json()
    settled_job(stack, account.api_key, created["id"])
    response = api(stack, account.api_key, "POST", f"/jobs/{created['id']}/cancel")
    assert response.status_code == 409
