"""Shoal's own endpoints for the CLI: job details, node inventory, the live event stream.

Errors here are RFC 9457 problem+json (shoal_common.httpapp).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any

import orjson
from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import StreamingResponse

from shoal_common.errors import NotFound
from shoal_common.spec import JobHistoryType, JobStateType
from shoal_requester.api import wire
from shoal_requester.api.common import FastJSONResponse, ServiceDep
from shoal_requester.domain.inventory import TrackedNode
from shoal_requester.domain.model import HistoryRecord

if TYPE_CHECKING:
    from shoal_requester.service import RequesterService

router = APIRouter(prefix="/api/v1", tags=["shoal"])

KEEPALIVE_S = 15.0


@router.get("/jobs/{job_id}", summary="A job with its state and history")
async def get_job(job_id: str, service: ServiceDep) -> Response:
    view = await service.jobs.describe(job_id)
    _job, rows = await service.jobs.history(view.job.id)
    return FastJSONResponse(
        {
            "Job": dict(view.job.job),
            "State": wire.view_state(view),
            "History": [wire.history(h) for h in rows],
        }
    )


def _reputation(service: RequesterService, node_id: str) -> dict[str, Any]:
    # The inventory's standing: loaded from the store at start, plus what was committed since.
    return wire.reputation(
        service.inventory.standing(node_id), service.orchestrator.reputation(node_id)
    )


def _node(service: RequesterService, node: TrackedNode) -> dict[str, Any]:
    return wire.node(
        node,
        running=service.inventory.holds_on(node.id),
        reputation=_reputation(service, node.id),
    )


@router.get("/nodes", summary="Compute nodes: capabilities, capacity, liveness, reputation")
async def list_nodes(service: ServiceDep) -> Response:
    tracked = {n.id: n for n in service.inventory.all()}
    out = [_node(service, n) for n in tracked.values()]
    for record in await service.store.list_nodes():
        if record.id not in tracked:
            out.append(wire.persisted_node(record, reputation=_reputation(service, record.id)))
    out.sort(key=lambda n: str(n["id"]))
    return FastJSONResponse(out)


@router.get("/nodes/{node_id}", summary="One compute node")
async def get_node(node_id: str, service: ServiceDep) -> Response:
    tracked = service.inventory.get(node_id)
    if tracked is not None:
        return FastJSONResponse(_node(service, tracked))
    for record in await service.store.list_nodes():
        if record.id == node_id:
            return FastJSONResponse(
                wire.persisted_node(record, reputation=_reputation(service, record.id))
            )
    raise NotFound(f"node {node_id} not found")


class StreamLevel(StrEnum):
    JOB = "job"
    EXECUTION = "execution"

    @property
    def history_type(self) -> JobHistoryType:
        return (
            JobHistoryType.JOB_LEVEL if self is StreamLevel.JOB else JobHistoryType.EXECUTION_LEVEL
        )


def _sse(row: HistoryRecord) -> bytes:
    data = orjson.dumps(wire.history(row)).decode()
    return f"id: {row.seq}\nevent: history\ndata: {data}\n\n".encode()


def _ends_job(row: HistoryRecord) -> bool:
    return row.type is JobHistoryType.JOB_LEVEL and JobStateType(row.new).terminal


@router.get(
    "/events/stream",
    summary="Job history as Server-Sent Events, for one job or all jobs",
    response_description="text/event-stream; each event is one JobHistory entry",
)
async def event_stream(
    service: ServiceDep,
    job_id: Annotated[str | None, Query(description="Only this job (full or short id)")] = None,
    level: Annotated[
        StreamLevel | None,
        Query(
            description="Only entries of this level: `job` (state changes of jobs) or `execution`"
        ),
    ] = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> Response:
    """For one job: its history so far, then each new entry, ending after the job ends.
    For all jobs: each entry as it is recorded, until the client goes away. A watcher that
    only wants jobs' states (a dashboard, a load generator) asks for ``level=job`` and is
    sent about a third of the entries."""
    resolved = (await service.jobs.resolve(job_id)).id if job_id else None
    after = int(last_event_id) if last_event_id and last_event_id.isdigit() else 0
    wanted = level.history_type if level is not None else None

    async def stream() -> AsyncIterator[bytes]:
        last = after
        with service.hub.subscribe(resolved, wanted) as sub:
            if resolved is not None:
                # Subscribed first, then read the backlog: nothing falls in between, and the
                # sequence numbers drop what both deliver.
                _job, rows = await service.jobs.history(resolved)
                for old in rows:
                    if old.seq > last and (wanted is None or old.type is wanted):
                        last = old.seq
                        yield _sse(old)
                    if _ends_job(old):
                        return
            yield b": connected\n\n"
            while True:
                rows = await sub.next_batch(KEEPALIVE_S)
                if not rows:
                    if sub.overflowed:
                        yield b"event: overflow\ndata: {}\n\n"
                        return
                    if sub.closed.is_set():
                        return
                    yield b": keepalive\n\n"
                    continue
                # Every row that is ready goes out in one chunk: one write (and one pass
                # through the middleware) instead of one per row.
                chunk = []
                ended = False
                for row in rows:
                    if row.seq <= last:
                        continue
                    last = row.seq
                    chunk.append(_sse(row))
                    if resolved is not None and _ends_job(row):
                        ended = True
                        break
                if chunk:
                    yield b"".join(chunk)
                if ended:
                    return

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
