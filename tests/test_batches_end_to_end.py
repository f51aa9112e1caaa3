"""Batches through the whole system with the official SDK: files, batches, output, money."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest
from async_support import (
    FAST_ASYNC_ENV,
    batch_cost,
    batch_jobs,
    chat_line,
    discounted,
    jsonl,
    ledger_ok,
    read_jsonl,
    upload,
    wait_batch,
    wallet,
)
from harness import RedisServer, Stack, running_stack
from sqlalchemy import select
from support import wait_for

from broker.tables import LedgerEntry

OPENING = 5_000_000


def test_batch_round_trip_charges_discount(stack: Stack) -> None:
    account = stack.new_account(OPENING)
    client = stack.client(account.api_key)
    lines = [chat_line(f"flash-{n}") for n in range(8)]
    lines += [chat_line(f"qwen-{n}", model="qwen3-max") for n in range(4)]
    file_id = upload(client, jsonl(lines))

    stored = client.files.retrieve(file_id)
    assert stored.purpose == "batch"
    assert stored.bytes == len(jsonl(lines))
    assert file_id in [f.id for f in client.files.list()]

    batch = client.batches.create(
        input_file_id=file_id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"run": "round-trip"},
    )
    assert batch.status == "validating"
    assert batch.metadata == {"run": "round-trip"}
    done = wait_batch(client, batch.id, ("completed", "failed", "expired", "cancelled"))

    assert done.status == "completed", done.errors
    assert done.request_counts.total == 12
    assert done.request_counts.completed == 12
    assert done.request_counts.failed == 0
    assert done.error_file_id is None
    assert done.in_progress_at is not None
    assert done.finalizing_at is not None
    assert done.completed_at is not None
    output = read_jsonl(client, done.output_file_id)
    assert sorted(line["custom_id"] for line in output) == sorted(
        line["custom_id"] for line in lines
    )

    jobs = {job.id: job for job in batch_jobs(stack, batch.id)}
    assert len(jobs) == 12
    total = 0
    for line in output:
        assert line["error"] is None
        assert line["id"].startswith("batch_req_")
        assert line["response"]["status_code"] == 200
        body = line["response"]["body"]
        job = jobs[line["response"]["request_id"]]
        assert job.custom_id == line["custom_id"]
        assert job.lane == "batch"
        assert body["choices"][0]["message"]["content"]
        usage = body["usage"]
        expected = batch_cost(job.model, usage["prompt_tokens"], usage["completion_tokens"])
        assert job.cost_micro_usd == expected, line["custom_id"]
        assert job.input_price_micro_usd == discounted(
            {"deepseek-v4-flash": 135_800, "qwen3-max": 1_140_000}[job.model]
        )
        total += expected
    wait_for(lambda: wallet(stack, account.wallet_id).held_micro_usd == 0, what="holds")
    assert wallet(stack, account.wallet_id).balance_micro_usd == OPENING - total
    assert ledger_ok(stack, account.wallet_id)

    assert batch.id in [b.id for b in client.batches.list()]
    listed = httpx.get(
        f"{stack.api_url}/jobs",
        params={"batch_id": batch.id, "limit": 5},
        headers={"authorization": f"Bearer {account.api_key}"},
    ).json()
    assert listed["object"] == "list"
    assert len(listed["data"]) == 5
    assert listed["has_more"] is True
    assert all(job["batch_id"] == batch.id for job in listed["data"])
    assert client.files.delete(done.output_file_id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(done.output_file_id)


INVALID_LINES: list[tuple[object, str, str | None]] = [
    ("{not json", "invalid_json_line", None),
    (
        {"method": "POST", "url": "/v1/chat/completions", "body": {"model": "qwen3-max"}},
        "missing_required_parameter",
        "custom_id",
    ),
    (chat_line("twice"), "duplicate_custom_id", "custom_id"),
    (chat_line("unknown-model", model="no-such-model"), "model_not_found", "body.model"),
    (chat_line("wrong-url", url="/v1/embeddings"), "url_mismatch", "url"),
    (chat_line("wrong-method", method="GET"), "invalid_value", "method"),
    (
        {"custom_id": "no-body", "method": "POST", "url": "/v1/chat/completions", "body": [1]},
        "invalid_value",
        "body",
    ),
    (
        chat_line("no-messages", body={"model": "qwen3-max"}),
        "missing_required_parameter",
        "body.messages",
    ),
]


def test_batch_invalid_lines_fail_batch(stack: Stack) -> None:
    account = stack.new_account(OPENING)
    client = stack.client(account.api_key)
    # Lines 1 and 2 are valid and use two models, because a mix of models is allowed.
    lines: list[object] = [chat_line("twice"), chat_line("other", model="qwen3-max")]
    lines += [line for line, _, _ in INVALID_LINES]
    file_id = upload(client, jsonl(lines))
    batch = client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = wait_batch(client, batch.id, ("failed", "in_progress", "completed"))

    assert done.status == "failed"
    assert done.failed_at is not None
    errors = {error.line: error for error in done.errors.data}
    for number, (_, code, param) in enumerate(INVALID_LINES, start=3):
        assert errors[number].code == code, (number, errors[number])
        assert errors[number].param == param, (number, errors[number])
        assert errors[number].message
    assert sorted(errors) == list(range(3, 3 + len(INVALID_LINES)))
    assert batch_jobs(stack, batch.id) == []
    assert wallet(stack, account.wallet_id).held_micro_usd == 0


def test_batch_empty_file_fails(stack: Stack) -> None:
    account = stack.new_account(OPENING)
    client = stack.client(account.api_key)
    batch = client.batches.create(
        input_file_id=upload(client, b"\n\n"),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    done = wait_batch(client, batch.id, ("failed", "completed"))
    assert done.status == "failed"
    assert [error.code for error in done.errors.data] == ["empty_file"]


def test_batch_create_rejects_bad_arguments(stack: Stack) -> None:
    account = stack.new_account(OPENING)
    client = stack.client(account.api_key)
    file_id = upload(client, jsonl([chat_line("a")]))
    with pytest.raises(openai.BadRequestError) as caught:
        client.batches.create(
            input_file_id=file_id, endpoint="/v1/images/generations", completion_window="24h"
        )
    assert caught.value.body["param"] == "endpoint"
    with pytest.raises(openai.BadRequestError) as caught:
        client.batches.create(
            input_file_id=file_id,
            endpoint="/v1/chat/completions",
            completion_window="1h",  # type: ignore[arg-type]
        )
    assert caught.value.body["param"] == "completion_window"
    with pytest.raises(openai.NotFoundError):
        client.batches.create(
            input_file_id="file_missing", endpoint="/v1/chat/completions", completion_window="24h"
        )


def test_other_account_gets_404(stack: Stack) -> None:
    owner = stack.new_account(OPENING)
    other = stack.new_account(OPENING)
    owner_client = stack.client(owner.api_key)
    other_client = stack.client(other.api_key)
    file_id = upload(owner_client, jsonl([chat_line("mine")]))
    batch = owner_client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = wait_batch(owner_client, batch.id, ("completed", "failed"))
    job_id = batch_jobs(stack, batch.id)[0].id

    with pytest.raises(openai.NotFoundError):
        other_client.files.retrieve(file_id)
    with pytest.raises(openai.NotFoundError):
        other_client.files.content(file_id)
    with pytest.raises(openai.NotFoundError):
        other_client.files.delete(file_id)
    with pytest.raises(openai.NotFoundError):
        other_client.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        other_client.batches.cancel(batch.id)
    with pytest.raises(openai.NotFoundError):
        other_client.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    headers = {"authorization": f"Bearer {other.api_key}"}
    assert httpx.get(f"{stack.api_url}/jobs/{job_id}", headers=headers).status_code == 404
    response = httpx.post(f"{stack.api_url}/jobs/{job_id}/cancel", headers=headers)
    assert response.status_code == 404
    assert file_id not in [f.id for f in other_client.files.list()]
    assert batch.id not in [b.id for b in other_client.batches.list()]
    listed = httpx.get(f"{stack.api_url}/jobs", headers=headers).json()
    assert listed["data"] == []
    assert owner_client.files.content(done.output_file_id).read()


@pytest.fixture(scope="module")
def slow_window_stack(
    redis_server: RedisServer, postgres_admin: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """A system on PostgreSQL that keeps two jobs of a batch in flight at a time."""
    redis_url = f"redis://127.0.0.1:{redis_server.port}/7"
    with running_stack(
        "postgresql", redis_url, tmp_path_factory.mktemp("batch-window"), env=FAST_ASYNC_ENV
    ) as running:
        yield running
        running.close_clients()


def test_cancel_mid_batch_charges_finished(slow_window_stack: Stack) -> None:
    stack = slow_window_stack
    account = stack.new_account(OPENING)
    client = stack.client(account.api_key)
    lines = [chat_line(f"slow-{n}") for n in range(10)]
    config = f"{stack.simulator_url('hk')}/_sim/config"
    httpx.post(config, json={"latency_ms": 700}).raise_for_status()
    try:
        batch = client.batches.create(
            input_file_id=upload(client, jsonl(lines)),
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
        wait_for(
            lambda: client.batches.retrieve(batch.id).request_counts.completed >= 2,
            timeout_s=60,
            what="two finished requests",
        )
        cancelling = client.batches.cancel(batch.id)
        assert cancelling.status == "cancelling"
        assert cancelling.cancelling_at is not None
        done = wait_batch(client, batch.id, ("cancelled", "completed", "failed"), 60)
    finally:
        httpx.post(config, json={"latency_ms": 0}).raise_for_status()

    assert done.status == "cancelled"
    assert done.cancelled_at is not None
    counts = done.request_counts
    assert counts.total == 10
    assert 2 <= counts.completed < 10
    assert counts.completed + counts.failed == 10
    output = read_jsonl(client, done.output_file_id)
    errors = read_jsonl(client, done.error_file_id)
    assert len(output) == counts.completed
    assert len(errors) == counts.failed
    assert {line["error"]["code"] for line in errors} == {"batch_cancelled"}
    assert all(line["response"] is None for line in errors)
    assert sorted(line["custom_id"] for line in output + errors) == sorted(
        line["custom_id"] for line in lines
    )

    jobs = batch_jobs(stack, batch.id)
    charged = [job for job in jobs if job.cost_micro_usd]
    assert len(charged) == counts.completed
    assert all(job.settled_at is not None for job in jobs)
    for job in jobs:
        if not job.cost_micro_usd:
            assert job.status == "cancelled"
            assert job.prompt_tokens == 0
    with stack.sessions() as session:
        released = session.scalars(
            select(LedgerEntry.job_id).where(
                LedgerEntry.kind == "release",
                LedgerEntry.job_id.in_([job.id for job in jobs]),
            )
        ).all()
    assert len(released) == 10
    state = wallet(stack, account.wallet_id)
    assert state.held_micro_usd == 0
    assert state.balance_micro_usd == OPENING - sum(job.cost_micro_usd for job in charged)
    assert ledger_ok(stack, account.wallet_id)


def test_batch_wallet_runs_out_mid_batch(slow_window_stack: Stack) -> None:
    stack = slow_window_stack
    # Each line holds about 20,000 micro-dollars (7,000 output tokens at the discounted
    # 2.85 dollars per million), so 50,000 covers the holds of the first two lines only.
    account = stack.new_account(50_000)
    client = stack.client(account.api_key)
    lines = [chat_line(f"costly-{n}", model="qwen3-max", max_tokens=7_000) for n in range(5)]
    batch = client.batches.create(
        input_file_id=upload(client, jsonl(lines)),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    done = wait_batch(client, batch.id, ("completed", "failed", "cancelled"))

    assert done.status == "completed"
    assert done.request_counts.completed == 2
    assert done.request_counts.failed == 3
    errors = read_jsonl(client, done.error_file_id)
    assert sorted(line["custom_id"] for line in errors) == ["costly-2", "costly-3", "costly-4"]
    assert {line["error"]["code"] for line in errors} == {"insufficient_quota"}
    state = wallet(stack, account.wallet_id)
    assert state.held_micro_usd == 0
    assert state.balance_micro_usd >= 0
    assert ledger_ok(stack, account.wallet_id)
