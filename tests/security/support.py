"""Helpers of the security suite: a requester on a real database, driven over HTTP.

The requester is the real service (API, domain, SQL store with its migrations) on an in-memory
bus, with fake compute nodes, verifier and publisher (shoal_requester.testing): what is under
attack here is the API and what it stores, not the nodes. ``raise_app_exceptions=False`` makes an
unhandled exception come back as the 500 a real client would see, so tests assert on statuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import httpx

from shoal_common.bus import MemoryBus
from shoal_common.db import run_migrations
from shoal_common.signing import ClientKey, sign_envelope
from shoal_common.spec import JobStateType, to_wire
from shoal_common.testing import wait_for
from shoal_requester.domain.model import JobQuery
from shoal_requester.service import RequesterService
from shoal_requester.settings import RequesterSettings
from shoal_requester.store.sql import MIGRATIONS, SqlRequesterStore
from shoal_requester.testing import (
    FakeComputeNode,
    NoopVerifierAndPublisher,
    make_spec,
    node_info,
    stop_all,
)

# A job's observable footprint: (state, version, executions, history rows).
Footprint = tuple[str, int, int, int]


class Target:
    """A started requester and an HTTP client on its app."""

    def __init__(
        self,
        service: RequesterService,
        bus: MemoryBus,
        http: httpx.AsyncClient,
        nodes: list[FakeComputeNode],
    ) -> None:
        self.service = service
        self.bus = bus
        self.http = http
        self.nodes = nodes

    def __repr__(self) -> str:
        return f"Target({self.service.settings.node_id}, {len(self.nodes)} nodes)"

    async def post(
        self, path: str, body: bytes | Mapping[str, Any], headers: Mapping[str, str] | None = None
    ) -> httpx.Response:
        # The stdlib encoder: orjson cannot write integers past 64 bits, which tests send.
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        sent = {"Content-Type": "application/json", **(headers or {})}
        return await self.http.post(path, content=content, headers=sent)

    async def submit(self, key: ClientKey, spec: Mapping[str, Any] | None = None) -> httpx.Response:
        """A signed submit of ``spec`` (wire form; a small noop job by default)."""
        return await self.post("/requester/submit", sign_envelope(key, payload(key, spec)))

    async def submit_ok(self, key: ClientKey, spec: Mapping[str, Any] | None = None) -> str:
        resp = await self.submit(key, spec)
        assert resp.status_code == 200, resp.text
        job_id: str = resp.json()["job"]["Metadata"]["ID"]
        return job_id

    async def job_ids(self) -> set[str]:
        return {j.id for j in await self.service.store.list_jobs(JobQuery())}

    async def footprint(self, job_id: str) -> Footprint:
        store = self.service.store
        job = await store.get_job(job_id)
        executions = (await store.list_executions([job_id]))[job_id]
        history = await store.list_history(job_id)
        return (job.state.value, job.version, len(executions), len(history))

    async def wait_state(self, job_id: str, *states: JobStateType, timeout: float = 10) -> None:
        async def probe() -> bool:
            job = await self.service.store.find_job(job_id)
            return job is not None and job.state in states

        await wait_for(probe, timeout=timeout)

    def hang(self) -> None:
        """Nodes accept work and never finish it: jobs stay InProgress (stable footprints)."""
        for node in self.nodes:
            node.run = "hang"


def payload(key: ClientKey, spec: Mapping[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """A JobCreatePayload for ``key``'s client; a nonce keeps identical specs distinct."""
    body: dict[str, Any] = {
        "APIVersion": "V1beta1",
        "ClientID": key.client_id,
        "Spec": dict(spec) if spec is not None else to_wire(make_spec()),
    }
    body["Nonce"] = uuid.uuid4().hex
    body.update(extra)
    return body


def noop_spec(**changes: Any) -> dict[str, Any]:
    """The wire form of a small noop job with ``changes`` applied (wire key names)."""
    spec = to_wire(make_spec())
    spec.update(changes)
    return spec


@contextlib.asynccontextmanager
async def running_requester(
    db_url: str, tmp_path: Path, *, migrate: bool = True, **settings: Any
) -> AsyncIterator[Target]:
    """A requester on ``db_url`` with three live fake nodes, served over ASGI.

    ``migrate=False``: the database is already at the head revision (a copy of a template).
    """
    bus = MemoryBus()
    values: dict[str, Any] = {
        "state_dir": tmp_path / "requester",
        "housekeeping_interval": 0.2,
        "reconcile_interval": 0.5,
        "bid_timeout": 1.0,
        "rpc_timeout": 1.0,
        "job_timeout_grace": 0.0,
    }
    values.update(settings)
    service = RequesterService(
        RequesterSettings(**values), bus=bus, store=SqlRequesterStore(db_url, migrate=migrate)
    )
    await NoopVerifierAndPublisher(bus).start()
    await service.start()
    nodes: list[FakeComputeNode] = []
    try:
        for i in range(3):
            node = FakeComputeNode(bus, f"compute-{i}", info=node_info(f"compute-{i}"))
            await node.start()
            node.start_heartbeats(0.5)
            nodes.append(node)
        transport = httpx.ASGITransport(app=service.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://requester") as http:
            yield Target(service=service, bus=bus, http=http, nodes=nodes)
    finally:
        # Let in-flight placements settle first: stopping mid-flight is not what is under test.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(service.orchestrator.idle(), 5)
        await stop_all(*nodes)
        await service.stop()
        await bus.close()


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


def migrated_sqlite(path: Path) -> Path:
    """An empty requester database at the head revision (copied per test: migrating is slow)."""
    run_migrations(sqlite_url(path), MIGRATIONS)
    return path
