"""What every provider adapter returns and raises.

    UpstreamError                 the call failed; ``retryable``: another attempt may succeed
     +-- UpstreamTimeout          no answer within the attempt's timeout (retryable)
     |    +-- DeadlineExceeded    the job's overall deadline passed (final)
     +-- UpstreamUnreachable      connection refused, reset or DNS failure (retryable)
     +-- UpstreamStatusError      the provider answered with an error status
     +-- CircuitOpen              the target's circuit is open; nothing was sent
     +-- ProviderBusy             the provider region's caps stayed full; nothing was sent

``retryable`` means another attempt at the same target may succeed; ``failover`` means
another target (region or fallback model) may succeed; ``trips_circuit`` means the
failure says something about the target's health rather than about the request.

Adapters map httpx errors and provider error bodies to these classes in one place, so
no httpx exception reaches a task body.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

# HTTP statuses worth another attempt at the same target, because the provider may
# respond differently a moment later.
RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504, 529})


class UpstreamError(Exception):
    """An upstream call that did not produce a usable response."""

    retryable = False
    trips_circuit = False
    # Status and error type the client sees when this is the job's final error.
    client_status = 502
    client_error_type = "upstream_error"

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        retry_after_s: float | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.retry_after_s = retry_after_s
        self.code = code

    @property
    def failover(self) -> bool:
        return self.retryable

    def to_job_error(self) -> dict[str, Any]:
        return {
            "status": self.client_status,
            "type": self.client_error_type,
            "message": self.message,
            "code": self.code,
            "upstream_status": self.status_code,
        }


class UpstreamTimeout(UpstreamError):
    retryable = True
    trips_circuit = True
    client_status = 504
    client_error_type = "timeout"


class DeadlineExceeded(UpstreamTimeout):
    retryable = False

    @property
    def failover(self) -> bool:
        return False


class ProviderBusy(UpstreamError):
    """The provider region's concurrency or rate cap stayed full; nothing was sent."""

    retryable = True
    client_status = 429
    client_error_type = "rate_limit_error"


class CircuitOpen(UpstreamError):
    """The target failed repeatedly, so the breaker sends it nothing for a while."""

    client_status = 503
    client_error_type = "service_unavailable"

    @property
    def failover(self) -> bool:
        return True


class UpstreamUnreachable(UpstreamError):
    retryable = True
    trips_circuit = True


class UpstreamStatusError(UpstreamError):
    """An error status from the provider, classified by what the client can do about it."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        retry_after_s: float | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message, status_code=status_code, retry_after_s=retry_after_s, code=code)
        self.retryable = status_code in RETRYABLE_STATUSES
        self.trips_circuit = status_code >= 500
        if status_code in (401, 403):
            # The provider rejected the broker's own credentials: an operator problem.
            self.client_status = 502
            self.client_error_type = "provider_configuration_error"
            self.message = (
                f"The provider rejected the broker's credentials ({status_code}): "
                f"{message} Check BROKER_PROVIDER_KEYS."
            )
        elif status_code == 429:
            self.client_status = 429
            self.client_error_type = "rate_limit_error"
        elif 400 <= status_code < 500 and status_code not in RETRYABLE_STATUSES:
            self.client_status = 400
            self.client_error_type = "invalid_request_error"

    @property
    def failover(self) -> bool:
        # Rejected credentials or an unknown upstream model are this provider's
        # configuration, which another target does not share; a bad request is not.
        return self.retryable or self.status_code in (401, 403, 404)


@dataclass(frozen=True)
class UpstreamResult:
    """A successful call, its body already in the OpenAI chat completion format."""

    body: dict[str, Any]
    prompt_tokens: int
    completion_tokens: int
    status_code: int


def parse_retry_after(value: str | None) -> float | None:
    """Read a Retry-After header given in seconds or as an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
