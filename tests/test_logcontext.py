"""Structured JSON logs: context ids and masking of secrets."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI

from broker import logcontext

API_KEY = "sk-brk-9f8e7d6c5b4a39281706f5e4d3c2b1a0"
ANTHROPIC_KEY = "sk-ant-api03-AbCdEfGhIjKlMnOp_qrstuv-wxyz"
WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
GOOGLE_KEY = "AIzaSyA1234567890abcdefghijklmnopqrstuv"


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger whose records go only to a JSON handler writing into a buffer."""
    stream = io.StringIO()
    logger = logging.getLogger("test.logcontext")
    logger.handlers = [logcontext.json_handler(stream)]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, stream
    logger.handlers = []
    logger.propagate = True


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_key_in_message_is_masked(captured) -> None:
    logger, stream = captured
    logger.info(f"calling upstream with {API_KEY}")
    text = stream.getvalue()
    assert API_KEY not in text
    assert lines(stream)[0]["message"] == "calling upstream with sk-***"


def test_key_in_args_is_masked(captured) -> None:
    logger, stream = captured
    logger.warning("key %s rejected; header %r", API_KEY, f"Bearer {ANTHROPIC_KEY}")
    logger.warning("secret %(secret)s for %(url)s", {"secret": WEBHOOK_SECRET, "url": "x"})
    logger.warning("google key %s", GOOGLE_KEY)
    text = stream.getvalue()
    for secret in (API_KEY, ANTHROPIC_KEY, WEBHOOK_SECRET, GOOGLE_KEY):
        assert secret not in text
    first, second, third = lines(stream)
    assert first["message"] == "key sk-*** rejected; header 'Bearer sk-***'"
    assert second["message"] == "secret whsec_*** for x"
    assert third["message"] == "google key AIza***"


def test_key_in_object_arg_is_masked(captured) -> None:
    class Config:
        def __str__(self) -> str:
            return f"Config(key={API_KEY})"

    logger, stream = captured
    logger.info("loaded %s", Config())
    assert API_KEY not in stream.getvalue()
    assert lines(stream)[0]["message"] == "loaded Config(key=sk-***)"


def test_key_in_exception_is_masked(captured) -> None:
    logger, stream = captured
    try:
        raise ValueError(f"bad key {API_KEY}")
    except ValueError:
        logger.exception("upstream call failed")
    entry = lines(stream)[0]
    assert API_KEY not in stream.getvalue()
    assert "ValueError: bad key sk-***" in entry["exception"]


def test_key_in_extra_is_masked(captured) -> None:
    logger, stream = captured
    logger.info("request headers", extra={"authorization": f"Bearer {API_KEY}", "attempt": 2})
    entry = lines(stream)[0]
    assert entry["authorization"] == "Bearer sk-***"
    assert entry["attempt"] == 2


def test_mismatched_args_still_masked(captured) -> None:
    logger, stream = captured
    record = logging.LogRecord(
        "test.logcontext", logging.INFO, __file__, 1, "two values %s %s", (API_KEY,), None
    )
    logcontext.SecretFilter().filter(record)
    assert record.args == ("sk-***",)
    assert stream.getvalue() == ""


def test_text_handler_with_filter_masks(captured) -> None:
    logger, _ = captured
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.addFilter(logcontext.SecretFilter())
    logger.handlers = [handler]
    try:
        raise RuntimeError(WEBHOOK_SECRET)
    except RuntimeError:
        logger.error("token %s failed", API_KEY, exc_info=True)
    text = stream.getvalue()
    assert API_KEY not in text
    assert WEBHOOK_SECRET not in text
    assert text.startswith("ERROR token sk-*** failed")
    assert "RuntimeError: whsec_***" in text


def test_words_containing_sk_are_kept(captured) -> None:
    logger, stream = captured
    logger.info("task-sk-1, risk-assessment and disk-usage-report")
    logger.info("key=%s", API_KEY)
    first, second = lines(stream)
    assert first["message"] == "task-sk-1, risk-assessment and disk-usage-report"
    assert second["message"] == "key=sk-***"


def test_context_ids_in_each_line(captured) -> None:
    logger, stream = captured
    logger.info("before")
    with logcontext.bind(request_id="req_1", account_id="acct_1"):
        with logcontext.bind(job_id="job_1"):
            logger.info("inside")
        logger.info("after job")
    logger.info("after request")
    before, inside, after_job, after_request = lines(stream)
    assert "request_id" not in before
    assert inside["request_id"] == "req_1"
    assert inside["job_id"] == "job_1"
    assert inside["account_id"] == "acct_1"
    assert "job_id" not in after_job
    assert after_job["request_id"] == "req_1"
    assert "request_id" not in after_request


def test_json_line_fields(captured) -> None:
    logger, stream = captured
    logger.warning('quote " and\nnewline')
    output = stream.getvalue()
    assert output.count("\n") == 1
    entry = json.loads(output)
    assert entry["level"] == "WARNING"
    assert entry["logger"] == "test.logcontext"
    assert entry["message"] == 'quote " and\nnewline'
    assert entry["time"].endswith("+00:00")
    assert isinstance(entry["process"], int)


def test_bind_rejects_unknown_ids() -> None:
    with pytest.raises(TypeError, match="trace_id"):
        with logcontext.bind(trace_id="x"):
            pass


def test_asyncio_tasks_keep_own_ids(captured) -> None:
    logger, stream = captured

    async def work(job_id: str) -> None:
        with logcontext.bind(job_id=job_id):
            await asyncio.sleep(0.01)
            logger.info("done")

    async def main() -> None:
        await asyncio.gather(*(work(f"job_{index}") for index in range(5)))

    asyncio.run(main())
    assert sorted(entry["job_id"] for entry in lines(stream)) == [f"job_{i}" for i in range(5)]


def test_request_id_middleware(captured) -> None:
    logger, stream = captured
    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict[str, str | None]:
        logger.info("ping")
        return {"request_id": logcontext.request_id_var.get()}

    wrapped = logcontext.RequestIdMiddleware(app)

    async def fetch() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=wrapped)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return [
                await http.get("/ping", headers={"x-request-id": "client-id-1"}),
                await http.get("/ping", headers={"x-request-id": "bad id\twith spaces"}),
                await http.get("/ping"),
            ]

    given, invalid, missing = asyncio.run(fetch())
    assert given.headers["x-request-id"] == "client-id-1"
    assert given.json()["request_id"] == "client-id-1"
    assert invalid.headers["x-request-id"].startswith("req_")
    assert missing.headers["x-request-id"].startswith("req_")
    assert missing.json()["request_id"] == missing.headers["x-request-id"]
    assert [entry["request_id"] for entry in lines(stream)] == [
        "client-id-1",
        invalid.headers["x-request-id"],
        missing.headers["x-request-id"],
    ]
    assert logcontext.request_id_var.get() is None
