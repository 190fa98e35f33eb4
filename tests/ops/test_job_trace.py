"""One job is one connected trace across requester, compute, verifier and publisher.

This is the acceptance test for tracing's integration (docs/adr/0007-observability.md): it passes
once the bus and the services carry the context (``tracing.inject`` into each envelope's
``trace``, ``tracing.extract`` + a CONSUMER span around each handled message, spans at the HTTP
submit) and SQL statements run while a span is current (``db SELECT`` ... child spans).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shoal_cli import jobspec
from shoal_common import tracing
from shoal_common.spec import DockerSpec, Engine, JobStateType, Spec
from tests.conftest import StackFactory
from tests.support import wait_until

SERVICES = {"shoal-requester", "shoal-compute", "shoal-verifier", "shoal-publisher"}


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = tracing.use_in_memory_exporter()
    yield exporter
    tracing.shutdown_tracing()


def _service(span: ReadableSpan) -> str:
    return str(span.resource.attributes.get("service.name", ""))


def _trace_of_job(spans: tuple[ReadableSpan, ...], job_id: str) -> set[int]:
    return {
        s.context.trace_id
        for s in spans
        if s.context is not None and (s.attributes or {}).get("shoal.job_id") == job_id
    }


@pytest.mark.e2e
def test_one_job_yields_one_connected_trace(
    make_devstack: StackFactory, exporter: InMemorySpanExporter, tmp_path: Path
) -> None:
    stack = make_devstack(compute_nodes=1)
    # Verified, so every service has a part: a noop-verified result never reaches the verifier
    # (ADR 0027).
    spec = Spec(
        Engine=Engine.DOCKER,
        Docker=DockerSpec(Image="shoal-test/busybox:latest", Entrypoint=["echo", "traced"]),
        **jobspec.common_spec(verifier="Deterministic"),
    )
    with stack.client(tmp_path / "client") as client:
        job_id = client.submit(spec).metadata.id
        assert client.wait(job_id, timeout=30).state == JobStateType.COMPLETED

    def whole_trace() -> list[ReadableSpan] | None:
        spans = exporter.get_finished_spans()
        traces = _trace_of_job(spans, job_id)
        if len(traces) != 1:
            return None
        (trace_id,) = traces
        in_trace = [s for s in spans if s.context is not None and s.context.trace_id == trace_id]
        return in_trace if {_service(s) for s in in_trace} >= SERVICES else None

    spans = wait_until(whole_trace, timeout=5, what="spans of every service in one trace")
    assert len(_trace_of_job(exporter.get_finished_spans(), job_id)) == 1
    ids = {s.context.span_id for s in spans if s.context is not None}
    roots = [s for s in spans if s.parent is None or s.parent.span_id not in ids]
    assert len(roots) == 1, [(r.name, _service(r)) for r in roots]
    # Database statements made while handling the job are spans of the same trace (the
    # requester batches many jobs' writes on its writer thread: those are nobody's child).
    db = {_service(s) for s in spans if s.name.startswith("db ")}
    assert {"shoal-compute", "shoal-verifier", "shoal-publisher"} <= db, sorted(db)
