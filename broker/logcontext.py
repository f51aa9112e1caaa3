"""Structured logs: one JSON object per line, tagged with the ids of the current work.

``request_id``, ``job_id`` and ``account_id`` live in context variables, so every log
line written while a request or job runs carries them, in asyncio tasks and gevent
greenlets alike (greenlet 1.0 and later give each greenlet its own context).

``SecretFilter`` masks API keys and webhook secrets in the message and its arguments
before any handler formats the record. ``JsonFormatter`` masks its whole output again,
which also covers exception tracebacks and ``extra`` fields.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from typing import Any, TextIO

from broker.ids import new_id

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
job_id_var: ContextVar[str | None] = ContextVar("job_id", default=None)
account_id_var: ContextVar[str | None] = ContextVar("account_id", default=None)

_CONTEXT_VARS: dict[str, ContextVar[str | None]] = {
    "request_id": request_id_var,
    "job_id": job_id_var,
    "account_id": account_id_var,
}

# Secrets that must never reach a log line, each with its replacement. A prefix must
# not follow a letter or digit, so words such as "risk-assessment" stay readable.
SECRET_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # OpenAI-style keys, which include this broker's own keys (sk-brk-...) and
    # Anthropic's (sk-ant-...).
    (re.compile(r"(?<![A-Za-z0-9])sk-[A-Za-z0-9_-]{8,}"), "sk-***"),
    # Standard Webhooks signing secrets: "whsec_" and base64.
    (re.compile(r"(?<![A-Za-z0-9])whsec_[A-Za-z0-9+/=_-]+"), "whsec_***"),
    # Google API keys, which Gemini takes in the URL.
    (re.compile(r"(?<![A-Za-z0-9])AIza[0-9A-Za-z_-]{35}"), "AIza***"),
)

# Attributes every LogRecord has; any other attribute came from ``extra=``.
_RECORD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}

# Longest X-Request-ID accepted from a client; longer or unusual values are replaced.
MAX_REQUEST_ID_CHARS = 128
_REQUEST_ID_PATTERN = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_REQUEST_ID_CHARS}}}")


def mask_secrets(text: str) -> str:
    """Return ``text`` with every substring that looks like a secret replaced."""
    for pattern, replacement in SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _mask_value(value: Any) -> Any:
    if isinstance(value, str):
        return mask_secrets(value)
    if isinstance(value, int | float | bool) or value is None:
        return value
    # Anything else is formatted with %s or %r later; mask its text form now.
    return mask_secrets(str(value))


@contextmanager
def bind(**ids: str | None) -> Iterator[None]:
    """Set ``request_id``, ``job_id`` or ``account_id`` for the block, then restore them."""
    unknown = sorted(set(ids) - set(_CONTEXT_VARS))
    if unknown:
        raise TypeError(f"bind() got unknown id {unknown[0]!r}; expected {sorted(_CONTEXT_VARS)}")
    tokens: list[tuple[ContextVar[str | None], Token[str | None]]] = [
        (_CONTEXT_VARS[name], _CONTEXT_VARS[name].set(value)) for name, value in ids.items()
    ]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def current_ids() -> dict[str, str]:
    """Return the ids set in the current context, leaving out unset ones."""
    values = {name: var.get() for name, var in _CONTEXT_VARS.items()}
    return {name: value for name, value in values.items() if value is not None}


class SecretFilter(logging.Filter):
    """Masks secrets in a record's message and arguments; never drops a record.

    Attach it to handlers, not loggers: a logger's filters do not run for records
    that propagate from its child loggers.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        # Formatters reuse a record's exc_text once it is set, so a traceback formatted
        # and masked here is the one every handler prints.
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask_secrets(record.exc_text)
        if record.stack_info:
            record.stack_info = mask_secrets(record.stack_info)
        try:
            message = record.getMessage()
        except (TypeError, ValueError, KeyError):
            # The arguments do not fit the format string. Mask the parts one by one
            # and let the handler report the formatting error as usual.
            record.msg = _mask_value(record.msg)
            if isinstance(record.args, dict):
                record.args = {key: _mask_value(value) for key, value in record.args.items()}
            elif isinstance(record.args, tuple):
                record.args = tuple(_mask_value(value) for value in record.args)
            return True
        record.msg = mask_secrets(message)
        record.args = None
        return True


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object on one line, with secrets masked.

    Fields: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``, ``process``,
    the ids set with ``bind``, ``exception`` when the record has one, and every field
    given with ``extra=``. Values that JSON cannot encode are written with ``str``.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        entry.update(current_ids())
        for name, value in record.__dict__.items():
            if name not in _RECORD_ATTRIBUTES and not name.startswith("_"):
                entry[name] = value
        if record.exc_text:
            entry["exception"] = record.exc_text
        elif record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        line = json.dumps(entry, default=str, ensure_ascii=False)
        return mask_secrets(line)


def json_handler(stream: TextIO | None = None) -> logging.Handler:
    """Return a stream handler that writes masked JSON lines (stderr by default)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(SecretFilter())
    return handler


def request_id_from(header_value: str | None) -> str:
    """Return the client's X-Request-ID if it is short and plain, else a new id."""
    if header_value and _REQUEST_ID_PATTERN.fullmatch(header_value):
        return header_value
    return new_id("req")


class RequestIdMiddleware:
    """ASGI middleware: binds ``request_id`` for the request and returns it as a header.

    The id is the client's ``X-Request-ID`` when it is acceptable (see
    ``request_id_from``), else a new ``req_...`` id.
    """

    def __init__(self, app: Callable) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = None
        for name, value in scope.get("headers", []):
            if name.lower() == b"x-request-id":
                sent = value.decode("latin-1")
                break
        request_id = request_id_from(sent)

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (name, value)
                    for name, value in message.get("headers", [])
                    if name.lower() != b"x-request-id"
                ]
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        with bind(request_id=request_id):
            await self.app(scope, receive, send_with_id)
