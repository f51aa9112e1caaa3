"""Intake: turn a validated request into a held, durable, published job.

The hold on the wallet and the job row are written in one transaction, so a job
exists exactly when its worst-case cost is reserved. The task is published after the
commit; if publishing fails the job is failed and its hold released at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from celery import Celery
from kombu.exceptions import KombuError
from redis.exceptions import RedisError
from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.catalog import Catalog
from broker.chat_request import ChatCompletionRequest
from broker.errors import GatewayTimeout, InsufficientFunds, InvalidRequest, ServiceUnavailable
from broker.ids import new_id
from broker.pricing import hold_micro_usd, token_cost_micro_usd
from broker.replies import ReplyListener
from broker.router import (
    Target,
    apply_parameter_policy,
    check_output_limit,
    plan_route,
    resolve_model,
)
from broker.tables import Job, LedgerEntry, Wallet, utcnow
from workers.app import RUN_JOB_TASK

logger = logging.getLogger(__name__)

# Seconds between reads of the job row while waiting, in case a reply was lost.
REPLY_FALLBACK_CHECK_S = 5.0


@dataclass(frozen=True)
class Principal:
    """Who is calling: the account, the key and the wallet that pays."""

    account_id: str
    api_key_id: str
    wallet_id: str


CHAT_ENDPOINT = "/v1/chat/completions"
EMBEDDINGS_ENDPOINT = "/v1/embeddings"


@dataclass(frozen=True)
class Submission:
    """A checked request, ready to become a job."""

    endpoint: str
    target: Target
    body: dict[str, Any]
    hold: int
    stream: bool = False


def format_usd(micro_usd: int) -> str:
    return f"${micro_usd / 1_000_000:,.6f}"


class Intake:
    """Creates jobs and waits for their outcome; one instance per API process."""

    def __init__(
        self,
        catalog: Catalog,
        sessions: async_sessionmaker[AsyncSession],
        celery: Celery,
        replies: ReplyListener,
        wait_timeout_s: float,
    ) -> None:
        self.catalog = catalog
        self.sessions = sessions
        self.celery = celery
        self.replies = replies
        self.wait_timeout_s = wait_timeout_s

    def prepare_chat(self, body: dict[str, Any], request: ChatCompletionRequest) -> Submission:
        """Check a chat request against its model and price its worst case."""
        model = resolve_model(self.catalog, request.model)
        check_output_limit(model, body)
        body = apply_parameter_policy(model, body)
        hold = hold_micro_usd(
            body,
            model.pricing.input_per_mtok,
            model.pricing.output_per_mtok,
            model.max_output_tokens,
        )
        return Submission(
            CHAT_ENDPOINT,
            plan_route(model, request.region),
            body,
            hold,
            stream=bool(request.stream),
        )

    def prepare_embeddings(self, body: dict[str, Any]) -> Submission:
        """Check an embeddings request and price it: input tokens only."""
        model_id = body.get("model")
        if not isinstance(model_id, str) or not model_id:
            raise InvalidRequest("Missing required parameter: 'model'.", param="model")
        texts = body.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if (
            not isinstance(texts, list)
            or not texts
            or not all(isinstance(text, str) and text for text in texts)
        ):
            raise InvalidRequest(
                "'input' must be a non-empty string or a list of non-empty strings.", param="input"
            )
        model = resolve_model(self.catalog, model_id, category="embedding")
        region = body.get("region")
        tokens = sum(len(text.encode("utf-8")) for text in texts)
        hold = token_cost_micro_usd(tokens, 0, model.pricing.input_per_mtok, 0)
        return Submission(EMBEDDINGS_ENDPOINT, plan_route(model, region), body, hold)

    async def run(self, principal: Principal, submission: Submission) -> dict[str, Any]:
        """Run a job and return the worker's final reply message."""
        job_id = new_id("job")
        future = self.replies.expect(job_id)
        try:
            await self._submit(principal, job_id, submission)
            return await self._wait(job_id, future)
        finally:
            self.replies.forget(job_id)

    async def stream(
        self, principal: Principal, submission: Submission
    ) -> tuple[str, AsyncIterator[dict[str, Any]]]:
        """Start a streamed job; returns its id and its chunk messages, then the final one.

        Leaving the iterator early (a client that went away) asks the worker to cancel.
        """
        job_id = new_id("job")
        queue = self.replies.expect_stream(job_id)
        try:
            await self._submit(principal, job_id, submission)
        except BaseException:
            self.replies.forget(job_id)
            raise
        return job_id, self._relay(job_id, queue)

    async def _relay(
        self, job_id: str, queue: asyncio.Queue[dict[str, Any]]
    ) -> AsyncIterator[dict[str, Any]]:
        finished = False
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.wait_timeout_s
            while True:
                try:
                    message = await asyncio.wait_for(queue.get(), REPLY_FALLBACK_CHECK_S)
                except TimeoutError:
                    stored = await self._read_finished(job_id)
                    if stored is None and loop.time() < deadline:
                        continue
                    finished = True
                    yield stored or self._timeout_message(job_id)
                    return
                if message.get("type") != "chunk":
                    finished = True
                yield message
                if finished:
                    return
        finally:
            self.replies.forget(job_id)
            if not finished:
                await self.replies.request_cancel(job_id)

    def _timeout_message(self, job_id: str) -> dict[str, Any]:
        return {
            "job_id": job_id,
            "type": "final",
            "status": "failed",
            "error": GatewayTimeout(self._timeout_text(job_id)).to_job_error(),
        }

    def _timeout_text(self, job_id: str) -> str:
        return (
            f"Job {job_id} did not finish within {self.wait_timeout_s:g} s. It keeps "
            "running; its result is stored with the job."
        )

    async def _submit(self, principal: Principal, job_id: str, submission: Submission) -> None:
        await self._create_job(principal, job_id, submission)
        try:
            self._publish(job_id, submission)
        except (KombuError, RedisError, OSError) as exc:
            await self._abandon(job_id, principal.wallet_id, submission.hold)
            raise ServiceUnavailable(
                "The job queue (Redis) is unreachable, so the request was "
                "not run and nothing was charged. Resend it later."
            ) from exc

    async def _create_job(self, principal: Principal, job_id: str, submission: Submission) -> None:
        target, body, hold = submission.target, submission.body, submission.hold
        now = utcnow()
        pricing = target.model.pricing
        async with self.sessions.begin() as session:
            # The check and the hold are one statement, so concurrent requests cannot
            # together reserve more than the wallet has.
            held = await session.execute(
                update(Wallet)
                .where(
                    Wallet.id == principal.wallet_id,
                    Wallet.balance_micro_usd - Wallet.held_micro_usd >= hold,
                )
                .values(held_micro_usd=Wallet.held_micro_usd + hold, updated_at=now)
            )
            if held.rowcount != 1:
                available = await session.scalar(
                    select(Wallet.balance_micro_usd - Wallet.held_micro_usd).where(
                        Wallet.id == principal.wallet_id
                    )
                )
                raise InsufficientFunds(
                    f"The wallet's available balance ({format_usd(available or 0)}) cannot "
                    f"cover this request's worst-case cost ({format_usd(hold)}). Top up the "
                    "wallet or lower max_tokens."
                )
            await session.execute(
                insert(LedgerEntry).values(
                    wallet_id=principal.wallet_id,
                    kind="hold",
                    amount_micro_usd=0,
                    held_delta_micro_usd=hold,
                    idempotency_key=f"hold:{job_id}",
                    job_id=job_id,
                    note="",
                    created_at=now,
                )
            )
            await session.execute(
                insert(Job).values(
                    id=job_id,
                    account_id=principal.account_id,
                    api_key_id=principal.api_key_id,
                    endpoint=submission.endpoint,
                    model=target.model.id,
                    provider=target.model.provider,
                    region=target.region,
                    lane=target.lane,
                    status="queued",
                    request=body,
                    reply_to=self.replies.channel,
                    prompt_tokens=0,
                    completion_tokens=0,
                    input_price_micro_usd=pricing.input_per_mtok,
                    output_price_micro_usd=pricing.output_per_mtok,
                    hold_micro_usd=hold,
                    created_at=now,
                )
            )

    def _publish(self, job_id: str, submission: Submission) -> None:
        target = submission.target
        model = target.model
        spec = {
            "job_id": job_id,
            "endpoint": submission.endpoint,
            "model": model.id,
            "provider": model.provider,
            "region": target.region,
            "upstream_model": model.upstream_model,
            "wire_format": model.wire_format,
            "body": submission.body,
            "reply_to": self.replies.channel,
            "input_price": model.pricing.input_per_mtok,
            "output_price": model.pricing.output_per_mtok,
        }
        # The prompt travels in the message but is never shown: Flower and the worker
        # logs print ``kwargsrepr`` instead of the arguments.
        self.celery.send_task(
            RUN_JOB_TASK,
            kwargs=spec,
            queue=target.queue,
            kwargsrepr=f"{{job_id: {job_id}, model: {model.id}, region: {target.region}}}",
            retry=False,
        )

    async def _abandon(self, job_id: str, wallet_id: str, hold: int) -> None:
        """Fail a job whose task was never published and give its hold back."""
        now = utcnow()
        async with self.sessions.begin() as session:
            await session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(
                    status="failed",
                    finished_at=now,
                    settled_at=now,
                    cost_micro_usd=0,
                    error={
                        "status": 503,
                        "type": "service_unavailable",
                        "message": "the job queue was unreachable",
                    },
                )
            )
            await session.execute(
                update(Wallet)
                .where(Wallet.id == wallet_id)
                .values(held_micro_usd=Wallet.held_micro_usd - hold, updated_at=now)
            )
            await session.execute(
                insert(LedgerEntry).values(
                    wallet_id=wallet_id,
                    kind="release",
                    amount_micro_usd=0,
                    held_delta_micro_usd=-hold,
                    idempotency_key=f"release:{job_id}",
                    job_id=job_id,
                    note="job not published",
                    created_at=now,
                )
            )

    async def _wait(self, job_id: str, future: asyncio.Future[dict[str, Any]]) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_timeout_s
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise GatewayTimeout(self._timeout_text(job_id))
            try:
                return await asyncio.wait_for(
                    asyncio.shield(future), min(remaining, REPLY_FALLBACK_CHECK_S)
                )
            except TimeoutError:
                stored = await self._read_finished(job_id)
                if stored is not None:
                    return stored

    async def _read_finished(self, job_id: str) -> dict[str, Any] | None:
        """Rebuild the reply from the job row if the job is final (the reply was lost)."""
        async with self.sessions() as session:
            job = await session.get(Job, job_id)
        if job is None or job.status in ("queued", "running"):
            return None
        message: dict[str, Any] = {
            "job_id": job.id,
            "type": "final",
            "status": job.status,
            "provider": job.served_provider,
            "region": job.served_region,
            "model": job.served_model,
            "response": job.response,
            "error": job.error,
        }
        if job.status == "succeeded":
            message["cost_micro_usd"] = token_cost_micro_usd(
                job.prompt_tokens,
                job.completion_tokens,
                job.input_price_micro_usd,
                job.output_price_micro_usd,
            )
        return message
