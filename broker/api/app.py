"""The intake API application (FastAPI on uvicorn)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from redis.exceptions import RedisError
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from broker.api import (
    admin,
    batches,
    billing,
    catalog_routes,
    chat,
    files,
    jobs,
    payments,
    webhooks,
)
from broker.api.auth import KeyAuthenticator
from broker.api.observability import RequestMetricsMiddleware
from broker.api.services import Services, services
from broker.catalog import load_catalog
from broker.db import async_session_factory, make_async_engine
from broker.errors import BrokerError, ServiceUnavailable
from broker.gc_tuning import tune_after_startup
from broker.intake import Intake
from broker.jsonresponse import ORJSONResponse
from broker.logcontext import RequestIdMiddleware
from broker.logs import configure_logging
from broker.metrics import catalog_queues, catalog_targets, metrics_app
from broker.replies import ReplyListener
from broker.settings import Settings, get_settings
from workers.app import BATCHES_QUEUE, BILLING_QUEUE, WEBHOOKS_QUEUE, make_celery

logger = logging.getLogger(__name__)


def _build_services(settings: Settings) -> Services:
    catalog = load_catalog(settings.catalog_path, settings.base_url_overrides)
    engine = make_async_engine(
        settings.database_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
    )
    sessions = async_session_factory(engine)
    replies = ReplyListener(settings.redis_url)
    celery = make_celery()
    return Services(
        settings=settings,
        catalog=catalog,
        engine=engine,
        sessions=sessions,
        celery=celery,
        replies=replies,
        auth=KeyAuthenticator(sessions, settings.key_cache_ttl_s),
        intake=Intake(
            catalog,
            sessions,
            celery,
            replies,
            replies.redis,
            settings.sync_wait_timeout_s,
            settings.job_timeout_s,
        ),
    )


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: Services = app.state.services
    await state.replies.start()
    key_changes = asyncio.create_task(state.auth.follow_key_changes(state.replies.redis))
    tune_after_startup()
    logger.info(
        "API ready: %d models, reply list %s", len(state.catalog.models), state.replies.channel
    )
    try:
        yield
    finally:
        key_changes.cancel()
        await state.replies.stop()
        await state.intake.jobs.close()
        await state.engine.dispose()


def _error_response(exc: BrokerError) -> ORJSONResponse:
    return ORJSONResponse(exc.to_body(), status_code=exc.status_code, headers=exc.headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(BrokerError)
    async def broker_error(_: Request, exc: BrokerError) -> ORJSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> ORJSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(part) for part in first["loc"][1:]) or None
        body = BrokerError(f"Invalid request: {first['msg']}.", param=param)
        body.error_type = "invalid_request_error"
        return ORJSONResponse(body.to_body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> ORJSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        body = {"error": {"message": str(exc.detail), "type": kind, "param": None, "code": None}}
        return ORJSONResponse(body, status_code=exc.status_code)

    @app.exception_handler(DBAPIError)
    @app.exception_handler(PoolTimeout)
    async def database_error(request: Request, exc: Exception) -> ORJSONResponse:
        # The transaction that failed wrote nothing, so no hold or job exists for it.
        logger.warning(
            "database error on %s %s: %s",
            request.method,
            request.url.path,
            type(exc.orig).__name__ if exc.orig else type(exc).__name__,
        )
        return _error_response(
            ServiceUnavailable(
                "The broker's database is unavailable or overloaded; nothing was charged. "
                "Resend the request shortly."
            )
        )

    @app.exception_handler(RedisError)
    async def redis_error(request: Request, exc: RedisError) -> ORJSONResponse:
        logger.warning("Redis error on %s %s: %s", request.method, request.url.path, exc)
        return _error_response(
            ServiceUnavailable("The broker's Redis is unavailable; resend the request shortly.")
        )

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, _: ClientDisconnect) -> Response:
        # The client closed the connection while sending its body: no job was created
        # and the client never reads this response.
        logger.debug("client disconnected during %s %s", request.method, request.url.path)
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> ORJSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        body = {
            "error": {
                "message": "The broker hit an internal error. The request may be "
                "resent; nothing is charged for a job that did not run.",
                "type": "server_error",
                "param": None,
                "code": None,
            }
        }
        return ORJSONResponse(body, status_code=500)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API; uvicorn calls this as a factory in each worker process."""
    settings = settings or get_settings()
    configure_logging(settings.log_level, settings.log_format)
    app = FastAPI(
        title="Inference broker",
        version="0.1.0",
        lifespan=_lifespan,
        default_response_class=ORJSONResponse,
    )
    app.state.services = _build_services(settings)
    _install_error_handlers(app)
    app.add_middleware(RequestMetricsMiddleware)
    app.add_middleware(RequestIdMiddleware)
    catalog = app.state.services.catalog
    app.add_route(
        "/metrics",
        metrics_app(
            settings.redis_url,
            catalog_queues(catalog, extra=[BILLING_QUEUE, WEBHOOKS_QUEUE, BATCHES_QUEUE]),
            catalog_targets(catalog),
        ),
        include_in_schema=False,
    )
    app.include_router(chat.router)
    app.include_router(catalog_routes.router)
    app.include_router(billing.router)
    app.include_router(admin.router)
    app.include_router(payments.router)
    # Asynchronous work: jobs, files, batches and webhooks.
    for module in (jobs, files, batches, webhooks):
        app.include_router(module.router)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz(request: Request) -> ORJSONResponse:
        state = services(request)
        checks = {}
        try:
            async with state.engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as exc:  # noqa: BLE001  (any failure means not ready)
            checks["database"] = f"failed: {type(exc).__name__}"
        try:
            await state.replies.ping()
            checks["redis"] = "ok"
        except Exception as exc:  # noqa: BLE001
            checks["redis"] = f"failed: {type(exc).__name__}"
        ready = all(value == "ok" for value in checks.values())
        return ORJSONResponse(
            {"status": "ok" if ready else "unavailable", "checks": checks},
            status_code=200 if ready else 503,
        )

    return app
