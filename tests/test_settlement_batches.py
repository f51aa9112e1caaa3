"""Settling many jobs in one transaction, on a real database, and the group commit."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session, sessionmaker
from support import new_job

from broker.accounts import create_account
from broker.db import is_sqlite, make_engine, session_factory
from broker.ids import new_id
from broker.ledger import check_wallet, credit, settle_jobs
from broker.tables import Batch, Job, LedgerEntry, Wallet, utcnow
from workers import billing
from workers.batch_stop import settle_stopped
from workers.group_commit import GroupCommit

# Seconds a test waits for another transaction to block on a row lock.
LOCK_WAIT_TIMEOUT_S = 10.0

# $2 and $8 per million tokens, in micro-USD per million tokens.
INPUT_PRICE = 2_000_000
OUTPUT_PRICE = 8_000_000
HOLD = 50_000


def _add_job(session: Session, account_id: str, status: str, prompt: int, completion: int) -> str:
    job = new_job(
        account_id,
        status,
        provider="p",
        prompt_tokens=prompt,
        completion_tokens=completion,
        input_price_micro_usd=INPUT_PRICE,
        output_price_micro_usd=OUTPUT_PRICE,
        hold_micro_usd=HOLD,
    )
    job_id, now = job.id, job.created_at
    session.add(job)
    # The hold the API would have placed with the job.
    wallet = session.scalars(select(Wallet).where(Wallet.account_id == account_id)).one()
    wallet.held_micro_usd += HOLD
    session.add(
        LedgerEntry(
            wallet_id=wallet.id,
            kind="hold",
            amount_micro_usd=0,
            held_delta_micro_usd=HOLD,
            idempotency_key=f"hold:{job_id}",
            job_id=job_id,
            note="",
            created_at=now,
        )
    )
    return job_id


@pytest.fixture
def sessions(migrated_database: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(migrated_database, pool_size=1)
    yield session_factory(engine)
    engine.dispose()


def _wait_for_lock_waiter(sessions: sessionmaker[Session]) -> None:
    """Wait until a transaction of this database waits for a row lock."""
    deadline = time.monotonic() + LOCK_WAIT_TIMEOUT_S
    query = text(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    while time.monotonic() < deadline:
        with sessions() as session:
            if session.scalar(query):
                return
        time.sleep(0.05)
    raise AssertionError(f"no transaction waited for a lock within {LOCK_WAIT_TIMEOUT_S:g} s")


def test_settlement_and_batch_stop_share_lock_order(
    migrated_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if is_sqlite(migrated_database):
        pytest.skip("SQLite runs one writer at a time, so it has no row locks to order")
    engine = make_engine(migrated_database, pool_size=4)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        account, wallet = create_account(session, "stopping")
        credit(session, account.id, 1_000_000, kind="topup")
        now = utcnow()
        batch_id = new_id("batch")
        session.add(
            Batch(
                id=batch_id,
                account_id=account.id,
                endpoint="/v1/chat/completions",
                input_file_id="file_x",
                completion_window="24h",
                status="cancelling",
                total=2,
                created_at=now,
                expires_at=now + timedelta(hours=1),
            )
        )
        session.flush()
        job_ids = [_add_job(session, account.id, "cancelled", 0, 0) for _ in range(2)]
        session.execute(update(Job).where(Job.id.in_(job_ids)).values(batch_id=batch_id))
    ctx = SimpleNamespace(sessions=sessions, settings=SimpleNamespace())
    errors: dict[str, BaseException] = {}
    batch_locked = threading.Event()
    real_on_jobs_settled = billing.on_jobs_settled

    def on_jobs_settled_then_wait(session: Session, ids: list[str], settings: Any) -> Any:
        # The batch's row is now locked. Keep it, before the wallet update, until the
        # batch stop below waits for a lock.
        after = real_on_jobs_settled(session, ids, settings)
        batch_locked.set()
        _wait_for_lock_waiter(sessions)
        return after

    monkeypatch.setattr(billing, "on_jobs_settled", on_jobs_settled_then_wait)

    def settle_first() -> None:
        try:
            billing.settle_together(ctx, [job_ids[0]])
        except Exception as exc:  # noqa: BLE001  (checked below)
            errors["settle_together"] = exc

    settler = threading.Thread(target=settle_first)
    try:
        settler.start()
        assert batch_locked.wait(LOCK_WAIT_TIMEOUT_S)
        try:
            # The settler has locked the first job's row, so this stop settles the second.
            settle_stopped(ctx, batch_id)
        except Exception as exc:  # noqa: BLE001  (checked below)
            errors["settle_stopped"] = exc
        settler.join(LOCK_WAIT_TIMEOUT_S * 2)

        assert not settler.is_alive()
        assert errors == {}
        with sessions() as session:
            assert all(session.get(Job, job_id).settled_at is not None for job_id in job_ids)
            assert session.get(Wallet, wallet.id).held_micro_usd == 0
            assert check_wallet(session, wallet.id).ok
    finally:
        settler.join(LOCK_WAIT_TIMEOUT_S * 2)
        engine.dispose()


def test_settle_jobs_charges_finished_once(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        first, first_wallet = create_account(session, "first")
        second, second_wallet = create_account(session, "second")
        for account in (first, second):
            credit(session, account.id, 1_000_000, kind="topup")
    with sessions.begin() as session:
        # 1,000 prompt and 500 completion tokens: 2,000 + 4,000 micro-USD.
        a = _add_job(session, first.id, "succeeded", 1_000, 500)
        # 250 completion tokens only: 2,000 micro-USD.
        b = _add_job(session, first.id, "succeeded", 0, 250)
        # A failed job with no usage releases its hold and is charged nothing.
        c = _add_job(session, second.id, "failed", 0, 0)
        running = _add_job(session, second.id, "running", 0, 0)
        done_before = _add_job(session, second.id, "succeeded", 500, 0)
    with sessions.begin() as session:
        assert [s.job_id for s in settle_jobs(session, [done_before])] == [done_before]

    with sessions.begin() as session:
        settled = settle_jobs(session, [a, b, c, running, done_before, a])

    assert {s.job_id: s.cost_micro_usd for s in settled} == {a: 6_000, b: 2_000, c: 0}
    assert all(s.released_micro_usd == HOLD for s in settled)
    with sessions() as session:
        wallets = {w.account_id: w for w in session.scalars(select(Wallet))}
        assert wallets[first.id].balance_micro_usd == 1_000_000 - 8_000
        assert wallets[first.id].held_micro_usd == 0
        # The earlier settlement charged 1,000; the running job's hold stays.
        assert wallets[second.id].balance_micro_usd == 1_000_000 - 1_000
        assert wallets[second.id].held_micro_usd == HOLD
        charges = session.scalars(
            select(LedgerEntry.idempotency_key).where(LedgerEntry.kind == "charge")
        ).all()
        assert sorted(charges) == sorted(f"charge:{j}" for j in (a, b, done_before))
        releases = session.scalar(
            select(func.count()).where(LedgerEntry.kind == "release", LedgerEntry.job_id == a)
        )
        assert releases == 1
        assert session.get(Job, running).settled_at is None
        assert session.get(Job, a).cost_micro_usd == 6_000
        assert session.get(Job, b).cost_micro_usd == 2_000
        assert session.get(Job, c).cost_micro_usd == 0
        charge = session.scalars(
            select(LedgerEntry).where(LedgerEntry.idempotency_key == f"charge:{a}")
        ).one()
        assert charge.wallet_id == first_wallet.id
        assert charge.job_id == a
        assert charge.amount_micro_usd == -6_000
        assert charge.held_delta_micro_usd == 0
        assert charge.created_at == session.get(Job, a).settled_at
        release = session.scalars(
            select(LedgerEntry).where(LedgerEntry.idempotency_key == f"release:{c}")
        ).one()
        assert release.wallet_id == second_wallet.id
        assert release.amount_micro_usd == 0
        assert release.held_delta_micro_usd == -HOLD
        for wallet in (first_wallet, second_wallet):
            assert check_wallet(session, wallet.id).ok

    with sessions.begin() as session:
        assert settle_jobs(session, [a, b, c]) == []


def test_group_commit_batches_waiting_callers() -> None:
    release_first = threading.Event()
    batches: list[list[int]] = []

    def write(items: list[int]) -> list[int]:
        batches.append(items)
        if len(batches) == 1:
            assert release_first.wait(10)
        return [item * 10 for item in items]

    group: GroupCommit[int, int] = GroupCommit(write, max_items=4)
    results: dict[int, int] = {}

    def call(item: int) -> None:
        results[item] = group.submit(item)

    first = threading.Thread(target=call, args=(0,))
    first.start()
    _wait_until(lambda: len(batches) == 1)
    others = [threading.Thread(target=call, args=(n,)) for n in range(1, 7)]
    for thread in others:
        thread.start()
    _wait_until(lambda: len(group._pending) == 6)
    release_first.set()
    for thread in [first, *others]:
        thread.join(10)

    assert results == {n: n * 10 for n in range(7)}
    assert batches[0] == [0]
    # The six callers that arrived during the first write share two batches of at most 4.
    assert sorted(len(batch) for batch in batches[1:]) == [2, 4]


def test_group_commit_linger_gathers_items() -> None:
    batches: list[list[int]] = []

    def write(items: list[int]) -> list[int]:
        batches.append(list(items))
        return items

    # An hour's linger: the first item is written only once the second fills the batch.
    group: GroupCommit[int, int] = GroupCommit(write, max_items=2, linger_s=3600.0)
    callers = [threading.Thread(target=group.submit, args=(n,)) for n in range(2)]
    callers[0].start()
    _wait_until(lambda: len(group._pending) == 1)
    callers[1].start()
    for thread in callers:
        thread.join(10)
        assert not thread.is_alive()
    assert batches == [[0, 1]]

    # A full batch is written at once.
    caller = threading.Thread(target=group.submit_all, args=([2, 3],))
    caller.start()
    caller.join(10)
    assert not caller.is_alive()
    assert batches[-1] == [2, 3]

    # A short batch is written when the linger ends.
    short: GroupCommit[int, int] = GroupCommit(write, max_items=2, linger_s=0.05)
    assert short.submit(4) == 4
    assert batches[-1] == [4]


def test_group_commit_isolates_item_errors() -> None:
    def write(items: list[int]) -> list[int | BaseException]:
        return [ValueError(f"bad {item}") if item == 2 else item for item in items]

    group: GroupCommit[int, int] = GroupCommit(write)
    assert group.submit(1) == 1
    with pytest.raises(ValueError, match="bad 2"):
        group.submit(2)
    first, second, third = group.submit_all([1, 2, 3])
    assert first == 1
    assert isinstance(second, ValueError)
    assert third == 3

    def broken(items: list[int]) -> list[int]:
        raise RuntimeError("database gone")

    with pytest.raises(RuntimeError, match="database gone"):
        GroupCommit(broken).submit(3)


def _wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)
