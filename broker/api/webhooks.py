"""Webhook endpoints and deliveries of the calling account.

``POST /v1/webhook_endpoints`` returns the endpoint's signing secret once. Rotating it
keeps the old secret signing next to the new one for 24 hours, so receivers can switch
without missing an event. Deliveries list every attempt. A manual redelivery makes one
attempt at once, and automatic retries follow only within the retry window that began
with the event.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Query, Request
from sqlalchemy import insert, select, update

from broker.api.pages import page_body, paginate
from broker.api.services import Caller, services
from broker.chat_request import parse_json_body
from broker.errors import InvalidRequest, NotFound
from broker.ids import new_id
from broker.jsonresponse import ORJSONResponse
from broker.tables import (
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    as_utc,
    utcnow,
)
from broker.url_safety import UnsafeUrl, check_url
from broker.webhooks import (
    ROTATION_GRACE_S,
    claim_until,
    generate_secret,
    publish_deliveries,
)

router = APIRouter()

MAX_PAGE = 100
# Maximum number of endpoints one account may register.
MAX_ENDPOINTS = 20


def _time(moment: Any) -> int | None:
    return int(as_utc(moment).timestamp()) if moment is not None else None


def endpoint_object(row: WebhookEndpoint, secret: str | None = None) -> dict[str, Any]:
    """Render an endpoint; the secret appears only when it was just created or rotated."""
    body = {
        "id": row.id,
        "object": "webhook_endpoint",
        "url": row.url,
        "created_at": _time(row.created_at),
        "previous_secret_expires_at": _time(row.previous_secret_expires_at),
    }
    if secret is not None:
        body["secret"] = secret
    return body


def attempt_object(row: WebhookAttempt) -> dict[str, Any]:
    return {
        "number": row.number,
        "status_code": row.status_code,
        "error": row.error,
        "latency_ms": row.latency_ms,
        "created_at": _time(row.created_at),
    }


def delivery_object(row: WebhookDelivery, attempts: list[WebhookAttempt]) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "webhook_delivery",
        "endpoint_id": row.endpoint_id,
        "url": row.url,
        "event_type": row.event_type,
        "status": row.status,
        "attempt_count": row.attempts,
        "next_attempt_at": _time(row.next_attempt_at) if row.status == "pending" else None,
        "created_at": _time(row.created_at),
        "delivered_at": _time(row.delivered_at),
        "payload": row.payload,
        "attempts": [attempt_object(attempt) for attempt in attempts],
    }


async def checked_webhook_url(request: Request, url: Any, param: str) -> str:
    """Return ``url`` if it may receive webhooks, or raise a 400 naming ``param``.

    The DNS lookup runs in a worker thread, so it does not block the event loop.
    """
    if not isinstance(url, str):
        raise InvalidRequest(f"'{param}' must be a string URL.", param=param)
    allow_private = services(request).settings.webhook_allow_private
    try:
        await asyncio.to_thread(check_url, url, allow_private=allow_private)
    except UnsafeUrl as exc:
        raise InvalidRequest(str(exc), param=param, code="invalid_url") from exc
    return url


async def require_signing_endpoint(request: Request, caller: Caller, param: str) -> None:
    """Reject a per-job or per-batch webhook URL when nothing could sign its events.

    Those events are signed with the secrets of the account's webhook endpoints.
    """
    async with services(request).sessions() as session:
        found = await session.scalar(
            select(WebhookEndpoint.id)
            .where(
                WebhookEndpoint.account_id == caller.account_id,
                WebhookEndpoint.disabled_at.is_(None),
            )
            .limit(1)
        )
    if found is None:
        raise InvalidRequest(
            "Events sent to a webhook_url are signed with your webhook endpoints' secrets, "
            "and this account has none. Register one with POST /v1/webhook_endpoints first.",
            param=param,
        )


async def _owned_endpoint(request: Request, caller: Caller, endpoint_id: str) -> WebhookEndpoint:
    async with services(request).sessions() as session:
        row = await session.get(WebhookEndpoint, endpoint_id)
    if row is None or row.account_id != caller.account_id or row.disabled_at is not None:
        raise NotFound(f"No such webhook endpoint: {endpoint_id}", param="endpoint_id")
    return row


@router.post("/v1/webhook_endpoints")
async def create_endpoint(request: Request, caller: Caller) -> ORJSONResponse:
    body = parse_json_body(await request.body())
    url = await checked_webhook_url(request, body.get("url"), "url")
    async with services(request).sessions.begin() as session:
        existing = await session.scalars(
            select(WebhookEndpoint.id).where(
                WebhookEndpoint.account_id == caller.account_id,
                WebhookEndpoint.disabled_at.is_(None),
            )
        )
        if len(existing.all()) >= MAX_ENDPOINTS:
            raise InvalidRequest(
                f"This account already has {MAX_ENDPOINTS} webhook endpoints, the most "
                "allowed. Delete one first."
            )
        values = {
            "id": new_id("we"),
            "account_id": caller.account_id,
            "url": url,
            "secret": generate_secret(),
            "created_at": utcnow(),
        }
        await session.execute(insert(WebhookEndpoint).values(**values))
    row = WebhookEndpoint(**values)
    return ORJSONResponse(endpoint_object(row, secret=row.secret), status_code=201)


@router.get("/v1/webhook_endpoints")
async def list_endpoints(request: Request, caller: Caller) -> ORJSONResponse:
    async with services(request).sessions() as session:
        rows = (
            await session.scalars(
                select(WebhookEndpoint)
                .where(
                    WebhookEndpoint.account_id == caller.account_id,
                    WebhookEndpoint.disabled_at.is_(None),
                )
                .order_by(WebhookEndpoint.id)
            )
        ).all()
    return ORJSONResponse(page_body(rows, MAX_ENDPOINTS, endpoint_object))


@router.delete("/v1/webhook_endpoints/{endpoint_id}")
async def delete_endpoint(request: Request, caller: Caller, endpoint_id: str) -> ORJSONResponse:
    """Disable an endpoint: it gets no new events, and its pending deliveries give up."""
    await _owned_endpoint(request, caller, endpoint_id)
    async with services(request).sessions.begin() as session:
        await session.execute(
            update(WebhookEndpoint)
            .where(WebhookEndpoint.id == endpoint_id)
            .values(disabled_at=utcnow())
        )
    return ORJSONResponse({"id": endpoint_id, "object": "webhook_endpoint", "deleted": True})


@router.post("/v1/webhook_endpoints/{endpoint_id}/rotate_secret")
async def rotate_secret(request: Request, caller: Caller, endpoint_id: str) -> ORJSONResponse:
    """Replace the signing secret; the old one keeps signing for 24 hours."""
    row = await _owned_endpoint(request, caller, endpoint_id)
    now = utcnow()
    secret = generate_secret()
    expires = now + timedelta(seconds=ROTATION_GRACE_S)
    async with services(request).sessions.begin() as session:
        await session.execute(
            update(WebhookEndpoint)
            .where(WebhookEndpoint.id == endpoint_id)
            .values(secret=secret, previous_secret=row.secret, previous_secret_expires_at=expires)
        )
    row.secret, row.previous_secret_expires_at = secret, expires
    return ORJSONResponse(endpoint_object(row, secret=secret))


async def _attempts_of(request: Request, delivery_ids: list[str]) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = {delivery_id: [] for delivery_id in delivery_ids}
    if not delivery_ids:
        return found
    async with services(request).sessions() as session:
        rows = await session.scalars(
            select(WebhookAttempt)
            .where(WebhookAttempt.delivery_id.in_(delivery_ids))
            .order_by(WebhookAttempt.delivery_id, WebhookAttempt.number)
        )
        for attempt in rows:
            found[attempt.delivery_id].append(attempt)
    return found


@router.get("/v1/webhook_deliveries")
async def list_deliveries(
    request: Request,
    caller: Caller,
    endpoint_id: str | None = Query(None),
    status: str | None = Query(None),
    after: str | None = Query(None),
    limit: int = Query(20, ge=1, le=MAX_PAGE),
) -> ORJSONResponse:
    """List the account's deliveries, newest first, each with its attempts."""
    query = select(WebhookDelivery).where(WebhookDelivery.account_id == caller.account_id)
    if endpoint_id:
        query = query.where(WebhookDelivery.endpoint_id == endpoint_id)
    if status:
        query = query.where(WebhookDelivery.status == status)
    async with services(request).sessions() as session:
        rows = (await session.scalars(paginate(query, WebhookDelivery.id, after, limit))).all()
    attempts = await _attempts_of(request, [row.id for row in rows[:limit]])
    body = page_body(rows, limit, lambda row: delivery_object(row, attempts[row.id]))
    return ORJSONResponse(body)


async def _owned_delivery(request: Request, caller: Caller, delivery_id: str) -> WebhookDelivery:
    async with services(request).sessions() as session:
        row = await session.get(WebhookDelivery, delivery_id)
    if row is None or row.account_id != caller.account_id:
        raise NotFound(f"No such webhook delivery: {delivery_id}", param="delivery_id")
    return row


@router.get("/v1/webhook_deliveries/{delivery_id}")
async def retrieve_delivery(request: Request, caller: Caller, delivery_id: str) -> ORJSONResponse:
    row = await _owned_delivery(request, caller, delivery_id)
    attempts = await _attempts_of(request, [row.id])
    return ORJSONResponse(delivery_object(row, attempts[row.id]))


@router.post("/v1/webhook_deliveries/{delivery_id}/redeliver")
async def redeliver(request: Request, caller: Caller, delivery_id: str) -> ORJSONResponse:
    """Send a delivery again now, with the same webhook-id, whatever its status."""
    row = await _owned_delivery(request, caller, delivery_id)
    state = services(request)
    now = utcnow()
    async with state.sessions.begin() as session:
        await session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id)
            .values(
                status="pending",
                delivered_at=None,
                next_attempt_at=claim_until(now, state.settings.webhook_timeout_s),
            )
        )
    publish_deliveries(state.celery, [delivery_id])
    row.status, row.delivered_at, row.next_attempt_at = "pending", None, now
    attempts = await _attempts_of(request, [row.id])
    return ORJSONResponse(delivery_object(row, attempts[row.id]), status_code=202)
