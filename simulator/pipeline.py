"""Request handling shared by the wire formats: outage, auth, body, faults and latency.

Each provider route is a ``ProviderEndpoint`` around a format-specific handler. Handlers
raise ``RequestRejected`` for any error reply, and the endpoint renders it in the
format's own error shape.
"""

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from simulator.faults import (
    FAULT_HEADER,
    FAULT_OVERLOADED,
    FAULT_RATE_LIMIT,
    FAULT_SERVER_ERROR,
    FAULT_TIMEOUT,
    InvalidFaultHeader,
    sleep_unless_disconnected,
)
from simulator.state import SimulatorState

logger = logging.getLogger("simulator")

# Format-neutral error kinds. Each wire format maps them to a status and error body.
ERROR_INVALID_REQUEST = "invalid_request"
ERROR_AUTHENTICATION = "authentication"
ERROR_NOT_FOUND = "not_found"
ERROR_RATE_LIMIT = "rate_limit"
ERROR_SERVER = "server_error"
ERROR_OVERLOADED = "overloaded"
ERROR_UNAVAILABLE = "unavailable"


class RequestRejected(Exception):
    """An error reply, in format-neutral terms."""

    def __init__(
        self,
        kind: str,
        message: str,
        param: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s


class ClientDisconnected(Exception):
    """The client closed the connection before the response started."""


class WireFormat:
    """Error shapes and authentication of one provider API."""

    name = ""
    # Share of injected 500 faults that are sent as overloaded errors instead.
    overloaded_share = 0.0

    def authentication_error(self, request: Request) -> str | None:
        """Return the error message when the request carries no credentials."""
        raise NotImplementedError

    def error_body(self, error: RequestRejected) -> tuple[int, Any]:
        """Return the HTTP status and JSON body of ``error``."""
        raise NotImplementedError


Handler = Callable[[Request, SimulatorState], Awaitable[Any]]


def json_response(state: SimulatorState, payload: Any, status: int = 200) -> Response:
    return Response(
        orjson.dumps(payload),
        status_code=status,
        headers=state.response_headers(),
        media_type="application/json",
    )


def error_response(state: SimulatorState, wire: WireFormat, error: RequestRejected) -> Response:
    status, body = wire.error_body(error)
    response = json_response(state, body, status)
    if error.retry_after_s is not None:
        response.headers["retry-after"] = str(error.retry_after_s)
    return response


class ProviderEndpoint:
    """ASGI app of one provider route.

    It counts the request in the statistics, responds 503 while the simulator is down,
    checks credentials, runs the handler and sends its response.
    """

    def __init__(self, state: SimulatorState, wire: WireFormat, handler: Handler) -> None:
        self.state = state
        self.wire = wire
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = self.state
        stats = state.stats
        stats.begin(scope["path_params"].get("provider", ""))
        status = None
        try:
            request = Request(scope, receive)
            try:
                response = await self._respond(request)
            except RequestRejected as error:
                if not state.config.quiet:
                    logger.info("rejected %s with %s: %s", scope["path"], error.kind, error)
                response = error_response(state, self.wire, error)
            status = response.status_code
            await response(scope, receive, send)
            if getattr(response, "cancelled", False):
                self._count_cancelled(scope)
        except (ClientDisconnected, ClientDisconnect):
            # ClientDisconnect is Starlette's, raised while the body is still being read.
            self._count_cancelled(scope)
        finally:
            stats.finish(status)

    def _count_cancelled(self, scope: Scope) -> None:
        self.state.stats.cancelled += 1
        if not self.state.config.quiet:
            logger.info("client disconnected from %s before the reply finished", scope["path"])

    async def _respond(self, request: Request) -> Any:
        if self.state.config.down:
            raise RequestRejected(
                ERROR_UNAVAILABLE, "The service is temporarily unavailable. Retry later."
            )
        message = self.wire.authentication_error(request)
        if message is not None:
            raise RequestRejected(ERROR_AUTHENTICATION, message)
        return await self.handler(request, self.state)


async def read_json_object(request: Request) -> dict:
    """Parse the request body as a JSON object, raising RequestRejected otherwise."""
    body = await request.body()
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise RequestRejected(
            ERROR_INVALID_REQUEST, f"The request body is not valid JSON: {error}"
        ) from None
    if not isinstance(payload, dict):
        raise RequestRejected(ERROR_INVALID_REQUEST, "The request body must be a JSON object.")
    return payload


async def apply_faults_and_latency(
    request: Request, state: SimulatorState, wire: WireFormat
) -> None:
    """Inject this request's fault, if any, then wait the configured latency.

    Raises RequestRejected for a 429, 500 or overloaded fault, and ClientDisconnected
    when the client leaves during a wait. A timeout fault hangs for ``timeout_hang_s``
    and then lets the request continue normally.
    """
    config = state.config
    try:
        fault = state.faults.choose(
            request.headers.get(FAULT_HEADER),
            config.fault_rate_429,
            config.fault_rate_500,
            config.fault_rate_timeout,
            wire.overloaded_share,
        )
    except InvalidFaultHeader as error:
        raise RequestRejected(ERROR_INVALID_REQUEST, str(error), FAULT_HEADER) from None

    if fault == FAULT_RATE_LIMIT:
        raise RequestRejected(
            ERROR_RATE_LIMIT,
            "Rate limit exceeded. Retry after the delay.",
            retry_after_s=config.retry_after_s,
        )
    if fault == FAULT_SERVER_ERROR:
        raise RequestRejected(ERROR_SERVER, "The server had an error processing the request.")
    if fault == FAULT_OVERLOADED:
        raise RequestRejected(ERROR_OVERLOADED, "The service is overloaded. Retry later.")
    if fault == FAULT_TIMEOUT:
        if not config.quiet:
            logger.info("injecting a %s s hang into %s", config.timeout_hang_s, request.url.path)
        if await sleep_unless_disconnected(request.receive, config.timeout_hang_s):
            raise ClientDisconnected()

    delay = state.faults.latency_seconds(config.latency_ms, config.jitter_ms)
    if delay > 0 and await sleep_unless_disconnected(request.receive, delay):
        raise ClientDisconnected()
