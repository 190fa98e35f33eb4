"""``GET /verifier/jobs/{job_id}``: what the verifier knows and decided about a job."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from shoal_common.errors import NotFound
from shoal_verifier.store.base import VerifierStore


class ProposalRead(BaseModel):
    execution_id: str
    node_id: str
    result_cid: str
    status: str
    reason: str
    sealed: bool


class JobVerificationRead(BaseModel):
    job_id: str
    verifier: str
    status: str
    expected: int
    threshold: int
    escalations: int
    accepted_cid: str | None
    reason: str
    proposals: list[ProposalRead]


async def _store(request: Request) -> VerifierStore:
    store: VerifierStore = request.app.state.store
    return store


StoreDep = Annotated[VerifierStore, Depends(_store)]

router = APIRouter(prefix="/verifier")


@router.get("/jobs/{job_id}", response_model=JobVerificationRead)
async def get_job(job_id: str, store: StoreDep) -> Any:
    job = await store.find_job(job_id)
    if job is None:
        raise NotFound(f"the verifier has seen nothing of job {job_id}")
    proposals = await store.list_proposals(job_id)
    return JobVerificationRead(
        job_id=job.job_id,
        verifier=job.verifier.value,
        status=job.status.value,
        expected=job.expected,
        threshold=job.threshold,
        escalations=job.escalations,
        accepted_cid=job.accepted_cid,
        reason=job.reason,
        proposals=[
            ProposalRead(
                execution_id=p.execution_id,
                node_id=p.node_id,
                # A sealed result stays secret until it is decided (ADR 0004).
                result_cid=p.result_cid if not p.pending or not p.sealed else "",
                status=p.status.value,
                reason=p.reason,
                sealed=p.sealed,
            )
            for p in proposals
        ],
    )
