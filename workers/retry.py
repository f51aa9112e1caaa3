"""The retry decision: which errors are tried again, and how long to wait first."""

from __future__ import annotations

import random

from workers.adapters.base import UpstreamError

# Seconds of the first backoff step; each later step doubles it.
BASE_BACKOFF_S = 0.25


def backoff_s(attempt: int, error: UpstreamError, cap_s: float) -> float:
    """Return the wait before attempt ``attempt + 1``, after ``attempt`` failures.

    Exponential backoff with full jitter spreads retries of many jobs over time. A
    Retry-After from the provider wins when it is longer, up to ``cap_s``.
    """
    jittered = random.uniform(0, min(cap_s, BASE_BACKOFF_S * 2 ** (attempt - 1)))
    if error.retry_after_s is not None:
        return min(cap_s, max(error.retry_after_s, jittered))
    return jittered


def should_retry(error: UpstreamError, attempt: int, max_attempts: int) -> bool:
    return error.retryable and attempt < max_attempts
