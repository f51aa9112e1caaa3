"""Wallet top-ups paid through Stripe Checkout, credited from its webhook exactly once.

Stripe signs each event; the official library checks the signature and its age. The
ledger entry's idempotency key is the event id, so however often Stripe delivers the
event (it retries until it gets a 2xx), the wallet is credited once.
"""

from __future__ import annotations

import logging
from typing import Any

import stripe
from fastapi import APIRouter, Request
from sqlalchemy.orm import Session

from broker.api.services import services
from broker.errors import InvalidRequest, NotFound
from broker.jsonresponse import ORJSONResponse
from broker.ledger import LedgerError, credit
from broker.tables import Account

logger = logging.getLogger(__name__)

router = APIRouter()

# Micro-dollars in one cent: Stripe amounts are integers in the currency's minor unit.
MICRO_USD_PER_CENT = 10_000


def _account_id(session: Any) -> str | None:
    metadata = session.get("metadata") or {}
    return session.get("client_reference_id") or metadata.get("account_id")


@router.post("/v1/payments/stripe/webhook")
async def stripe_webhook(request: Request) -> ORJSONResponse:
    secret = services(request).settings.stripe_webhook_secret
    if secret is None:
        raise NotFound("Stripe payments are not configured (BROKER_STRIPE_WEBHOOK_SECRET).")
    payload = await request.body()
    try:
        event = stripe.Webhook.construct_event(
            payload, request.headers.get("stripe-signature", ""), secret.get_secret_value()
        )
    except (ValueError, stripe.SignatureVerificationError) as exc:
        raise InvalidRequest(
            "The Stripe event's signature is missing or invalid.",
            param="stripe-signature",
            code="invalid_signature",
        ) from exc

    # Stripe's objects are not dicts; the plain form reads the same for every version.
    event = event.to_dict()
    if event["type"] != "checkout.session.completed":
        return ORJSONResponse({"received": True, "applied": False})
    checkout = event["data"]["object"]
    if checkout.get("payment_status") not in (None, "paid"):
        return ORJSONResponse({"received": True, "applied": False})
    account_id = _account_id(checkout)
    currency = (checkout.get("currency") or "").lower()
    amount_cents = checkout.get("amount_total")
    if not account_id or currency != "usd" or not isinstance(amount_cents, int):
        raise InvalidRequest(
            "The checkout session must carry client_reference_id (the "
            "account id) and a USD amount_total.",
            param="data.object",
        )

    def apply(session: Session) -> bool:
        if session.get(Account, account_id) is None:
            raise NotFound(f"Account {account_id} not found.", param="client_reference_id")
        try:
            return credit(
                session,
                account_id,
                amount_cents * MICRO_USD_PER_CENT,
                kind="topup",
                idempotency_key=f"stripe:{event['id']}",
                note=f"Stripe checkout {checkout.get('id')}",
            )
        except LedgerError as exc:
            raise InvalidRequest(str(exc), param="amount_total") from exc

    async with services(request).sessions.begin() as session:
        applied = await session.run_sync(apply)
    logger.info(
        "Stripe event %s for account %s: %s",
        event["id"],
        account_id,
        "credited" if applied else "already credited",
    )
    return ORJSONResponse({"received": True, "applied": applied})
