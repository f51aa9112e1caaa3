"""Start-up checks that turn a missing service into one line saying what to start."""

from __future__ import annotations

import redis
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from broker.db import is_sqlite, make_engine
from broker.migrate import is_current


class ServiceDown(Exception):
    """A service the broker needs is missing, unreachable or not set up."""


def _display_url(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def check_redis(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise ServiceDown(
            f"Redis at {_display_url(redis_url)} is unreachable ({exc}). Start "
            "Redis or set BROKER_REDIS_URL."
        ) from exc
    finally:
        client.close()


def check_database(database_url: str, *, require_schema: bool = True) -> None:
    engine = make_engine(database_url, pool_size=1)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        what = "the SQLite file" if is_sqlite(database_url) else "PostgreSQL"
        raise ServiceDown(
            f"The database at {_display_url(database_url)} is unreachable "
            f"({reason}). Start {what} or set BROKER_DATABASE_URL."
        ) from exc
    finally:
        engine.dispose()
    if require_schema and not is_current(database_url):
        raise ServiceDown(
            f"The database at {_display_url(database_url)} is not migrated to "
            "the current schema. Run: broker migrate"
        )
