"""A batch's output and error files, written as OpenAI writes them.

Output lines hold the requests that produced a result:
``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error": null}``.
Error lines hold the others. A request that ran and failed keeps the provider's status
in ``response``, with ``{"error": {...}}`` as its body. A request that never ran
(cancelled, expired, not covered by the wallet) has ``"response": null`` and
``error {code, message}``. ``request_id`` is the job id, which ``GET /v1/jobs/{id}`` shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import insert, select

from broker.filestore import FileStore
from broker.ids import new_id
from broker.tables import Batch, Job, StoredFile, utcnow
from broker.webhooks import public_error
from workers.context import WorkerContext
from workers.job_events import produced_result

# Job rows read per round trip while writing.
READ_CHUNK = 500


@dataclass
class ResultFiles:
    output_file_id: str | None
    error_file_id: str | None


def result_line(row: Any) -> tuple[bool, dict[str, Any]]:
    """Return whether a job's line goes to the output file, and the line."""
    line_id = f"batch_req_{row.id.removeprefix('job_')}"
    error = row.error or None
    if produced_result(row.status, row.response is not None, error is not None):
        response = {"status_code": 200, "request_id": row.id, "body": row.response}
        return True, {
            "id": line_id,
            "custom_id": row.custom_id,
            "response": response,
            "error": None,
        }
    if row.status == "failed" and row.dispatched_at is not None and error:
        body = {"error": public_error(error)}
        response = {
            "status_code": int(error.get("status") or 500),
            "request_id": row.id,
            "body": body,
        }
        return False, {
            "id": line_id,
            "custom_id": row.custom_id,
            "response": response,
            "error": None,
        }
    detail = error or {"code": "batch_failed", "message": "The request did not run."}
    return False, {
        "id": line_id,
        "custom_id": row.custom_id,
        "response": None,
        "error": {"code": detail.get("code"), "message": detail.get("message")},
    }


def write_result_files(ctx: WorkerContext, batch: Batch) -> ResultFiles:
    """Write the batch's output and error files and register them; an empty one is
    not kept."""
    store = FileStore(ctx.settings.file_store_path)
    output_id, error_id = new_id("file"), new_id("file")
    with (
        store.writer(batch.account_id, output_id) as output,
        store.writer(batch.account_id, error_id) as errors,
        ctx.sessions() as session,
    ):
        # A server-side cursor on PostgreSQL, so the rows stream instead of loading.
        rows = session.execute(
            select(Job.id, Job.custom_id, Job.status, Job.response, Job.error, Job.dispatched_at)
            .where(Job.batch_id == batch.id)
            .execution_options(yield_per=READ_CHUNK)
        )
        for row in rows:
            to_output, line = result_line(row)
            (output if to_output else errors).write(orjson.dumps(line) + b"\n")
    now = utcnow()
    kept: dict[str, str | None] = {}
    files = []
    for file_id, writer, suffix in ((output_id, output, "output"), (error_id, errors, "error")):
        if writer.bytes == 0:
            store.delete(writer.relative_path)
            kept[suffix] = None
            continue
        kept[suffix] = file_id
        files.append(
            {
                "id": file_id,
                "account_id": batch.account_id,
                "purpose": "batch_output",
                "filename": f"{batch.id}_{suffix}.jsonl",
                "bytes": writer.bytes,
                "storage_path": writer.relative_path,
                "created_at": now,
            }
        )
    if files:
        with ctx.sessions.begin() as session:
            session.execute(insert(StoredFile), files)
    return ResultFiles(kept["output"], kept["error"])
