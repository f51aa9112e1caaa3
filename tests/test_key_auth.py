"""API key lookups on a real database: concurrent requests with one key share a query."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.accounts import create_account, create_api_key
from broker.api.auth import KeyAuthenticator
from broker.db import async_session_factory, make_async_engine, make_engine, session_factory
from broker.errors import AuthenticationFailed
from broker.keys import hash_key


@pytest.fixture
def api_key(migrated_database: str) -> Iterator[tuple[str, str]]:
    """Return the database URL and a new account's API key."""
    engine = make_engine(migrated_database, pool_size=1)
    with session_factory(engine).begin() as session:
        account, _ = create_account(session, "key-auth")
        _, key = create_api_key(session, account.id, "key-auth")
    engine.dispose()
    yield migrated_database, key


def count_key_queries(engine: AsyncEngine) -> list[str]:
    """Record each statement that reads the api_keys table."""
    seen: list[str] = []

    def before(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "FROM api_keys" in statement:
            seen.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", before)
    return seen


def test_concurrent_requests_share_one_lookup(api_key: tuple[str, str]) -> None:
    url, key = api_key

    async def scenario() -> tuple[list[Any], int, list[Any], int, int]:
        # Two pooled connections, fewer than the requests, as under load.
        engine = make_async_engine(url, pool_size=2, max_overflow=0)
        queries = count_key_queries(engine)
        auth = KeyAuthenticator(async_session_factory(engine), cache_ttl_s=60)
        try:
            principals = await asyncio.gather(
                *(auth.authenticate(f"Bearer {key}") for _ in range(20))
            )
            shared = len(queries)
            # A wrong key fails for every request sent at the same time.
            wrong = f"{key[:-4]}xxxx"
            failures = await asyncio.gather(
                *(auth.authenticate(f"Bearer {wrong}") for _ in range(5)),
                return_exceptions=True,
            )
            after_wrong = len(queries)
            # A failed lookup is not cached, and a dropped key is looked up again.
            await asyncio.gather(auth.authenticate(f"Bearer {wrong}"), return_exceptions=True)
            auth.forget(hash_key(key))
            await auth.authenticate(f"Bearer {key}")
            return list(principals), shared, failures, after_wrong, len(queries)
        finally:
            await engine.dispose()

    principals, shared, failures, after_wrong, total = asyncio.run(scenario())

    assert shared == 1
    assert len({p.api_key_id for p in principals}) == 1
    assert all(isinstance(f, AuthenticationFailed) for f in failures)
    assert all(f.status_code == 401 for f in failures)
    assert after_wrong == 2
    assert total == 4
