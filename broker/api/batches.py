"""The Batch API (OpenAI-compatible): create, retrieve, list and cancel batches.

Creating a batch only records it; the ``batches`` worker validates the input file and
creates its jobs (``workers.batches``). A batch may also name a ``webhook_url``, in the
body or as ``metadata.webhook_url``, which gets its final event.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Query, Request
from kombu.exceptions import KombuError
from redis.exceptions import RedisError
from sqlalchemy import insert, select

from broker.api.files import owned_file
from broker.api.pages import page_body, paginate
from broker.api.services import Caller, services
from broker.api.webhooks import checked_webhook_url, require_signing_endpoint
from broker.batches import (
    COMPLETION_WINDOWS,
    ENDPOINTS,
    PROCESS_BATCH_TASK,
    STOP_BATCH_TASK,
    batch_object,
    send_batch_task,
    transition,
)
from broker.chat_request import parse_json_body
from broker.errors import Conflict, InvalidRequest, NotFound, ServiceUnavailable
from broker.ids import new_id
from broker.jsonresponse import ORJSONResponse
from broker.tables import Batch, utcnow

router = APIRouter()

MAX_PAGE = 100
# OpenAI's metadata limits: 16 pairs, keys up to 64 characters, values up to 512.
MAX_METADATA_KEYS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512


def check_metadata(metadata: Any, param: str = "metadata") -> dict[str, str] | None:
    """Return valid OpenAI metadata (string keys and values, within the limits), or 400."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise InvalidRequest(f"'{param}' must be an object of strings.", param=param)
    if len(metadata) > MAX_METADATA_KEYS:
        raise InvalidRequest(
            f"'{param}' has {len(metadata)} keys; the limit is {MAX_METADATA_KEYS}.", param=param
        )
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY_CHARS:
            raise InvalidRequest(
                f"The {param} key '{key[:20]}...' is longer than {MAX_METADATA_KEY_CHARS} "
                "characters.",
                param=f"{param}.{key[:MAX_METADATA_KEY_CHARS]}",
            )
        if not isinstance(value, str) or len(value) > MAX_METADATA_VALUE_CHARS:
            raise InvalidRequest(
                f"'{param}.{key}' must be a string of at most {MAX_METADATA_VALUE_CHARS} "
                "characters.",
                param=f"{param}.{key}",
            )
    return metadata


async def _owned_batch(request: Request, caller: Caller, batch_id: str) -> Batch:
    async with services(request).sessions() as session:
        row = await session.get(Batch, batch_id)
    if row is None or row.account_id != caller.account_id:
        raise NotFound(f"No such batch: {batch_id}", param="batch_id")
    return row


@router.post("/v1/batches")
async def create_batch(request: Request, caller: Caller) -> ORJSONResponse:
    body = parse_json_body(await request.body())
    endpoint = body.get("endpoint")
    if endpoint not in ENDPOINTS:
        raise InvalidRequest(
            f"Invalid endpoint {endpoint!r}; batches support {', '.join(ENDPOINTS)}.",
            param="endpoint",
        )
    window = body.get("completion_window")
    if window not in COMPLETION_WINDOWS:
        raise InvalidRequest(
            f"Invalid completion_window {window!r}; supported: {', '.join(COMPLETION_WINDOWS)}.",
            param="completion_window",
        )
    metadata = check_metadata(body.get("metadata"))
    webhook_url, param = body.get("webhook_url"), "webhook_url"
    if webhook_url is None and metadata and "webhook_url" in metadata:
        webhook_url, param = metadata["webhook_url"], "metadata.webhook_url"
    if webhook_url is not None:
        webhook_url = await checked_webhook_url(request, webhook_url, param)
        await require_signing_endpoint(request, caller, param)
    file_id = body.get("input_file_id")
    if not isinstance(file_id, str) or not file_id:
        raise InvalidRequest(
            "Missing required parameter: 'input_file_id'.",
            param="input_file_id",
            code="missing_required_parameter",
        )
    stored = await owned_file(request, caller, file_id)
    if stored.purpose != "batch":
        raise InvalidRequest(
            f"File {file_id} has purpose '{stored.purpose}'; a batch input file must be "
            "uploaded with purpose 'batch'.",
            param="input_file_id",
        )

    now = utcnow()
    values = {
        "id": new_id("batch"),
        "account_id": caller.account_id,
        "api_key_id": caller.api_key_id,
        "endpoint": endpoint,
        "input_file_id": file_id,
        "completion_window": window,
        "status": "validating",
        "total": 0,
        "completed": 0,
        "failed": 0,
        "batch_metadata": metadata,
        "webhook_url": webhook_url,
        "created_at": now,
        "expires_at": now + timedelta(seconds=COMPLETION_WINDOWS[window]),
    }
    state = services(request)
    async with state.sessions.begin() as session:
        await session.execute(insert(Batch).values(**values))
    try:
        send_batch_task(state.celery, PROCESS_BATCH_TASK, values["id"])
    except (KombuError, RedisError, OSError) as exc:
        async with state.sessions.begin() as session:
            errors = {
                "object": "list",
                "data": [
                    {
                        "code": "queue_unavailable",
                        "line": None,
                        "param": None,
                        "message": "The batch could not be queued.",
                    }
                ],
            }
            await session.run_sync(
                lambda sync: transition(sync, values["id"], "failed", errors=errors)
            )
        raise ServiceUnavailable(
            "The job queue (Redis) is unreachable, so the batch was not started. "
            "Create it again later."
        ) from exc
    return ORJSONResponse(batch_object(Batch(**values)))


@router.get("/v1/batches/{batch_id}")
async def retrieve_batch(request: Request, caller: Caller, batch_id: str) -> ORJSONResponse:
    return ORJSONResponse(batch_object(await _owned_batch(request, caller, batch_id)))


@router.get("/v1/batches")
async def list_batches(
    request: Request,
    caller: Caller,
    after: str | None = Query(None),
    limit: int = Query(20, ge=1, le=MAX_PAGE),
) -> ORJSONResponse:
    query = select(Batch).where(Batch.account_id == caller.account_id)
    async with services(request).sessions() as session:
        rows = (await session.scalars(paginate(query, Batch.id, after, limit))).all()
    return ORJSONResponse(page_body(rows, limit, batch_object))


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(request: Request, caller: Caller, batch_id: str) -> ORJSONResponse:
    """Start cancelling a batch. Jobs that have not run are cancelled and their holds
    released. Running ones finish and are charged, and the batch ends cancelled with a
    partial output file."""
    batch = await _owned_batch(request, caller, batch_id)
    state = services(request)
    if batch.status == "cancelling":
        return ORJSONResponse(batch_object(batch))
    async with state.sessions.begin() as session:
        changed = await session.run_sync(lambda sync: transition(sync, batch_id, "cancelling"))
    if not changed:
        raise Conflict(
            f"Batch {batch_id} is {batch.status}, so it cannot be cancelled.", param="batch_id"
        )
    send_batch_task(state.celery, STOP_BATCH_TASK, batch_id, "cancelled")
    return ORJSONResponse(batch_object(await _owned_batch(request, caller, batch_id)))
