"""create_app(settings): routes, error handlers, body-size limit, HTTP metrics, and the engine's lifespan."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import __version__
from service.api import explorer, repository, v1, v2
from service.api.access import RequestContext
from service.api.common import CLIENT_GONE, JSON, ClientDisconnected, counted_failure, validation_error
from service.api.fast_route import FastClassify
from service.config import Settings
from service.engine.handle import EngineHandle
from service.engine.launchers import ThreadLauncher
from service.engine.local_engine import BackendLoader, LocalEngine
from service.engine.remote import RemoteEngine
from service.errors import FRAMEWORK_ERRORS, ErrorKind, ServiceError
from service.metrics import CONTENT_TYPE, Metrics

if TYPE_CHECKING:
    import grpc

log = logging.getLogger(__name__)


class BodyLimitAndMetrics:
    """Pure ASGI middleware: refuses bodies over the limit (413) and counts every HTTP request by route/status."""

    def __init__(self, app: ASGIApp, settings: Settings, metrics: Metrics) -> None:
        self.app, self.limit, self.metrics = app, settings.max_body_bytes, metrics

    def _too_large(self) -> ServiceError:
        return ServiceError(ErrorKind.PAYLOAD_TOO_LARGE, f"request body is larger than {self.limit} bytes")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500
        limit = self.limit

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > limit:
            await counted_failure(self.metrics, "", self._too_large())(scope, receive, send_wrapper)
        else:
            received = 0

            async def receive_wrapper() -> Message:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        raise _BodyTooLarge(413, self._too_large().message)
                return message

            try:
                await self.app(scope, receive_wrapper, send_wrapper)
            except _BodyTooLarge:
                # Only the fast route lets it reach here (FastAPI's routes answer it in on_http_error, counted).
                model = scope.get("state", {}).get("model", "")
                await counted_failure(self.metrics, model, self._too_large())(scope, receive, send_wrapper)
        route = scope.get("route")
        path = getattr(route, "path", "unmatched")
        if path != "/metrics":
            model = scope.get("state", {}).get("model", "")
            self.metrics.requests.labels(model, path, str(status), "http").inc()
            self.metrics.request_duration.labels(model, path, "http").observe(time.perf_counter() - t0)


class _BodyTooLarge(StarletteHTTPException):
    """Raised while a streamed body is read. An HTTPException, so FastAPI passes it to the app's handler (413)
    instead of turning it into a 400 'error parsing the body'."""


def model_readiness(app: FastAPI) -> list[tuple[str, bool]]:
    engine = getattr(app.state, "engine", None)
    if engine is None:  # still starting
        return []
    return [(n, w.ready) for n, w in engine.models.items()] + [(n, False) for n in engine.failed]


def create_app(settings: Settings | None = None, loader: BackendLoader | None = None) -> FastAPI:
    """The app. `loader` turns a model folder into a backend (default: the real ones, per the settings); the fast
    API tests pass a fake, and then a "model process" is a ModelServer on a thread of this process."""
    settings = settings or Settings()
    remote = settings.model_process
    metrics = Metrics(engine=not remote)  # with a model process, the engine's metrics live there
    app = FastAPI(
        title="moe-serve",
        version=__version__,
        lifespan=_engine_lifespan(settings, metrics, loader, remote),
        description="Mixture-of-Experts text classification with expert-grouped dynamic batching.",
    )
    app.state.settings = settings  # the API reads its HTTP limits here
    app.state.metrics = metrics
    metrics.watch_models(lambda: model_readiness(app))
    app.include_router(v1.router)
    app.include_router(v2.router)
    app.include_router(explorer.router)  # GET /explorer: the routing explorer page
    app.include_router(repository.router)
    _add_error_handlers(app, metrics)
    _add_ops_routes(app, metrics)
    app.add_middleware(FastClassify, state=app.state)  # the hot route, past FastAPI's machinery
    app.add_middleware(BodyLimitAndMetrics, settings=settings, metrics=metrics)
    # Outermost: ids, draining and auth before any body is read.
    app.add_middleware(RequestContext, settings=settings, state=app.state)
    return app


def _engine_lifespan(
    settings: Settings, metrics: Metrics, loader: BackendLoader | None, remote: bool
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Start the engine (in a model process when `remote`) before traffic, watch it, close it at shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine: EngineHandle
        if remote:
            engine = RemoteEngine(settings, ThreadLauncher(loader) if loader else None, metrics)
        else:
            engine = LocalEngine(settings, metrics, loader)
        app.state.engine = engine
        await engine.start()  # every model loaded and warmed up before accepting traffic
        # The engine cannot serve (every model failed, or a crash with exit_on_model_crash; in-process: a dead or
        # hung worker): stop serving (the CLI's server drains what it can; under another runner, SIGTERM) and exit
        # non-zero (engine.fatal) for the orchestrator to restart the process.
        stop = getattr(app.state, "stop_server", None) or (lambda: os.kill(os.getpid(), signal.SIGTERM))
        engine.watch(lambda _: stop())
        grpc_server = await _start_grpc(app) if settings.grpc_port is not None else None
        yield
        if grpc_server is not None:  # uvicorn has drained HTTP by now; gRPC calls in flight get the same grace
            await grpc_server.stop(settings.shutdown_grace_s)
        await engine.close()

    return lifespan


async def _start_grpc(app: FastAPI) -> grpc.aio.Server:
    from service.api.grpc_v2.server import start  # grpc is imported only where it is served

    return await start(app.state)


def _add_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """Every error answered with the error table's body and status, and counted."""

    def failure(request: Request, err: ServiceError) -> JSON:
        return counted_failure(metrics, getattr(request.state, "model", ""), err)

    @app.exception_handler(ServiceError)
    async def on_service_error(request: Request, err: ServiceError) -> JSON:
        return failure(request, err)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSON:
        return failure(request, validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSON:
        # Errors raised by the framework itself: unknown route, wrong method, streamed body over the limit.
        kind = FRAMEWORK_ERRORS.get(exc.status_code)
        if kind is not None and kind is not ErrorKind.NOT_FOUND:
            message = "request body could not be decoded as UTF-8 JSON" if exc.status_code == 400 else str(exc.detail)
            return failure(request, ServiceError(kind, message, field="body" if exc.status_code == 400 else None))
        body = {"error": str(exc.detail), "type": kind.value if kind else "http_error"}
        return JSON(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(ClientDisconnected)
    async def on_disconnect(request: Request, exc: ClientDisconnected) -> JSON:
        return failure(request, CLIENT_GONE)


def _add_ops_routes(app: FastAPI, metrics: Metrics) -> None:
    """/metrics (the API process's own plus the engine's) and /health."""

    @app.get(
        "/metrics",
        tags=["ops"],
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}}}},
    )
    async def prometheus(request: Request) -> Response:
        engine_part = await request.app.state.engine.metrics_exposition()
        return Response(metrics.exposition() + engine_part, media_type=CONTENT_TYPE)

    @app.get("/health", tags=["ops"], summary="Liveness (same as /v2/health/live)")
    async def health() -> JSON:
        return JSON({"status": "ok"})
