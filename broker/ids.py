"""Identifiers: a type prefix and a time-ordered random part."""

from __future__ import annotations

import os
import time


def new_id(prefix: str) -> str:
    """Return ``<prefix>_<26 hex chars>`` that sorts by creation time (millisecond resolution)."""
    millis = time.time_ns() // 1_000_000
    return f"{prefix}_{millis:012x}{os.urandom(7).hex()}"
