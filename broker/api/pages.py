"""Cursor pagination in the OpenAI list format.

Ids sort by creation time (``broker.ids``), so a page is the objects after the cursor
id in id order: ``{"object": "list", "data", "first_id", "last_id", "has_more"}``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sqlalchemy import Select
from sqlalchemy.orm import InstrumentedAttribute

from broker.errors import InvalidRequest

Row = TypeVar("Row")


def paginate(
    query: Select[Any],
    id_column: InstrumentedAttribute[str],
    after: str | None,
    limit: int,
    order: str = "desc",
) -> Select[Any]:
    """Restrict ``query`` to one page past ``after``, plus one extra row so that
    ``page_body`` can set ``has_more``."""
    if order not in ("asc", "desc"):
        raise InvalidRequest("'order' must be 'asc' or 'desc'.", param="order")
    if order == "desc":
        if after:
            query = query.where(id_column < after)
        return query.order_by(id_column.desc()).limit(limit + 1)
    if after:
        query = query.where(id_column > after)
    return query.order_by(id_column.asc()).limit(limit + 1)


def page_body(
    rows: Sequence[Row], limit: int, render: Callable[[Row], dict[str, Any]]
) -> dict[str, Any]:
    """Render the rows of ``paginate``'s query as an OpenAI list."""
    data = [render(row) for row in rows[:limit]]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(rows) > limit,
    }
