"""Request metrics for the API: one observation per request, by endpoint, model and status."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from broker.metrics import UNKNOWN_MODEL, observe_request

# Path prefixes reported as the endpoint label; anything else is "other", so that
# paths with ids in them cannot create a series each.
ENDPOINTS = (
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/models",
    "/v1/wallet",
    "/v1/usage",
    "/v1/jobs",
    "/v1/files",
    "/v1/batches",
    "/v1/webhooks",
    "/v1/payments",
    "/admin",
)


def endpoint_label(path: str) -> str:
    for prefix in ENDPOINTS:
        if path.startswith(prefix):
            return prefix
    return "other"


class RequestMetricsMiddleware:
    """ASGI middleware recording ``broker_requests_total`` and the end-to-end duration.

    Routes put the model id in ``request.state.model`` once it is known to be in the
    catalog. A streamed response counts when its last byte is sent.
    """

    def __init__(self, app: Callable) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(("/v1/", "/admin")):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def record_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            model = (scope.get("state") or {}).get("model", UNKNOWN_MODEL)
            observe_request(
                endpoint_label(scope["path"]), model, status, time.perf_counter() - started
            )
