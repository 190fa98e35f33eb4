"""``GET /publisher/jobs/{job_id}``: what was published for a job, where, or why not."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from shoal_common.errors import NotFound
from shoal_publisher.store.base import PublisherStore


class PublicationRead(BaseModel):
    execution_id: str
    node_id: str
    result_cid: str
    publisher: str
    status: str
    result: dict[str, Any] | None
    error: str
    attempts: int


async def _store(request: Request) -> PublisherStore:
    store: PublisherStore = request.app.state.store
    return store


StoreDep = Annotated[PublisherStore, Depends(_store)]

router = APIRouter(prefix="/publisher", tags=["publications"])


@router.get("/jobs/{job_id}", response_model=list[PublicationRead])
async def job_publications(job_id: str, store: StoreDep) -> Any:
    found = await store.list_publications(job_id)
    if not found:
        raise NotFound(f"nothing was published for job {job_id}")
    return [
        PublicationRead(
            execution_id=p.execution_id,
            node_id=p.node_id,
            result_cid=p.result_cid,
            publisher=p.publisher,
            status=p.status.value,
            result=p.result,
            error=p.error,
            attempts=p.attempts,
        )
        for p in found
    ]
