"""Settings, read once at start-up from the environment (prefix ``BROKER_``)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

PACKAGE_DIR = Path(__file__).resolve().parent

# Default catalog: the one shipped inside the package.
DEFAULT_CATALOG_PATH = PACKAGE_DIR / "catalog.yaml"


class Settings(BaseSettings):
    """Every tunable of the broker; ``repr`` never shows a secret."""

    model_config = SettingsConfigDict(env_prefix="BROKER_", env_file=None, extra="ignore")

    database_url: str = Field(
        default="sqlite:///var/broker.db",
        description="SQLAlchemy URL; SQLite file by default, postgresql+psycopg:// in production.",
    )
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Connections each process keeps to PostgreSQL, and how many more it may open under
    # load. Every API, worker and billing process has its own pool, so their sum must
    # stay below the server's max_connections (100 by default).
    db_pool_size: int = 10
    db_max_overflow: int = 5
    catalog_path: Path = DEFAULT_CATALOG_PATH

    api_host: str = "127.0.0.1"
    api_port: int = 8000
    flower_port: int = 5555
    flower_basic_auth: SecretStr = SecretStr("admin:admin")

    # Keys are "provider", "provider.region" or "*.region"; the most specific wins.
    base_url_overrides: dict[str, str] = Field(default_factory=dict)
    # Provider id -> upstream API key. A provider without a key is called without one.
    provider_keys: dict[str, SecretStr] = Field(default_factory=dict)
    # Bearer token of the /admin API; without one the admin API is off.
    admin_token: SecretStr | None = None
    # Signing secret of the Stripe webhook endpoint (whsec_...); without one it is off.
    stripe_webhook_secret: SecretStr | None = None

    # Upstream calls in flight per region worker process (greenlets that run jobs).
    worker_concurrency: int = 500
    # Jobs that the API or a batch publishes together share a task message of at most
    # this many jobs. 1 publishes one message per job, as workers older than run_jobs
    # need: set it while such workers still run, during a rolling upgrade.
    jobs_per_message: int = Field(default=32, ge=1)
    # Greenlets of the billing worker. Settle tasks running at once share a transaction,
    # so more greenlets mean larger, fewer transactions under load.
    billing_concurrency: int = 256
    # Seconds an upstream call may take before the attempt counts as timed out.
    upstream_timeout_s: float = 120.0
    # Seconds a job may take from acceptance to its result, retries and failover
    # included; after that the sweeper expires it and releases its hold.
    job_timeout_s: float = 600.0
    # Seconds between sweeper runs (re-dispatch, expiry, missed settlements).
    sweep_interval_s: float = 5.0
    # Seconds a synchronous request waits for its job before it returns 504.
    sync_wait_timeout_s: float = 600.0
    # Attempts per job on the same target for transient errors (429, 5xx, timeouts).
    max_attempts: int = 3
    # Upper bound of one backoff sleep, also the cap on a provider's Retry-After.
    max_backoff_s: float = 20.0
    # Largest request body accepted, in bytes; larger bodies get 413.
    max_request_bytes: int = 8 * 1024 * 1024
    # Seconds an authenticated API key stays cached in an API process.
    key_cache_ttl_s: float = 2.0

    # Asynchronous jobs, files and batches.
    # Days a finished job is kept; older settled jobs and their attempts are deleted.
    job_retention_days: int = 30
    # Folder holding uploaded and generated files; the API and the billing worker
    # (which runs the batch tasks) must see the same folder.
    file_store_path: Path = Path("var/files")
    # Largest file upload, in bytes (OpenAI's batch input limit is 200 MB).
    max_upload_bytes: int = 200 * 1024 * 1024
    # Maximum number of requests in one batch input file.
    batch_max_requests: int = 100_000
    # Discount on batch jobs' prices in parts per million: 500_000 halves them.
    batch_discount_ppm: int = 500_000
    # Input lines turned into jobs per database transaction.
    batch_chunk_size: int = 250
    # Jobs of one batch published to the queues at once. The rest wait in the database
    # until earlier ones settle, so a large batch neither floods Redis nor delays others.
    # NOTE: the sweeper examines the 500 oldest published jobs per run, so a few large
    # batches in flight can keep it from reaching newer interactive jobs.
    batch_max_in_flight: int = 200

    # Webhooks.
    # Deliver to private and loopback addresses (for local demos and tests only);
    # cloud metadata addresses stay rejected even then.
    webhook_allow_private: bool = False
    # Seconds each step of a delivery attempt (connect, send, read the response) may take.
    webhook_timeout_s: float = 10.0
    # Retry delays double per attempt from the base up to the maximum, with jitter. A
    # delivery gives up once the window since the event has passed.
    webhook_retry_base_s: float = 5.0
    webhook_retry_max_delay_s: float = 3600.0
    webhook_retry_window_s: float = 24 * 3600.0
    # Seconds between scans for due webhook retries, overdue batches and old jobs.
    async_pass_interval_s: float = 1.0

    # Processes uvicorn runs for the API.
    api_workers: int = 1
    # Region a worker process serves and its lanes, comma-separated; set by
    # ``broker worker --region --lanes``.
    worker_region: str | None = None
    worker_lanes: str = "interactive,batch"

    # Per-key limits, requests and worst-case tokens per minute; None turns one off.
    rate_limit_rpm: int | None = None
    rate_limit_tpm: int | None = None
    # Per provider-region caps the workers respect, e.g.
    # {"openai.us": {"max_concurrency": 200, "rps": 50}}; keys as in base_url_overrides.
    provider_limits: dict[str, dict[str, int]] = Field(default_factory=dict)
    # Seconds a cached response is kept; requests opt in with "x-broker-cache: true".
    response_cache_ttl_s: float = 3600.0
    # Also cache requests with temperature 0 and one choice, without an opt-in.
    response_cache_temperature_zero: bool = True
    # "text" or "json": one JSON object per log line, with request, job and account ids.
    log_format: str = "text"
    # Port on which each worker process serves /metrics; None turns it off.
    worker_metrics_port: int | None = None

    log_level: str = "INFO"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the process-wide settings, read from the environment on first use."""
    return Settings()
