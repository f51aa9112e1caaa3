"""The operator's API under ``/admin``: accounts, keys, top-ups, adjustments, refunds.

Every route needs ``Authorization: Bearer <BROKER_ADMIN_TOKEN>``; without a configured
token the admin API returns 404, as if it did not exist.
"""

from __future__ import annotations

import hmac
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from broker.accounts import (
    KEY_CHANGES_CHANNEL,
    KeyNotFound,
    create_account,
    create_api_key,
    describe_key,
    get_key,
    list_keys,
    revoke_key,
    rotate_key,
    update_key,
)
from broker.api.services import services
from broker.errors import AuthenticationFailed, InvalidRequest, NotFound
from broker.jsonresponse import ORJSONResponse
from broker.ledger import LedgerError, check_wallet, credit, refund_job
from broker.tables import Account, Wallet

router = APIRouter(prefix="/admin")


async def require_admin(request: Request) -> None:
    token = services(request).settings.admin_token
    if token is None:
        raise NotFound("Not Found")
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), token.get_secret_value().encode()
    ):
        raise AuthenticationFailed(
            "The admin API needs 'Authorization: Bearer <admin token>'.", code="invalid_admin_token"
        )


Admin = Annotated[None, Depends(require_admin)]


class NewAccount(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    price_multiplier_ppm: int = Field(1_000_000, ge=0, le=10_000_000)


class KeyLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, max_length=200)
    monthly_limit_micro_usd: int | None = Field(None, ge=0)
    allowed_models: list[str] | None = None
    region_pin: str | None = None
    expires_at: datetime | None = None


class Credit(BaseModel):
    model_config = ConfigDict(extra="forbid")
    amount_micro_usd: int
    idempotency_key: str | None = Field(None, max_length=100)
    note: str = Field("", max_length=500)


class Refund(BaseModel):
    model_config = ConfigDict(extra="forbid")
    amount_micro_usd: int | None = Field(None, gt=0)
    note: str = Field("", max_length=500)


async def _in_session(request: Request, work: Any) -> Any:
    """Run ``work(session)`` (synchronous ORM code) in one transaction."""
    async with services(request).sessions.begin() as session:
        return await session.run_sync(work)


async def _announce(request: Request, key_hash: str) -> None:
    await services(request).replies.redis.publish(KEY_CHANGES_CHANNEL, key_hash)


def _account_body(session: Session, account: Account) -> dict[str, Any]:
    wallet = session.query(Wallet).filter_by(account_id=account.id).one()
    check = check_wallet(session, wallet.id)
    return {
        "id": account.id,
        "object": "account",
        "name": account.name,
        "price_multiplier_ppm": account.price_multiplier_ppm,
        "wallet": {
            "id": wallet.id,
            "balance_micro_usd": wallet.balance_micro_usd,
            "held_micro_usd": wallet.held_micro_usd,
            "ledger_ok": check.ok,
        },
    }


def _account(session: Session, account_id: str) -> Account:
    account = session.get(Account, account_id)
    if account is None:
        raise NotFound(f"Account {account_id} not found.", param="account_id")
    return account


@router.post("/accounts", status_code=201)
async def post_account(request: Request, body: NewAccount, _: Admin) -> ORJSONResponse:
    def work(session: Session) -> dict[str, Any]:
        account, _wallet = create_account(session, body.name)
        account.price_multiplier_ppm = body.price_multiplier_ppm
        session.flush()
        return _account_body(session, account)

    return ORJSONResponse(await _in_session(request, work), status_code=201)


@router.get("/accounts/{account_id}")
async def get_account(request: Request, account_id: str, _: Admin) -> ORJSONResponse:
    return ORJSONResponse(
        await _in_session(request, lambda s: _account_body(s, _account(s, account_id)))
    )


@router.post("/accounts/{account_id}/keys", status_code=201)
async def post_key(request: Request, account_id: str, body: KeyLimits, _: Admin) -> ORJSONResponse:
    def work(session: Session) -> dict[str, Any]:
        _account(session, account_id)
        row, key = create_api_key(session, account_id, body.name or "")
        update_key(session, row.id, **body.model_dump(exclude_unset=True, exclude={"name"}))
        return {**describe_key(row), "key": key}

    return ORJSONResponse(await _in_session(request, work), status_code=201)


@router.get("/accounts/{account_id}/keys")
async def get_keys(request: Request, account_id: str, _: Admin) -> ORJSONResponse:
    def work(session: Session) -> dict[str, Any]:
        _account(session, account_id)
        return {"object": "list", "data": [describe_key(k) for k in list_keys(session, account_id)]}

    return ORJSONResponse(await _in_session(request, work))


async def _key_action(request: Request, key_id: str, action: Any) -> dict[str, Any]:
    def work(session: Session) -> tuple[dict[str, Any], str]:
        try:
            old_hash = get_key(session, key_id).key_hash
            return action(session), old_hash
        except KeyNotFound as exc:
            raise NotFound(str(exc), param="key_id") from exc
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from exc

    body, old_hash = await _in_session(request, work)
    await _announce(request, old_hash)
    return body


@router.post("/keys/{key_id}/revoke")
async def post_revoke(request: Request, key_id: str, _: Admin) -> ORJSONResponse:
    return ORJSONResponse(
        await _key_action(request, key_id, lambda s: describe_key(revoke_key(s, key_id)))
    )


@router.post("/keys/{key_id}/rotate")
async def post_rotate(request: Request, key_id: str, _: Admin) -> ORJSONResponse:
    def rotate(session: Session) -> dict[str, Any]:
        row, key = rotate_key(session, key_id)
        session.flush()
        return {**describe_key(row), "key": key, "replaces": key_id}

    return ORJSONResponse(await _key_action(request, key_id, rotate))


@router.patch("/keys/{key_id}")
async def patch_key(request: Request, key_id: str, body: KeyLimits, _: Admin) -> ORJSONResponse:
    changes = body.model_dump(exclude_unset=True)
    return ORJSONResponse(
        await _key_action(request, key_id, lambda s: describe_key(update_key(s, key_id, **changes)))
    )


async def _credit(request: Request, account_id: str, body: Credit, kind: str) -> ORJSONResponse:
    def work(session: Session) -> dict[str, Any]:
        _account(session, account_id)
        try:
            applied = credit(
                session,
                account_id,
                body.amount_micro_usd,
                kind=kind,
                idempotency_key=body.idempotency_key,
                note=body.note,
            )
        except LedgerError as exc:
            raise InvalidRequest(str(exc), param="amount_micro_usd") from exc
        return {"applied": applied, **_account_body(session, _account(session, account_id))}

    return ORJSONResponse(await _in_session(request, work))


@router.post("/accounts/{account_id}/topups")
async def post_topup(request: Request, account_id: str, body: Credit, _: Admin) -> ORJSONResponse:
    return await _credit(request, account_id, body, "topup")


@router.post("/accounts/{account_id}/adjustments")
async def post_adjustment(
    request: Request, account_id: str, body: Credit, _: Admin
) -> ORJSONResponse:
    return await _credit(request, account_id, body, "adjustment")


@router.post("/jobs/{job_id}/refund")
async def post_refund(request: Request, job_id: str, body: Refund, _: Admin) -> ORJSONResponse:
    def work(session: Session) -> dict[str, Any]:
        try:
            amount = refund_job(session, job_id, body.amount_micro_usd, body.note)
        except LedgerError as exc:
            raise InvalidRequest(str(exc), param="amount_micro_usd") from exc
        return {"job_id": job_id, "refunded_micro_usd": amount}

    return ORJSONResponse(await _in_session(request, work))
