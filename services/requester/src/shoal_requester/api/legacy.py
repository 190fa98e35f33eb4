"""The reference system's requester API (``/requester/*``), served at the root and /api/v1.

Shapes and status codes follow reference/bacalhau-legacy-api.md so Bacalhau's own Python SDK
and Airflow provider work unchanged. Signed requests are verified over the raw payload bytes.
Two deliberate differences from Go: unknown jobs are 404 (Go: 500) and cancelling a finished job
is 409 (Go: 500); the clients treat every non-2xx alike, and a 500 would page an operator.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse, StreamingResponse

from shoal_common.errors import InvalidInput, NotFound
from shoal_common.httpapp import DirectRoute
from shoal_common.signing import verify_signed_envelope
from shoal_requester.api import wire
from shoal_requester.api.common import (
    FastJSONResponse,
    LegacyRoute,
    ServiceDep,
    body_schema,
    parse_model,
    read_body,
    with_legacy_errors,
)
from shoal_requester.api.schemas import (
    EventsRequest,
    ListRequest,
    SignedApprove,
    SignedCancel,
    SignedLogs,
    SignedSubmit,
    StateRequest,
)
from shoal_requester.domain.model import JobQuery
from shoal_requester.domain.validation import (
    ApprovePayload,
    JobCancelPayload,
    LogsPayload,
    check_reason,
    parse_payload,
)

router = APIRouter(route_class=LegacyRoute, tags=["legacy"])

JOB_ID_HEADER = "X-Bacalhau-Job-ID"
CLIENT_ID_HEADER = "X-Bacalhau-Client-ID"
SORT_KEYS = {"created_at": "created_at", "createdat": "created_at", "id": "id", "": "created_at"}
LOG_POLL_INTERVAL_S = 0.25
MAX_LIST_LIMIT = 2**31 - 1


@router.post(
    "/requester/submit",
    summary="Submit a job (signed)",
    openapi_extra=body_schema(SignedSubmit, "A signed JobCreatePayload"),
)
async def submit(request: Request, service: ServiceDep) -> Response:
    if JOB_ID_HEADER.lower() in request.headers:
        raise InvalidInput(
            f"a submit must not carry the {JOB_ID_HEADER} header: the requester assigns job ids"
        )
    body = await read_body(request, service.settings.max_body_bytes)
    envelope = verify_signed_envelope(body)
    job, _created = await service.jobs.submit(
        envelope.payload, envelope.payload_raw.encode(), client_id=envelope.client_id
    )
    return FastJSONResponse(
        {"job": dict(job.job)},
        headers={JOB_ID_HEADER: job.id, CLIENT_ID_HEADER: job.client_id},
    )


async def _submit_direct(request: Request) -> Response:
    return await submit(request, request.app.state.service)


def direct_routes() -> dict[tuple[str, str], DirectRoute]:
    """The submit, served without FastAPI's router (ADR 0031): the one route every job takes.
    The routes above stay registered, for the OpenAPI document and as the same behaviour."""
    handler = with_legacy_errors(_submit_direct)
    return {
        ("POST", path): DirectRoute(path, handler)
        for path in (f"{prefix}/requester/submit" for prefix in ("", "/api/v1"))
    }


@router.post(
    "/requester/cancel",
    summary="Cancel a job (signed, owner only)",
    openapi_extra=body_schema(SignedCancel, "A signed JobCancelPayload"),
)
async def cancel(request: Request, service: ServiceDep) -> Response:
    body = await read_body(request, service.settings.max_body_bytes)
    envelope = verify_signed_envelope(body)
    payload: JobCancelPayload = parse_payload(JobCancelPayload, envelope.payload)
    if not payload.job_id:
        raise InvalidInput("JobID is required")
    view = await service.jobs.cancel(
        payload.job_id,
        client_id=envelope.client_id,
        reason=check_reason(payload.reason) or "cancelled by the client",
    )
    return FastJSONResponse({"state": wire.view_state(view)}, headers={JOB_ID_HEADER: view.job.id})


@router.post(
    "/requester/approve",
    summary="Approve executions a node holds for approval (signed)",
    openapi_extra=body_schema(SignedApprove, "A signed ApprovePayload"),
)
async def approve(request: Request, service: ServiceDep) -> Response:
    body = await read_body(request, service.settings.max_body_bytes)
    envelope = verify_signed_envelope(body)
    payload: ApprovePayload = parse_payload(ApprovePayload, envelope.payload)
    if not payload.job_id:
        raise InvalidInput("JobID is required")
    view = await service.jobs.approve(
        payload.job_id,
        client_id=envelope.client_id,
        execution_id=payload.execution_id or "",
        approve=payload.approve is not False,
        reason=check_reason(payload.reason) or "",
    )
    return FastJSONResponse({"state": wire.view_state(view)})


@router.post(
    "/requester/list",
    summary="List jobs",
    openapi_extra=body_schema(ListRequest),
)
async def list_jobs(request: Request, service: ServiceDep) -> Response:
    req = parse_model(ListRequest, await read_body(request, service.settings.max_body_bytes))
    if req.id:
        try:
            views = [await service.jobs.view(req.id)]
        except NotFound:
            views = []
    else:
        sort_by = SORT_KEYS.get((req.sort_by or "").strip().lower())
        if sort_by is None:
            raise InvalidInput(f"sort_by must be created_at or id (got {req.sort_by!r})")
        limit = req.max_jobs or 0
        if limit < 0:
            raise InvalidInput(f"max_jobs must be >= 0 (got {limit})")
        # Past the database's integer range every limit means "all" anyway.
        limit = min(limit, MAX_LIST_LIMIT)
        query = JobQuery(
            client_id=None if req.return_all else (req.client_id or None),
            include_tags=tuple(req.include_tags or ()),
            exclude_tags=tuple(req.exclude_tags or ()),
            sort_by="id" if sort_by == "id" else "created_at",
            reverse=bool(req.sort_reverse),
            limit=limit,
        )
        views = await service.jobs.list_jobs(query)
    return FastJSONResponse({"jobs": [wire.job_with_info(v) for v in views]})


@router.post(
    "/requester/states",
    summary="A job's state and executions",
    openapi_extra=body_schema(StateRequest),
)
async def states(request: Request, service: ServiceDep) -> Response:
    req = parse_model(StateRequest, await read_body(request, service.settings.max_body_bytes))
    view = await service.jobs.view(req.job_id)
    return FastJSONResponse({"state": wire.view_state(view)})


@router.post(
    "/requester/events",
    summary="A job's history, oldest first",
    openapi_extra=body_schema(EventsRequest),
)
async def events(request: Request, service: ServiceDep) -> Response:
    req = parse_model(EventsRequest, await read_body(request, service.settings.max_body_bytes))
    filters = req.filters
    since = None
    if filters is not None and filters.since:
        try:
            since = datetime.fromtimestamp(filters.since, UTC)
        except (OverflowError, OSError, ValueError) as exc:
            raise InvalidInput(f"filters.since is not a valid unix time: {exc}") from exc
    _job, rows = await service.jobs.history(
        req.job_id,
        since=since,
        exclude_job_level=bool(filters and filters.exclude_job_level),
        exclude_execution_level=bool(filters and filters.exclude_execution_level),
    )
    return FastJSONResponse({"events": [wire.history(h) for h in rows]})


@router.post(
    "/requester/results",
    summary="Published results: one per completed execution",
    openapi_extra=body_schema(StateRequest),
)
async def results(request: Request, service: ServiceDep) -> Response:
    req = parse_model(StateRequest, await read_body(request, service.settings.max_body_bytes))
    completed = await service.jobs.results(req.job_id)
    return FastJSONResponse({"results": [wire.published_result(e) for e in completed]})


@router.post(
    "/requester/logs",
    summary="An execution's stdout and stderr (signed, owner only; Follow streams)",
    openapi_extra=body_schema(SignedLogs, "A signed LogsPayload"),
    response_class=PlainTextResponse,
)
async def logs(request: Request, service: ServiceDep) -> Response:
    body = await read_body(request, service.settings.max_body_bytes)
    envelope = verify_signed_envelope(body)
    payload: LogsPayload = parse_payload(LogsPayload, envelope.payload)
    if not payload.job_id:
        raise InvalidInput("JobID is required")
    job = await service.jobs.owned(payload.job_id, envelope.client_id, action="logs")
    execution = await service.jobs.pick_execution(job, payload.execution_id or "")
    jobs = service.jobs
    if not payload.follow:
        answer = await jobs.logs(execution, stdout_offset=0, stderr_offset=0)
        return PlainTextResponse(answer.stdout + answer.stderr)

    async def follow() -> AsyncIterator[bytes]:
        stdout_at = stderr_at = 0
        with_history = payload.with_history is not False
        first = True
        while True:
            answer = await jobs.logs(execution, stdout_offset=stdout_at, stderr_offset=stderr_at)
            if not answer.error:
                stdout_at, stderr_at = answer.stdout_offset, answer.stderr_offset
                text = answer.stdout + answer.stderr
                if text and (with_history or not first):
                    yield text.encode()
            first = False
            if answer.finished:
                return
            if await jobs.execution_finished(execution.id) and not answer.error:
                # One last read picks up what was written before the end.
                last = await jobs.logs(execution, stdout_offset=stdout_at, stderr_offset=stderr_at)
                if last.stdout or last.stderr:
                    yield (last.stdout + last.stderr).encode()
                return
            await asyncio.sleep(LOG_POLL_INTERVAL_S)

    return StreamingResponse(follow(), media_type="text/plain; charset=utf-8")
