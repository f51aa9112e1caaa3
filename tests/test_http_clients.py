"""How a worker lends its HTTP clients to upstream calls (pure logic)."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import pytest

from workers.context import CALLS_PER_CLIENT, WorkerContext


def _context(clients: int) -> WorkerContext:
    names: Any = [f"client-{n}" for n in range(clients)]
    return WorkerContext(None, None, None, None, names, None, None)  # type: ignore[arg-type]


def test_quiet_worker_uses_first_client() -> None:
    ctx = _context(4)

    used = []
    for _ in range(20):
        with ctx.http_client() as client:
            used.append(client)

    assert set(used) == {"client-0"}
    assert ctx.calls_in_flight == [0, 0, 0, 0]


def test_busy_client_spills_over_in_order() -> None:
    ctx = _context(3)

    with ExitStack() as held:
        lent = [held.enter_context(ctx.http_client()) for _ in range(2 * CALLS_PER_CLIENT + 1)]
        assert lent[:CALLS_PER_CLIENT] == ["client-0"] * CALLS_PER_CLIENT
        assert lent[CALLS_PER_CLIENT : 2 * CALLS_PER_CLIENT] == ["client-1"] * CALLS_PER_CLIENT
        assert lent[-1] == "client-2"
        assert ctx.calls_in_flight == [CALLS_PER_CLIENT, CALLS_PER_CLIENT, 1]

    assert ctx.calls_in_flight == [0, 0, 0]


def test_all_full_picks_least_busy() -> None:
    ctx = _context(2)

    with ExitStack() as held:
        for _ in range(2 * CALLS_PER_CLIENT + 3):
            held.enter_context(ctx.http_client())
        counts = list(ctx.calls_in_flight)

    assert counts == [CALLS_PER_CLIENT + 2, CALLS_PER_CLIENT + 1]


def test_failed_call_returns_its_client() -> None:
    ctx = _context(2)

    with pytest.raises(ConnectionError), ctx.http_client():
        raise ConnectionError("upstream went away")

    assert ctx.calls_in_flight == [0, 0]
