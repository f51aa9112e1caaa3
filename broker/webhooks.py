"""Webhook events: payloads, Standard Webhooks signatures, delivery rows and retry timing.

An event becomes one ``webhook_deliveries`` row per receiving URL: each active endpoint
of the account, plus the job's or batch's own ``webhook_url``. Rows are written in the
transaction that changes the job or batch, so an event exists exactly when its change
does. The ``webhooks`` worker posts them (``workers.webhooks``), and a periodic pass
publishes the retries that are due.

Signatures follow Standard Webhooks (https://www.standardwebhooks.com): headers
``webhook-id`` (the delivery id, the same on every retry), ``webhook-timestamp`` (Unix
seconds) and ``webhook-signature`` ("v1,<base64 HMAC-SHA256>", several separated by
spaces while a rotated secret is still valid).
"""

from __future__ import annotations

import base64
import random
import secrets as secret_tokens
from datetime import datetime, timedelta
from typing import Any

import orjson
from celery import Celery
from sqlalchemy import insert, select
from sqlalchemy.orm import Session
from standardwebhooks import Webhook

from broker.ids import new_id
from broker.tables import Job, WebhookDelivery, WebhookEndpoint, as_utc, utcnow

JOB_EVENTS = {
    "succeeded": "job.succeeded",
    "failed": "job.failed",
    "cancelled": "job.cancelled",
    # An expired job never ran, so receivers see it as failed.
    "expired": "job.failed",
}
BATCH_EVENTS = {
    "completed": "batch.completed",
    "failed": "batch.failed",
    "cancelled": "batch.cancelled",
    "expired": "batch.expired",
}
SECRET_PREFIX = "whsec_"
# Random bytes in a signing secret.
SECRET_BYTES = 32
# Seconds a rotated-out secret keeps signing next to the new one.
ROTATION_GRACE_S = 24 * 3600
# Seconds a published delivery is left to its task before a periodic pass publishes it
# again (its worker died or its message was lost), on top of the delivery timeout.
CLAIM_MARGIN_S = 30
DELIVER_WEBHOOK_TASK = "broker.webhook.deliver"


def generate_secret() -> str:
    """Return a new signing secret, ``whsec_`` followed by base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secret_tokens.token_bytes(SECRET_BYTES)).decode()


def isoformat(moment: datetime) -> str:
    """Return an RFC 3339 UTC timestamp such as ``2026-01-02T03:04:05.123456Z``."""
    return as_utc(moment).isoformat().replace("+00:00", "Z")


def build_event(event_type: str, data: dict[str, Any], now: datetime) -> dict[str, Any]:
    """Return the JSON body of an event."""
    return {"type": event_type, "timestamp": isoformat(now), "data": data}


def encode_payload(payload: dict[str, Any]) -> bytes:
    """Serialise an event body; the signature covers exactly these bytes."""
    return orjson.dumps(payload)


def sign_headers(
    delivery_id: str, body: bytes, signing_secrets: list[str], now: datetime
) -> dict[str, str]:
    """Return the Standard Webhooks headers of one attempt, signed with every secret."""
    signatures = [Webhook(secret).sign(delivery_id, now, body) for secret in signing_secrets]
    return {
        "webhook-id": delivery_id,
        "webhook-timestamp": str(int(as_utc(now).timestamp())),
        "webhook-signature": " ".join(signatures),
        "content-type": "application/json",
    }


def retry_delay_s(attempt: int, base_s: float, max_delay_s: float) -> float:
    """Return the wait after failed attempt number ``attempt`` (1-based).

    The delay doubles per attempt up to ``max_delay_s``. Half of it is random ("equal
    jitter"), so a receiver that comes back is not hit by every retry at once.
    """
    delay = min(max_delay_s, base_s * 2 ** min(attempt - 1, 32))
    return delay / 2 + random.uniform(0, delay / 2)


def claim_until(now: datetime, timeout_s: float) -> datetime:
    """Return when a published delivery counts as lost if it has not been attempted."""
    return now + timedelta(seconds=timeout_s + CLAIM_MARGIN_S)


def active_secrets(endpoint: WebhookEndpoint, now: datetime) -> list[str]:
    """Return the secrets that sign for ``endpoint``: the current one, then a rotated-out
    one while its grace period lasts."""
    found = [endpoint.secret]
    expires = endpoint.previous_secret_expires_at
    if endpoint.previous_secret and expires is not None and as_utc(expires) > now:
        found.append(endpoint.previous_secret)
    return found


def signing_secrets(session: Session, delivery: WebhookDelivery, now: datetime) -> list[str]:
    """Return the secrets that sign a delivery, or none when nothing may sign it.

    A delivery to an endpoint is signed with that endpoint's secrets. One to a job's or
    batch's own ``webhook_url`` is signed with the secrets of every active endpoint of
    the account, so the receiver can verify it with any of them.
    """
    query = select(WebhookEndpoint).where(
        WebhookEndpoint.account_id == delivery.account_id, WebhookEndpoint.disabled_at.is_(None)
    )
    if delivery.endpoint_id is not None:
        query = query.where(WebhookEndpoint.id == delivery.endpoint_id)
    found: list[str] = []
    for endpoint in session.scalars(query.order_by(WebhookEndpoint.id)):
        found.extend(active_secrets(endpoint, now))
    return found


def enqueue_event(
    session: Session,
    account_id: str,
    event_type: str,
    data: dict[str, Any],
    direct_url: str | None,
    timeout_s: float,
) -> list[str]:
    """Insert one delivery per receiving URL of an event and return their ids.

    Publish them with ``publish_deliveries`` after the transaction commits.
    """
    now = utcnow()
    endpoints = session.execute(
        select(WebhookEndpoint.id, WebhookEndpoint.url).where(
            WebhookEndpoint.account_id == account_id, WebhookEndpoint.disabled_at.is_(None)
        )
    ).all()
    targets: list[tuple[str | None, str]] = [(row.id, row.url) for row in endpoints]
    if direct_url and direct_url not in {url for _, url in targets}:
        targets.append((None, direct_url))
    if not targets:
        return []
    payload = build_event(event_type, data, now)
    rows = [
        {
            "id": new_id("msg"),
            "account_id": account_id,
            "endpoint_id": endpoint_id,
            "url": url,
            "event_type": event_type,
            "payload": payload,
            "status": "pending",
            "attempts": 0,
            "next_attempt_at": claim_until(now, timeout_s),
            "created_at": now,
        }
        for endpoint_id, url in targets
    ]
    session.execute(insert(WebhookDelivery), rows)
    return [row["id"] for row in rows]


def publish_deliveries(celery: Celery, delivery_ids: list[str]) -> None:
    """Publish the delivery task of each id on the ``webhooks`` queue."""
    from workers.app import WEBHOOKS_QUEUE

    for delivery_id in delivery_ids:
        celery.send_task(
            DELIVER_WEBHOOK_TASK,
            args=[delivery_id],
            queue=WEBHOOKS_QUEUE,
            argsrepr=f"({delivery_id!r})",
        )


def job_event_data(job: Job) -> dict[str, Any]:
    """Return the ``data`` of a job event: its state and cost, without the result.

    Receivers fetch the result with ``GET /v1/jobs/{id}``, so events stay small and
    carry no completion text.
    """
    return {
        "id": job.id,
        "object": "job",
        "status": job.status,
        "endpoint": job.endpoint,
        "model": job.model,
        "metadata": job.job_metadata,
        "cost_micro_usd": job.cost_micro_usd,
        "error": public_error(job.error),
        "created_at": int(as_utc(job.created_at).timestamp()),
        "finished_at": int(as_utc(job.finished_at).timestamp()) if job.finished_at else None,
    }


def public_error(error: dict[str, Any] | None) -> dict[str, Any] | None:
    """Return a stored job error as clients see it: code, message, type and param."""
    if not error:
        return None
    return {
        "code": error.get("code"),
        "message": error.get("message"),
        "type": error.get("type"),
        "param": error.get("param"),
    }
