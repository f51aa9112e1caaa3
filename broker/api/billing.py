"""The caller's money: ``GET /v1/wallet``, ``/v1/wallet/ledger`` and ``/v1/usage``."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Query, Request
from sqlalchemy import func, select

from broker.api.services import Caller, services
from broker.errors import InvalidRequest
from broker.jsonresponse import ORJSONResponse
from broker.tables import Job, LedgerEntry, Wallet, as_utc

router = APIRouter()

# Most ledger entries one page returns.
MAX_PAGE = 1000
# Maximum period of one usage report, in days.
MAX_USAGE_DAYS = 366


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


def _entry(entry: LedgerEntry) -> dict[str, Any]:
    return {
        "id": entry.id,
        "object": "ledger_entry",
        "kind": entry.kind,
        "amount_micro_usd": entry.amount_micro_usd,
        "held_delta_micro_usd": entry.held_delta_micro_usd,
        "job_id": entry.job_id,
        "note": entry.note,
        "created_at": int(as_utc(entry.created_at).timestamp()),
    }


@router.get("/v1/wallet/ledger")
async def list_ledger(
    request: Request,
    caller: Caller,
    after: int | None = Query(None, description="Entry id to start after."),
    limit: int = Query(100, ge=1, le=MAX_PAGE),
) -> ORJSONResponse:
    """List the wallet's ledger entries, oldest first, ``limit`` at a time."""
    query = select(LedgerEntry).where(LedgerEntry.wallet_id == caller.wallet_id)
    if after is not None:
        query = query.where(LedgerEntry.id > after)
    async with services(request).sessions() as session:
        rows = (await session.scalars(query.order_by(LedgerEntry.id).limit(limit + 1))).all()
    page = [_entry(row) for row in rows[:limit]]
    return ORJSONResponse(
        {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(rows) > limit,
        }
    )


def _day_range(start: date | None, end: date | None) -> tuple[datetime, datetime]:
    today = datetime.now(UTC).date()
    end = end or today
    start = start or end - timedelta(days=29)
    if start > end:
        raise InvalidRequest("'start_date' must not be after 'end_date'.", param="start_date")
    if (end - start).days >= MAX_USAGE_DAYS:
        raise InvalidRequest(
            f"A usage report covers at most {MAX_USAGE_DAYS} days.", param="start_date"
        )
    begin = datetime(start.year, start.month, start.day, tzinfo=UTC)
    return begin, datetime(end.year, end.month, end.day, tzinfo=UTC) + timedelta(days=1)


@router.get("/v1/usage")
async def get_usage(
    request: Request,
    caller: Caller,
    start_date: date | None = Query(None, description="First day, UTC."),
    end_date: date | None = Query(None, description="Last day, UTC."),
) -> ORJSONResponse:
    """Sum the account's settled jobs by day, model and key: requests, tokens and cost."""
    begin, end = _day_range(start_date, end_date)
    day = func.date(Job.created_at)
    query = (
        select(
            day.label("day"),
            Job.model,
            Job.api_key_id,
            func.count().label("requests"),
            func.sum(Job.prompt_tokens),
            func.sum(Job.completion_tokens),
            func.sum(Job.cost_micro_usd),
        )
        .where(
            Job.account_id == caller.account_id,
            Job.settled_at.is_not(None),
            Job.created_at >= begin,
            Job.created_at < end,
        )
        .group_by(day, Job.model, Job.api_key_id)
        .order_by(day, Job.model, Job.api_key_id)
    )
    async with services(request).sessions() as session:
        rows = (await session.execute(query)).all()
    data = [
        {
            "day": str(row[0]),
            "model": row[1],
            "api_key_id": row[2],
            "requests": row[3],
            "prompt_tokens": int(row[4] or 0),
            "completion_tokens": int(row[5] or 0),
            "cost_micro_usd": int(row[6] or 0),
        }
        for row in rows
    ]
    return ORJSONResponse(
        {
            "object": "usage",
            "start_date": str(begin.date()),
            "end_date": str((end - timedelta(days=1)).date()),
            "data": data,
            "total": {
                "requests": sum(item["requests"] for item in data),
                "prompt_tokens": sum(item["prompt_tokens"] for item in data),
                "completion_tokens": sum(item["completion_tokens"] for item in data),
                "cost_micro_usd": sum(item["cost_micro_usd"] for item in data),
            },
        }
    )
