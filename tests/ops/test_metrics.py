"""The metrics issue 7 asks for exist with their labels, and the scrape-time ones count right.

Issue 7: jobs submitted / by terminal state, latency by stage, queue depths, node count by
state, per-node capacity used/total, bids, executor runs by engine and outcome, verification
accepted/rejected, publish bytes and failures, HTTP, NATS errors and redeliveries, outbox lag.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import REGISTRY

import shoal_common.telemetry
import shoal_compute.metrics
import shoal_publisher.metrics
import shoal_requester.metrics
import shoal_verifier.metrics
from shoal_common.bus import NatsBus
from shoal_common.events import Envelope, ExecutionCancelled
from shoal_common.natsserver import NatsServer
from shoal_common.protocol import Capacity, Heartbeat
from shoal_common.subjects import Producer
from shoal_common.testing import wait_for
from shoal_compute.domain.capacity import CapacityLedger
from shoal_publisher.adapters.fetch import HttpResultFetcher
from shoal_requester.domain.inventory import Inventory
from shoal_requester.testing import node_info

MODULES = (
    shoal_common.telemetry,
    shoal_requester.metrics,
    shoal_compute.metrics,
    shoal_verifier.metrics,
    shoal_publisher.metrics,
)

# (metric name as scraped, prometheus type, label names)
REQUIRED = [
    ("shoal_requester_jobs_submitted_total", "counter", ()),
    ("shoal_requester_jobs_finished_total", "counter", ("state",)),
    ("shoal_requester_job_stage_seconds", "histogram", ("stage",)),
    ("shoal_requester_job_duration_seconds", "histogram", ()),
    ("shoal_compute_execution_duration_seconds", "histogram", ("engine",)),
    ("shoal_requester_queued_jobs", "gauge", ()),
    ("shoal_compute_executions_queued", "gauge", ()),
    ("shoal_compute_executions_running", "gauge", ()),
    ("shoal_requester_nodes", "gauge", ("state",)),
    ("shoal_compute_capacity_used", "gauge", ("resource",)),
    ("shoal_compute_capacity_total", "gauge", ("resource",)),
    ("shoal_requester_bids_total", "counter", ("answer",)),
    ("shoal_compute_bids_total", "counter", ("answer",)),
    ("shoal_compute_executions_total", "counter", ("engine", "outcome")),
    ("shoal_verifier_results_accepted_total", "counter", ("verifier",)),
    ("shoal_verifier_results_rejected_total", "counter", ("verifier",)),
    ("shoal_publisher_result_bytes_total", "counter", ()),
    ("shoal_publisher_content_bytes_total", "counter", ("direction",)),
    ("shoal_publisher_publish_failures_total", "counter", ("publisher",)),
    ("shoal_http_requests_total", "counter", ("service", "route", "status")),
    ("shoal_http_request_duration_seconds", "histogram", ("service", "route")),
    ("shoal_bus_errors_total", "counter", ("operation",)),
    ("shoal_bus_redeliveries_total", "counter", ("consumer",)),
    ("shoal_outbox_lag_seconds", "histogram", ("service",)),
]


def _family(name: str, kind: str) -> str:
    # prometheus-client names a counter's family without its _total suffix.
    return name.removesuffix("_total") if kind == "counter" else name


def _labels_of(name: str, kind: str) -> tuple[str, ...]:
    """Label names of a registered metric, read the way Prometheus will see them."""
    family_name = _family(name, kind)
    for family in REGISTRY.collect():
        if family.name == family_name:
            samples = [s for s in family.samples if s.name in (name, name + "_bucket")]
            if samples:
                return tuple(k for k in samples[0].labels if k != "le")
    # A labelled metric without a child yet exports no sample: ask the object itself.
    collector = REGISTRY._names_to_collectors[name]
    return tuple(collector._labelnames)  # type: ignore[attr-defined]


@pytest.mark.parametrize(("name", "kind", "labels"), REQUIRED, ids=[r[0] for r in REQUIRED])
def test_issue_metrics_are_registered_with_their_labels(
    name: str, kind: str, labels: tuple[str, ...]
) -> None:
    assert MODULES  # imported: every service's metrics are in the process registry
    types = {f.name: f.type for f in REGISTRY.collect()}
    family = _family(name, kind)
    assert types.get(family) == kind, f"{name}: {types.get(family)!r}"
    assert set(_labels_of(name, kind)) == set(labels), name


def test_no_id_is_a_label() -> None:
    # An id per job/execution/node would make one series each: unbounded cardinality.
    shoal = {c for name, c in REGISTRY._names_to_collectors.items() if name.startswith("shoal_")}
    assert len(shoal) > 20
    for collector in shoal:
        for label in getattr(collector, "_labelnames", ()):
            assert not label.endswith(("id", "_id", "cid")), (collector, label)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_nodes_are_counted_by_state_when_scraped() -> None:
    now = [0.0]
    inventory = Inventory(lost_after=5.0, clock=lambda: now[0])
    before = {s: sample("shoal_requester_nodes", state=s) for s in ("live", "lost", "stopping")}
    shoal_requester.metrics.watch_nodes(inventory)
    for i, stopping in ((1, False), (2, False), (3, True)):
        inventory.observe(
            Heartbeat(info=node_info(f"n{i}"), seq=1, sent_at=time.time(), stopping=stopping)
        )
    assert sample("shoal_requester_nodes", state="live") - before["live"] == 2
    assert sample("shoal_requester_nodes", state="stopping") - before["stopping"] == 1
    for seq, t in enumerate((2.0, 4.0, 6.0, 8.0, 10.0), start=2):  # n1 beats on, n2, n3 not
        now[0] = t
        inventory.observe(Heartbeat(info=node_info("n1"), seq=seq, sent_at=time.time()))
    assert [n.id for n in inventory.expire()] == ["n2", "n3"]
    assert sample("shoal_requester_nodes", state="live") - before["live"] == 1
    assert sample("shoal_requester_nodes", state="lost") - before["lost"] == 2


def test_capacity_used_and_total_follow_the_nodes_books() -> None:
    before = {
        (kind, r): sample(f"shoal_compute_capacity_{kind}", resource=r)
        for kind in ("total", "used")
        for r in ("cpu", "gpu")
    }
    ledger = CapacityLedger(Capacity(cpu=4, memory=2**30, gpu=2), ("0", "1"))

    def delta(kind: str, resource: str) -> float:
        return sample(f"shoal_compute_capacity_{kind}", resource=resource) - before[kind, resource]

    assert (delta("total", "cpu"), delta("total", "gpu")) == (4, 2)
    assert ledger.try_commit("e1", Capacity(cpu=1.5, memory=1024, gpu=1))
    assert delta("used", "cpu") == 0  # promised, not running yet
    assert ledger.try_start("e1") is not None
    assert (delta("used", "cpu"), delta("used", "gpu")) == (1.5, 1)
    ledger.release("e1")
    assert (delta("used", "cpu"), delta("used", "gpu")) == (0, 0)


async def test_result_bytes_fetched_for_publishing_are_counted(tmp_path: Path) -> None:
    body = b"x" * 300_000

    class Streamed(httpx.AsyncByteStream):  # as a compute node sends it: in chunks
        async def __aiter__(self) -> AsyncIterator[bytes]:
            for start in range(0, len(body), 65_536):
                yield body[start : start + 65_536]

    transport = httpx.MockTransport(
        lambda _: httpx.Response(200, stream=Streamed(), headers={"X-Shoal-Kind": "file"})
    )
    fetcher = HttpResultFetcher(max_bytes=1 << 20, client=httpx.AsyncClient(transport=transport))
    before = sample("shoal_publisher_result_bytes_total")
    try:
        path = await fetcher.fetch("http://compute/results/e1", tmp_path)
    finally:
        await fetcher.close()
    assert path.read_bytes() == body
    assert sample("shoal_publisher_result_bytes_total") - before == len(body)


@pytest.mark.integration
async def test_consume_errors_and_redeliveries_are_counted(nats_server: NatsServer) -> None:
    bus = await NatsBus.connect(nats_server.url, name="test-metrics")
    failures = [1]  # the first delivery fails, the redelivery succeeds
    handled: list[str] = []

    async def flaky(env: Envelope) -> None:
        if failures:
            failures.pop()
            raise RuntimeError("database away")
        handled.append(env.id)

    before = (
        sample("shoal_bus_errors_total", operation="handle"),
        sample("shoal_bus_redeliveries_total", consumer="metrics-test"),
    )
    try:
        await bus.consume_events(producer=Producer.COMPUTE, durable="metrics-test", handler=flaky)
        event = Envelope.wrap(ExecutionCancelled(job_id="j", execution_id="e", node_id="n"))
        await bus.publish_event(event)

        async def done() -> bool:
            return handled == [event.id]

        await wait_for(done, timeout=10)
    finally:
        await bus.close()
    assert sample("shoal_bus_errors_total", operation="handle") - before[0] == 1
    assert sample("shoal_bus_redeliveries_total", consumer="metrics-test") - before[1] == 1
