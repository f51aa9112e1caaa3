"""Errors the API reports to clients, in the OpenAI error format.

BrokerError                 -> status, type and code of the response
 +-- InvalidRequest         400  the body is wrong; fix it before resending
 +-- AuthenticationFailed   401  missing, unknown, revoked or expired API key
 +-- InsufficientFunds      402  the wallet cannot cover the worst-case cost; top up
 +-- PermissionDenied       403  the key may not use this model or region
 +-- NotFound               404  unknown model, job or object
 +-- Conflict               409  the request clashes with the object's state
 +-- PayloadTooLarge        413  the body exceeds the configured limit
 +-- RateLimited            429  too many requests; resend after Retry-After
 +-- UpstreamFailed         502  the provider failed after every retry
 +-- ServiceUnavailable     503  a dependency of the broker is down; resend later
 +-- GatewayTimeout         504  the job did not finish in time; it may still finish
"""

from __future__ import annotations

from typing import Any


class BrokerError(Exception):
    """An error with an HTTP status, rendered as ``{"error": {...}}``."""

    status_code = 500
    error_type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def to_job_error(self) -> dict[str, Any]:
        """Return the form stored on a failed job, which ``from_job_error`` reads back."""
        return {
            "status": self.status_code,
            "type": self.error_type,
            "message": self.message,
            "code": self.code,
            "param": self.param,
        }

    def to_body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(BrokerError):
    status_code = 400
    error_type = "invalid_request_error"


class AuthenticationFailed(BrokerError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class InsufficientFunds(BrokerError):
    status_code = 402
    error_type = "insufficient_quota"
    code = "insufficient_quota"


class PermissionDenied(BrokerError):
    status_code = 403
    error_type = "permission_error"


class NotFound(BrokerError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"


class Conflict(BrokerError):
    status_code = 409
    error_type = "invalid_request_error"
    code = "conflict"


class PayloadTooLarge(BrokerError):
    status_code = 413
    error_type = "invalid_request_error"
    code = "payload_too_large"


class RateLimited(BrokerError):
    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"


class UpstreamFailed(BrokerError):
    status_code = 502
    error_type = "upstream_error"


class ServiceUnavailable(BrokerError):
    status_code = 503
    error_type = "service_unavailable"


class GatewayTimeout(BrokerError):
    status_code = 504
    error_type = "timeout"
    code = "timeout"


# Error bodies a worker stores on a failed job carry their status; this maps it back.
_BY_STATUS: dict[int, type[BrokerError]] = {
    cls.status_code: cls
    for cls in (
        InvalidRequest,
        AuthenticationFailed,
        InsufficientFunds,
        PermissionDenied,
        NotFound,
        Conflict,
        PayloadTooLarge,
        RateLimited,
        UpstreamFailed,
        ServiceUnavailable,
        GatewayTimeout,
    )
}


def from_job_error(error: dict[str, Any]) -> BrokerError:
    """Rebuild the client-facing error stored on a failed job."""
    cls = _BY_STATUS.get(int(error.get("status", 502)), UpstreamFailed)
    exc = cls(
        error.get("message", "the upstream call failed"),
        param=error.get("param"),
        code=error.get("code"),
    )
    if error.get("type"):
        exc.error_type = error["type"]
    return exc
