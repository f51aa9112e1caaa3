"""Webhook delivery: one signed POST per task, each attempt logged, retries scheduled.

A failed attempt stores ``next_attempt_at`` on the delivery. It neither sleeps nor
uses a Celery countdown, which Redis would keep as an unacknowledged message for hours.
The periodic pass runs ``publish_due_deliveries``, which publishes the task again once
that time has come.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from functools import lru_cache
from urllib.parse import urlsplit, urlunsplit

import httpx
from sqlalchemy import insert, select, update

from broker.settings import Settings
from broker.tables import WebhookAttempt, WebhookDelivery, as_utc, utcnow
from broker.url_safety import CheckedUrl, UnsafeUrl, check_url
from broker.webhooks import (
    DELIVER_WEBHOOK_TASK,
    claim_until,
    encode_payload,
    publish_deliveries,
    retry_delay_s,
    sign_headers,
    signing_secrets,
)
from workers.app import celery_app
from workers.context import WorkerContext, get_context

logger = logging.getLogger(__name__)

# Deliveries published per periodic pass, so one pass stays short.
DUE_BATCH = 200
# Characters of an error message kept on an attempt row.
MAX_ERROR_CHARS = 500


@lru_cache(maxsize=1)
def _client(timeout_s: float) -> httpx.Client:
    # No redirects: a receiver could redirect to an internal address after the check.
    return httpx.Client(timeout=httpx.Timeout(timeout_s), follow_redirects=False)


def _pinned_request(checked: CheckedUrl) -> tuple[str, dict[str, str], dict[str, str]]:
    """Return a URL that connects to the checked address, with the Host header and TLS
    server name of the original host, so DNS cannot change between check and connect."""
    parts = urlsplit(checked.url)
    address = checked.addresses[0]
    literal = f"[{address}]" if address.version == 6 else str(address)
    pinned = urlunsplit(
        (parts.scheme, f"{literal}:{checked.port}", parts.path or "/", parts.query, "")
    )
    default_port = 443 if checked.scheme == "https" else 80
    host = checked.host if checked.port == default_port else f"{checked.host}:{checked.port}"
    extensions = {"sni_hostname": checked.host} if checked.scheme == "https" else {}
    return pinned, {"host": host}, extensions


def post_event(
    settings: Settings, url: str, headers: dict[str, str], body: bytes
) -> tuple[int | None, str | None]:
    """POST one attempt; returns the status code (None if no response) and an error."""
    try:
        checked = check_url(url, allow_private=settings.webhook_allow_private)
    except UnsafeUrl as exc:
        return None, f"rejected: {exc}"
    pinned, host_header, extensions = _pinned_request(checked)
    try:
        # The response body is never read: a receiver cannot make the worker buffer it.
        with _client(settings.webhook_timeout_s).stream(
            "POST",
            pinned,
            content=body,
            headers={**headers, **host_header},
            extensions=extensions,
        ) as response:
            status = response.status_code
    except httpx.TimeoutException as exc:
        return None, f"timed out after {settings.webhook_timeout_s:g} s ({type(exc).__name__})"
    except httpx.HTTPError as exc:
        return None, f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
    if 200 <= status < 300:
        return status, None
    return status, f"the receiver answered HTTP {status}"


def _claim(ctx: WorkerContext, delivery: WebhookDelivery) -> bool:
    """Take the delivery's next attempt; False if another task took it first."""
    with ctx.sessions.begin() as session:
        return bool(
            session.execute(
                update(WebhookDelivery)
                .where(
                    WebhookDelivery.id == delivery.id,
                    WebhookDelivery.status == "pending",
                    WebhookDelivery.attempts == delivery.attempts,
                )
                .values(
                    attempts=delivery.attempts + 1,
                    next_attempt_at=claim_until(utcnow(), ctx.settings.webhook_timeout_s),
                )
            ).rowcount
        )


def attempt_delivery(ctx: WorkerContext, delivery_id: str) -> str | None:
    """Make one attempt of a pending delivery and record it; returns its new status."""
    settings = ctx.settings
    now = utcnow()
    with ctx.sessions() as session:
        delivery = session.get(WebhookDelivery, delivery_id)
        if delivery is None or delivery.status != "pending":
            return None
        secrets = signing_secrets(session, delivery, now)
    if not _claim(ctx, delivery):
        return None
    number = delivery.attempts + 1
    started = time.monotonic()
    if secrets:
        body = encode_payload(delivery.payload)
        headers = sign_headers(delivery.id, body, secrets, now)
        status_code, error = post_event(settings, delivery.url, headers, body)
    else:
        status_code, error = None, "no signing secret: the account has no active webhook endpoint"
    latency_ms = int((time.monotonic() - started) * 1000)

    finished = utcnow()
    values: dict[str, object] = {}
    if error is None:
        values = {"status": "delivered", "delivered_at": finished, "next_attempt_at": None}
    else:
        delay = retry_delay_s(
            number, settings.webhook_retry_base_s, settings.webhook_retry_max_delay_s
        )
        next_at = finished + timedelta(seconds=delay)
        window_end = as_utc(delivery.created_at) + timedelta(
            seconds=settings.webhook_retry_window_s
        )
        if not secrets or next_at > window_end:
            values = {"status": "failed", "next_attempt_at": None}
        else:
            values = {"next_attempt_at": next_at}
    with ctx.sessions.begin() as session:
        session.execute(
            insert(WebhookAttempt).values(
                delivery_id=delivery.id,
                number=number,
                status_code=status_code,
                error=error[:MAX_ERROR_CHARS] if error else None,
                latency_ms=latency_ms,
                created_at=finished,
            )
        )
        session.execute(
            update(WebhookDelivery).where(WebhookDelivery.id == delivery.id).values(**values)
        )
    status = str(values.get("status", "pending"))
    if error is None:
        logger.info(
            "webhook %s (%s) delivered on attempt %d", delivery.id, delivery.event_type, number
        )
    else:
        logger.warning(
            "webhook %s (%s) attempt %d failed: %s; %s",
            delivery.id,
            delivery.event_type,
            number,
            error,
            "giving up" if status == "failed" else f"next attempt at {values['next_attempt_at']}",
        )
    return status


@celery_app.task(name=DELIVER_WEBHOOK_TASK)
def deliver_webhook(delivery_id: str) -> None:
    """Make the next attempt of one webhook delivery (a repeated message does nothing)."""
    attempt_delivery(get_context(), delivery_id)


def publish_due_deliveries(ctx: WorkerContext) -> int:
    """Publish the pending deliveries whose next attempt is due; returns how many.

    Each is first given a new claim time, so the next pass does not publish it again
    while its task waits in the queue.
    """
    now = utcnow()
    with ctx.sessions.begin() as session:
        due = session.scalars(
            select(WebhookDelivery.id)
            .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now)
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(DUE_BATCH)
        ).all()
        if due:
            session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id.in_(due))
                .values(next_attempt_at=claim_until(now, ctx.settings.webhook_timeout_s))
            )
    publish_deliveries(celery_app, list(due))
    return len(due)
