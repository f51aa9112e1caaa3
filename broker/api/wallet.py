"""``GET /v1/wallet``: the caller's balance and held amount."""

from __future__ import annotations

from fastapi import APIRouter, Request

from broker.api.services import Caller, services
from broker.jsonresponse import ORJSONResponse
from broker.tables import Wallet

router = APIRouter()


@router.get("/v1/wallet")
async def get_wallet(request: Request, caller: Caller) -> ORJSONResponse:
    async with services(request).sessions() as session:
        wallet = await session.get(Wallet, caller.wallet_id)
    assert wallet is not None
    return ORJSONResponse(
        {
            "object": "wallet",
            "id": wallet.id,
            "currency": "usd",
            "balance_micro_usd": wallet.balance_micro_usd,
            "held_micro_usd": wallet.held_micro_usd,
            "available_micro_usd": wallet.balance_micro_usd - wallet.held_micro_usd,
        }
    )
