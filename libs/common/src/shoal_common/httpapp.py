"""HTTP pieces every service's FastAPI app shares: health, metrics, problem+json errors."""

from __future__ import annotations

import shutil
import time
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint

from shoal_common import telemetry, tracing
from shoal_common.db import DATABASE_UNAVAILABLE
from shoal_common.errors import ShoalError, Unavailable

ReadyCheck = Callable[[], Awaitable[bool]]

PROBLEM_JSON = "application/problem+json"


def health_router(ready: ReadyCheck) -> APIRouter:
    """/healthz, /livez, /readyz and /metrics."""
    router = APIRouter(include_in_schema=False)

    @router.get("/healthz")
    async def healthz() -> dict[str, object]:
        # The reference system's shape (free disk space), which its apiclient parses.
        def usage(path: str) -> dict[str, int]:
            u = shutil.disk_usage(path)
            return {"All": u.total, "Free": u.free, "Used": u.used}

        return {"FreeSpace": {"root": usage("/"), "tmp": usage("/tmp")}, "Status": "ok"}

    @router.get("/livez")
    async def livez() -> PlainTextResponse:
        return PlainTextResponse("OK")

    @router.get("/readyz")
    async def readyz() -> PlainTextResponse:
        if await ready():
            return PlainTextResponse("READY")
        return PlainTextResponse("NOT READY", status_code=503)

    @router.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return router


def problem_response(err: ShoalError) -> JSONResponse:
    return JSONResponse(err.problem(), status_code=err.http_status, media_type=PROBLEM_JSON)


def install_error_handlers(app: FastAPI) -> None:
    """ShoalError -> RFC 9457 problem+json; request validation -> 400 saying which field."""

    @app.exception_handler(ShoalError)
    async def _shoal_error(_: Request, exc: ShoalError) -> JSONResponse:
        return problem_response(exc)

    # The database (or another backing service) is unreachable, e.g. Postgres restarting: the
    # request did nothing, so say "retry" (503) instead of reporting a server bug (500).
    async def _unavailable(_: Request, exc: Exception) -> JSONResponse:
        err = Unavailable(
            "a backing service (database) is unavailable", hint="retry in a few seconds"
        )
        response = problem_response(err)
        response.headers["Retry-After"] = "2"
        return response

    for error in DATABASE_UNAVAILABLE:
        app.add_exception_handler(error, _unavailable)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body')}: {e.get('msg')}"
            for e in exc.errors()
        ]
        body = {
            "type": "https://shoal.dev/errors/invalid_input",
            "title": "invalid input",
            "status": 400,
            "detail": "; ".join(problems) or "invalid request",
        }
        return JSONResponse(body, status_code=400, media_type=PROBLEM_JSON)


class MetricsMiddleware(BaseHTTPMiddleware):
    """Counts and times requests by route template (never by raw path: no ids as labels)."""

    def __init__(self, app: object, service: str) -> None:
        super().__init__(app)  # type: ignore[arg-type]
        self._service = service

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        start = time.perf_counter()
        with tracing.start_span(
            f"{request.method} {request.url.path}",
            service=self._service,
            context=tracing.extract(dict(request.headers)),
            kind=tracing.SpanKind.SERVER,
        ) as span:
            response = await call_next(request)
            route = request.scope.get("route")
            template = getattr(route, "path", "unmatched")
            span.update_name(f"{request.method} {template}")
            span.set_attribute("http.status_code", response.status_code)
        telemetry.HTTP_REQUESTS.labels(self._service, template, str(response.status_code)).inc()
        telemetry.HTTP_LATENCY.labels(self._service, template).observe(time.perf_counter() - start)
        return response
