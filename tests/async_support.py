"""Helpers for the tests of jobs, files, batches and webhooks."""

from __future__ import annotations

import json
import time
from typing import Any

import openai
from harness import Stack
from sqlalchemy import select

from broker.ledger import check_wallet
from broker.tables import Job, Wallet

# Settings of the systems that the cancel and webhook tests start: two jobs of a batch
# in flight at a time, and webhook retries within seconds.
FAST_ASYNC_ENV = {
    "BROKER_BATCH_MAX_IN_FLIGHT": "2",
    "BROKER_WEBHOOK_TIMEOUT_S": "1",
    "BROKER_WEBHOOK_RETRY_BASE_S": "0.5",
    "BROKER_WEBHOOK_RETRY_MAX_DELAY_S": "1",
    "BROKER_ASYNC_PASS_INTERVAL_S": "0.2",
}
# Catalog prices in micro-dollars per million tokens, and the 50 % batch discount.
CATALOG_PRICES = {
    "deepseek-v4-flash": (135_800, 271_600),
    "qwen3-max": (1_140_000, 5_700_000),
}
BATCH_DISCOUNT_PPM = 500_000


def discounted(price: int) -> int:
    """Return a batch price: the catalog price less the discount, rounded up."""
    return -(-price * (1_000_000 - BATCH_DISCOUNT_PPM) // 1_000_000)


def batch_cost(model: str, prompt_tokens: int, completion_tokens: int) -> int:
    """Return what a batch request costs, computed here from the literal prices."""
    input_price, output_price = (discounted(price) for price in CATALOG_PRICES[model])
    exact = prompt_tokens * input_price + completion_tokens * output_price
    return -(-exact // 1_000_000)


def chat_line(
    custom_id: str, model: str = "deepseek-v4-flash", max_tokens: int = 40, **overrides: Any
) -> dict[str, Any]:
    line = {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": model,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": f"Say something about {custom_id}."}],
        },
    }
    line.update(overrides)
    return line


def jsonl(lines: list[Any]) -> bytes:
    """Encode lines as JSONL; a str line is written as is (for invalid lines)."""
    return b"".join(
        (line if isinstance(line, str) else json.dumps(line)).encode() + b"\n" for line in lines
    )


def upload(client: openai.OpenAI, content: bytes, name: str = "batch.jsonl") -> str:
    return client.files.create(file=(name, content), purpose="batch").id


def wait_batch(
    client: openai.OpenAI, batch_id: str, statuses: tuple[str, ...], timeout_s: float = 120
) -> Any:
    """Poll a batch until its status is one of ``statuses``."""
    deadline = time.monotonic() + timeout_s
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        if time.monotonic() > deadline:
            raise AssertionError(
                f"batch {batch_id} is {batch.status} after {timeout_s:g} s, "
                f"counts {batch.request_counts}"
            )
        time.sleep(0.2)


def read_jsonl(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    content = client.files.content(file_id).read()
    return [json.loads(line) for line in content.splitlines() if line.strip()]


def batch_jobs(stack: Stack, batch_id: str) -> list[Job]:
    with stack.sessions() as session:
        return list(session.scalars(select(Job).where(Job.batch_id == batch_id)))


def wallet(stack: Stack, wallet_id: str) -> Wallet:
    with stack.sessions() as session:
        found = session.get(Wallet, wallet_id)
        assert found is not None
        return found


def ledger_ok(stack: Stack, wallet_id: str) -> bool:
    with stack.sessions() as session:
        return check_wallet(session, wallet_id).ok
