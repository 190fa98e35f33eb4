"""MetricsMiddleware (a plain ASGI middleware counting requests by route template) and
DirectRoutes (hot routes served without FastAPI's router)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from fastapi import FastAPI, Request, Response
from fastapi.responses import PlainTextResponse, StreamingResponse
from prometheus_client import REGISTRY
from starlette.types import Message

from shoal_common import tracing
from shoal_common.errors import NotFound
from shoal_common.httpapp import (
    PROBLEM_JSON,
    DirectRoute,
    DirectRoutes,
    MetricsMiddleware,
    install_error_handlers,
)

_names = itertools.count()


@pytest.fixture
def service() -> str:
    # A service label of its own per test: the metrics are process-wide.
    return f"test{next(_names)}"


def requests(service: str, route: str, status: int) -> float:
    value = REGISTRY.get_sample_value(
        "shoal_http_requests_total", {"service": service, "route": route, "status": str(status)}
    )
    return value or 0.0


def timed(service: str, route: str) -> float:
    value = REGISTRY.get_sample_value(
        "shoal_http_request_duration_seconds_count", {"service": service, "route": route}
    )
    return value or 0.0


def make_app(service: str, release: asyncio.Event | None = None) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(MetricsMiddleware, service=service)

    @app.get("/jobs/{job_id}")
    async def job(job_id: str) -> dict[str, str]:
        return {"id": job_id}

    @app.get("/missing")
    async def missing() -> None:
        raise NotFound("no such thing")

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"first"
            assert release is not None
            await release.wait()
            yield b"second"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    return app


def client(app: FastAPI) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


async def test_counts_and_times_by_route_template(service: str) -> None:
    async with client(make_app(service)) as http:
        assert (await http.get("/jobs/a")).status_code == 200
        assert (await http.get("/jobs/b")).status_code == 200
        assert (await http.get("/missing")).status_code == 404
        assert (await http.get("/no/such/path")).status_code == 404
    assert requests(service, "/jobs/{job_id}", 200) == 2
    assert timed(service, "/jobs/{job_id}") == 2
    assert requests(service, "/missing", 404) == 1
    assert requests(service, "unmatched", 404) == 1
    assert timed(service, "unmatched") == 1


async def test_an_exception_counts_as_500_and_propagates(service: str) -> None:
    async with client(make_app(service)) as http:
        response = await http.get("/boom")
    assert response.status_code == 500  # Starlette's ServerErrorMiddleware, outside ours
    assert requests(service, "/boom", 500) == 1
    assert timed(service, "/boom") == 1

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        pass

    async def failing(scope: object, receive: object, send: object) -> None:
        raise ValueError("before the response")

    middleware = MetricsMiddleware(failing, service=service)
    with pytest.raises(ValueError, match="before the response"):
        await middleware(http_scope("/x"), receive, send)
    assert requests(service, "unmatched", 500) == 1


def http_scope(path: str) -> dict[str, object]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"test")],
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
    }


async def test_streamed_responses_are_passed_on_unbuffered(service: str) -> None:
    release = asyncio.Event()
    app = make_app(service, release)
    sent: list[Message] = []
    first_chunk = asyncio.Event()
    disconnect = asyncio.Event()

    async def receive() -> Message:
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)
        if message.get("body") == b"first":
            first_chunk.set()

    task = asyncio.create_task(app(http_scope("/stream"), receive, send))
    await asyncio.wait_for(first_chunk.wait(), 10)
    # The first chunk is out while the endpoint still waits; the request is counted already.
    assert not task.done()
    assert sent[0]["type"] == "http.response.start"
    assert requests(service, "/stream", 200) == 1
    release.set()
    await asyncio.wait_for(task, 10)
    assert [m.get("body") for m in sent[1:]] == [b"first", b"second", b""]
    disconnect.set()


async def test_non_http_scopes_pass_through(service: str) -> None:
    seen: list[str] = []

    async def inner(scope: dict[str, object], receive: object, send: object) -> None:
        seen.append(str(scope["type"]))

    middleware = MetricsMiddleware(inner, service=service)  # type: ignore[arg-type]
    await middleware({"type": "lifespan"}, None, None)  # type: ignore[arg-type]
    assert seen == ["lifespan"]


@pytest.fixture
def exporter() -> Iterator[tracing.InMemorySpanExporter]:
    yield tracing.use_in_memory_exporter()
    tracing.shutdown_tracing()


async def test_server_spans_are_named_by_route_template(
    service: str, exporter: tracing.InMemorySpanExporter
) -> None:
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with client(make_app(service)) as http:
        await http.get("/jobs/a", headers={"traceparent": traceparent})
        await http.get("/boom")
    spans = {s.name: s for s in exporter.get_finished_spans()}
    ok = spans["GET /jobs/{job_id}"]
    assert ok.kind is tracing.SpanKind.SERVER
    assert ok.attributes is not None
    assert ok.attributes["http.status_code"] == 200
    assert ok.context is not None
    assert format(ok.context.trace_id, "032x") == traceparent[3:35]
    failed = spans["GET /boom"]
    assert failed.attributes is not None
    assert failed.attributes["http.status_code"] == 500
    assert requests(service, "/jobs/{job_id}", 200) == 1


def make_direct_app(service: str, calls: list[str]) -> FastAPI:
    """/hot is served by DirectRoutes; /hot is also registered with FastAPI, answering
    differently, so a test can tell which of the two served a request."""
    app = FastAPI()
    install_error_handlers(app)

    async def hot(request: Request) -> Response:
        calls.append(request.url.path)
        kind = request.query_params.get("raise")
        if kind == "shoal":
            raise NotFound("no such hot thing")
        if kind == "bug":
            raise RuntimeError("a bug")
        return PlainTextResponse(f"direct {(await request.body()).decode()}")

    routes = {("POST", path): DirectRoute(path, hot) for path in ("/hot", "/v1/hot")}
    app.add_middleware(DirectRoutes, routes=routes, exception_handlers=app.exception_handlers)
    app.add_middleware(MetricsMiddleware, service=service)

    @app.post("/hot")
    async def routed() -> PlainTextResponse:
        return PlainTextResponse("routed")

    @app.get("/hot")
    async def routed_get() -> PlainTextResponse:
        return PlainTextResponse("routed get")

    return app


async def test_direct_routes_serve_exact_method_and_path_without_the_router(service: str) -> None:
    calls: list[str] = []
    async with client(make_direct_app(service, calls)) as http:
        assert (await http.post("/hot", content=b"body")).text == "direct body"
        assert (await http.post("/v1/hot", content=b"two")).text == "direct two"
        # Any other method or path is the app's.
        assert (await http.get("/hot")).text == "routed get"
        assert (await http.post("/hot/")).status_code in (307, 404)
    assert calls == ["/hot", "/v1/hot"]
    # Counted under their own templates, as the router's routes are.
    assert requests(service, "/hot", 200) == 2  # the direct POST and the routed GET
    assert requests(service, "/v1/hot", 200) == 1


async def test_direct_route_errors_go_to_the_apps_exception_handlers(service: str) -> None:
    calls: list[str] = []
    async with client(make_direct_app(service, calls)) as http:
        missing = await http.post("/hot?raise=shoal")
        bug = await http.post("/hot?raise=bug")
    # NotFound is a ShoalError: install_error_handlers' problem+json, found by its class.
    assert missing.status_code == 404
    assert missing.headers["content-type"] == PROBLEM_JSON
    assert missing.json()["detail"] == "no such hot thing"
    # No handler: ServerErrorMiddleware's 500, counted as one, as from the router.
    assert bug.status_code == 500
    assert requests(service, "/hot", 404) == 1
    assert requests(service, "/hot", 500) == 1
