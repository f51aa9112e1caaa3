"""Group commit of job creation, driven directly on a real database of each backend.

The jobs of one ``asyncio.gather`` reach the writer before its flusher task first
runs, so they form one group: the tests check that with the writer's flush count.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from broker import grouped_intake
from broker.accounts import create_account
from broker.db import async_session_factory, is_sqlite, make_async_engine, make_engine
from broker.db import session_factory as sync_session_factory
from broker.errors import InsufficientFunds
from broker.grouped_intake import JobGroupCommit
from broker.ids import new_id
from broker.jobstore import DuplicateIdempotencyKey, format_usd
from broker.ledger import check_wallet, top_up
from broker.tables import Job, LedgerEntry, Wallet, utcnow

# Seconds a test waits for a flush to reach the database before it fails.
FLUSH_START_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Customer:
    id: str
    wallet_id: str


@dataclass(frozen=True)
class Request:
    account: Customer
    hold: int
    idempotency_key: str | None = None


def job_values(request: Request) -> dict[str, Any]:
    now = utcnow()
    return {
        "id": new_id("job"),
        "account_id": request.account.id,
        "api_key_id": None,
        "endpoint": "/v1/chat/completions",
        "model": "m",
        "provider": "p",
        "region": "us",
        "lane": "interactive",
        "status": "queued",
        "request": {"messages": [{"role": "user", "content": "hi"}]},
        "idempotency_key": request.idempotency_key,
        "route": [],
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "input_price_micro_usd": 1_000_000,
        "output_price_micro_usd": 2_000_000,
        "hold_micro_usd": request.hold,
        "created_at": now,
        "deadline_at": now + timedelta(minutes=5),
    }


class Database:
    """A migrated test database with a sync engine for set-up and checks."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: Engine = make_engine(url, pool_size=2)
        self.sessions = sync_session_factory(self.engine)

    def new_account(self, balance: int) -> Customer:
        with self.sessions.begin() as session:
            account, wallet = create_account(session, "group-commit")
            if balance:
                top_up(session, account.id, balance, note="test opening balance")
        return Customer(account.id, wallet.id)

    def held(self, account: Customer) -> int:
        with self.sessions() as session:
            return session.get(Wallet, account.wallet_id).held_micro_usd

    def job_ids(self, account: Customer) -> set[str]:
        with self.sessions() as session:
            return set(session.scalars(select(Job.id).where(Job.account_id == account.id)))

    def hold_entries(self, account: Customer) -> dict[str, int]:
        """Return the account's hold ledger entries: job id to held amount."""
        with self.sessions() as session:
            rows = session.execute(
                select(LedgerEntry.job_id, LedgerEntry.held_delta_micro_usd).where(
                    LedgerEntry.wallet_id == account.wallet_id, LedgerEntry.kind == "hold"
                )
            ).all()
        return {job_id: amount for job_id, amount in rows}

    def ledger_ok(self, account: Customer) -> bool:
        with self.sessions() as session:
            return check_wallet(session, account.wallet_id).ok

    def jobs_with_key(self, account: Customer, key: str) -> int:
        with self.sessions() as session:
            return session.scalar(
                select(func.count())
                .select_from(Job)
                .where(Job.account_id == account.id, Job.idempotency_key == key)
            )

    async def wait_blocked(self, writer: JobGroupCommit, waiters: int) -> None:
        """Wait until ``writer`` has started a flush and, on PostgreSQL, until
        ``waiters`` transactions of this database wait for a lock."""
        await wait_until(lambda: writer.flushes >= 1, "a flush to start")
        if not is_sqlite(self.url):
            await wait_until(lambda: self.lock_waiters() == waiters, f"{waiters} lock waiters")

    def lock_waiters(self) -> int:
        with self.engine.connect() as connection:
            return connection.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            )

    @contextmanager
    def writes_blocked(self, wallet_id: str) -> Iterator[None]:
        """Hold the lock a group transaction needs first until the block ends.

        SQLite: the database's write lock (BEGIN IMMEDIATE). PostgreSQL: the wallet's row.
        """
        with self.engine.connect() as connection:
            transaction = connection.begin()
            if not is_sqlite(self.url):
                connection.execute(
                    select(Wallet.id).where(Wallet.id == wallet_id).with_for_update()
                )
            try:
                yield
            finally:
                transaction.rollback()


@pytest.fixture
def database(migrated_database: str) -> Iterator[Database]:
    database = Database(migrated_database)
    yield database
    database.engine.dispose()


def run_with_writers(url: str, count: int, scenario: Callable[..., Awaitable[Any]]) -> Any:
    """Run ``scenario(*writers)`` with ``count`` writers, each on its own async engine
    (as separate API processes have)."""

    async def main() -> Any:
        engines = [make_async_engine(url, pool_size=4) for _ in range(count)]
        writers = [JobGroupCommit(async_session_factory(engine)) for engine in engines]
        try:
            return await scenario(*writers)
        finally:
            for writer, engine in zip(writers, engines, strict=True):
                await writer.close()
                await engine.dispose()

    return asyncio.run(main())


async def submit_all(writer: JobGroupCommit, requests: list[Request]) -> list[Any]:
    """Create the jobs concurrently; returns each job's id or the exception it raised."""
    values = [job_values(request) for request in requests]
    outcomes = await asyncio.gather(
        *(
            writer.create_job(wallet_id=request.account.wallet_id, hold=request.hold, values=v)
            for request, v in zip(requests, values, strict=True)
        ),
        return_exceptions=True,
    )
    return [
        outcome if isinstance(outcome, BaseException) else v["id"]
        for v, outcome in zip(values, outcomes, strict=True)
    ]


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + FLUSH_START_TIMEOUT_S
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {FLUSH_START_TIMEOUT_S:g} s waiting for {what}")
        await asyncio.sleep(0.01)


def test_group_holds_what_each_wallet_covers(database: Database) -> None:
    rich = database.new_account(10_000)
    partial = database.new_account(400)
    empty = database.new_account(0)
    # In arrival order the partial wallet covers 100 and 250, not 100 (50 left), then
    # 50, and not 200.
    partial_holds = [100, 250, 100, 50, 200]
    requests = [
        Request(rich, 1_000),
        Request(partial, partial_holds[0]),
        Request(empty, 10),
        Request(partial, partial_holds[1]),
        Request(rich, 2_000),
        Request(partial, partial_holds[2]),
        Request(empty, 20),
        Request(partial, partial_holds[3]),
        Request(rich, 3_000),
        Request(partial, partial_holds[4]),
    ]

    async def scenario(writer: JobGroupCommit) -> tuple[list[Any], int]:
        return await submit_all(writer, requests), writer.flushes

    outcomes, flushes = run_with_writers(database.url, 1, scenario)

    assert flushes == 1
    by_account: dict[str, list[Any]] = {rich.id: [], partial.id: [], empty.id: []}
    for request, outcome in zip(requests, outcomes, strict=True):
        by_account[request.account.id].append(outcome)
    assert all(isinstance(outcome, str) for outcome in by_account[rich.id])
    assert all(isinstance(outcome, InsufficientFunds) for outcome in by_account[empty.id])
    partial_created = [isinstance(outcome, str) for outcome in by_account[partial.id]]
    assert partial_created == [True, True, False, True, False]

    rejected_100 = by_account[partial.id][2]
    assert rejected_100.status_code == 402
    assert rejected_100.message == (
        f"The wallet's available balance ({format_usd(50)}) cannot cover this request's "
        f"worst-case cost ({format_usd(100)}). Top up the wallet or lower max_tokens."
    )
    assert format_usd(0) in by_account[partial.id][4].message

    for account in (rich, partial, empty):
        created = {o for o in by_account[account.id] if isinstance(o, str)}
        holds = {
            outcome: request.hold
            for request, outcome in zip(requests, outcomes, strict=True)
            if outcome in created
        }
        assert database.job_ids(account) == created
        assert database.hold_entries(account) == holds
        assert database.held(account) == sum(holds.values())
        assert database.ledger_ok(account)
    assert database.held(partial) == 400


def test_group_duplicate_key_fails_alone(database: Database) -> None:
    first = database.new_account(100_000)
    second = database.new_account(100_000)
    earlier = Request(first, 100, idempotency_key="key-used")
    requests = [
        Request(first, 200, idempotency_key="key-used"),
        Request(first, 300),
        Request(second, 400, idempotency_key="key-new"),
        Request(second, 500),
        Request(first, 600, idempotency_key="key-twice"),
        Request(first, 700, idempotency_key="key-twice"),
    ]

    async def scenario(writer: JobGroupCommit) -> tuple[list[Any], list[Any], int, int]:
        before = await submit_all(writer, [earlier])
        return await submit_all(writer, requests), before, writer.flushes, writer.failed_flushes

    outcomes, before, flushes, failed_flushes = run_with_writers(database.url, 1, scenario)

    assert isinstance(before[0], str)
    assert flushes == 2
    # The used key is found before the group writes anything, so the group commits and
    # only the duplicate is tried alone.
    assert failed_flushes == 0
    assert isinstance(outcomes[0], DuplicateIdempotencyKey)
    assert all(isinstance(outcome, str) for outcome in outcomes[1:4])
    twice = outcomes[4:]
    assert sum(isinstance(o, str) for o in twice) == 1
    assert sum(isinstance(o, DuplicateIdempotencyKey) for o in twice) == 1
    assert database.jobs_with_key(first, "key-used") == 1
    assert database.jobs_with_key(first, "key-twice") == 1

    all_requests = [earlier, *requests]
    all_outcomes = [before[0], *outcomes]
    for account in (first, second):
        holds = {
            outcome: request.hold
            for request, outcome in zip(all_requests, all_outcomes, strict=True)
            if isinstance(outcome, str) and request.account == account
        }
        assert database.hold_entries(account) == holds
        assert database.held(account) == sum(holds.values())
        assert database.job_ids(account) == set(holds)
        assert database.ledger_ok(account)


def test_group_repeated_key_keeps_group(database: Database) -> None:
    account = database.new_account(100_000)
    other = database.new_account(100_000)
    requests = [
        Request(account, 100, idempotency_key="key-a"),
        Request(other, 200),
        Request(account, 300, idempotency_key="key-a"),
    ]

    async def scenario(writer: JobGroupCommit) -> tuple[list[Any], int]:
        return await submit_all(writer, requests), writer.failed_flushes

    outcomes, failed_flushes = run_with_writers(database.url, 1, scenario)

    # The repeat waits for the group to commit and then fails alone.
    assert failed_flushes == 0
    assert isinstance(outcomes[0], str)
    assert isinstance(outcomes[1], str)
    assert isinstance(outcomes[2], DuplicateIdempotencyKey)
    assert database.held(account) == 100
    assert database.hold_entries(account) == {outcomes[0]: 100}
    assert database.ledger_ok(account)


def test_concurrent_flushes_share_wallets(database: Database) -> None:
    # Two writers (two API processes) each bring 6 jobs of 100 to a wallet of 700 and
    # 3 jobs of 100 to a wallet of 500, in opposite wallet order.
    first_wallet = database.new_account(700)
    second_wallet = database.new_account(500)
    rich = [database.new_account(100_000), database.new_account(100_000)]
    groups = [
        [Request(first_wallet, 100)] * 6
        + [Request(second_wallet, 100)] * 3
        + [Request(rich[0], 1_000)] * 3,
        [Request(second_wallet, 100)] * 3
        + [Request(first_wallet, 100)] * 6
        + [Request(rich[1], 1_000)] * 3,
    ]

    async def scenario(*writers: JobGroupCommit) -> list[list[Any]]:
        runs = []
        with database.writes_blocked(first_wallet.wallet_id):
            # The first writer waits first, so it gets the blocked wallet first. Without
            # a fixed wallet order it would then wait for the wallet the second writer
            # locked, while the second writer waits for the blocked one: a deadlock.
            for started, (writer, group) in enumerate(zip(writers, groups, strict=True), 1):
                runs.append(asyncio.create_task(submit_all(writer, group)))
                await database.wait_blocked(writer, started)
            # Neither flush can finish while the lock is held, so both are in flight
            # at once when it is released.
            assert not any(run.done() for run in runs)
        results = await asyncio.gather(*runs)
        assert [writer.flushes for writer in writers] == [1, 1]
        assert [writer.failed_flushes for writer in writers] == [0, 0]
        return results

    results = run_with_writers(database.url, 2, scenario)

    for account, balance, covered in ((first_wallet, 700, 7), (second_wallet, 500, 5)):
        outcomes = [
            outcome
            for group, group_outcomes in zip(groups, results, strict=True)
            for request, outcome in zip(group, group_outcomes, strict=True)
            if request.account == account
        ]
        assert sum(isinstance(o, str) for o in outcomes) == covered
        assert sum(isinstance(o, InsufficientFunds) for o in outcomes) == len(outcomes) - covered
        assert database.held(account) == balance
        assert len(database.hold_entries(account)) == covered
        assert database.ledger_ok(account)
    for account in rich:
        assert len(database.job_ids(account)) == 3
        assert database.held(account) == 3_000
        assert database.ledger_ok(account)


def test_arrivals_during_flush_wait(database: Database) -> None:
    account = database.new_account(100_000)

    async def scenario(writer: JobGroupCommit) -> tuple[list[Any], list[Any], int]:
        with database.writes_blocked(account.wallet_id):
            first = asyncio.create_task(submit_all(writer, [Request(account, 100)]))
            await database.wait_blocked(writer, 1)
            rest = asyncio.create_task(submit_all(writer, [Request(account, 200)] * 4))
            await wait_until(lambda: writer.pending == 4, "four pending jobs")
            assert writer.flushes == 1
        return await first, await rest, writer.flushes

    first, rest, flushes = run_with_writers(database.url, 1, scenario)

    assert isinstance(first[0], str)
    assert all(isinstance(outcome, str) for outcome in rest)
    assert flushes == 2
    assert database.held(account) == 900
    assert database.ledger_ok(account)


def run_with_publisher(
    url: str, publish: Callable[[list[Any]], Awaitable[None]], requests: list[Request]
) -> tuple[list[Any], list[str], int]:
    """Create the jobs concurrently with messages; returns each create_job's result or
    exception, the job ids and the flush count."""

    async def main() -> tuple[list[Any], list[str], int]:
        engine = make_async_engine(url, pool_size=4)
        writer = JobGroupCommit(async_session_factory(engine), publish=publish)
        values = [job_values(request) for request in requests]
        try:
            outcomes = await asyncio.gather(
                *(
                    writer.create_job(
                        wallet_id=request.account.wallet_id,
                        hold=request.hold,
                        values=v,
                        message=f"message of {v['id']}",
                    )
                    for request, v in zip(requests, values, strict=True)
                ),
                return_exceptions=True,
            )
        finally:
            await writer.close()
            await engine.dispose()
        return list(outcomes), [v["id"] for v in values], writer.flushes

    return asyncio.run(main())


def test_group_publishes_held_jobs_once(database: Database) -> None:
    rich = database.new_account(10_000)
    empty = database.new_account(0)
    calls: list[list[Any]] = []

    async def publish(messages: list[Any]) -> None:
        calls.append(messages)

    requests = [Request(rich, 100), Request(empty, 10), Request(rich, 200)]
    outcomes, job_ids, flushes = run_with_publisher(database.url, publish, requests)

    assert flushes == 1
    assert outcomes[0] is True
    assert isinstance(outcomes[1], InsufficientFunds)
    assert outcomes[2] is True
    assert calls == [[f"message of {job_ids[0]}", f"message of {job_ids[2]}"]]
    assert database.job_ids(rich) == {job_ids[0], job_ids[2]}


def test_failed_group_publish_leaves_jobs(database: Database) -> None:
    account = database.new_account(10_000)

    async def publish(messages: list[Any]) -> None:
        raise ConnectionError("Redis is down")

    requests = [Request(account, 100), Request(account, 200)]
    outcomes, job_ids, _ = run_with_publisher(database.url, publish, requests)

    # create_job returns False, so each request publishes its own job, still created and held.
    assert outcomes == [False, False]
    assert database.job_ids(account) == set(job_ids)
    assert database.held(account) == 300
    assert database.ledger_ok(account)


def test_used_key_rejected_while_job_settles(database: Database) -> None:
    if is_sqlite(database.url):
        pytest.skip("SQLite runs one writer at a time, so no insert waits on another's row")
    account = database.new_account(10_000)
    first = run_with_writers(
        database.url,
        1,
        lambda writer: submit_all(writer, [Request(account, 100, idempotency_key="settling")]),
    )
    assert isinstance(first[0], str)
    # An insert that waits on a lock fails after this long instead of hanging the test.
    with database.engine.connect() as connection:
        connection.execute(
            text(f"ALTER DATABASE {connection.engine.url.database} SET lock_timeout = '5s'")
        )
        connection.commit()

    # A settlement's first statement updates the job's row, which stays locked until its
    # commit; the settlement then waits for the wallet. The repeat must not lock the
    # wallet and then wait for that row.
    with database.engine.connect() as settlement:
        transaction = settlement.begin()
        settlement.execute(update(Job).where(Job.id == first[0]).values(settled_at=utcnow()))
        repeat = run_with_writers(
            database.url,
            1,
            lambda writer: submit_all(writer, [Request(account, 200, idempotency_key="settling")]),
        )
        settlement.execute(
            update(Wallet).where(Wallet.id == account.wallet_id).values(updated_at=utcnow())
        )
        transaction.rollback()

    assert isinstance(repeat[0], DuplicateIdempotencyKey)
    assert database.held(account) == 100
    assert database.jobs_with_key(account, "settling") == 1


def test_stuck_group_publish_times_out(database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(grouped_intake, "PUBLISH_TIMEOUT_S", 0.2)
    account = database.new_account(10_000)

    async def publish(messages: list[Any]) -> None:
        # A Redis that accepts the connection but never replies.
        await asyncio.Event().wait()

    outcomes, job_ids, _ = run_with_publisher(database.url, publish, [Request(account, 100)])

    # The request publishes its own job after the timeout; the job stays created and held.
    assert outcomes == [False]
    assert database.job_ids(account) == set(job_ids)
    assert database.held(account) == 100


def test_group_stores_every_column_as_given(database: Database) -> None:
    account = database.new_account(10_000)
    plain, detached = Request(account, 100), Request(account, 200)
    plain_values = job_values(plain)
    # An asynchronous job carries two more columns, so the group has two column sets.
    detached_values = {
        **job_values(detached),
        "webhook_url": "https://hooks.example.com/done",
        "job_metadata": {"team": "search", "tags": ["a", "b"]},
        "request": {"messages": [{"role": "user", "content": 'ünïcode \u2603 "quoted"'}]},
        "route": [{"provider": "p", "region": "us", "input_price": 2**70}],
    }

    async def scenario(writer: JobGroupCommit) -> tuple[list[Any], int]:
        outcomes = await asyncio.gather(
            *(
                writer.create_job(wallet_id=account.wallet_id, hold=request.hold, values=values)
                for request, values in ((plain, plain_values), (detached, detached_values))
            ),
            return_exceptions=True,
        )
        return list(outcomes), writer.flushes

    outcomes, flushes = run_with_writers(database.url, 1, scenario)

    assert outcomes == [False, False]
    assert flushes == 1
    with database.sessions() as session:
        for values in (plain_values, detached_values):
            job = session.get(Job, values["id"])
            for name, value in values.items():
                assert as_utc(getattr(job, name)) == value, name
            assert job.dispatch_count == 0
            assert job.cached_prompt_tokens == 0
        assert session.get(Job, plain_values["id"]).webhook_url is None
        assert session.get(Job, plain_values["id"]).job_metadata is None
    assert database.hold_entries(account) == {plain_values["id"]: 100, detached_values["id"]: 200}
    assert database.held(account) == 300
    assert database.ledger_ok(account)


def as_utc(value: Any) -> Any:
    """SQLite returns timestamps without their zone; they were written in UTC."""
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def test_failed_wallet_leaves_other_wallets_jobs(database: Database) -> None:
    good = database.new_account(10_000)
    other = database.new_account(10_000)
    good_values = job_values(Request(good, 100))
    # A job row naming an account that does not exist fails its foreign key.
    broken_values = {**job_values(Request(other, 200)), "account_id": "acct_missing"}

    async def scenario(writer: JobGroupCommit) -> list[Any]:
        outcomes = await asyncio.gather(
            writer.create_job(wallet_id=good.wallet_id, hold=100, values=good_values),
            writer.create_job(wallet_id=other.wallet_id, hold=200, values=broken_values),
            return_exceptions=True,
        )
        return list(outcomes)

    outcomes = run_with_writers(database.url, 1, scenario)

    assert outcomes[0] is False
    assert isinstance(outcomes[1], IntegrityError)
    assert database.job_ids(good) == {good_values["id"]}
    assert database.held(good) == 100
    assert database.held(other) == 0
    assert database.hold_entries(other) == {}
    assert database.ledger_ok(good)
    assert database.ledger_ok(other)


def test_lost_statement_connection_is_replaced(database: Database) -> None:
    if is_sqlite(database.url):
        pytest.skip("only PostgreSQL groups use the writer's own connection")
    account = database.new_account(100_000)
    requests = [Request(account, 100), Request(account, 200), Request(account, 300)]
    values = [job_values(request) for request in requests]

    def statement_backends() -> list[int]:
        # The writer's own connection is the one whose last statement was the hold.
        with database.engine.connect() as connection:
            return list(
                connection.scalars(
                    text(
                        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                        "AND query LIKE 'WITH held AS%'"
                    )
                )
            )

    async def create(writer: JobGroupCommit, index: int) -> bool:
        request = requests[index]
        return await writer.create_job(
            wallet_id=account.wallet_id, hold=request.hold, values=values[index]
        )

    async def scenario(writer: JobGroupCommit) -> tuple[list[int], list[int], int]:
        await create(writer, 0)
        (first,) = statement_backends()
        with database.engine.connect() as connection:
            connection.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": first})
        # The broken connection fails this group, whose job is then created alone.
        await create(writer, 1)
        await create(writer, 2)
        return [first], statement_backends(), writer.failed_flushes

    first, later, failed_flushes = run_with_writers(database.url, 1, scenario)

    assert failed_flushes == 1
    assert len(later) == 1
    assert later != first
    assert database.job_ids(account) == {v["id"] for v in values}
    assert database.held(account) == 600
    assert database.ledger_ok(account)
