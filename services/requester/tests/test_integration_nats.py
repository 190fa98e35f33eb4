"""The requester on real NATS (JetStream) and SQLite, with scripted compute nodes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from shoal_common.bus import NatsBus
from shoal_common.natsserver import NatsServer
from shoal_common.spec import ExecutionStateType, JobStateType
from shoal_common.testing import wait_for
from shoal_requester.domain.model import JobRecord
from shoal_requester.service import RequesterService
from shoal_requester.settings import RequesterSettings
from shoal_requester.testing import (
    FakeComputeNode,
    NoopVerifierAndPublisher,
    make_job,
    make_spec,
    node_info,
    stop_all,
    submit_payload,
)

pytestmark = pytest.mark.integration


def _settings(tmp_path: Path, nats_url: str, **extra: Any) -> RequesterSettings:
    return RequesterSettings(
        nats_url=nats_url,
        state_dir=tmp_path / "requester",
        housekeeping_interval=0.05,
        reconcile_interval=0.5,
        job_timeout_grace=0.0,
        **extra,
    )


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[NatsBus]:
    b = await NatsBus.connect(nats_server.url, name="test-cluster")
    try:
        yield b
    finally:
        await b.close()


async def _state(service: RequesterService, job_id: str) -> JobRecord | None:
    job = await service.store.find_job(job_id)
    return job if job is not None and job.state.terminal else None


async def test_jobs_complete_over_nats_and_survive_a_restart(
    tmp_path: Path, nats_server: NatsServer, bus: NatsBus
) -> None:
    nodes = [
        await FakeComputeNode(bus, f"node-{i}", info=node_info(f"node-{i}")).start()
        for i in range(3)
    ]
    for n in nodes:
        n.start_heartbeats(0.2)
    await NoopVerifierAndPublisher(bus).start()
    # The requester connects its own NATS client (bus=None), as `shoal serve` runs it.
    service = RequesterService(_settings(tmp_path, nats_server.url))
    await service.start()
    try:
        await wait_for(_live(service, 3))
        spec = make_spec(Deal={"Concurrency": 2})
        payload = submit_payload(spec, "client-a")
        job, created = await service.jobs.submit(
            payload, orjson.dumps(payload), client_id="client-a"
        )
        assert created
        done = await wait_for(lambda: _state(service, job.id))
        assert done.state is JobStateType.COMPLETED
        executions = (await service.store.list_executions([job.id]))[job.id]
        assert [e.state for e in executions] == [ExecutionStateType.COMPLETED] * 2
        latencies = []
        for _ in range(20):
            started = time.perf_counter()
            payload = submit_payload(make_spec(), "client-a")
            quick, _ = await service.jobs.submit(
                payload, orjson.dumps(payload), client_id="client-a"
            )
            await wait_for(_terminal(service, quick.id), interval=0.001)
            latencies.append(time.perf_counter() - started)
        latencies.sort()
        print(f"noop job p50 {latencies[len(latencies) // 2] * 1000:.1f} ms (fake nodes)")
    finally:
        await service.stop()

    # A job acknowledged but never placed (as if the requester died right after the commit):
    # the next start finds it and runs it.
    again = RequesterService(_settings(tmp_path, nats_server.url), bus=bus)
    orphan = make_job(client_id="client-a")
    await again.store.open()
    await again.store.create_job(orphan)
    await again.store.close()
    again = RequesterService(_settings(tmp_path, nats_server.url), bus=bus)
    await again.start()
    try:
        before = await again.store.get_job(job.id)
        assert before.state is JobStateType.COMPLETED  # the first job is still there
        recovered = await wait_for(lambda: _state(again, orphan.id), timeout=10)
        assert recovered.state is JobStateType.COMPLETED
        assert {n["id"] for n in await _nodes(again)} == {"node-0", "node-1", "node-2"}
    finally:
        await again.stop()
        await stop_all(*nodes)


def _terminal(service: RequesterService, job_id: str) -> Callable[[], Awaitable[Any]]:
    async def probe() -> JobRecord | None:
        return await _state(service, job_id)

    return probe


def _live(service: RequesterService, n: int) -> Any:
    async def probe() -> bool:
        return service.live_node_count() >= n

    return probe


async def _nodes(service: RequesterService) -> list[dict[str, Any]]:
    return [{"id": r.id} for r in await service.store.list_nodes()]


async def test_failures_and_lost_nodes_over_nats(
    tmp_path: Path, nats_server: NatsServer, bus: NatsBus
) -> None:
    broken = await FakeComputeNode(bus, "broken", run="fail").start()
    hanging = await FakeComputeNode(bus, "hanging", run="hang").start()
    good = await FakeComputeNode(bus, "good").start()
    for n in (broken, hanging, good):
        n.start_heartbeats(0.1)
    await NoopVerifierAndPublisher(bus).start()
    service = RequesterService(_settings(tmp_path, nats_server.url, node_lost_after=0.5), bus=bus)
    await service.start()
    try:
        await wait_for(_live(service, 3))
        spec = make_spec(Deal={"Concurrency": 3})
        payload = submit_payload(spec, "client-b")
        job, _ = await service.jobs.submit(payload, orjson.dumps(payload), client_id="client-b")

        async def placed_on_hanging() -> bool:
            execs = (await service.store.list_executions([job.id]))[job.id]
            return any(
                e.node_id == "hanging" and e.state is ExecutionStateType.BID_ACCEPTED for e in execs
            )

        await wait_for(placed_on_hanging)
        hanging.stop_heartbeats()
        done = await wait_for(lambda: _state(service, job.id), timeout=10)
        # One good result; the failed and lost executions were retried where possible.
        assert done.state in (JobStateType.COMPLETED_PARTIALLY, JobStateType.COMPLETED)
        executions = (await service.store.list_executions([job.id]))[job.id]
        statuses = " | ".join(e.status for e in executions)
        assert "lost" in statuses
        assert "executor failed" in statuses
        await asyncio.sleep(0)  # let the history fan-out run
    finally:
        await service.stop()
        await stop_all(broken, hanging, good)
