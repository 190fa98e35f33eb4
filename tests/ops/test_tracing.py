"""Tracing: off by default, and one trace across a NATS hop (context carried in headers)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext

from shoal_common import tracing


def _context(span: ReadableSpan) -> SpanContext:
    ctx = span.get_span_context()
    assert ctx is not None
    return ctx


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = tracing.use_in_memory_exporter()
    yield exporter
    tracing.shutdown_tracing()


def test_off_by_default_costs_nothing() -> None:
    tracing.shutdown_tracing()
    assert not tracing.enabled()
    with tracing.start_span("submit", job_id="j1") as span:
        assert not span.is_recording()
        headers = tracing.inject({})
    assert headers == {}
    assert tracing.current_trace_id() is None
    # extract gives an empty context, which start_span takes as "no parent"
    assert not dict(tracing.extract({"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}))


def test_configured_only_by_otel_environment() -> None:
    assert not tracing.tracing_requested({})
    assert tracing.tracing_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert tracing.tracing_requested({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1"})
    assert tracing.tracing_requested({"OTEL_TRACES_EXPORTER": "console"})
    assert not tracing.tracing_requested({"OTEL_TRACES_EXPORTER": "none"})
    assert not tracing.tracing_requested(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}
    )
    assert not tracing.configure_tracing("requester", environ={})
    assert not tracing.enabled()


def test_configure_with_console_exporter_names_the_service() -> None:
    try:
        assert tracing.configure_tracing(
            "compute", instance_id="node-1", environ={"OTEL_TRACES_EXPORTER": "console"}
        )
        assert tracing.enabled()
        provider_tracer = tracing.tracer("compute", instance_id="node-1")
        span = provider_tracer.start_span("x")
        attrs = span.resource.attributes  # type: ignore[attr-defined]
        assert attrs["service.name"] == "shoal-compute"
        assert attrs["service.instance.id"] == "node-1"
    finally:
        tracing.shutdown_tracing()


def test_context_crosses_a_message_hop(exporter: InMemorySpanExporter) -> None:
    # producer: a span is current while the message is built; its context goes into the headers
    with tracing.start_span("submit", service="requester", job_id="job-1") as parent:
        headers: dict[str, str] = {"Nats-Msg-Id": "evt-1"}
        tracing.inject(headers)
        producer_trace = tracing.current_trace_id()
    assert "traceparent" in headers
    assert headers["Nats-Msg-Id"] == "evt-1"

    # consumer: somewhere else (no current span), the headers are all it has
    ctx = tracing.extract({k.upper(): v for k, v in headers.items()})  # header case is lost
    with (
        tracing.start_span(
            "handle result_proposed",
            service="verifier",
            context=ctx,
            kind=tracing.SpanKind.CONSUMER,
            execution_id="e-1",
        ),
        tracing.start_span("db.update", service="verifier"),
    ):
        pass

    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"submit", "handle result_proposed", "db.update"}
    root, child, grandchild = (
        spans["submit"],
        spans["handle result_proposed"],
        spans["db.update"],
    )
    trace_id = parent.get_span_context().trace_id
    assert producer_trace == format(trace_id, "032x")
    assert {_context(s).trace_id for s in spans.values()} == {trace_id}
    assert child.parent is not None
    assert child.parent.span_id == _context(root).span_id
    assert grandchild.parent is not None
    assert grandchild.parent.span_id == _context(child).span_id
    assert child.kind == tracing.SpanKind.CONSUMER
    assert child.attributes is not None
    assert child.attributes["shoal.execution_id"] == "e-1"
    assert root.resource.attributes["service.name"] == "shoal-requester"
    assert child.resource.attributes["service.name"] == "shoal-verifier"


def test_exceptions_are_recorded_and_reraised(exporter: InMemorySpanExporter) -> None:
    with pytest.raises(ValueError, match="boom"), tracing.start_span("run"):
        raise ValueError("boom")
    (span,) = exporter.get_finished_spans()
    assert not span.status.is_ok
    assert any(e.name == "exception" for e in span.events)


def test_no_active_span_injects_nothing(exporter: InMemorySpanExporter) -> None:
    assert tracing.inject({}) == {}
    assert not exporter.get_finished_spans()


async def test_traced_handler_continues_the_producers_trace(
    exporter: InMemorySpanExporter,
) -> None:
    from shoal_common.events import Envelope

    seen: list[str | None] = []

    async def handler(env: Envelope) -> None:
        seen.append(tracing.current_trace_id())

    with tracing.start_span("submit", service="requester") as parent:
        envelope = Envelope(
            type="result_accepted",
            producer="verifier",
            trace=tracing.inject({}),
            data={"job_id": "j-1", "execution_id": "e-1"},
        )
    await tracing.traced_handler("publisher", handler)(envelope)

    trace_id = format(parent.get_span_context().trace_id, "032x")
    assert seen == [trace_id]
    spans = {s.name: s for s in exporter.get_finished_spans()}
    consumer = spans["handle result_accepted"]
    assert consumer.kind == tracing.SpanKind.CONSUMER
    assert consumer.resource.attributes["service.name"] == "shoal-publisher"
    assert consumer.attributes is not None
    assert consumer.attributes["shoal.job_id"] == "j-1"
    assert consumer.parent is not None
    assert consumer.parent.span_id == _context(spans["submit"]).span_id


def test_continued_from_makes_the_remote_context_current(exporter: InMemorySpanExporter) -> None:
    with tracing.start_span("ask_bid", service="requester"):
        headers = tracing.inject({})
        trace_id = tracing.current_trace_id()
    assert tracing.current_trace_id() is None
    with tracing.continued_from(headers):
        assert tracing.current_trace_id() == trace_id
        with tracing.start_span("bid", service="compute") as span:
            assert format(span.get_span_context().trace_id, "032x") == trace_id
    assert tracing.current_trace_id() is None


def test_log_lines_get_trace_ids(exporter: InMemorySpanExporter) -> None:
    assert tracing.add_trace_ids(None, "info", {}) == {}
    with tracing.start_span("x"):
        event = tracing.add_trace_ids(None, "info", {"event": "job_submitted"})
    assert event["trace_id"] == format(int(event["trace_id"], 16), "032x")
    assert len(event["span_id"]) == 16


def test_traced_handler_is_a_passthrough_when_off() -> None:
    import asyncio

    from shoal_common.events import Envelope

    tracing.shutdown_tracing()
    calls: list[Envelope] = []

    async def handler(env: Envelope) -> None:
        calls.append(env)

    env = Envelope(type="t", producer="compute", data={})
    asyncio.run(tracing.traced_handler("verifier", handler)(env))
    assert calls == [env]
    with tracing.continued_from({"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}):
        assert tracing.current_trace_id() is None


async def test_sql_inside_a_traced_operation_is_a_child_span(
    exporter: InMemorySpanExporter,
) -> None:
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine("sqlite+aiosqlite:///:memory:")
    try:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))  # no span current: no orphan trace
            with tracing.start_span("submit", service="requester"):
                await conn.execute(text("SELECT :secret"), {"secret": "hunter2"})
                with pytest.raises(OperationalError):
                    await conn.execute(text("SELECT * FROM missing"))
    finally:
        await engine.dispose()
    finished = exporter.get_finished_spans()
    assert sorted(s.name for s in finished) == ["db SELECT", "db SELECT", "submit"]
    (submit,) = (s for s in finished if s.name == "submit")
    db = [s for s in finished if s.name == "db SELECT"]
    assert len(db) == 2
    for span in db:
        assert span.parent is not None
        assert span.parent.span_id == _context(submit).span_id
        assert span.kind == tracing.SpanKind.CLIENT
        assert span.resource.attributes["service.name"] == "shoal-requester"
        assert span.attributes is not None
        assert span.attributes["db.system"] == "sqlite"
        assert "hunter2" not in str(dict(span.attributes))
    assert db[0].status.is_ok
    assert not db[1].status.is_ok


@pytest.mark.parametrize("traced", [True, False])
async def test_log_lines_in_a_handler_carry_job_execution_and_trace_ids(traced: bool) -> None:
    from shoal_common.events import Envelope
    from shoal_common.logging import shared_processors

    if traced:
        tracing.use_in_memory_exporter()
    else:
        tracing.shutdown_tracing()
    lines: list[dict[str, object]] = []

    async def handler(env: Envelope) -> None:
        event: dict[str, object] = {"event": "result_published"}
        for processor in shared_processors():
            event = dict(processor(None, "info", event))  # type: ignore[arg-type]
        lines.append(event)

    envelope = Envelope(
        type="result_accepted", producer="verifier", data={"job_id": "j-1", "execution_id": "e-1"}
    )
    try:
        await tracing.traced_handler("publisher", handler)(envelope)
    finally:
        tracing.shutdown_tracing()
    (line,) = lines
    assert (line["job_id"], line["execution_id"], line["level"]) == ("j-1", "e-1", "info")
    assert ("trace_id" in line) is traced
    # Nothing stays bound after the handler.
    import structlog

    assert "job_id" not in structlog.contextvars.get_contextvars()
