"""The verifier's store on SQLAlchemy 2 async: SQLite (embedded default) or Postgres."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sqlalchemy import bindparam, func, insert, select, update
from sqlalchemy.engine import RowMapping
from sqlalchemy.exc import IntegrityError

from shoal_common.db import StoreConnection
from shoal_common.errors import Conflict
from shoal_common.outbox_store import OutboxSqlStore, OutboxTx
from shoal_common.spec import VerifierType
from shoal_verifier.domain.models import JobRecord, JobStatus, ProposalRecord, ProposalStatus
from shoal_verifier.store import tables as t

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
_KEY_NAME = "sealing"
# The deadline sweep's wake-up time (ix_verifier_jobs_status_round: an index range read).
_FIRST_ROUND_START = select(func.min(t.jobs.c.round_started)).where(
    t.jobs.c.status == JobStatus.OPEN.value,
    t.jobs.c.verifier == VerifierType.DETERMINISTIC.value,
    t.jobs.c.round_started.is_not(None),
)


def _job_values(job: JobRecord) -> dict[str, Any]:
    return {
        "job_id": job.job_id,
        "verifier": job.verifier.value,
        "verifier_from_plan": job.verifier_from_plan,
        "base": job.base,
        "plan_expected": job.plan_expected,
        "plan_time": job.plan_time,
        "floor": job.floor,
        "confidence": job.confidence,
        "planned": dict(job.planned),
        "escalations": job.escalations,
        "extra_executions": job.extra_executions,
        "status": job.status.value,
        "accepted_cid": job.accepted_cid,
        "reason": job.reason,
        "round_started": job.round_started,
        "version": job.version,
        "created": job.created,
        "updated": job.updated,
    }


def _job(row: RowMapping) -> JobRecord:
    return JobRecord(
        job_id=row["job_id"],
        verifier=VerifierType(row["verifier"]),
        verifier_from_plan=bool(row["verifier_from_plan"]),
        base=row["base"],
        plan_expected=row["plan_expected"],
        plan_time=row["plan_time"],
        floor=row["floor"],
        confidence=row["confidence"],
        planned=dict(row["planned"] or {}),
        escalations=row["escalations"],
        extra_executions=row["extra_executions"],
        status=JobStatus(row["status"]),
        accepted_cid=row["accepted_cid"],
        reason=row["reason"],
        round_started=row["round_started"],
        version=row["version"],
        created=row["created"],
        updated=row["updated"],
    )


def _proposal_values(p: ProposalRecord) -> dict[str, Any]:
    return {
        "execution_id": p.execution_id,
        "job_id": p.job_id,
        "node_id": p.node_id,
        "result_cid": p.result_cid,
        "received": p.received,
        "status": p.status.value,
        "reason": p.reason,
        "invalid_reason": p.invalid_reason,
        "sealed": p.sealed,
        "publisher": dict(p.publisher),
        "result_url": p.result_url,
        "run_output": p.run_output,
        "event_id": p.event_id,
    }


def _proposal(row: RowMapping) -> ProposalRecord:
    return ProposalRecord(
        execution_id=row["execution_id"],
        job_id=row["job_id"],
        node_id=row["node_id"],
        result_cid=row["result_cid"],
        received=row["received"],
        status=ProposalStatus(row["status"]),
        reason=row["reason"],
        invalid_reason=row["invalid_reason"],
        sealed=bool(row["sealed"]),
        publisher=dict(row["publisher"] or {}),
        result_url=row["result_url"],
        run_output=row["run_output"],
        event_id=row["event_id"],
    )


# Built once: constructing a statement per call cost more than running it (stress profile).
_SELECT_JOB = select(t.jobs).where(t.jobs.c.job_id == bindparam("b_job_id"))
_SELECT_PROPOSALS = (
    select(t.proposals)
    .where(t.proposals.c.job_id == bindparam("b_job_id"))
    .order_by(t.proposals.c.received, t.proposals.c.execution_id)
)
_SELECT_PROPOSAL = select(t.proposals).where(
    t.proposals.c.execution_id == bindparam("b_execution_id")
)
_INSERT_JOB = insert(t.jobs)
_INSERT_PROPOSAL = insert(t.proposals)
_UPDATE_JOB = update(t.jobs).where(
    t.jobs.c.job_id == bindparam("b_job_id"), t.jobs.c.version == bindparam("b_version")
)
_UPDATE_PROPOSAL = update(t.proposals).where(
    t.proposals.c.execution_id == bindparam("b_execution_id")
)


async def _find_job(conn: StoreConnection, job_id: str) -> JobRecord | None:
    row = (await conn.execute(_SELECT_JOB, {"b_job_id": job_id})).mappings().first()
    return _job(row) if row else None


async def _list_proposals(conn: StoreConnection, job_id: str) -> list[ProposalRecord]:
    rows = (await conn.execute(_SELECT_PROPOSALS, {"b_job_id": job_id})).mappings()
    return [_proposal(r) for r in rows]


class SqlTx(OutboxTx):
    outbox = t.outbox
    processed_events = t.processed_events

    async def find_job(self, job_id: str) -> JobRecord | None:
        return await _find_job(self._conn, job_id)

    # No savepoint around the inserts: a duplicate raises Conflict, which ends (rolls back) the
    # whole transaction anyway; nothing carries on after it.
    async def insert_job(self, job: JobRecord) -> None:
        try:
            await self._conn.execute(_INSERT_JOB, _job_values(job))
        except IntegrityError as exc:
            raise Conflict(f"job {job.job_id} already exists") from exc

    async def update_job(self, job: JobRecord, *, expected_version: int) -> None:
        values = _job_values(job)
        values["version"] = expected_version + 1
        del values["job_id"]
        result = await self._conn.execute(
            _UPDATE_JOB, {**values, "b_job_id": job.job_id, "b_version": expected_version}
        )
        if result.rowcount != 1:
            raise Conflict(f"job {job.job_id} changed since it was read")
        job.version = expected_version + 1

    async def list_proposals(self, job_id: str) -> list[ProposalRecord]:
        return await _list_proposals(self._conn, job_id)

    async def find_proposal(self, execution_id: str) -> ProposalRecord | None:
        row = (
            (await self._conn.execute(_SELECT_PROPOSAL, {"b_execution_id": execution_id}))
            .mappings()
            .first()
        )
        return _proposal(row) if row else None

    async def insert_proposal(self, proposal: ProposalRecord) -> None:
        try:
            await self._conn.execute(_INSERT_PROPOSAL, _proposal_values(proposal))
        except IntegrityError as exc:
            raise Conflict(f"execution {proposal.execution_id} already proposed") from exc

    async def update_proposal(self, proposal: ProposalRecord) -> None:
        values = _proposal_values(proposal)
        del values["execution_id"]
        await self._conn.execute(
            _UPDATE_PROPOSAL, {**values, "b_execution_id": proposal.execution_id}
        )


class SqlVerifierStore(OutboxSqlStore[SqlTx]):
    """:class:`~shoal_verifier.store.base.VerifierStore` on SQLite (group commit) or Postgres."""

    service = "verifier"
    migrations = MIGRATIONS
    tx_type = SqlTx

    async def find_job(self, job_id: str) -> JobRecord | None:
        async with self.engine.connect() as conn:
            return await _find_job(conn, job_id)

    async def list_proposals(self, job_id: str) -> list[ProposalRecord]:
        async with self.engine.connect() as conn:
            return await _list_proposals(conn, job_id)

    async def list_due_jobs(self, *, started_before: float, limit: int = 100) -> list[str]:
        query = (
            select(t.jobs.c.job_id)
            .where(
                t.jobs.c.status == JobStatus.OPEN.value,
                t.jobs.c.verifier == VerifierType.DETERMINISTIC.value,
                t.jobs.c.round_started.is_not(None),
                t.jobs.c.round_started < started_before,
            )
            .order_by(t.jobs.c.round_started)
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            return list((await conn.execute(query)).scalars())

    async def first_round_start(self) -> float | None:
        async with self.engine.connect() as conn:
            first = (await conn.execute(_FIRST_ROUND_START)).scalar()
            return float(first) if first is not None else None

    async def load_or_create_key(self, candidate: bytes) -> bytes:
        query = select(t.keys.c.private_key).where(t.keys.c.name == _KEY_NAME)
        async with self.engine.begin() as conn:
            found = (await conn.execute(query)).scalar()
            if found is not None:
                return bytes(found)
        try:
            async with self.engine.begin() as conn:
                await conn.execute(
                    insert(t.keys).values(
                        name=_KEY_NAME, private_key=candidate, created=time.time()
                    )
                )
            return candidate
        except IntegrityError:
            # Another replica stored its key first; everyone uses that one.
            async with self.engine.connect() as conn:
                return bytes((await conn.execute(query)).scalar_one())
