"""Pooled PostgreSQL connections: tested before use only after sitting idle.

Each test ends its own server process with ``pg_terminate_backend``, which is what a
server restart or a failover does to every pooled connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from harness import PG_ADMIN_URL, create_database, drop_database
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from broker import db


@pytest.fixture
def database_url(postgres_admin: str, tmp_path: Path) -> Iterator[str]:
    url, handle = create_database("postgresql", tmp_path)
    yield url
    drop_database(handle)


def _terminate(backend_pid: int) -> None:
    """End the server process and wait (up to 5 s) until it has exited."""
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        ended = admin.execute("SELECT pg_terminate_backend(%s, 5000)", (backend_pid,)).fetchone()
    assert ended == (True,)


def test_idle_connection_is_tested_and_replaced(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = db.make_engine(database_url, pool_size=1, max_overflow=0)
    try:
        with engine.connect() as connection:
            first = connection.scalar(text("SELECT pg_backend_pid()"))
        _terminate(first)
        # Every returned connection now counts as idle for long enough to be tested.
        monkeypatch.setattr(db, "PING_AFTER_IDLE_S", 0.0)
        with engine.connect() as connection:
            second = connection.scalar(text("SELECT pg_backend_pid()"))
        assert second != first
    finally:
        engine.dispose()


def test_recent_connection_is_not_tested(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection that died while briefly idle fails one statement, then the pool heals."""
    # No returned connection counts as idle for long enough to be tested.
    monkeypatch.setattr(db, "PING_AFTER_IDLE_S", 3600.0)
    engine = db.make_engine(database_url, pool_size=1, max_overflow=0)
    try:
        with engine.connect() as connection:
            first = connection.scalar(text("SELECT pg_backend_pid()"))
        _terminate(first)
        with pytest.raises(OperationalError) as failure, engine.connect() as connection:
            connection.scalar(text("SELECT 1"))
        assert failure.value.connection_invalidated
        with engine.connect() as connection:
            assert connection.scalar(text("SELECT pg_backend_pid()")) != first
    finally:
        engine.dispose()


def test_async_engine_replaces_dead_connection(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def backend_pids() -> tuple[int, int]:
        engine = db.make_async_engine(database_url, pool_size=1, max_overflow=0)
        try:
            async with engine.connect() as connection:
                first = await connection.scalar(text("SELECT pg_backend_pid()"))
            await asyncio.to_thread(_terminate, first)
            monkeypatch.setattr(db, "PING_AFTER_IDLE_S", 0.0)
            async with engine.connect() as connection:
                second = await connection.scalar(text("SELECT pg_backend_pid()"))
            return first, second
        finally:
            await engine.dispose()

    first, second = asyncio.run(backend_pids())
    assert second != first
