"""Database engines for SQLite and PostgreSQL, sync (workers) and async (API)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from datetime import date, datetime
from pathlib import Path
from typing import Any

import orjson
import psycopg
from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Connection, CursorResult, Engine, make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

# Milliseconds a SQLite writer waits for another process's write lock before failing.
SQLITE_BUSY_TIMEOUT_MS = 30_000
# Seconds to wait for a PostgreSQL connection before reporting the server unreachable.
PG_CONNECT_TIMEOUT_S = 5
# A pooled PostgreSQL connection idle for longer than this is tested with a round trip
# before it is handed out. One used more recently is not, because on the hot path that
# test was a round trip per transaction. The pools hand out the connection used last
# (LIFO), so at low load the same few stay in use and are not tested.
PING_AFTER_IDLE_S = 1.0
# Key of the connection record's info dict that holds when the connection was returned.
_RETURNED_AT = "broker_returned_at"


def _normalise(url: str, *, asynchronous: bool) -> URL:
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        driver = "aiosqlite" if asynchronous else "pysqlite"
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        return parsed.set(drivername=f"sqlite+{driver}")
    if backend == "postgresql":
        return parsed.set(drivername="postgresql+psycopg")
    raise ValueError(
        f"unsupported database URL scheme {parsed.drivername!r}: "
        "use sqlite:///path or postgresql://"
    )


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Transactions are begun explicitly below so every one takes the write lock at
    # BEGIN; a deferred transaction that upgrades later can fail with SQLITE_BUSY.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin(conn: Any) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def _install_sqlite_events(engine: Engine) -> None:
    event.listen(engine, "connect", _sqlite_pragmas)
    event.listen(engine, "begin", _sqlite_begin)


def _ping_idle_connections(engine: Engine) -> None:
    """Test a connection that sat in the pool for a while before handing it out.

    SQLAlchemy's ``pool_pre_ping`` tests every checkout. This tests only connections
    idle for more than PING_AFTER_IDLE_S, which is where a restarted or failed-over
    server leaves dead ones. A connection in use, or idle for less, fails its
    statement instead. After the first such failure SQLAlchemy replaces every pooled
    connection, and the callers retry or report the error as for any lost connection.
    """
    dialect = engine.dialect

    def returned(_dbapi_connection: Any, record: Any) -> None:
        record.info[_RETURNED_AT] = time.monotonic()

    def checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        returned_at = record.info.get(_RETURNED_AT)
        if returned_at is None or time.monotonic() - returned_at < PING_AFTER_IDLE_S:
            return
        try:
            dialect.do_ping(dbapi_connection)
        except Exception as exc:
            # The pool then replaces this connection with a new one.
            raise DisconnectionError(f"pooled connection failed its test: {exc}") from exc

    event.listen(engine, "checkin", returned)
    event.listen(engine, "checkout", checkout)


def json_text(value: Any) -> str:
    """Serialise a JSON column's value: orjson, or the standard library for what orjson
    rejects (integers beyond 64 bits, which a request body may contain)."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return json.dumps(value)


def json_rows(rows: list[dict[str, Any]] | dict[str, Any]) -> str:
    """Serialise rows (or one row) for a PostgreSQL statement that reads them as JSON,
    with timestamps in ISO 8601."""
    try:
        return orjson.dumps(rows).decode()
    except TypeError:
        return json.dumps(rows, default=_isoformat)


def execute_unprepared(
    connection: Connection, statement: str, parameters: dict[str, Any]
) -> CursorResult[Any]:
    """Run a statement on a psycopg connection without preparing it, so it is planned
    for these parameters and the table sizes of now.

    psycopg prepares a statement after a few runs, and PostgreSQL may then keep a
    generic plan. For a join of jobs with rows given as JSON, the generic plan made
    while the table was small scanned all of it, and with autovacuum off nothing
    replaced it as the table grew.
    """
    driver = connection.connection.driver_connection
    threshold = driver.prepare_threshold
    driver.prepare_threshold = None
    try:
        return connection.exec_driver_sql(statement, parameters)
    finally:
        driver.prepare_threshold = threshold


def _isoformat(value: Any) -> str:
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def make_engine(url: str, *, pool_size: int = 10, max_overflow: int = 5) -> Engine:
    """Create the synchronous engine that workers and the CLI use."""
    target = _normalise(url, asynchronous=False)
    if target.get_backend_name() == "sqlite":
        engine = create_engine(
            target,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            json_serializer=json_text,
        )
        _install_sqlite_events(engine)
        return engine
    engine = create_engine(
        target,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_use_lifo=True,
        connect_args={"connect_timeout": PG_CONNECT_TIMEOUT_S},
        json_serializer=json_text,
    )
    _ping_idle_connections(engine)
    return engine


def make_async_engine(url: str, *, pool_size: int = 10, max_overflow: int = 5) -> AsyncEngine:
    """Create the asyncio engine that the API uses."""
    target = _normalise(url, asynchronous=True)
    if target.get_backend_name() == "sqlite":
        engine = create_async_engine(
            target,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            json_serializer=json_text,
        )
        _install_sqlite_events(engine.sync_engine)
        return engine
    engine = create_async_engine(
        target,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_use_lifo=True,
        connect_args={"connect_timeout": PG_CONNECT_TIMEOUT_S},
        json_serializer=json_text,
    )
    _ping_idle_connections(engine.sync_engine)
    return engine


class StatementConnection:
    """A PostgreSQL connection in autocommit mode, for one task that runs its statements
    one at a time, without SQLAlchemy's pool and execution layers.

    On the API's hot path those layers took about 0.2 ms per statement, more than the
    statement itself on a local server (asyncio, measured on the benchmark machine).
    The connection opens on first use, is tested with a round trip after
    PING_AFTER_IDLE_S of idleness as pooled connections are, and is replaced after it
    breaks.
    """

    def __init__(self, url: URL | str) -> None:
        self._conninfo = _libpq_url(url)
        self._connection: psycopg.AsyncConnection[Any] | None = None
        self._last_used = 0.0
        self._lock = asyncio.Lock()

    async def fetchone(self, statement: str, parameters: dict[str, Any]) -> tuple[Any, ...]:
        """Run ``statement`` and return its first row. Raises psycopg.Error on failure."""
        async with self._lock:
            connection = await self._connected()
            try:
                cursor = await connection.execute(statement, parameters)
                row = await cursor.fetchone()
            finally:
                self._last_used = time.monotonic()
                if connection.broken:
                    self._connection = None
                    await connection.close()
            if row is None:
                raise psycopg.ProgrammingError("the statement returned no row")
            return row

    async def close(self) -> None:
        async with self._lock:
            if self._connection is not None:
                await self._connection.close()
                self._connection = None

    async def _connected(self) -> psycopg.AsyncConnection[Any]:
        connection = self._connection
        if connection is not None and time.monotonic() - self._last_used > PING_AFTER_IDLE_S:
            try:
                await connection.execute("SELECT 1")
            except psycopg.Error:
                await connection.close()
                connection = None
        if connection is None or connection.closed:
            connection = await psycopg.AsyncConnection.connect(
                self._conninfo, autocommit=True, connect_timeout=PG_CONNECT_TIMEOUT_S
            )
            self._connection = connection
        return connection


class BlockingStatementConnection:
    """The blocking form of StatementConnection, for a worker's single outcome writer.

    In the worker, SQLAlchemy's layers took about 0.09 ms per statement (measured on the
    benchmark machine). Under gevent the lock and the socket yield to other greenlets.
    """

    def __init__(self, url: URL | str) -> None:
        self._conninfo = _libpq_url(url)
        self._connection: psycopg.Connection[Any] | None = None
        self._last_used = 0.0
        self._lock = threading.Lock()

    def fetchall(
        self, statement: str, parameters: dict[str, Any], *, prepare: bool | None = None
    ) -> list[tuple[Any, ...]]:
        """Run ``statement`` and return its rows. Raises psycopg.Error on failure.

        ``prepare`` is passed to psycopg, where False plans the statement at each run.
        """
        with self._lock:
            connection = self._connected()
            try:
                return connection.execute(statement, parameters, prepare=prepare).fetchall()
            finally:
                self._last_used = time.monotonic()
                if connection.broken:
                    self._connection = None
                    connection.close()

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    def _connected(self) -> psycopg.Connection[Any]:
        connection = self._connection
        if connection is not None and time.monotonic() - self._last_used > PING_AFTER_IDLE_S:
            try:
                connection.execute("SELECT 1")
            except psycopg.Error:
                connection.close()
                connection = None
        if connection is None or connection.closed:
            connection = psycopg.Connection.connect(
                self._conninfo, autocommit=True, connect_timeout=PG_CONNECT_TIMEOUT_S
            )
            self._connection = connection
        return connection


def _libpq_url(url: URL | str) -> str:
    """Return a SQLAlchemy PostgreSQL URL in the form libpq reads, password included."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def async_session_factory(engine: AsyncEngine) -> async_sessionmaker:
    return async_sessionmaker(engine, expire_on_commit=False)
