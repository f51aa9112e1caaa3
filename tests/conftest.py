"""Fixtures that run the real system; the parts they are made of live in ``harness``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from harness import (
    BACKENDS,
    PG_ADMIN_URL,
    RedisServer,
    Stack,
    create_database,
    drop_database,
    running_stack,
    start_redis,
)

from broker.migrate import upgrade


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.process.terminate()
    server.process.wait(10)


@pytest.fixture(scope="session")
def postgres_admin() -> str:
    try:
        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3):
            pass
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL at {PG_ADMIN_URL} is unreachable: {exc}")
    return PG_ADMIN_URL


@pytest.fixture(params=BACKENDS)
def migrated_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty database of each backend, for tests without processes."""
    if request.param == "postgresql":
        request.getfixturevalue("postgres_admin")
    url, handle = create_database(request.param, tmp_path)
    upgrade(url)
    yield url
    drop_database(handle)


@pytest.fixture(scope="session", params=BACKENDS)
def stack(
    request: pytest.FixtureRequest,
    redis_server: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """The whole system on one backend, shared by the tests of that backend."""
    if request.param == "postgresql":
        request.getfixturevalue("postgres_admin")
    # Each backend gets its own Redis database number, so their queues never mix.
    redis_url = f"redis://127.0.0.1:{redis_server.port}/{BACKENDS.index(request.param) + 1}"
    with running_stack(
        request.param, redis_url, tmp_path_factory.mktemp(f"stack-{request.param}")
    ) as running:
        yield running


@pytest.fixture(autouse=True)
def _close_sdk_clients(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    for name in ("stack", "fault_stack"):
        if name in request.fixturenames:
            request.getfixturevalue(name).close_clients()
