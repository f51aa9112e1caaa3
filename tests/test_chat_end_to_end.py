"""Chat completions through the whole system: SDK, API, Celery region pools, simulator."""

from __future__ import annotations

import httpx
import openai
import pytest
from harness import Stack
from sqlalchemy import func, select
from support import wait_for

from broker.processes import broker_command
from broker.tables import Attempt, Job, LedgerEntry, Wallet
from workers.app import BILLING_QUEUE, SETTLE_JOB_TASK, make_celery

# deepseek-v4-flash prices from the catalog, in micro-dollars per million tokens.
FLASH_INPUT_PRICE = 135_800
FLASH_OUTPUT_PRICE = 271_600


def expected_cost(prompt_tokens: int, completion_tokens: int) -> int:
    """Cost rounded up to a whole micro-dollar, computed here independently of the broker."""
    exact = prompt_tokens * FLASH_INPUT_PRICE + completion_tokens * FLASH_OUTPUT_PRICE
    return (exact + 999_999) // 1_000_000


def wallet_of(stack: Stack, wallet_id: str) -> Wallet:
    with stack.sessions() as session:
        wallet = session.get(Wallet, wallet_id)
        assert wallet is not None
        return wallet


def job_row(stack: Stack, job_id: str) -> Job:
    with stack.sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def settled(stack: Stack, job_id: str) -> bool:
    return job_row(stack, job_id).settled_at is not None


def test_chat_completion_settles_wallet(stack: Stack) -> None:
    account = stack.new_account(5_000_000)
    client = stack.client(account.api_key)

    raw = client.chat.completions.with_raw_response.create(
        model="deepseek-v4-flash",
        max_tokens=200,
        messages=[
            {"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": "Name three uses of a message queue."},
        ],
    )
    completion = raw.parse()

    assert completion.choices[0].message.content
    assert completion.model == "deepseek-v4-flash"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens > 0
    assert completion.usage.completion_tokens > 0
    job_id = raw.headers["x-broker-job-id"]
    assert raw.headers["x-broker-provider"] == "deepseek"
    assert raw.headers["x-broker-region"] == "hk"
    cost = expected_cost(completion.usage.prompt_tokens, completion.usage.completion_tokens)
    assert int(raw.headers["x-broker-cost-micro-usd"]) == cost

    wait_for(lambda: settled(stack, job_id), what=f"settlement of {job_id}")
    job = job_row(stack, job_id)
    assert job.status == "succeeded"
    assert job.cost_micro_usd == cost
    wallet = wallet_of(stack, account.wallet_id)
    assert wallet.balance_micro_usd == 5_000_000 - cost
    assert wallet.held_micro_usd == 0
    with stack.sessions() as session:
        kinds = session.scalars(
            select(LedgerEntry.kind).where(LedgerEntry.job_id == job_id).order_by(LedgerEntry.id)
        ).all()
    assert kinds == ["hold", "release", "charge"]


def test_wallet_endpoint_shows_balance(stack: Stack) -> None:
    account = stack.new_account(1_234_567)
    response = httpx.get(
        f"{stack.api_url}/wallet", headers={"authorization": f"Bearer {account.api_key}"}
    )
    assert response.status_code == 200
    assert response.json()["balance_micro_usd"] == 1_234_567
    assert response.json()["held_micro_usd"] == 0


def test_models_list_has_prices(stack: Stack) -> None:
    account = stack.new_account(0)
    models = {model.id: model for model in stack.client(account.api_key).models.list()}
    assert len(models) >= 40
    opus = models["claude-opus-4-7"].model_dump()
    assert opus["owned_by"] == "anthropic"
    assert opus["pricing_micro_usd"]["input_per_mtok"] == 5_000_000
    assert opus["pricing_micro_usd"]["output_per_mtok"] == 25_000_000


def test_missing_key_gets_401(stack: Stack) -> None:
    response = httpx.post(f"{stack.api_url}/chat/completions", json={})
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


def test_unknown_key_gets_401(stack: Stack) -> None:
    client = stack.client("sk-brk-not-a-real-key-0000000000000000")
    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(
            model="deepseek-v4-flash", messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.status_code == 401
    assert "not-a-real-key" not in caught.value.message


def test_unknown_model_gets_404(stack: Stack) -> None:
    account = stack.new_account()
    with pytest.raises(openai.NotFoundError) as caught:
        stack.client(account.api_key).chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.body["code"] == "model_not_found"
    assert caught.value.body["param"] == "model"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "deepseek-v4-flash"}, "messages"),
        ({"model": "deepseek-v4-flash", "messages": []}, "messages"),
        (
            {"model": "deepseek-v4-flash", "messages": [{"role": "robot", "content": "x"}]},
            "messages[0].role",
        ),
        (
            {
                "model": "deepseek-v4-flash",
                "messages": [{"role": "user", "content": "x"}],
                "temperature": 7,
            },
            "temperature",
        ),
        (
            {
                "model": "deepseek-v4-flash",
                "messages": [{"role": "user", "content": "x"}],
                "max_tokens": 0,
            },
            "max_tokens",
        ),
        (
            {
                "model": "deepseek-v4-flash",
                "messages": [{"role": "user", "content": "x"}],
                "region": "eu",
            },
            "region",
        ),
        (
            {
                "model": "deepseek-v4-flash",
                "messages": [{"role": "user", "content": "x"}],
                "max_tokens": 10_000_000,
            },
            "max_tokens",
        ),
    ],
)
def test_invalid_body_gets_400_naming_param(stack: Stack, body: dict, param: str) -> None:
    account = stack.new_account()
    response = httpx.post(
        f"{stack.api_url}/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {account.api_key}"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_malformed_json_gets_400(stack: Stack) -> None:
    account = stack.new_account()
    response = httpx.post(
        f"{stack.api_url}/chat/completions",
        content=b"{not json",
        headers={"authorization": f"Bearer {account.api_key}", "content-type": "application/json"},
    )
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]["message"]


def test_uncovered_request_gets_402_and_no_job(stack: Stack) -> None:
    account = stack.new_account(10)  # ten micro-dollars
    with pytest.raises(openai.APIStatusError) as caught:
        stack.client(account.api_key).chat.completions.create(
            model="gpt-5.4",
            max_tokens=1000,
            messages=[{"role": "user", "content": "Write a long essay."}],
        )
    assert caught.value.status_code == 402
    assert caught.value.body["code"] == "insufficient_quota"
    wallet = wallet_of(stack, account.wallet_id)
    assert wallet.balance_micro_usd == 10
    assert wallet.held_micro_usd == 0
    with stack.sessions() as session:
        jobs = session.scalar(
            select(func.count()).select_from(Job).where(Job.account_id == account.id)
        )
    assert jobs == 0


def test_hk_job_runs_only_on_hk_pool(stack: Stack) -> None:
    account = stack.new_account()
    client = stack.client(account.api_key)
    job_ids = []
    for number in range(6):
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-5.4-mini",
            max_tokens=50,
            extra_body={"region": "hk"},
            messages=[{"role": "user", "content": f"Question number {number}?"}],
        )
        assert raw.headers["x-broker-region"] == "hk"
        job_ids.append(raw.headers["x-broker-job-id"])

    with stack.sessions() as session:
        attempts = session.scalars(select(Attempt).where(Attempt.job_id.in_(job_ids))).all()
    assert len(attempts) == len(job_ids)
    for attempt in attempts:
        assert attempt.region == "hk"
        assert attempt.worker is not None
        assert attempt.worker.startswith("hk@")
    stats = httpx.get(f"{stack.simulator_url('us')}/_sim/stats").json()
    assert stats["by_model"].get("gpt-5.4-mini", 0) == 0


def test_hk_job_waits_while_hk_pool_is_down(stack: Stack) -> None:
    account = stack.new_account()
    stack.group.stop("worker-hk")
    try:
        with pytest.raises(openai.APITimeoutError):
            stack.client(account.api_key, timeout_s=3).chat.completions.create(
                model="qwen3-max",
                max_tokens=20,
                messages=[{"role": "user", "content": "Still there?"}],
            )
        with stack.sessions() as session:
            job = session.scalars(select(Job).where(Job.account_id == account.id)).one()
        assert job.status == "queued"
        assert job.region == "hk"
    finally:
        stack.group.start("worker-hk", broker_command("worker", "--region", "hk"))
        stack.group.wait_worker("worker-hk", stack.settings.redis_url, "hk")
    wait_for(lambda: job_row(stack, job.id).status == "succeeded", what="the queued hk job")
    with stack.sessions() as session:
        attempt = session.scalars(select(Attempt).where(Attempt.job_id == job.id)).one()
    assert attempt.worker.startswith("hk@")
    wait_for(lambda: settled(stack, job.id), what="settlement")
    assert wallet_of(stack, account.wallet_id).held_micro_usd == 0


def test_settle_delivered_three_times_charges_once(stack: Stack) -> None:
    account = stack.new_account()
    stack.group.stop("billing")
    try:
        raw = stack.client(account.api_key).chat.completions.with_raw_response.create(
            model="deepseek-v4-flash",
            max_tokens=80,
            messages=[{"role": "user", "content": "Summarise exactly-once settlement."}],
        )
        job_id = raw.headers["x-broker-job-id"]
        cost = int(raw.headers["x-broker-cost-micro-usd"])
        # The worker sends its settle task shortly after the reply.
        wait_for(lambda: stack.redis.llen(BILLING_QUEUE) == 1, what="the worker's settle task")
        celery = make_celery()
        celery.conf.broker_url = stack.settings.redis_url
        for _ in range(2):
            celery.send_task(SETTLE_JOB_TASK, args=[job_id], queue=BILLING_QUEUE)
        celery.close()
        assert stack.redis.llen(BILLING_QUEUE) == 3
    finally:
        stack.group.start("billing", broker_command("billing-worker"))
    wait_for(
        lambda: stack.redis.llen(BILLING_QUEUE) == 0 and stack.redis.hlen("unacked") == 0,
        what="the billing queue to drain",
    )

    with stack.sessions() as session:
        entries = session.execute(
            select(LedgerEntry.kind, LedgerEntry.amount_micro_usd).where(
                LedgerEntry.job_id == job_id
            )
        ).all()
    assert sorted(kind for kind, _ in entries) == ["charge", "hold", "release"]
    assert [amount for kind, amount in entries if kind == "charge"] == [-cost]
    wallet = wallet_of(stack, account.wallet_id)
    assert wallet.balance_micro_usd == 5_000_000 - cost
    assert wallet.held_micro_usd == 0


def test_logs_never_contain_api_key(stack: Stack) -> None:
    account = stack.new_account()
    stack.client(account.api_key).chat.completions.create(
        model="kimi-k2.6", max_tokens=20, messages=[{"role": "user", "content": "hello"}]
    )
    for log in stack.group.log_dir.glob("*.log"):
        text = log.read_text(errors="replace")
        assert account.api_key not in text, log.name
        assert "simulator-key" not in text, log.name
