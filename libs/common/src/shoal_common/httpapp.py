"""HTTP pieces every service's FastAPI app shares: health, metrics, problem+json errors."""

from __future__ import annotations

import shutil
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.telemetry import TelemetryConfig
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shoal_common import telemetry, tracing
from shoal_common.db import DATABASE_UNAVAILABLE
from shoal_common.errors import ShoalError, Unavailable

ReadyCheck = Callable[[], Awaitable[bool]]

PROBLEM_JSON = "application/problem+json"

# For ``FastAPI(telemetry=...)``. FastAPI's own OpenTelemetry asks the global providers on every
# request whether it is on (~1.7% of the requester's CPU under load, ADR 0024); Shoal's spans
# come from each service's own provider and MetricsMiddleware (tracing.py, ADR 0007), so it
# stays off and a global provider set by someone else cannot double every server span.
NO_FASTAPI_TELEMETRY: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}


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


class MetricsMiddleware:
    """Counts and times requests by route template (never by raw path: no ids as labels).

    A plain ASGI middleware: Starlette's ``BaseHTTPMiddleware`` ran every request's app in a
    task of its own with memory streams between the two (about 4% of the requester's CPU under
    load). The request is counted when its response starts (the latency is the time to the
    status line, so a streamed or SSE response is counted at once and passed on unbuffered);
    an exception raised before that counts as a 500 and propagates.
    """

    def __init__(self, app: ASGIApp, service: str) -> None:
        self.app = app
        self._service = service
        # Labelled children looked up once per (route, status): labels() is not free.
        self._children: dict[tuple[str, int], tuple[Counter, Histogram]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        if not tracing.enabled():
            started = False

            async def send_counted(message: Message) -> None:
                nonlocal started
                if message["type"] == "http.response.start" and not started:
                    started = True
                    self._record(scope, message["status"], start)
                await send(message)

            try:
                await self.app(scope, receive, send_counted)
            except BaseException:
                if not started:
                    self._record(scope, 500, start)
                raise
            return
        await self._traced(scope, receive, send, start)

    async def _traced(self, scope: Scope, receive: Receive, send: Send, start: float) -> None:
        method = scope["method"]
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        status: int | None = None
        with tracing.start_span(
            f"{method} {scope['path']}",
            service=self._service,
            context=tracing.extract(headers),
            kind=tracing.SpanKind.SERVER,
        ) as span:

            async def send_counted(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start" and status is None:
                    status = message["status"]
                    template = self._record(scope, status, start)
                    span.update_name(f"{method} {template}")
                    span.set_attribute("http.status_code", status)
                await send(message)

            try:
                await self.app(scope, receive, send_counted)
            except BaseException:
                if status is None:
                    template = self._record(scope, 500, start)
                    span.update_name(f"{method} {template}")
                    span.set_attribute("http.status_code", 500)
                raise

    def _record(self, scope: Scope, status: int, start: float) -> str:
        template: str = getattr(scope.get("route"), "path", "unmatched")
        children = self._children.get((template, status))
        if children is None:
            children = (
                telemetry.HTTP_REQUESTS.labels(self._service, template, str(status)),
                telemetry.HTTP_LATENCY.labels(self._service, template),
            )
            self._children[(template, status)] = children
        children[0].inc()
        children[1].observe(time.perf_counter() - start)
        return template


DirectHandler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class DirectRoute:
    """A route :class:`DirectRoutes` serves. ``path`` is its template, as ``scope["route"]``
    carries it for :class:`MetricsMiddleware`."""

    path: str
    handler: DirectHandler


class DirectRoutes:
    """Serves a few hot routes, by exact method and path, without FastAPI's router (ADR 0031).

    FastAPI's route matching, dependency solving and its layers of exception wrapping cost the
    requester about as much CPU as verifying and storing a submit. This layer sits inside
    :class:`MetricsMiddleware` and the auth middleware, so a request here is let in, counted and
    traced as before. An exception the handler raises goes to the app's exception handlers
    (looked up by its class, as Starlette's ExceptionMiddleware does), and one without a handler
    propagates to ServerErrorMiddleware, a 500, as it did from the router. Any other method or
    path (a trailing slash, a HEAD) goes to the app unchanged.
    """

    def __init__(
        self,
        app: ASGIApp,
        routes: Mapping[tuple[str, str], DirectRoute],
        exception_handlers: Mapping[Any, Callable[..., Any]],
    ) -> None:
        self.app = app
        self._routes = dict(routes)
        # The app's own dict, read at request time: handlers added later are seen.
        self._exception_handlers = exception_handlers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = (
            self._routes.get((scope["method"], scope["path"])) if scope["type"] == "http" else None
        )
        if route is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = route
        request = Request(scope, receive, send)
        try:
            response = await route.handler(request)
        except Exception as exc:
            handler = self._handler_for(exc)
            if handler is None:
                raise
            response = await handler(request, exc)
        await response(scope, receive, send)

    def _handler_for(self, exc: Exception) -> Callable[..., Any] | None:
        for cls in type(exc).__mro__:
            handler = self._exception_handlers.get(cls)
            if handler is not None:
                return handler
        return None
