"""Logging set-up shared by every process: one line per event on stderr."""

from __future__ import annotations

import logging
import sys

LOG_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"


def configure_logging(level: str = "INFO") -> None:
    """Send this process's logs to stderr at ``level``."""
    root = logging.getLogger()
    if not any(getattr(h, "_broker", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler._broker = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level.upper())
    # httpx logs every request URL at INFO; URLs may carry a provider key (Gemini's ?key=).
    logging.getLogger("httpx").setLevel(logging.WARNING)
