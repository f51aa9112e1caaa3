"""Intake: turn a validated request into a held, durable, published job.

The hold on the wallet and the job row are written in one transaction, so a job
exists exactly when its worst-case cost is reserved. The task is published after the
commit; if publishing fails the job is failed and its hold released at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, NamedTuple

import redis.asyncio as aioredis
from celery import Celery
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.catalog import Catalog, Model
from broker.chat_request import ChatCompletionRequest
from broker.circuits import unavailable_targets
from broker.errors import (
    Conflict,
    GatewayTimeout,
    InvalidRequest,
    PermissionDenied,
    ServiceUnavailable,
)
from broker.grouped_intake import JobGroupCommit
from broker.ids import new_id
from broker.jobstore import (
    DuplicateIdempotencyKey,
    abandon_job,
    final_reply,
    find_by_idempotency_key,
    read_final_reply,
)
from broker.pricing import hold_micro_usd, token_cost_micro_usd
from broker.replies import ReplyListener
from broker.router import (
    Target,
    apply_parameter_policy,
    check_output_limit,
    plan_route,
    resolve_model,
)
from broker.tables import utcnow
from workers.app import encode_job_messages
from workers.markers import queued_key

logger = logging.getLogger(__name__)

# Seconds between reads of the job row while waiting, in case a reply was lost.
REPLY_FALLBACK_CHECK_S = 5.0
# Seconds between reads of the job row while waiting on another request's job.
IDEMPOTENT_POLL_S = 0.2
# Seconds the queued marker outlives a job's deadline.
MARKER_MARGIN_S = 300
# Seconds an availability read serves later requests for the same route. A circuit that
# opens meanwhile is caught by the worker, because it reads the circuit before each call
# and fails the job over. A region whose workers stop is noticed only once their
# heartbeats lapse (15 s) in any case.
AVAILABILITY_MAX_AGE_S = 0.25
# Routes whose last availability read is stored. Past this many the stored reads are
# dropped, because a request may name any list of fallback models.
AVAILABILITY_ROUTES_KEPT = 1024

CHAT_ENDPOINT = "/v1/chat/completions"
EMBEDDINGS_ENDPOINT = "/v1/embeddings"


class JobMessage(NamedTuple):
    """The id, queue and task spec of a job to publish."""

    job_id: str
    queue: str
    spec: dict[str, Any]


@dataclass(frozen=True)
class Principal:
    """The caller: its account, API key, paying wallet and the key's limits."""

    account_id: str
    api_key_id: str
    wallet_id: str
    expires_at_s: float | None = None
    monthly_limit_micro_usd: int | None = None
    allowed_models: tuple[str, ...] | None = None
    region_pin: str | None = None
    # Account's price multiplier in parts per million (1_000_000: catalog prices).
    price_multiplier_ppm: int = 1_000_000


@dataclass
class Submission:
    """A checked request, ready to become a job."""

    endpoint: str
    plan: list[Target]
    body: dict[str, Any]
    hold: int
    stream: bool = False
    idempotency_key: str | None = None
    start: int = field(default=0)
    # Asynchronous jobs (``submit_async``): no request waits for the reply, and
    # ``job_fields`` adds columns such as ``webhook_url`` and ``job_metadata``.
    detached: bool = False
    job_fields: dict[str, Any] = field(default_factory=dict)
    # The row of the job this submission created, once created: Job attribute names
    # and the values inserted.
    created: dict[str, Any] | None = None

    @property
    def target(self) -> Target:
        return self.plan[self.start]


class Intake:
    """Creates jobs and waits for their outcome; one instance per API process."""

    def __init__(
        self,
        catalog: Catalog,
        sessions: async_sessionmaker[AsyncSession],
        celery: Celery,
        replies: ReplyListener,
        redis: aioredis.Redis,
        wait_timeout_s: float,
        job_timeout_s: float,
    ) -> None:
        self.catalog = catalog
        self.sessions = sessions
        self.celery = celery
        self.replies = replies
        self.redis = redis
        self.wait_timeout_s = wait_timeout_s
        self.job_timeout_s = job_timeout_s
        # Concurrent requests share the transaction that reserves their worst-case cost
        # and inserts their job, and the round trip that publishes their messages.
        self.jobs = JobGroupCommit(sessions, publish=self._publish_messages)
        # Availability reads in flight, and the last one of each route plan and lane,
        # with the time it ended (see _unavailable).
        self._availability: dict[tuple[Any, ...], asyncio.Future[set[tuple[str, str]]]] = {}
        self._availability_read: dict[tuple[Any, ...], tuple[float, set[tuple[str, str]]]] = {}

    def prepare_chat(
        self, body: dict[str, Any], request: ChatCompletionRequest, principal: Principal
    ) -> Submission:
        """Check a chat request against its model and the key, and price its worst case."""
        model = resolve_model(self.catalog, request.model)
        check_output_limit(model, body)
        body = apply_key_policy(principal, apply_parameter_policy(model, body))
        plan = self._plan(model, body, principal)
        # The hold covers the dearest target, because any of them may serve the job.
        hold = max(
            hold_micro_usd(body, t.input_price, t.output_price, t.model.max_output_tokens)
            for t in plan
        )
        return Submission(CHAT_ENDPOINT, plan, body, hold, stream=bool(request.stream))

    def prepare_embeddings(self, body: dict[str, Any], principal: Principal) -> Submission:
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
        if body.get("stream"):
            raise InvalidRequest(
                "Embeddings cannot be streamed; send the request without 'stream'.", param="stream"
            )
        model = resolve_model(self.catalog, model_id, category="embedding")
        body = apply_key_policy(principal, body)
        plan = self._plan(model, body, principal)
        tokens = sum(len(text.encode("utf-8")) for text in texts)
        hold = max(token_cost_micro_usd(tokens, 0, t.input_price, 0) for t in plan)
        return Submission(EMBEDDINGS_ENDPOINT, plan, body, hold)

    def _plan(self, model: Model, body: dict[str, Any], principal: Principal) -> list[Target]:
        plan = plan_route(self.catalog, model, body, price_ppm=principal.price_multiplier_ppm)
        if principal.allowed_models is not None:
            plan = [t for t in plan if t.model.id in principal.allowed_models]
            if not plan:
                raise PermissionDenied(
                    f"This API key may not use the model '{model.id}'.",
                    param="model",
                    code="model_not_allowed",
                )
        return plan

    async def run(self, principal: Principal, submission: Submission) -> dict[str, Any]:
        """Run a job and return the worker's final reply message."""
        job_id = new_id("job")
        future = self.replies.expect(job_id)
        try:
            if not await self._submit(principal, job_id, submission):
                return await self._replay(principal, submission)
            return await self._wait(job_id, future)
        finally:
            self.replies.forget(job_id)

    async def submit_async(self, principal: Principal, submission: Submission) -> str:
        """Create and publish a job that no request waits for; returns its id.

        A repeated Idempotency-Key returns the id of the job that first used it, unless
        that job had a different request (409).
        """
        submission.detached = True
        job_id = new_id("job")
        if await self._submit(principal, job_id, submission):
            return job_id
        key = submission.idempotency_key
        job = await find_by_idempotency_key(self.sessions, principal.account_id, key or "")
        if job is None:
            raise Conflict("The request with this Idempotency-Key could not be found.")
        if job.request != submission.body or job.endpoint != submission.endpoint:
            raise Conflict(
                "This Idempotency-Key was already used with a different "
                "request body. Use a new key for a new request.",
                param="Idempotency-Key",
            )
        return job.id

    async def stream(
        self, principal: Principal, submission: Submission
    ) -> tuple[str, AsyncIterator[dict[str, Any]]]:
        """Start a streamed job; returns its id and its chunk messages, then the final one.

        Leaving the iterator early (a client that went away) sets the job's cancel key, so
        the worker stops the upstream call.
        """
        job_id = new_id("job")
        queue = self.replies.expect_stream(job_id)
        try:
            if not await self._submit(principal, job_id, submission):
                raise Conflict(
                    "A request with this Idempotency-Key was already made; a "
                    "stream cannot be replayed. Fetch the job's result instead.",
                    param="Idempotency-Key",
                )
        except BaseException:
            self.replies.forget(job_id)
            raise
        return job_id, self._relay(job_id, queue)

    async def _submit(self, principal: Principal, job_id: str, submission: Submission) -> bool:
        """Create and publish the job; returns False if the Idempotency-Key already ran."""
        if submission.idempotency_key and await find_by_idempotency_key(
            self.sessions, principal.account_id, submission.idempotency_key
        ):
            return False
        submission.start = await self._choose_start(submission.plan)
        now = utcnow()
        deadline = now + timedelta(seconds=self.job_timeout_s)
        spec = self._task_spec(job_id, submission, deadline.timestamp())
        target = submission.target
        values = {
            "id": job_id,
            "account_id": principal.account_id,
            "api_key_id": principal.api_key_id,
            "endpoint": submission.endpoint,
            "model": target.model.id,
            "provider": target.model.provider,
            "region": target.region,
            "lane": target.lane,
            "status": "queued",
            "request": submission.body,
            "reply_to": None if submission.detached else self.replies.channel,
            "idempotency_key": submission.idempotency_key,
            "route": [t.to_spec() for t in submission.plan],
            "dispatch": spec,
            "dispatched_at": now,
            "dispatch_count": 1,
            "deadline_at": deadline,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "input_price_micro_usd": target.input_price,
            "output_price_micro_usd": target.output_price,
            "cached_input_price_micro_usd": target.cached_input_price,
            "hold_micro_usd": submission.hold,
            "created_at": now,
            **submission.job_fields,
        }
        message = JobMessage(job_id, target.queue, spec)
        try:
            published = await self.jobs.create_job(
                wallet_id=principal.wallet_id,
                hold=submission.hold,
                values=values,
                monthly_limit=principal.monthly_limit_micro_usd,
                message=message,
            )
        except DuplicateIdempotencyKey:
            return False
        submission.created = values
        if published:
            return True
        try:
            await self._publish_messages([message])
        except (RedisError, OSError) as exc:
            logger.warning("could not publish job %s: %s: %s", job_id, type(exc).__name__, exc)
            error = ServiceUnavailable(
                "The job queue (Redis) is unreachable, so the request "
                "was not run and nothing was charged. Resend it later."
            )
            await abandon_job(
                self.sessions, job_id, principal.wallet_id, submission.hold, error.to_job_error()
            )
            raise error from exc
        return True

    async def _choose_start(self, plan: list[Target]) -> int:
        """Return the first target whose circuit is closed and whose region has workers."""
        try:
            unavailable = await self._unavailable(
                tuple(t.key for t in plan), plan[0].lane if plan else "interactive"
            )
        except RedisError:
            return 0
        for index, target in enumerate(plan):
            if target.key not in unavailable:
                return index
        # No target can run it now, so queue it on the primary. A worker that comes back
        # picks it up, or the sweeper moves or expires it.
        return 0

    async def _unavailable(
        self, keys: tuple[tuple[str, str], ...], lane: str
    ) -> set[tuple[str, str]]:
        """Read which targets are unavailable, sharing a recent read or one in flight.

        A read serves the requests for the same route for AVAILABILITY_MAX_AGE_S after
        it ended, and requests that arrive while an MGET is on its way wait for that
        one instead of sending their own. So the result is at most that age plus a
        round trip older than the request, and a single request at a time does not
        wait for Redis before its job is created.
        """
        lookup = (keys, lane)
        recent = self._availability_read.get(lookup)
        if recent is not None and time.monotonic() - recent[0] < AVAILABILITY_MAX_AGE_S:
            return recent[1]
        pending = self._availability.get(lookup)
        if pending is None:
            pending = asyncio.ensure_future(unavailable_targets(self.redis, list(keys), lane))
            self._availability[lookup] = pending
            pending.add_done_callback(lambda done: self._read_done(lookup, done))
        # Shielded: a request that goes away must not cancel the others' read.
        return await asyncio.shield(pending)

    def _read_done(self, lookup: tuple[Any, ...], done: asyncio.Future[Any]) -> None:
        self._availability.pop(lookup, None)
        if done.cancelled():
            return
        # Also marks the error retrieved when every waiting request went away.
        if done.exception() is not None:
            return
        if len(self._availability_read) >= AVAILABILITY_ROUTES_KEPT:
            self._availability_read.clear()
        self._availability_read[lookup] = (time.monotonic(), done.result())

    def _task_spec(self, job_id: str, submission: Submission, deadline: float) -> dict[str, Any]:
        return {
            "job_id": job_id,
            "endpoint": submission.endpoint,
            "body": submission.body,
            "reply_to": None if submission.detached else self.replies.channel,
            "deadline": deadline,
            "route_index": submission.start,
            "attempt_offset": 0,
            "route": [t.to_spec() for t in submission.plan],
            **submission.target.to_spec(),
        }

    async def _publish_messages(self, messages: list[JobMessage]) -> None:
        """Mark the jobs as queued and push their task messages, in one round trip.

        Jobs of the same queue share a message (``encode_job_messages``). The messages
        are the ones Celery's ``send_task`` would write, pushed on this process's asyncio
        client, because Celery's producer blocks the event loop. MULTI/EXEC applies the
        markers and the pushes together or not at all. Raises RedisError when Redis
        cannot be reached after the client's retries.
        """
        marker_s = int(self.job_timeout_s + MARKER_MARGIN_S)
        payloads = encode_job_messages(self.celery, [(m.queue, m.spec) for m in messages])
        async with self.redis.pipeline(transaction=True) as pipe:
            for message in messages:
                pipe.set(queued_key(message.job_id), b"1", ex=marker_s)
            for payload in payloads:
                pipe.lpush(payload.key, payload.payload)
            await pipe.execute()

    async def _replay(self, principal: Principal, submission: Submission) -> dict[str, Any]:
        """Return the outcome of the job that first used this Idempotency-Key."""
        key = submission.idempotency_key
        assert key is not None
        deadline = time.monotonic() + self.wait_timeout_s
        while True:
            job = await find_by_idempotency_key(self.sessions, principal.account_id, key)
            if job is None:
                raise Conflict("The request with this Idempotency-Key could not be found.")
            if job.request != submission.body or job.endpoint != submission.endpoint:
                raise Conflict(
                    "This Idempotency-Key was already used with a different "
                    "request body. Use a new key for a new request.",
                    param="Idempotency-Key",
                )
            reply = final_reply(job)
            if reply is not None:
                return reply
            if time.monotonic() > deadline:
                raise GatewayTimeout(self._timeout_text(job.id))
            await asyncio.sleep(IDEMPOTENT_POLL_S)

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
                stored = await self._stored_reply(job_id)
                if stored is not None:
                    return stored

    async def _stored_reply(self, job_id: str) -> dict[str, Any] | None:
        """Read the job's final reply from its row; None while it runs or the read fails.

        The job exists, so a database error here must not fail the request as if the
        job never ran. The request keeps waiting for the reply until its deadline.
        """
        try:
            return await read_final_reply(self.sessions, job_id)
        except SQLAlchemyError as exc:
            logger.warning(
                "reading job %s failed while waiting for its reply: %s", job_id, type(exc).__name__
            )
            return None

    async def _relay(
        self, job_id: str, queue: asyncio.Queue[dict[str, Any]]
    ) -> AsyncIterator[dict[str, Any]]:
        finished = False
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.wait_timeout_s
            while not finished:
                try:
                    message = await asyncio.wait_for(queue.get(), REPLY_FALLBACK_CHECK_S)
                except TimeoutError:
                    stored = await self._stored_reply(job_id)
                    if stored is None and loop.time() < deadline:
                        continue
                    message = stored or self._timeout_message(job_id)
                finished = message.get("type") != "chunk"
                yield message
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


def apply_key_policy(principal: Principal, body: dict[str, Any]) -> dict[str, Any]:
    """Apply the key's region pin: the request may not ask for any other region."""
    pin = principal.region_pin
    if pin is None:
        return body
    for param in ("region_pin", "region"):
        asked = body.get(param)
        if asked is not None and asked != pin:
            raise PermissionDenied(
                f"This API key is pinned to region '{pin}'; '{param}' cannot be '{asked}'.",
                param=param,
                code="region_pinned",
            )
    return {**body, "region_pin": pin}
