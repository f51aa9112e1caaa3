"""Run-time settings of one simulator instance."""

from pydantic import BaseModel, ConfigDict, Field


class SimulatorConfig(BaseModel):
    """Settings of one simulated upstream region.

    ``POST /_sim/config`` replaces the instance at run time, and handlers read the
    current instance on every request. The exception is uvicorn's access log, which
    keeps the ``quiet`` setting it was started with.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    region: str = Field(min_length=1, description="region name sent in x-simulator-region")
    latency_ms: int = Field(0, ge=0, description="delay in ms before each reply")
    jitter_ms: int = Field(0, ge=0, description="maximum random deviation in ms from latency_ms")
    stream_chunk_delay_ms: int = Field(
        0, ge=0, description="delay in ms between two chunks of a streamed reply"
    )
    fault_rate_429: float = Field(
        0, ge=0, le=1, description="share of requests rejected with 429 (0 to 1)"
    )
    fault_rate_500: float = Field(
        0, ge=0, le=1, description="share of requests failed with 500 (0 to 1)"
    )
    fault_rate_timeout: float = Field(
        0, ge=0, le=1, description="share of requests that hang for timeout_hang_s (0 to 1)"
    )
    retry_after_s: int = Field(1, ge=0, description="Retry-After value in s sent with a 429")
    timeout_hang_s: float = Field(
        30, ge=0, description="time in s a request with a timeout fault hangs before replying"
    )
    down: bool = Field(False, description="respond 503 to every provider request")
    split_multibyte: bool = Field(
        False, description="cut multi-byte UTF-8 characters across HTTP chunks in streams"
    )
    quiet: bool = Field(True, description="turn off the access log and per-request logging")
    seed: int = Field(0, description="seed of generated replies and fault draws")
