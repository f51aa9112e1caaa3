"""Ledger invariants over random sequences of wallet operations, on a real database.

Each step calls the code the broker runs (the API's hold-and-job transaction, the
billing worker's settlement, top-ups, refunds, adjustments); after each step the
wallet must equal the sum of its ledger entries and never promise more than it has.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import func, select, update

from broker.accounts import create_account
from broker.db import async_session_factory, make_async_engine, make_engine, session_factory
from broker.errors import InsufficientFunds
from broker.ids import new_id
from broker.jobstore import create_job
from broker.ledger import LedgerError, check_wallet, credit, refund_job, settle_job
from broker.tables import Job, LedgerEntry, utcnow

AMOUNTS = st.integers(min_value=1, max_value=5_000)


def ledger_machine(database_url: str) -> type[RuleBasedStateMachine]:
    sync_engine = make_engine(database_url, pool_size=1)
    sessions = session_factory(sync_engine)

    class LedgerMachine(RuleBasedStateMachine):
        held_jobs = Bundle("held_jobs")
        settled_jobs = Bundle("settled_jobs")

        def __init__(self) -> None:
            super().__init__()
            with sessions.begin() as session:
                account, wallet = create_account(session, "property")
            self.account_id, self.wallet_id = account.id, wallet.id
            self.loop = asyncio.new_event_loop()
            self.async_engine = make_async_engine(database_url, pool_size=1)
            self.async_sessions = async_session_factory(self.async_engine)

        def teardown(self) -> None:
            self.loop.run_until_complete(self.async_engine.dispose())
            self.loop.close()

        @rule(amount=AMOUNTS)
        def top_up(self, amount: int) -> None:
            with sessions.begin() as session:
                credit(session, self.account_id, amount, kind="topup")

        @rule(amount=st.integers(min_value=-3_000, max_value=3_000).filter(bool))
        def adjust(self, amount: int) -> None:
            try:
                with sessions.begin() as session:
                    credit(session, self.account_id, amount, kind="adjustment", note="test")
            except LedgerError:
                pass  # a debit larger than the available balance is refused

        @rule(target=held_jobs, hold=AMOUNTS)
        def hold(self, hold: int) -> str | None:
            job_id = new_id("job")
            now = utcnow()
            values = {
                "id": job_id,
                "account_id": self.account_id,
                "api_key_id": None,
                "endpoint": "/v1/chat/completions",
                "model": "m",
                "provider": "p",
                "region": "us",
                "lane": "interactive",
                "status": "queued",
                "request": {},
                "route": [],
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "input_price_micro_usd": 1_000_000,
                "output_price_micro_usd": 2_000_000,
                "hold_micro_usd": hold,
                "created_at": now,
                "deadline_at": now + timedelta(minutes=5),
            }
            try:
                self.loop.run_until_complete(
                    create_job(
                        self.async_sessions, wallet_id=self.wallet_id, hold=hold, values=values
                    )
                )
            except InsufficientFunds:
                return None
            return job_id

        @rule(
            target=settled_jobs,
            job_id=consumes(held_jobs),
            prompt=st.integers(0, 3_000),
            completion=st.integers(0, 3_000),
            succeeded=st.booleans(),
        )
        def finish_and_settle(
            self, job_id: str | None, prompt: int, completion: int, succeeded: bool
        ) -> str | None:
            if job_id is None:
                return None
            with sessions.begin() as session:
                session.execute(
                    update(Job)
                    .where(Job.id == job_id)
                    .values(
                        status="succeeded" if succeeded else "failed",
                        finished_at=utcnow(),
                        prompt_tokens=prompt if succeeded else 0,
                        completion_tokens=completion if succeeded else 0,
                    )
                )
            with sessions.begin() as session:
                assert settle_job(session, job_id) is not None
            return job_id

        @rule(job_id=settled_jobs)
        def settle_again(self, job_id: str | None) -> None:
            if job_id is None:
                return
            with sessions.begin() as session:
                before = session.scalar(select(func.count()).select_from(LedgerEntry))
                assert settle_job(session, job_id) is None
                assert session.scalar(select(func.count()).select_from(LedgerEntry)) == before

        @rule(job_id=settled_jobs, share=st.integers(1, 100))
        def refund(self, job_id: str | None, share: int) -> None:
            if job_id is None:
                return
            try:
                with sessions.begin() as session:
                    cost = session.get(Job, job_id).cost_micro_usd
                    refund_job(session, job_id, max(1, cost * share // 100))
            except LedgerError:
                pass  # nothing (or not that much) left to refund

        @rule()
        def crash_during_settlement(self) -> None:
            """A settlement that dies before commit leaves no trace."""
            with sessions() as session:
                job_id = session.scalar(
                    select(Job.id)
                    .where(Job.account_id == self.account_id, Job.settled_at.is_(None))
                    .limit(1)
                )
            if job_id is None:
                return
            with sessions() as session:
                session.begin()
                session.execute(
                    update(Job)
                    .where(Job.id == job_id)
                    .values(status="succeeded", finished_at=utcnow())
                )
                settle_job(session, job_id)
                session.rollback()

        @invariant()
        def wallet_matches_ledger(self) -> None:
            with sessions() as session:
                check = check_wallet(session, self.wallet_id)
                refunds = session.scalar(
                    select(func.coalesce(func.sum(LedgerEntry.amount_micro_usd), 0)).where(
                        LedgerEntry.wallet_id == self.wallet_id, LedgerEntry.kind == "refund"
                    )
                )
                charges = -session.scalar(
                    select(func.coalesce(func.sum(LedgerEntry.amount_micro_usd), 0)).where(
                        LedgerEntry.wallet_id == self.wallet_id, LedgerEntry.kind == "charge"
                    )
                )
                holds_open = session.scalar(
                    select(func.coalesce(func.sum(Job.hold_micro_usd), 0)).where(
                        Job.account_id == self.account_id, Job.settled_at.is_(None)
                    )
                )
            assert check.ok
            assert check.held_micro_usd == holds_open
            assert check.held_micro_usd >= 0
            assert check.balance_micro_usd - check.held_micro_usd >= 0
            assert refunds <= charges

    return LedgerMachine


def test_ledger_invariants_hold(migrated_database: str) -> None:
    machine = ledger_machine(migrated_database)
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=15,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
