"""Job use cases behind the API: submit, look up, list, cancel, read logs."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from shoal_common.errors import (
    InvalidInput,
    NotEnoughNodes,
    NotFound,
    Unauthorized,
    Unavailable,
)
from shoal_common.events import new_id
from shoal_common.protocol import ApproveBid, Capacity, LogsAnswer, LogsQuery
from shoal_common.spec import (
    ExecutionStateType,
    Job,
    JobHistoryType,
    JobRequester,
    JobStateType,
    Metadata,
    Spec,
    utcnow,
)
from shoal_requester import metrics
from shoal_requester.domain.inventory import Inventory
from shoal_requester.domain.matching import misfit, requirements
from shoal_requester.domain.model import (
    ExecutionRecord,
    HistoryRecord,
    JobQuery,
    JobRecord,
)
from shoal_requester.domain.orchestrator import WAITING_FOR_APPROVAL, NewJobWrite, Orchestrator
from shoal_requester.domain.ports import ComputeClient, NodeCallFailed
from shoal_requester.domain.validation import check_job_id, storable_text, validate_submit
from shoal_requester.settings import RequesterSettings
from shoal_requester.store.base import RequesterStore

SHORT_ID_LENGTH = 8
MIN_SUFFIX_LENGTH = 6


@dataclass(frozen=True)
class JobView:
    """A job with its executions (what JobState shows)."""

    job: JobRecord
    executions: list[ExecutionRecord]


class JobService:
    """The requester's job operations, independent of HTTP."""

    def __init__(
        self,
        *,
        store: RequesterStore,
        inventory: Inventory,
        orchestrator: Orchestrator,
        compute: ComputeClient,
        settings: RequesterSettings,
    ) -> None:
        self._store = store
        self._inventory = inventory
        self._orchestrator = orchestrator
        self._compute = compute
        self._settings = settings

    # --- submit ------------------------------------------------------------------------------

    async def submit(
        self, payload: Mapping[str, Any], payload_raw: bytes, *, client_id: str
    ) -> tuple[JobRecord, bool]:
        """Validate and store a job, then start placing it. Returns (job, created).

        A payload that was submitted before (same signed bytes) returns the original job: a
        replayed request cannot run a job twice.
        """
        submit_key = hashlib.sha256(payload_raw).hexdigest()
        parsed, spec, resources = validate_submit(
            payload, default_timeout=self._settings.default_job_timeout
        )
        try:
            self.check_feasible(spec, resources, client_id=client_id)
        except NotEnoughNodes:
            # A replay still answers its original job, even when the nodes have gone since.
            existing = await self._store.find_job_by_submit_key(submit_key)
            if existing is not None:
                return existing, False
            raise
        now = utcnow()
        job_id = new_id()
        job = Job(
            APIVersion=parsed.api_version,
            Metadata=Metadata(
                ID=job_id,
                CreatedAt=now,
                ClientID=client_id,
                Requester=JobRequester(RequesterNodeID=self._settings.node_id),
            ),
            Spec=spec,
        )
        record = JobRecord.of(
            job,
            id=job_id,
            client_id=client_id,
            state=JobStateType.NEW,
            version=1,
            created=now,
            updated=now,
            submit_key=submit_key,
        )
        # Placement starts now: its asks to the nodes overlap the job's write, and it records
        # its decision only after the job's row (ADR 0026).
        write = NewJobWrite()
        self._orchestrator.schedule(record, write)
        try:
            stored, created = await self._store.create_job(record, on_ordered=write.row_ordered)
        except BaseException:
            write.finished(False)
            raise
        write.finished(created)
        if created:
            metrics.JOBS_SUBMITTED.inc()
        return stored, created

    def check_feasible(self, spec: Spec, resources: Capacity, *, client_id: str) -> None:
        """Refuse a job that no set of live nodes could ever run (behaviours 18, 24, 31)."""
        req = requirements(spec, client_id=client_id, resources=resources)
        nodes = self._inventory.schedulable()
        misfits: dict[str, str] = {}
        fitting = 0
        needed = max(spec.concurrency, spec.min_bids, 1)
        for node in nodes:
            why = misfit(node.info, req)
            if why is None:
                fitting += 1
                if fitting >= needed:
                    # Enough: every submit scanning all nodes was O(cluster) on its critical
                    # path (17 ms at 1,000 nodes); the misfits only matter for a refusal.
                    return
            else:
                misfits[node.id] = why
        metrics.SUBMITS_REFUSED.labels(reason="not_enough_nodes").inc()
        detail = (
            f"not enough nodes to run this job: it needs {needed}, "
            f"{fitting} of {len(nodes)} live node(s) match"
        )
        if misfits:
            shown = sorted(misfits.items())[:5]
            detail += " (" + "; ".join(f"{n}: {why}" for n, why in shown)
            detail += f"; and {len(misfits) - 5} more)" if len(misfits) > 5 else ")"
        raise NotEnoughNodes(detail)

    # --- reads -------------------------------------------------------------------------------

    async def resolve(self, job_id: str) -> JobRecord:
        """A job by full id or unique prefix (the 8-character short id); raises NotFound."""
        job_id = job_id.strip()
        if not job_id:
            raise InvalidInput("a job id is required")
        if not check_job_id(job_id):
            # No stored id holds a NUL (and Postgres could not even compare one).
            raise NotFound(f"job {job_id!r} not found")
        job = await self._store.find_job(job_id)
        if job is not None:
            return job
        ids = await self._store.find_job_ids(job_id, limit=2)
        if not ids and len(job_id) >= MIN_SUFFIX_LENGTH:
            # Ids are time-ordered (UUIDv7): jobs submitted within a minute share their first
            # 8 characters, so a short id may be taken from the random end instead.
            ids = await self._store.find_job_ids(job_id, limit=2, suffix=True)
        if not ids:
            raise NotFound(f"job {job_id} not found")
        if len(ids) > 1:
            raise InvalidInput(f"job id {job_id!r} matches several jobs: use more characters")
        return await self._store.get_job(ids[0])

    async def view(self, job_id: str) -> JobView:
        # Jobs in flight are served from the orchestrator's working set (state as committed),
        # so clients polling a running job cost no database reads.
        live = self._orchestrator.snapshot(job_id)
        if live is not None:
            return JobView(*live)
        job = await self.resolve(job_id)
        executions = (await self._store.list_executions([job.id]))[job.id]
        return JobView(job, executions)

    async def describe(self, job_id: str) -> JobView:
        """:meth:`view`, with a Queued job's reason re-said from the nodes as they are now.

        The stored reason is from when the job last tried to find a node; capacity and nodes
        have moved since, and an operator asking why a job waits wants the present answer.
        """
        view = await self.view(job_id)
        job = view.job
        if job.state is not JobStateType.QUEUED or job.status.startswith(WAITING_FOR_APPROVAL):
            return view
        min_free = max(job.spec.min_bids, 1) if not view.executions else 1
        why = self._orchestrator.waiting_reason(job, view.executions, min_free=min_free)
        if why is None or why == job.status:
            return view  # nodes have room: the stored answer (their bids) says more
        return JobView(job.evolve(status=why), view.executions)

    async def list_jobs(self, query: JobQuery) -> list[JobView]:
        # A tag no store can hold matches no job; dropping it keeps it away from the database.
        include = tuple(t for t in query.include_tags if storable_text(t))
        if (query.include_tags and not include) or not storable_text(query.client_id or ""):
            return []
        exclude = tuple(t for t in query.exclude_tags if storable_text(t))
        if (include, exclude) != (query.include_tags, query.exclude_tags):
            query = replace(query, include_tags=include, exclude_tags=exclude)
        jobs = await self._store.list_jobs(query)
        executions = await self._store.list_executions([j.id for j in jobs])
        return [JobView(j, executions[j.id]) for j in jobs]

    async def history(
        self,
        job_id: str,
        *,
        since: datetime | None = None,
        exclude_job_level: bool = False,
        exclude_execution_level: bool = False,
    ) -> tuple[JobRecord, list[HistoryRecord]]:
        job = await self.resolve(job_id)
        types: list[JobHistoryType] | None = None
        if exclude_job_level or exclude_execution_level:
            types = [
                t
                for t, excluded in (
                    (JobHistoryType.JOB_LEVEL, exclude_job_level),
                    (JobHistoryType.EXECUTION_LEVEL, exclude_execution_level),
                )
                if not excluded
            ]
        return job, await self._store.list_history(job.id, since=since, types=types)

    async def results(self, job_id: str) -> list[ExecutionRecord]:
        """Completed executions, one result each; with none, the failed executions whose
        partial results (what they wrote before failing) were published (behaviour 11)."""
        view = await self.view(job_id)
        completed = [e for e in view.executions if e.state is ExecutionStateType.COMPLETED]
        if completed:
            return completed
        return [e for e in view.executions if e.state is ExecutionStateType.FAILED and e.published]

    # --- owner-only operations -----------------------------------------------------------------

    async def owned(self, job_id: str, client_id: str, *, action: str) -> JobRecord:
        job = await self.resolve(job_id)
        if job.client_id != client_id:
            raise Unauthorized(f"mismatched ClientIDs for {action}")
        return job

    async def cancel(self, job_id: str, *, client_id: str, reason: str) -> JobView:
        job = await self.owned(job_id, client_id, action="cancel")
        await self._orchestrator.cancel(job.id, reason)
        return await self.view(job.id)

    async def approve(
        self,
        job_id: str,
        *,
        client_id: str,
        execution_id: str = "",
        approve: bool = True,
        reason: str = "",
    ) -> JobView:
        """Approve (or refuse) executions a node holds for approval; the node answers with a
        ``BidAnswered`` event, which places (or replaces) the execution."""
        job = await self.resolve(job_id)
        approvers = self._settings.approver_clients
        allowed = client_id in approvers if approvers else client_id == job.client_id
        if not allowed:
            raise Unauthorized(f"client {client_id} may not approve executions of job {job.id}")
        executions = (await self._store.list_executions([job.id]))[job.id]
        waiting = [
            e
            for e in executions
            if e.state is ExecutionStateType.ASK_FOR_BID
            and (not execution_id or e.id.startswith(execution_id))
        ]
        if not waiting:
            raise NotFound(f"no execution of job {job.id} is waiting for approval")
        for e in waiting:
            decision = ApproveBid(execution_id=e.id, job_id=job.id, approved=approve, reason=reason)
            try:
                ack = await self._compute.approve(e.node_id, decision)
            except NodeCallFailed as exc:
                raise Unavailable(
                    f"node {e.node_id} did not take the approval: {exc.detail}"
                ) from exc
            if not ack.ok:
                raise InvalidInput(f"node {e.node_id} refused the approval: {ack.error}")
        return JobView(job, executions)

    async def pick_execution(self, job: JobRecord, execution_id: str) -> ExecutionRecord:
        """The named execution of the job, or its most relevant one when none is named."""
        executions = (await self._store.list_executions([job.id]))[job.id]
        if execution_id:
            for e in executions:
                if e.id == execution_id or e.id.startswith(execution_id):
                    return e
            raise NotFound(f"execution {execution_id} of job {job.id} not found")
        ran = [e for e in executions if e.accepted_ask_for_bid]
        if not ran:
            raise NotFound(f"job {job.id} has no execution that ran (yet)")
        # Prefer one still running, then the latest that completed.
        running = [e for e in ran if e.state.active]
        return (running or ran)[-1]

    async def logs(
        self, execution: ExecutionRecord, *, stdout_offset: int, stderr_offset: int
    ) -> LogsAnswer:
        """Output of an execution from its node, from the given offsets.

        When the node cannot answer (gone, or it no longer has the execution) the stored
        (possibly truncated) run output stands in, marked finished.
        """
        query = LogsQuery(
            execution_id=execution.id,
            job_id=execution.job_id,
            stdout_offset=stdout_offset,
            stderr_offset=stderr_offset,
        )
        try:
            answer = await self._compute.logs(execution.node_id, query)
        except NodeCallFailed as exc:
            answer = LogsAnswer(execution_id=execution.id, error=exc.detail, finished=True)
        if not answer.error:
            return answer
        current = await self._store.find_execution(execution.id) or execution
        if current.state.active:
            if answer.finished:
                return answer.model_copy(update={"finished": False})
            return answer
        out = current.run_output or {}
        stdout = str(out.get("stdout", ""))[stdout_offset:]
        stderr = str(out.get("stderr", ""))[stderr_offset:]
        return LogsAnswer(
            execution_id=execution.id,
            stdout=stdout,
            stderr=stderr,
            stdout_offset=stdout_offset + len(stdout),
            stderr_offset=stderr_offset + len(stderr),
            finished=True,
        )

    async def execution_finished(self, execution_id: str) -> bool:
        current = await self._store.find_execution(execution_id)
        return current is None or not current.state.active
