"""Settling many jobs in one transaction, on a real database, and the group commit."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from broker.accounts import create_account
from broker.db import make_engine, session_factory
from broker.ids import new_id
from broker.ledger import check_wallet, credit, settle_jobs
from broker.tables import Job, LedgerEntry, Wallet, utcnow
from workers.group_commit import GroupCommit

# $2 and $8 per million tokens, in micro-USD per million tokens.
INPUT_PRICE = 2_000_000
OUTPUT_PRICE = 8_000_000
HOLD = 50_000


def _add_job(session: Session, account_id: str, status: str, prompt: int, completion: int) -> str:
    job_id = new_id("job")
    now = utcnow()
    session.add(
        Job(
            id=job_id,
            account_id=account_id,
            endpoint="/v1/chat/completions",
            model="m",
            provider="p",
            region="us",
            lane="interactive",
            status=status,
            request={},
            route=[],
            prompt_tokens=prompt,
            completion_tokens=completion,
            input_price_micro_usd=INPUT_PRICE,
            output_price_micro_usd=OUTPUT_PRICE,
            hold_micro_usd=HOLD,
            created_at=now,
            finished_at=None if status == "running" else now,
            deadline_at=now + timedelta(minutes=5),
        )
    )
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
