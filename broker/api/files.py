"""The Files API (OpenAI-compatible): upload, list, retrieve, download and delete."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse
from sqlalchemy import insert, select, update

from broker.api.pages import page_body, paginate
from broker.api.services import Caller, services
from broker.api.uploads import multipart_boundary, receive_upload
from broker.errors import Conflict, InvalidRequest, NotFound
from broker.filestore import FileStore
from broker.ids import new_id
from broker.jsonresponse import ORJSONResponse
from broker.tables import Batch, StoredFile, as_utc, utcnow

router = APIRouter()

# Purposes a client may upload with; generated files get "batch_output".
UPLOAD_PURPOSES = ("batch", "user_data")
# Batch statuses during which the batch still reads its input file.
READING_STATUSES = ("validating", "in_progress", "cancelling")
MAX_PAGE = 10_000


def file_store(request: Request) -> FileStore:
    return FileStore(services(request).settings.file_store_path)


def file_object(row: StoredFile) -> dict[str, Any]:
    """Render a file row as an OpenAI file object."""
    return {
        "id": row.id,
        "object": "file",
        "bytes": row.bytes,
        "created_at": int(as_utc(row.created_at).timestamp()),
        "filename": row.filename,
        "purpose": row.purpose,
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }


async def owned_file(request: Request, caller: Caller, file_id: str) -> StoredFile:
    """Return the caller's file, or a 404 (another account's file is not found either)."""
    async with services(request).sessions() as session:
        row = await session.get(StoredFile, file_id)
    if row is None or row.account_id != caller.account_id or row.deleted_at is not None:
        raise NotFound(f"No such File object: {file_id}", param="file_id")
    return row


@router.post("/v1/files")
async def upload_file(request: Request, caller: Caller) -> ORJSONResponse:
    """Store an uploaded file, streaming its bytes to disk as they arrive."""
    boundary = multipart_boundary(request.headers.get("content-type"))
    store = file_store(request)
    file_id = new_id("file")
    limit = services(request).settings.max_upload_bytes
    with store.writer(caller.account_id, file_id, max_bytes=limit) as writer:
        upload = await receive_upload(request.stream(), boundary, writer)
        purpose = upload.fields.get("purpose")
        if not purpose:
            raise InvalidRequest(
                "Missing required parameter: 'purpose'.",
                param="purpose",
                code="missing_required_parameter",
            )
        if purpose not in UPLOAD_PURPOSES:
            raise InvalidRequest(
                f"Invalid purpose '{purpose}'; this broker accepts {', '.join(UPLOAD_PURPOSES)}.",
                param="purpose",
            )
    now = utcnow()
    values = {
        "id": file_id,
        "account_id": caller.account_id,
        "purpose": purpose,
        "filename": upload.filename or "upload.jsonl",
        "bytes": upload.file_bytes,
        "storage_path": writer.relative_path,
        "created_at": now,
    }
    try:
        async with services(request).sessions.begin() as session:
            await session.execute(insert(StoredFile).values(**values))
    except BaseException:
        store.delete(writer.relative_path)
        raise
    return ORJSONResponse(file_object(StoredFile(**values)))


@router.get("/v1/files")
async def list_files(
    request: Request,
    caller: Caller,
    after: str | None = Query(None),
    limit: int = Query(10_000, ge=1, le=MAX_PAGE),
    order: str = Query("desc"),
    purpose: str | None = Query(None),
) -> ORJSONResponse:
    query = select(StoredFile).where(
        StoredFile.account_id == caller.account_id, StoredFile.deleted_at.is_(None)
    )
    if purpose:
        query = query.where(StoredFile.purpose == purpose)
    async with services(request).sessions() as session:
        rows = (await session.scalars(paginate(query, StoredFile.id, after, limit, order))).all()
    return ORJSONResponse(page_body(rows, limit, file_object))


@router.get("/v1/files/{file_id}")
async def retrieve_file(request: Request, caller: Caller, file_id: str) -> ORJSONResponse:
    return ORJSONResponse(file_object(await owned_file(request, caller, file_id)))


@router.get("/v1/files/{file_id}/content")
async def download_file(request: Request, caller: Caller, file_id: str) -> FileResponse:
    """Stream a file's bytes from disk."""
    row = await owned_file(request, caller, file_id)
    path = file_store(request).path(row.storage_path)
    if not path.exists():
        raise NotFound(
            f"The bytes of file {file_id} are missing from the file store.", param="file_id"
        )
    return FileResponse(path, media_type="application/octet-stream", filename=row.filename)


@router.delete("/v1/files/{file_id}")
async def delete_file(request: Request, caller: Caller, file_id: str) -> ORJSONResponse:
    """Delete a file; a batch that still reads it as input keeps it (409)."""
    row = await owned_file(request, caller, file_id)
    async with services(request).sessions.begin() as session:
        reader = await session.scalar(
            select(Batch.id)
            .where(Batch.input_file_id == file_id, Batch.status.in_(READING_STATUSES))
            .limit(1)
        )
        if reader is not None:
            raise Conflict(
                f"File {file_id} is the input of batch {reader}, which is still running. "
                "Cancel the batch or wait until it ends.",
                param="file_id",
            )
        await session.execute(
            update(StoredFile).where(StoredFile.id == file_id).values(deleted_at=utcnow())
        )
    file_store(request).delete(row.storage_path)
    return ORJSONResponse({"id": file_id, "object": "file", "deleted": True})
