"""Logging set-up shared by every process: one line per event on stderr."""

from __future__ import annotations

import logging
import sys

from broker.logcontext import SecretFilter, json_handler

LOG_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"


def configure_logging(level: str = "INFO", log_format: str = "text") -> None:
    """Send this process's logs to stderr at ``level``, as text or one JSON object a line.

    Either way a filter masks anything that looks like an API key or webhook secret.
    """
    root = logging.getLogger()
    if not any(getattr(h, "_broker", False) for h in root.handlers):
        if log_format == "json":
            handler = json_handler(sys.stderr)
        else:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler.addFilter(SecretFilter())
        handler._broker = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level.upper())
    # httpx logs every request URL at INFO; URLs may carry a provider key (Gemini's ?key=).
    logging.getLogger("httpx").setLevel(logging.WARNING)
