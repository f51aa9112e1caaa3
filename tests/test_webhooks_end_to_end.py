"""Webhooks through the whole system: signed events, retries, rotation, redelivery.

The receiver is a real HTTP server in the test process that verifies every signature
with the ``standardwebhooks`` library. The system here retries within seconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from async_support import FAST_ASYNC_ENV, chat_line, jsonl, upload, wait_batch
from harness import RedisServer, Stack, running_stack
from standardwebhooks import Webhook
from support import wait_for

from broker.processes import free_port
from broker.webhook_receiver import WebhookReceiver

OPENING = 5_000_000


@pytest.fixture(scope="module")
def hook_stack(
    redis_server: RedisServer, postgres_admin: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """A system on PostgreSQL with a 1 s delivery timeout and retries after about 1 s."""
    redis_url = f"redis://127.0.0.1:{redis_server.port}/8"
    with running_stack(
        "postgresql", redis_url, tmp_path_factory.mktemp("webhooks"), env=FAST_ASYNC_ENV
    ) as running:
        yield running
        running.close_clients()


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    found = WebhookReceiver(port=free_port())
    yield found
    found.stop()


def api(stack: Stack, api_key: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(
        method,
        f"{stack.api_url}{path}",
        headers={"authorization": f"Bearer {api_key}"},
        timeout=30,
        **kwargs,
    )


def register(stack: Stack, api_key: str, url: str) -> dict[str, Any]:
    response = api(stack, api_key, "POST", "/webhook_endpoints", json={"url": url})
    assert response.status_code == 201, response.text
    return response.json()


def submit_job(stack: Stack, api_key: str, **envelope: Any) -> str:
    response = api(
        stack,
        api_key,
        "POST",
        "/jobs",
        json={"endpoint": "/v1/chat/completions", "body": chat_line("hook")["body"], **envelope},
    )
    assert response.status_code == 202, response.text
    return response.json()["id"]


def deliveries(stack: Stack, api_key: str, **params: str) -> list[dict[str, Any]]:
    return api(stack, api_key, "GET", "/webhook_deliveries", params=params).json()["data"]


def test_delivery_survives_down_then_slow_receiver(
    hook_stack: Stack, receiver: WebhookReceiver
) -> None:
    account = hook_stack.new_account(OPENING)
    endpoint = register(hook_stack, account.api_key, receiver.url)
    receiver.secret = endpoint["secret"]
    assert endpoint["secret"].startswith("whsec_")
    job_id = submit_job(hook_stack, account.api_key, metadata={"order": "7"})

    # Down: nothing listens, so attempts fail to connect.
    delivery = wait_for(
        lambda: next(
            (d for d in deliveries(hook_stack, account.api_key) if len(d["attempts"]) >= 2),
            None,
        ),
        what="two failed attempts",
    )
    assert all(a["status_code"] is None for a in delivery["attempts"])
    assert delivery["status"] == "pending"

    # Slow: the receiver responds after 3 s, past the 1 s delivery timeout.
    receiver.delay_s = 3.0
    receiver.start()
    wait_for(
        lambda: any(
            "timed out" in (a["error"] or "")
            for a in deliveries(hook_stack, account.api_key)[0]["attempts"]
        ),
        what="an attempt that timed out",
    )

    # Up: the next attempt is delivered.
    receiver.delay_s = 0.0
    done = wait_for(
        lambda: (d := deliveries(hook_stack, account.api_key)[0])["status"] == "delivered" and d,
        timeout_s=30,
        what="the delivery",
    )
    attempts = done["attempts"]
    assert [a["number"] for a in attempts] == list(range(1, len(attempts) + 1))
    assert done["attempt_count"] == len(attempts)
    assert attempts[-1]["status_code"] == 204
    assert attempts[-1]["error"] is None
    assert all(a["error"] for a in attempts[:-1])
    assert done["event_type"] == "job.succeeded"

    events = receiver.of_type("job.succeeded")
    assert events, receiver.dump()
    assert {event.webhook_id for event in events} == {done["id"]}
    data = events[-1].payload["data"]
    assert data["id"] == job_id
    assert data["status"] == "succeeded"
    assert data["metadata"] == {"order": "7"}
    job = api(hook_stack, account.api_key, "GET", f"/jobs/{job_id}").json()
    assert data["cost_micro_usd"] == job["cost_micro_usd"]
    assert "result" not in data
    assert receiver.rejected == 0


def test_rotated_secret_signs_with_both(hook_stack: Stack, receiver: WebhookReceiver) -> None:
    account = hook_stack.new_account(OPENING)
    endpoint = register(hook_stack, account.api_key, receiver.url)
    old_secret = endpoint["secret"]
    rotated = api(
        hook_stack, account.api_key, "POST", f"/webhook_endpoints/{endpoint['id']}/rotate_secret"
    ).json()
    assert rotated["secret"] != old_secret
    assert rotated["previous_secret_expires_at"] is not None
    receiver.start()

    receiver.secret = old_secret
    submit_job(hook_stack, account.api_key)
    wait_for(lambda: receiver.of_type("job.succeeded"), what="an event under the old secret")
    receiver.secret = rotated["secret"]
    submit_job(hook_stack, account.api_key)
    wait_for(
        lambda: len(receiver.of_type("job.succeeded")) == 2, what="an event under the new secret"
    )
    assert receiver.rejected == 0
    listed = api(hook_stack, account.api_key, "GET", "/webhook_endpoints").json()["data"]
    assert [e["id"] for e in listed] == [endpoint["id"]]
    assert "secret" not in listed[0]


def test_job_webhook_url_and_redelivery(hook_stack: Stack, receiver: WebhookReceiver) -> None:
    account = hook_stack.new_account(OPENING)
    registered = WebhookReceiver(port=free_port())
    try:
        endpoint = register(hook_stack, account.api_key, registered.url)
        registered.secret = receiver.secret = endpoint["secret"]
        registered.start()
        receiver.start()
        job_id = submit_job(hook_stack, account.api_key, webhook_url=receiver.url)
        wait_for(lambda: receiver.of_type("job.succeeded"), what="the job's own event")
        wait_for(lambda: registered.of_type("job.succeeded"), what="the endpoint's event")
    finally:
        registered.stop()
    assert receiver.of_type("job.succeeded")[0].payload["data"]["id"] == job_id

    direct = next(d for d in deliveries(hook_stack, account.api_key) if d["url"] == receiver.url)
    assert direct["endpoint_id"] is None
    again = api(
        hook_stack, account.api_key, "POST", f"/webhook_deliveries/{direct['id']}/redeliver"
    )
    assert again.status_code == 202
    wait_for(lambda: len(receiver.of_type("job.succeeded")) == 2, what="the redelivery")
    assert {e.webhook_id for e in receiver.of_type("job.succeeded")} == {direct["id"]}
    attempts = api(hook_stack, account.api_key, "GET", f"/webhook_deliveries/{direct['id']}")
    assert [a["number"] for a in attempts.json()["attempts"]] == [1, 2]


def test_webhook_url_needs_an_endpoint(hook_stack: Stack) -> None:
    account = hook_stack.new_account(OPENING)
    response = api(
        hook_stack,
        account.api_key,
        "POST",
        "/jobs",
        json={
            "endpoint": "/v1/chat/completions",
            "body": chat_line("x")["body"],
            "webhook_url": "http://127.0.0.1:9/hooks",
        },
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "webhook_url"


def test_batch_completed_event(hook_stack: Stack, receiver: WebhookReceiver) -> None:
    account = hook_stack.new_account(OPENING)
    client = hook_stack.client(account.api_key)
    endpoint = register(hook_stack, account.api_key, receiver.url)
    receiver.secret = endpoint["secret"]
    receiver.start()
    batch = client.batches.create(
        input_file_id=upload(client, jsonl([chat_line(f"e-{n}") for n in range(3)])),
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"webhook_url": receiver.url},
    )
    wait_batch(client, batch.id, ("completed", "failed"))
    event = wait_for(lambda: receiver.of_type("batch.completed"), what="batch.completed")[0]
    data = event.payload["data"]
    assert data["id"] == batch.id
    assert data["status"] == "completed"
    assert data["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    assert event.payload["timestamp"].endswith("Z")
    # The batch's own URL is the endpoint's URL, so the event is sent once.
    assert len(receiver.of_type("batch.completed")) == 1
    # Batch jobs send no job events.
    assert receiver.of_type("job.succeeded") == []


def test_signature_verifies_with_library() -> None:
    from datetime import UTC, datetime

    from broker.webhooks import encode_payload, generate_secret, sign_headers

    secret = generate_secret()
    body = encode_payload({"type": "job.succeeded", "timestamp": "t", "data": {"id": "job_1"}})
    headers = sign_headers("msg_1", body, [generate_secret(), secret], datetime.now(UTC))
    assert len(headers["webhook-signature"].split(" ")) == 2
    assert Webhook(secret).verify(body, headers)["data"]["id"] == "job_1"
