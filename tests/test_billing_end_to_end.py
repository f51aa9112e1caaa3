"""Billing through the running system: races, keys, limits, payments, prices, reports."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import httpx
import openai
import pytest
from harness import STRIPE_WEBHOOK_SECRET, Stack
from sqlalchemy import func, select, update
from support import wait_for

from broker.ledger import check_wallet
from broker.tables import Job, LedgerEntry, Wallet

# deepseek-v4-flash: $0.1358 and $0.2716 per million tokens.
FLASH_IN, FLASH_OUT = 135_800, 271_600
# A request whose hold is (1 + 8 + 8) input and 1000 output tokens of deepseek-v4-flash:
# ceil((17 * 135_800 + 1000 * 271_600) / 1_000_000) = 274 micro-USD.
RACE_REQUEST = {
    "model": "deepseek-v4-flash",
    "max_tokens": 1000,
    "messages": [{"role": "user", "content": "x"}],
}
RACE_HOLD = 274


def settled(stack: Stack, account_id: str) -> bool:
    with stack.sessions() as session:
        return (
            session.scalar(
                select(func.count())
                .select_from(Job)
                .where(Job.account_id == account_id, Job.settled_at.is_(None))
            )
            == 0
        )


def wallet(stack: Stack, wallet_id: str) -> Wallet:
    with stack.sessions() as session:
        return session.get(Wallet, wallet_id)


def test_race_never_reserves_more_than_balance(stack: Stack) -> None:
    httpx.post(f"{stack.simulator_url('hk')}/_sim/config", json={"latency_ms": 1500})
    opening = 10 * RACE_HOLD + 100
    account = stack.new_account(opening)
    client = openai.AsyncOpenAI(
        base_url=stack.api_url, api_key=account.api_key, max_retries=0, timeout=120
    )

    async def one() -> int:
        try:
            await client.chat.completions.create(**RACE_REQUEST)
            return 200
        except openai.APIStatusError as exc:
            return exc.status_code

    async def all_of_them() -> list[int]:
        try:
            return await asyncio.gather(*(one() for _ in range(500)))
        finally:
            await client.close()

    try:
        statuses = asyncio.run(all_of_them())
    finally:
        httpx.post(f"{stack.simulator_url('hk')}/_sim/config", json={"latency_ms": 0})

    served = statuses.count(200)
    assert set(statuses) <= {200, 402}
    assert 1 <= served
    assert statuses.count(402) == 500 - served
    wait_for(lambda: settled(stack, account.id), timeout_s=60, what="settlement")
    with stack.sessions() as session:
        entries = session.execute(
            select(LedgerEntry.amount_micro_usd, LedgerEntry.held_delta_micro_usd)
            .where(LedgerEntry.wallet_id == account.wallet_id)
            .order_by(LedgerEntry.id)
        ).all()
        jobs = session.scalar(
            select(func.count()).select_from(Job).where(Job.account_id == account.id)
        )
    assert jobs == served
    balance = held = 0
    for amount, held_delta in entries:
        balance += amount
        held += held_delta
        assert held <= balance, "more was held than the wallet had"
        assert balance >= 0
    final = wallet(stack, account.wallet_id)
    assert final.balance_micro_usd == balance
    assert final.held_micro_usd == 0


def test_short_wallet_spares_other_accounts(stack: Stack) -> None:
    """Concurrent requests of three accounts share the API's job transactions. The one
    wallet that covers only 3 of its requests must not fail the other accounts'."""
    httpx.post(f"{stack.simulator_url('hk')}/_sim/config", json={"latency_ms": 1000})
    short = stack.new_account(3 * RACE_HOLD + 100)
    funded = [stack.new_account(), stack.new_account()]
    per_account = 30
    clients = {
        account.id: openai.AsyncOpenAI(
            base_url=stack.api_url, api_key=account.api_key, max_retries=0, timeout=120
        )
        for account in (short, *funded)
    }

    async def one(account_id: str) -> tuple[str, int, dict | None]:
        try:
            await clients[account_id].chat.completions.create(**RACE_REQUEST)
            return account_id, 200, None
        except openai.APIStatusError as exc:
            return account_id, exc.status_code, exc.body

    async def all_of_them() -> list[tuple[str, int, dict | None]]:
        order = [account.id for _ in range(per_account) for account in (short, *funded)]
        try:
            return await asyncio.gather(*(one(account_id) for account_id in order))
        finally:
            for client in clients.values():
                await client.close()

    try:
        results = asyncio.run(all_of_them())
    finally:
        httpx.post(f"{stack.simulator_url('hk')}/_sim/config", json={"latency_ms": 0})

    for account in funded:
        statuses = [status for account_id, status, _ in results if account_id == account.id]
        assert statuses == [200] * per_account
    short_results = [
        (status, body) for account_id, status, body in results if account_id == short.id
    ]
    served = sum(status == 200 for status, _ in short_results)
    # Holds are only released by settlement, so at least the 3 covered requests run.
    assert served >= 3
    for status, body in short_results:
        assert status in (200, 402)
        if status == 402:
            assert body["code"] == "insufficient_quota"
            assert "cannot cover this request's worst-case cost ($0.000274)" in body["message"]
    for account in (short, *funded):
        wait_for(
            lambda account=account: settled(stack, account.id), timeout_s=60, what="settlement"
        )
    with stack.sessions() as session:
        for account in (short, *funded):
            check = check_wallet(session, account.wallet_id)
            jobs = session.scalar(
                select(func.count()).select_from(Job).where(Job.account_id == account.id)
            )
            holds = session.scalar(
                select(func.count())
                .select_from(LedgerEntry)
                .where(LedgerEntry.wallet_id == account.wallet_id, LedgerEntry.kind == "hold")
            )
            expected = served if account is short else per_account
            assert jobs == expected
            assert holds == expected
            assert check.ok
            assert check.held_micro_usd == 0


def test_revoked_key_rejected_at_once(stack: Stack) -> None:
    account = stack.new_account()
    client = stack.client(account.api_key)
    # The first call puts the key in the API's cache.
    client.chat.completions.create(
        model="deepseek-v4-flash", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
    )
    keys = stack.admin("GET", f"/accounts/{account.id}/keys").json()["data"]
    assert stack.admin("POST", f"/keys/{keys[0]['id']}/revoke").status_code == 200

    def rejected() -> bool:
        try:
            client.chat.completions.create(
                model="deepseek-v4-flash",
                max_tokens=5,
                messages=[{"role": "user", "content": "hi"}],
            )
        except openai.AuthenticationError as exc:
            return exc.body["code"] == "revoked_api_key"
        return False

    # The revocation reaches the API through Redis; allow it well under the cache TTL.
    wait_for(rejected, timeout_s=1.0, interval_s=0.05, what="the revoked key to be rejected")


def test_rotated_key_replaces_old(stack: Stack) -> None:
    account = stack.new_account()
    key_id = stack.admin("GET", f"/accounts/{account.id}/keys").json()["data"][0]["id"]
    rotated = stack.admin("POST", f"/keys/{key_id}/rotate").json()
    assert rotated["replaces"] == key_id
    new_client = stack.client(rotated["key"])
    assert new_client.chat.completions.create(
        model="deepseek-v4-flash", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
    ).choices
    with pytest.raises(openai.AuthenticationError):
        stack.client(account.api_key).models.list()


def test_key_limits_enforced(stack: Stack) -> None:
    account = stack.new_account()
    created = stack.admin(
        "POST",
        f"/accounts/{account.id}/keys",
        json={
            "name": "limited",
            "allowed_models": ["deepseek-v4-flash", "gpt-5.4-mini"],
            "region_pin": "us",
            "monthly_limit_micro_usd": 250,
        },
    ).json()
    client = stack.client(created["key"])

    with pytest.raises(openai.PermissionDeniedError) as denied:
        client.chat.completions.create(
            model="gpt-5.4", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
        )
    assert denied.value.body["code"] == "model_not_allowed"

    raw = client.chat.completions.with_raw_response.create(
        model="deepseek-v4-flash", max_tokens=20, messages=[{"role": "user", "content": "x"}]
    )
    # deepseek-v4-flash defaults to hk; the key's pin moves it to us.
    assert raw.headers["x-broker-region"] == "us"
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(
            model="deepseek-v4-flash",
            max_tokens=5,
            extra_body={"region": "hk"},
            messages=[{"role": "user", "content": "hi"}],
        )

    # 250 micro-USD a month: small requests fit, but one whose hold is 274 cannot.
    with pytest.raises(openai.APIStatusError) as limited:
        client.chat.completions.create(**RACE_REQUEST)
    assert limited.value.status_code == 402
    assert limited.value.body["code"] == "key_limit_exceeded"


def test_expired_key_gets_401(stack: Stack) -> None:
    account = stack.new_account()
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    created = stack.admin("POST", f"/accounts/{account.id}/keys", json={"expires_at": past}).json()
    with pytest.raises(openai.AuthenticationError) as caught:
        stack.client(created["key"]).chat.completions.create(
            model="deepseek-v4-flash", messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.body["code"] == "expired_api_key"


def _stripe_event(account_id: str, event_id: str, cents: int) -> tuple[bytes, str]:
    payload = json.dumps(
        {
            "id": event_id,
            "object": "event",
            "type": "checkout.session.completed",
            "data": {
                "object": {
                    "id": "cs_test_1",
                    "object": "checkout.session",
                    "client_reference_id": account_id,
                    "amount_total": cents,
                    "currency": "usd",
                    "payment_status": "paid",
                }
            },
        }
    ).encode()
    timestamp = int(time.time())
    # Stripe's scheme: HMAC-SHA256 of "<timestamp>.<payload>" with the endpoint secret.
    signature = hmac.new(
        STRIPE_WEBHOOK_SECRET.encode(), f"{timestamp}.".encode() + payload, hashlib.sha256
    ).hexdigest()
    return payload, f"t={timestamp},v1={signature}"


def test_stripe_payment_credited_once(stack: Stack) -> None:
    account = stack.new_account(0)
    payload, signature = _stripe_event(account.id, "evt_test_replayed", 2500)
    url = f"http://127.0.0.1:{stack.ports.api}/v1/payments/stripe/webhook"
    answers = [
        httpx.post(url, content=payload, headers={"stripe-signature": signature}) for _ in range(3)
    ]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert [a.json()["applied"] for a in answers] == [True, False, False]
    assert wallet(stack, account.wallet_id).balance_micro_usd == 25_000_000

    forged = httpx.post(
        url, content=payload.replace(b"2500", b"9999"), headers={"stripe-signature": signature}
    )
    assert forged.status_code == 400
    assert wallet(stack, account.wallet_id).balance_micro_usd == 25_000_000


def test_price_change_during_job_keeps_old_price(stack: Stack, tmp_path) -> None:
    from broker.processes import broker_command, free_port
    from broker.settings import DEFAULT_CATALOG_PATH

    catalog = DEFAULT_CATALOG_PATH.read_text().replace(
        'input_per_mtok: "0.1358"', 'input_per_mtok: "1.3580"', 1
    )
    assert "1.3580" in catalog
    changed = tmp_path / "catalog.yaml"
    changed.write_text(catalog)
    port = free_port()
    stack.group.start(
        "api-new-prices",
        broker_command("api", "--port", str(port)),
        {"BROKER_CATALOG_PATH": str(changed)},
    )
    stack.group.wait_http("api-new-prices", f"http://127.0.0.1:{port}/healthz")
    httpx.post(f"{stack.simulator_url('hk')}/_sim/config", json={"latency_ms": 1500})
    account = stack.new_account()
    try:

        async def both() -> tuple[object, object]:
            old = openai.AsyncOpenAI(base_url=stack.api_url, api_key=account.api_key, max_retries=0)
            new = openai.AsyncOpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key=account.api_key, max_retries=0
            )
            request = {
                "model": "deepseek-v4-flash",
                "max_tokens": 50,
                "messages": [{"role": "user", "content": "price check"}],
            }
            first = asyncio.create_task(old.chat.completions.with_raw_response.create(**request))
            await asyncio.sleep(0.3)
            second = await new.chat.completions.with_raw_response.create(**request)
            result = await first, second
            await old.close()
            await new.close()
            return result

        first, second = asyncio.run(both())
    finally:
        httpx.post(f"{stack.simulator_url('hk')}/_sim/config", json={"latency_ms": 0})
        stack.group.stop("api-new-prices")
    wait_for(lambda: settled(stack, account.id), what="settlement")
    with stack.sessions() as session:
        old_job = session.get(Job, first.headers["x-broker-job-id"])
        new_job = session.get(Job, second.headers["x-broker-job-id"])
    assert old_job.input_price_micro_usd == FLASH_IN
    assert new_job.input_price_micro_usd == 1_358_000
    usage = first.parse().usage
    exact = usage.prompt_tokens * FLASH_IN + usage.completion_tokens * FLASH_OUT
    assert old_job.cost_micro_usd == (exact + 999_999) // 1_000_000


def test_ledger_and_usage_reports(stack: Stack) -> None:
    account = stack.new_account()
    client = stack.client(account.api_key)
    for _ in range(3):
        client.chat.completions.create(
            model="deepseek-v4-flash",
            max_tokens=20,
            messages=[{"role": "user", "content": "report"}],
        )
    wait_for(lambda: settled(stack, account.id), what="settlement")
    headers = {"authorization": f"Bearer {account.api_key}"}

    first = httpx.get(f"{stack.api_url}/wallet/ledger?limit=4", headers=headers).json()
    rest = httpx.get(
        f"{stack.api_url}/wallet/ledger?after={first['last_id']}&limit=100", headers=headers
    ).json()
    kinds = [e["kind"] for e in first["data"] + rest["data"]]
    assert first["has_more"] is True
    assert rest["has_more"] is False
    # One top-up, then a hold, release and charge per job.
    assert sorted(kinds) == sorted(["topup"] + ["hold", "release", "charge"] * 3)

    usage = httpx.get(f"{stack.api_url}/usage", headers=headers).json()
    with stack.sessions() as session:
        charged = -session.scalar(
            select(func.sum(LedgerEntry.amount_micro_usd)).where(
                LedgerEntry.wallet_id == account.wallet_id, LedgerEntry.kind == "charge"
            )
        )
    assert usage["total"]["requests"] == 3
    assert usage["total"]["cost_micro_usd"] == charged
    assert usage["data"][0]["model"] == "deepseek-v4-flash"


def test_refund_and_reconcile(stack: Stack) -> None:
    account = stack.new_account()
    raw = stack.client(account.api_key).chat.completions.with_raw_response.create(
        model="deepseek-v4-flash", max_tokens=20, messages=[{"role": "user", "content": "x"}]
    )
    job_id = raw.headers["x-broker-job-id"]
    cost = int(raw.headers["x-broker-cost-micro-usd"])
    wait_for(lambda: settled(stack, account.id), what="settlement")
    refund = stack.admin("POST", f"/jobs/{job_id}/refund", json={})
    assert refund.json()["refunded_micro_usd"] == cost
    again = stack.admin("POST", f"/jobs/{job_id}/refund", json={})
    assert again.status_code == 400
    assert wallet(stack, account.wallet_id).balance_micro_usd == 5_000_000

    env = {
        "BROKER_DATABASE_URL": stack.settings.database_url,
        "BROKER_REDIS_URL": stack.settings.redis_url,
    }
    command = [sys.executable, "-m", "broker.cli", "billing", "reconcile"]
    assert (
        subprocess.run(
            command, env={**os.environ, **env}, capture_output=True, timeout=60
        ).returncode
        == 0
    )
    with stack.sessions.begin() as session:
        session.execute(
            update(Wallet)
            .where(Wallet.id == account.wallet_id)
            .values(balance_micro_usd=Wallet.balance_micro_usd + 1)
        )
    try:
        result = subprocess.run(
            command, env={**os.environ, **env}, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 1
        assert account.wallet_id in result.stderr
    finally:
        with stack.sessions.begin() as session:
            session.execute(
                update(Wallet)
                .where(Wallet.id == account.wallet_id)
                .values(balance_micro_usd=Wallet.balance_micro_usd - 1)
            )


@pytest.mark.parametrize("amount", ["9000000000000", "1e309", "inf", "99999999999999999999"])
def test_cli_rejects_huge_top_up(stack: Stack, amount: str) -> None:
    account = stack.new_account(0)
    env = {
        **os.environ,
        "BROKER_DATABASE_URL": stack.settings.database_url,
        "BROKER_REDIS_URL": stack.settings.redis_url,
    }
    result = subprocess.run(
        [sys.executable, "-m", "broker.cli", "wallet", "topup", account.id, "--", amount],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert wallet(stack, account.wallet_id).balance_micro_usd == 0
