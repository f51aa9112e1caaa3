"""Helpers shared by the tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from broker.ids import new_id
from broker.tables import Job, utcnow

T = TypeVar("T")


def wait_for(
    condition: Callable[[], T],
    timeout_s: float = 30.0,
    interval_s: float = 0.1,
    what: str = "condition",
) -> T:
    """Poll ``condition`` until it returns something truthy, failing after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


def new_job(account_id: str, status: str, **fields: Any) -> Job:
    """Return an unsaved chat job of the account; ``fields`` replace the defaults.

    A job that is not queued or running gets ``finished_at``.
    """
    now = utcnow()
    values: dict[str, Any] = {
        "id": new_id("job"),
        "account_id": account_id,
        "endpoint": "/v1/chat/completions",
        "model": "m",
        "provider": "openai",
        "region": "us",
        "lane": "interactive",
        "status": status,
        "request": {},
        "route": [],
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "input_price_micro_usd": 1,
        "output_price_micro_usd": 1,
        "hold_micro_usd": 0,
        "created_at": now,
        "finished_at": None if status in ("queued", "running") else now,
        "deadline_at": now + timedelta(minutes=5),
    }
    return Job(**{**values, **fields})
