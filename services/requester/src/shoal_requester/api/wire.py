"""Records -> the reference system's JSON shapes (JobState, ExecutionState, JobHistory ...).

Built as plain dicts with the exact Go key names: these are on every poll of every client, so
they skip model validation. Timestamps are RFC 3339 strings with a ``Z``; numbers are numbers;
``VerificationProposal`` is never sent (the Python apiclient cannot read Go's base64 string).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from shoal_common.spec import JobHistoryType, StorageSourceType
from shoal_requester.domain.inventory import TrackedNode
from shoal_requester.domain.jobs import JobView
from shoal_requester.domain.model import (
    ExecutionRecord,
    HistoryRecord,
    JobRecord,
    NodeRecord,
    NodeStanding,
)


def rfc3339(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def execution_state(e: ExecutionRecord) -> dict[str, Any]:
    out: dict[str, Any] = {
        "JobID": e.job_id,
        "NodeId": e.node_id,  # sic: the Go model's key
        "ComputeReference": e.id,
        "State": e.state.value,
        "AcceptedAskForBid": e.accepted_ask_for_bid,
        "Status": e.status,
    }
    if e.verification is not None:
        out["VerificationResult"] = dict(e.verification)
    if e.published:  # {}: a failed run's partial result that could not be published
        out["PublishedResults"] = dict(e.published)
    if e.run_output is not None:
        out["RunOutput"] = dict(e.run_output)
    out["Version"] = e.version
    out["CreateTime"] = rfc3339(e.created)
    out["UpdateTime"] = rfc3339(e.updated)
    return out


def job_state(job: JobRecord, executions: Sequence[ExecutionRecord]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "JobID": job.id,
        "Executions": [execution_state(e) for e in executions],
        "State": job.state.value,
        "Version": job.version,
        "CreateTime": rfc3339(job.created),
        "UpdateTime": rfc3339(job.updated),
    }
    if job.timeout_at is not None:
        out["TimeoutAt"] = rfc3339(job.timeout_at)
    if job.status:
        out["Status"] = job.status  # Shoal's addition: why a job is where it is
    return out


def view_state(view: JobView) -> dict[str, Any]:
    return job_state(view.job, view.executions)


def history(h: HistoryRecord) -> dict[str, Any]:
    change: dict[str, str] = {"New": h.new}
    if h.previous is not None:
        change["Previous"] = h.previous
    out: dict[str, Any] = {"Type": h.type.value, "JobID": h.job_id}
    if h.type is JobHistoryType.JOB_LEVEL:
        out["JobState"] = change
    else:
        out["NodeID"] = h.node_id or ""
        out["ComputeReference"] = h.execution_id or ""
        out["ExecutionState"] = change
    out["NewVersion"] = h.version
    out["Comment"] = h.comment
    out["Time"] = rfc3339(h.time)
    return out


def published_result(e: ExecutionRecord) -> dict[str, Any]:
    """One ``PublishedResult``; ``Data`` is always an object (airflow reads ``data.cid``)."""
    data = dict(e.published) if e.published else {}
    if not data:
        data = {
            "StorageSource": StorageSourceType.IPFS.value,
            "Name": f"job-{e.job_id}-host-{e.node_id}",
        }
        if e.result_cid:
            data["CID"] = e.result_cid
    return {"NodeID": e.node_id, "Data": data}


def job_with_info(view: JobView) -> dict[str, Any]:
    return {"Job": dict(view.job.job), "State": view_state(view)}


def reputation(standing: NodeStanding, weight: float) -> dict[str, Any]:
    """A node's record as the requester judged it, and the ranking factor it gives."""
    return {
        "completed": standing.completed,
        "failed": standing.failed,
        "rejected": standing.rejected,
        "last_rejected": rfc3339(standing.last_rejected) if standing.last_rejected else None,
        "flagged": standing.rejected > 0,
        "weight": round(weight, 4),
    }


def node(tracked: TrackedNode, *, running: int, reputation: dict[str, Any]) -> dict[str, Any]:
    info = tracked.info
    return {
        "id": tracked.id,
        "state": tracked.state,
        "labels": dict(info.labels),
        "arch": info.arch,
        "engines": [e.value for e in info.engines],
        "storage_sources": [s.value for s in info.storage_sources],
        "publishers": [p.value for p in info.publishers],
        "verifiers": [v.value for v in info.verifiers],
        "capacity": {
            "total": info.total.model_dump(),
            "available": tracked.free.model_dump(),
            "reported_available": info.available.model_dump(),
            "max_per_job": info.max_per_job.model_dump(),
        },
        "timeout_min": info.timeout_min,
        "timeout_max": info.timeout_max,
        "running_executions": running,
        "node_running": info.running,
        "node_queued": info.queued,
        "allow_networking": info.allow_networking,
        "local_cids": list(info.local_cids),  # what the node holds (data-locality ranking)
        "content_url": info.content_url,
        "version": info.version,
        "first_seen": rfc3339(tracked.first_seen),
        "last_heartbeat": rfc3339(tracked.last_seen),
        "reputation": reputation,
    }


def persisted_node(record: NodeRecord, *, reputation: dict[str, Any]) -> dict[str, Any]:
    """A node known only from the database (lost before this requester started)."""
    info = dict(record.info)
    return {
        "id": record.id,
        "state": record.state,
        "labels": info.get("labels", {}),
        "arch": info.get("arch", ""),
        "engines": info.get("engines", []),
        "storage_sources": info.get("storage_sources", []),
        "publishers": info.get("publishers", []),
        "verifiers": info.get("verifiers", []),
        "capacity": {
            "total": info.get("total", {}),
            "available": {},
            "reported_available": info.get("available", {}),
            "max_per_job": info.get("max_per_job", {}),
        },
        "timeout_min": info.get("timeout_min"),
        "timeout_max": info.get("timeout_max"),
        "running_executions": 0,
        "node_running": 0,
        "node_queued": 0,
        "allow_networking": info.get("allow_networking", False),
        "content_url": info.get("content_url"),
        "version": info.get("version", ""),
        "first_seen": rfc3339(record.first_seen),
        "last_heartbeat": rfc3339(record.last_seen),
        "reputation": reputation,
    }
