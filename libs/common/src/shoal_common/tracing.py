"""OpenTelemetry tracing: off by default, configured by the standard ``OTEL_*`` variables.

Tracing turns on only when the environment asks for it: ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set (OTLP over HTTP/protobuf), or
``OTEL_TRACES_EXPORTER`` names an exporter (``otlp``, ``console``; ``none`` keeps it off).
``OTEL_SDK_DISABLED=true`` wins over everything. The rest is read by the SDK itself:
``OTEL_EXPORTER_OTLP_HEADERS`` (e.g. ``x-honeycomb-team=KEY``), ``OTEL_TRACES_SAMPLER`` and
``OTEL_TRACES_SAMPLER_ARG``, ``OTEL_BSP_*``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_SERVICE_NAME``.

While off, :func:`start_span` hands back the no-op ``INVALID_SPAN`` without touching the
context, and :func:`inject` leaves the headers alone, so an unconfigured service pays one
boolean test per call.

Each service gets its own ``TracerProvider`` (``service.name = shoal-<service>``) rather than
the process-global one, because a devstack runs every service in one process and the spans must
still say which service made them. They share one span processor, so one exporter.

SQL statements run inside a traced operation become CLIENT child spans (``db SELECT`` ...,
with ``db.system`` and ``db.statement``; never the parameters): SQLAlchemy engine events,
listened to only once tracing is on. Statements with no current span (housekeeping, a commit on
a worker thread) make no span, so no orphan traces.

Context crosses NATS as W3C ``traceparent``/``tracestate`` headers: the producer calls
:func:`inject` on the envelope's ``trace`` dict (sent as NATS headers), the consumer calls
:func:`extract` on it and starts its span with ``context=``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, MutableMapping
from typing import Any, Protocol, TypeVar

import structlog
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.util.types import AttributeValue

__all__ = [
    "InMemorySpanExporter",
    "SpanKind",
    "add_trace_ids",
    "configure_tracing",
    "continued_from",
    "current_trace_id",
    "enabled",
    "extract",
    "inject",
    "shutdown_tracing",
    "start_span",
    "traced_handler",
    "tracer",
    "tracing_requested",
    "use_in_memory_exporter",
]

log = logging.getLogger(__name__)

INSTRUMENTATION_NAME = "shoal"
DEFAULT_SERVICE = "shoal"
# Prefix of the attributes given as keyword arguments to start_span (job_id -> shoal.job_id).
ATTRIBUTE_PREFIX = "shoal."


class _State:
    """Process-wide tracing state; guarded by a lock because services may start in threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.enabled = False
        self.processor: SpanProcessor | None = None
        self.providers: dict[str, TracerProvider] = {}
        self.default_service: str | None = None


_state = _State()


def _env_true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def tracing_requested(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the ``OTEL_*`` environment asks for traces to be exported."""
    env = os.environ if environ is None else environ
    if _env_true(env.get("OTEL_SDK_DISABLED")):
        return False
    exporters = _exporter_names(env)
    if exporters is not None:
        return bool(exporters)
    return bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def _exporter_names(env: Mapping[str, str]) -> list[str] | None:
    """``OTEL_TRACES_EXPORTER`` as a list (``none`` -> empty); None when unset."""
    raw = env.get("OTEL_TRACES_EXPORTER")
    if raw is None or not raw.strip():
        return None
    names = [n.strip().lower() for n in raw.split(",") if n.strip()]
    return [n for n in names if n != "none"]


def _make_exporters(env: Mapping[str, str]) -> list[SpanExporter]:
    names = _exporter_names(env)
    if names is None:
        names = ["otlp"]  # an endpoint was given
    exporters: list[SpanExporter] = []
    for name in names:
        if name == "otlp":
            protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
                "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
            )
            if protocol != "http/protobuf":
                # Only the HTTP exporter ships with Shoal; every collector and Honeycomb take it.
                log.warning("otel protocol %s not available, using http/protobuf", protocol)
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporters.append(OTLPSpanExporter())  # endpoint, headers, timeout: from OTEL_*
        elif name == "console":
            exporters.append(ConsoleSpanExporter())
        else:
            log.warning("unknown OTEL_TRACES_EXPORTER %r ignored", name)
    return exporters


def configure_tracing(
    service: str,
    *,
    instance_id: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> bool:
    """Turn tracing on for ``service`` if the environment asks for it; returns whether it is on.

    Call once per service at start-up (``service`` is ``requester``, ``compute``, ...).
    Idempotent: the exporter is built once per process; later calls only add the service's
    tracer provider. ``instance_id`` (a node id) becomes ``service.instance.id``.
    """
    env = os.environ if environ is None else environ
    with _state.lock:
        if _state.processor is None:
            if not tracing_requested(env):
                return False
            exporters = _make_exporters(env)
            if not exporters:
                return False
            processors: list[SpanProcessor] = [BatchSpanProcessor(e) for e in exporters]
            _state.processor = processors[0] if len(processors) == 1 else _Fanout(processors)
            _state.enabled = True
            _listen_to_sql()
        _provider_locked(service, instance_id, env)
        if _state.default_service is None:
            _state.default_service = service
        return True


def use_in_memory_exporter() -> InMemorySpanExporter:
    """For tests: trace everything into a fresh in-memory exporter (synchronously) and return it.

    Replaces whatever was configured before; call :func:`shutdown_tracing` to turn it off.
    """
    exporter = InMemorySpanExporter()
    with _state.lock:
        _reset_locked()
        _state.processor = SimpleSpanProcessor(exporter)
        _state.enabled = True
        _listen_to_sql()
    return exporter


def shutdown_tracing() -> None:
    """Flush and stop the exporter; tracing is off afterwards (until configured again)."""
    with _state.lock:
        _reset_locked()


def _reset_locked() -> None:
    if _state.processor is not None:
        with contextlib.suppress(Exception):
            _state.processor.shutdown()
    _state.processor = None
    _state.providers.clear()
    _state.default_service = None
    _state.enabled = False


def enabled() -> bool:
    """Whether spans are being recorded in this process."""
    return _state.enabled


def _provider_locked(
    service: str, instance_id: str | None, env: Mapping[str, str]
) -> TracerProvider:
    key = f"{service}/{instance_id or ''}"
    provider = _state.providers.get(key)
    if provider is None:
        assert _state.processor is not None
        attrs: dict[str, AttributeValue] = {
            # OTEL_SERVICE_NAME lets an operator rename everything (one name per deployment).
            "service.name": env.get("OTEL_SERVICE_NAME") or f"shoal-{service}",
            "service.namespace": "shoal",
        }
        if instance_id:
            attrs["service.instance.id"] = instance_id
        # shutdown_on_exit=False: the shared processor is flushed once, by shutdown_tracing.
        provider = TracerProvider(resource=Resource.create(attrs), shutdown_on_exit=False)
        provider.add_span_processor(_state.processor)
        _state.providers[key] = provider
    return provider


def tracer(service: str | None = None, *, instance_id: str | None = None) -> Tracer:
    """The tracer of ``service`` (the first configured service's when None); no-op when off."""
    if not _state.enabled:
        return trace.NoOpTracer()
    with _state.lock:
        if _state.processor is None:  # raced with a shutdown
            return trace.NoOpTracer()
        name = service or _state.default_service or DEFAULT_SERVICE
        provider = _provider_locked(name, instance_id, os.environ)
    return provider.get_tracer(INSTRUMENTATION_NAME)


@contextlib.contextmanager
def start_span(
    name: str,
    *,
    service: str | None = None,
    context: Context | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, AttributeValue] | None = None,
    **attrs: AttributeValue | None,
) -> Iterator[Span]:
    """A span around a block, made current inside it; exceptions are recorded and re-raised.

    Keyword attributes get the ``shoal.`` prefix (``job_id=...`` -> ``shoal.job_id``) and None
    values are dropped; ``attributes`` takes fully qualified names (``http.route``).
    ``context`` is the parent (from :func:`extract`); by default the current span is.
    """
    if not _state.enabled:
        yield trace.INVALID_SPAN
        return
    merged: dict[str, AttributeValue] = dict(attributes or {})
    merged.update({ATTRIBUTE_PREFIX + k: v for k, v in attrs.items() if v is not None})
    with tracer(service).start_as_current_span(
        name, context=context, kind=kind, attributes=merged
    ) as span:
        yield span


def inject(headers: dict[str, str], context: Context | None = None) -> dict[str, str]:
    """Add the current (or given) trace context to ``headers`` as W3C ``traceparent``; returns
    ``headers``. Does nothing while tracing is off or when there is no active span."""
    if _state.enabled:
        propagate.inject(headers, context=context)
    return headers


def extract(headers: Mapping[str, str] | None) -> Context:
    """The trace context carried in ``headers`` (NATS or HTTP; any key case), as a parent for
    :func:`start_span`. An empty Context when there is none or tracing is off."""
    if not _state.enabled or not headers:
        return Context()
    carrier = {str(k).lower(): str(v) for k, v in headers.items()}
    return propagate.extract(carrier, context=Context())


@contextlib.contextmanager
def continued_from(headers: Mapping[str, str] | None) -> Iterator[None]:
    """Make the trace context carried in ``headers`` current inside the block, without a span of
    its own (for transports that do not know which service handles the message: the handler
    starts the span). Does nothing while tracing is off or when there is no context."""
    if not _state.enabled or not headers:
        yield
        return
    token = otel_context.attach(extract(headers))
    try:
        yield
    finally:
        otel_context.detach(token)


class TracedMessage(Protocol):
    """What :func:`traced_handler` reads from a message (``shoal_common.events.Envelope``)."""

    @property
    def id(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def trace(self) -> dict[str, str]: ...
    @property
    def data(self) -> dict[str, Any]: ...


M = TypeVar("M", bound=TracedMessage)


def traced_handler(
    service: str, handler: Callable[[M], Awaitable[None]]
) -> Callable[[M], Coroutine[Any, Any, None]]:
    """Wrap an event handler: each message is handled inside a CONSUMER span of ``service``
    named ``handle <type>``, child of the producer's span (from the message's ``trace``). While
    tracing is off the handler is called as it is. Either way the message's ``job_id`` and
    ``execution_id`` are bound to every log line the handler writes."""

    async def handle(message: M) -> None:
        data = message.data
        job_id = _str_or_none(data.get("job_id"))
        execution_id = _str_or_none(data.get("execution_id"))
        ids = {k: v for k, v in (("job_id", job_id), ("execution_id", execution_id)) if v}
        with structlog.contextvars.bound_contextvars(**ids):
            if not _state.enabled:
                await handler(message)
                return
            with start_span(
                f"handle {message.type}",
                service=service,
                context=extract(message.trace),
                kind=SpanKind.CONSUMER,
                event_id=message.id,
                job_id=job_id,
                execution_id=execution_id,
            ):
                await handler(message)

    return handle


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def add_trace_ids(
    logger: object, method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: bind ``trace_id``/``span_id`` of the current span to each log line."""
    if _state.enabled:
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            event_dict.setdefault("trace_id", format(ctx.trace_id, "032x"))
            event_dict.setdefault("span_id", format(ctx.span_id, "016x"))
    return event_dict


def current_trace_id() -> str | None:
    """The current trace id as 32 hex digits (for binding into logs), or None."""
    if not _state.enabled:
        return None
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


# --- SQL statements as spans ------------------------------------------------------------------

_SQL_SPAN = "_shoal_span"  # attribute on SQLAlchemy's per-statement ExecutionContext
_STATEMENT_MAX = 2000


def _listen_to_sql() -> None:
    """Hook every SQLAlchemy engine (async ones run a sync Engine underneath); once a process."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    if not event.contains(Engine, "before_cursor_execute", _sql_started):
        event.listen(Engine, "before_cursor_execute", _sql_started)
        event.listen(Engine, "after_cursor_execute", _sql_ended)
        event.listen(Engine, "handle_error", _sql_failed)


def _sql_started(
    conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
) -> None:
    if not _state.enabled or context is None:
        return
    parent = trace.get_current_span()
    if not parent.get_span_context().is_valid:
        return
    # The statement belongs to the service whose span is current (a devstack has several).
    resource = getattr(parent, "resource", None)
    provider = next((p for p in _state.providers.values() if p.resource is resource), None)
    if provider is None:
        return
    words = statement.split(None, 1)
    operation = words[0].upper() if words else "SQL"
    span = provider.get_tracer(INSTRUMENTATION_NAME).start_span(
        f"db {operation}",
        kind=SpanKind.CLIENT,
        attributes={
            "db.system": conn.dialect.name,
            "db.operation": operation,
            "db.statement": statement[:_STATEMENT_MAX],
        },
    )
    setattr(context, _SQL_SPAN, span)


def _sql_ended(
    conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
) -> None:
    span = getattr(context, _SQL_SPAN, None)
    if span is not None:
        setattr(context, _SQL_SPAN, None)
        span.end()


def _sql_failed(exception_context: Any) -> None:
    span = getattr(exception_context.execution_context, _SQL_SPAN, None)
    if span is not None:
        setattr(exception_context.execution_context, _SQL_SPAN, None)
        span.record_exception(exception_context.original_exception)
        span.set_status(Status(StatusCode.ERROR))
        span.end()


class _Fanout(SpanProcessor):
    """Several exporters at once (``OTEL_TRACES_EXPORTER=otlp,console``)."""

    def __init__(self, processors: list[SpanProcessor]) -> None:
        self._processors = processors

    def on_start(self, span: Any, parent_context: Context | None = None) -> None:
        for p in self._processors:
            p.on_start(span, parent_context=parent_context)

    def on_end(self, span: Any) -> None:
        for p in self._processors:
            p.on_end(span)

    def shutdown(self) -> None:
        for p in self._processors:
            p.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return all(p.force_flush(timeout_millis) for p in self._processors)
