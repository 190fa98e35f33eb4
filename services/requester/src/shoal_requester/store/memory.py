"""An in-memory :class:`~shoal_requester.store.base.RequesterStore` for unit tests.

Same semantics as the SQL store (compare-and-set, history, idempotent events, outbox relayed
after "commit"), no durability.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
from collections.abc import Callable, Sequence
from datetime import datetime

from shoal_common.errors import Conflict, NotFound
from shoal_common.events import Envelope
from shoal_common.spec import ExecutionStateType, JobHistoryType, JobStateType
from shoal_requester.domain.model import (
    Changes,
    ExecutionRecord,
    HistoryRecord,
    JobQuery,
    JobRecord,
    NodeRecord,
    NodeStanding,
    history_for,
    standing_changes,
)
from shoal_requester.store.base import HistoryFanout, HistoryListener, Publish


class MemoryRequesterStore:
    """Dicts behind a lock; records are immutable, so they are shared, not copied."""

    def __init__(self) -> None:
        self.jobs: dict[str, JobRecord] = {}
        self.executions: dict[str, ExecutionRecord] = {}
        self.history: list[HistoryRecord] = []
        self.nodes: dict[str, NodeRecord] = {}
        self.standing: dict[str, NodeStanding] = {}
        self.outbox: list[Envelope] = []
        self.processed: set[str] = set()
        self._by_submit_key: dict[str, str] = {}
        self._executions_by_job: dict[str, list[str]] = {}
        self._lock = asyncio.Lock()
        self._fanout = HistoryFanout()
        self._publish: Publish | None = None
        self._wake = asyncio.Event()
        self._relay: asyncio.Task[None] | None = None

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        await self.stop_outbox()

    # --- writes ----------------------------------------------------------------------------

    async def create_job(
        self,
        job: JobRecord,
        *,
        comment: str = "Job created",
        on_ordered: Callable[[], None] | None = None,  # never called: writes interleave here
    ) -> tuple[JobRecord, bool]:
        async with self._lock:
            if job.submit_key is not None and job.submit_key in self._by_submit_key:
                return self.jobs[self._by_submit_key[job.submit_key]], False
            if job.id in self.jobs:
                raise Conflict(f"job {job.id} already exists")
            job = job.evolve(job=copy.deepcopy(dict(job.job)))
            self.jobs[job.id] = job
            if job.submit_key is not None:
                self._by_submit_key[job.submit_key] = job.id
            row = HistoryRecord(
                seq=len(self.history) + 1,
                job_id=job.id,
                type=JobHistoryType.JOB_LEVEL,
                new=job.state.value,
                version=job.version,
                time=job.created,
                comment=comment,
            )
            self.history.append(row)
        self._fanout.notify([row])
        return job, True

    async def apply(self, changes: Changes) -> list[HistoryRecord] | None:
        async with self._lock:
            if changes.processed_event is not None and changes.processed_event in self.processed:
                return None
            for ju in changes.jobs:
                current = self.jobs.get(ju.before.id)
                if current is None or (current.state, current.version) != (
                    ju.before.state,
                    ju.before.version,
                ):
                    raise Conflict(f"job {ju.before.id} changed since it was read")
            for eu in changes.executions:
                if eu.before is None:
                    if eu.after.id in self.executions:
                        raise Conflict(f"execution {eu.after.id} already exists")
                    continue
                cur = self.executions.get(eu.before.id)
                if cur is None or (cur.state, cur.version) != (
                    eu.before.state,
                    eu.before.version,
                ):
                    raise Conflict(f"execution {eu.before.id} changed since it was read")
            # All checks passed: nothing below can fail, so the change is all-or-nothing.
            for ju in changes.jobs:
                self.jobs[ju.after.id] = ju.after
            for eu in changes.executions:
                self.executions[eu.after.id] = eu.after
                if eu.before is None:
                    self._executions_by_job.setdefault(eu.after.job_id, []).append(eu.after.id)
            rows = []
            for h in history_for(changes):
                rows.append(dataclasses.replace(h, seq=len(self.history) + 1))
                self.history.append(rows[-1])
            for node_id, delta in standing_changes(changes).items():
                self.standing[node_id] = self.standing.get(node_id, NodeStanding()) + delta
            if changes.processed_event is not None:
                self.processed.add(changes.processed_event)
            self.outbox.extend(Envelope.wrap(e) for e in changes.events)
        if changes.events:
            self._wake.set()
        self._fanout.notify(rows)
        return rows

    # --- reads -----------------------------------------------------------------------------

    async def ping(self) -> None:
        return None

    async def find_job(self, job_id: str) -> JobRecord | None:
        return self.jobs.get(job_id)

    async def get_job(self, job_id: str) -> JobRecord:
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"job {job_id} not found")
        return job

    async def find_job_by_submit_key(self, submit_key: str) -> JobRecord | None:
        job_id = self._by_submit_key.get(submit_key)
        return self.jobs[job_id] if job_id is not None else None

    async def find_job_ids(self, prefix: str, *, limit: int = 2, suffix: bool = False) -> list[str]:
        hits = (j for j in self.jobs if (j.endswith(prefix) if suffix else j.startswith(prefix)))
        return sorted(hits)[:limit]

    async def list_jobs(self, query: JobQuery) -> list[JobRecord]:
        found = []
        for job in self.jobs.values():
            if query.client_id is not None and job.client_id != query.client_id:
                continue
            if query.states and job.state not in query.states:
                continue
            tags = set(job.annotations)
            if query.include_tags and not tags.intersection(query.include_tags):
                continue
            if query.exclude_tags and tags.intersection(query.exclude_tags):
                continue
            found.append(job)
        if query.sort_by == "created_at":
            found.sort(key=lambda j: (j.created, j.id), reverse=query.reverse)
        else:
            found.sort(key=lambda j: j.id, reverse=query.reverse)
        return found[: query.limit] if query.limit > 0 else found

    async def list_jobs_in_states(
        self,
        states: Sequence[JobStateType],
        *,
        updated_before: datetime | None = None,
        limit: int = 1000,
    ) -> list[JobRecord]:
        found = await self.list_jobs(JobQuery(states=tuple(states)))
        if updated_before is not None:
            found = [j for j in found if j.updated < updated_before]
        return found[:limit]

    async def list_expired_jobs(self, now: datetime, *, limit: int = 1000) -> list[JobRecord]:
        out = [
            j
            for j in self.jobs.values()
            if (
                j.state in (JobStateType.IN_PROGRESS, JobStateType.QUEUED)
                and j.timeout_at is not None
                and j.timeout_at <= now
            )
            or (
                j.state == JobStateType.QUEUED
                and j.queue_deadline is not None
                and j.queue_deadline <= now
            )
        ]
        out.sort(key=lambda j: j.created)
        return out[:limit]

    async def find_execution(self, execution_id: str) -> ExecutionRecord | None:
        return self.executions.get(execution_id)

    async def list_executions(self, job_ids: Sequence[str]) -> dict[str, list[ExecutionRecord]]:
        return {
            j: [self.executions[e] for e in self._executions_by_job.get(j, [])] for j in job_ids
        }

    async def list_executions_in_states(
        self,
        states: Sequence[ExecutionStateType],
        *,
        node_ids: Sequence[str] | None = None,
        updated_before: datetime | None = None,
        limit: int = 10_000,
    ) -> list[ExecutionRecord]:
        wanted = set(states)
        out = [
            e
            for e in self.executions.values()
            if e.state in wanted
            and (node_ids is None or e.node_id in node_ids)
            and (updated_before is None or e.updated < updated_before)
        ]
        out.sort(key=lambda e: e.created)
        return out[:limit]

    async def list_history(
        self,
        job_id: str,
        *,
        since: datetime | None = None,
        types: Sequence[JobHistoryType] | None = None,
    ) -> list[HistoryRecord]:
        return [
            h
            for h in self.history
            if h.job_id == job_id
            and (since is None or h.time >= since)
            and (types is None or h.type in types)
        ]

    # --- nodes -----------------------------------------------------------------------------

    async def upsert_node(self, node: NodeRecord) -> None:
        existing = self.nodes.get(node.id)
        if existing is not None:
            node = dataclasses.replace(node, first_seen=existing.first_seen)
        # The standing is the store's own (apply() keeps it), never the caller's copy.
        self.nodes[node.id] = dataclasses.replace(node, standing=NodeStanding())

    async def list_nodes(self) -> list[NodeRecord]:
        return [
            dataclasses.replace(self.nodes[k], standing=self.standing.get(k, NodeStanding()))
            for k in sorted(self.nodes)
        ]

    # --- fan-out and outbox ----------------------------------------------------------------

    def subscribe_history(self, listener: HistoryListener) -> Callable[[], None]:
        return self._fanout.subscribe(listener)

    async def start_outbox(self, publish: Publish) -> None:
        self._publish = publish
        self._relay = asyncio.create_task(self._run_relay())
        self._wake.set()

    async def _run_relay(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.outbox and self._publish is not None:
                envelope = self.outbox[0]
                try:
                    await self._publish(envelope)
                except Exception:
                    await asyncio.sleep(0.05)
                    continue
                self.outbox.pop(0)

    async def stop_outbox(self) -> None:
        if self._relay is not None:
            self._relay.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._relay
            self._relay = None
