"""In-memory :class:`VerifierStore` for unit tests: same contract, no database."""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from shoal_common.errors import Conflict
from shoal_common.events import Envelope, Event
from shoal_common.spec import VerifierType
from shoal_verifier.domain.models import JobRecord, JobStatus, ProposalRecord
from shoal_verifier.store.base import Publish


@dataclass
class _State:
    jobs: dict[str, JobRecord] = field(default_factory=dict)
    proposals: dict[str, ProposalRecord] = field(default_factory=dict)
    processed: set[str] = field(default_factory=set)
    outbox: list[Envelope] = field(default_factory=list)
    key: bytes | None = None


class MemoryTx:
    def __init__(self, state: _State) -> None:
        self._s = state

    async def mark_processed(self, event_id: str) -> bool:
        if event_id in self._s.processed:
            return False
        self._s.processed.add(event_id)
        return True

    async def find_job(self, job_id: str) -> JobRecord | None:
        job = self._s.jobs.get(job_id)
        return copy.deepcopy(job) if job else None

    async def insert_job(self, job: JobRecord) -> None:
        if job.job_id in self._s.jobs:
            raise Conflict(f"job {job.job_id} already exists")
        self._s.jobs[job.job_id] = copy.deepcopy(job)

    async def update_job(self, job: JobRecord, *, expected_version: int) -> None:
        current = self._s.jobs.get(job.job_id)
        if current is None or current.version != expected_version:
            raise Conflict(f"job {job.job_id} changed since it was read")
        job.version = expected_version + 1
        self._s.jobs[job.job_id] = copy.deepcopy(job)

    async def list_proposals(self, job_id: str) -> list[ProposalRecord]:
        found = [copy.deepcopy(p) for p in self._s.proposals.values() if p.job_id == job_id]
        return sorted(found, key=lambda p: (p.received, p.execution_id))

    async def find_proposal(self, execution_id: str) -> ProposalRecord | None:
        p = self._s.proposals.get(execution_id)
        return copy.deepcopy(p) if p else None

    async def insert_proposal(self, proposal: ProposalRecord) -> None:
        if proposal.execution_id in self._s.proposals:
            raise Conflict(f"execution {proposal.execution_id} already proposed")
        self._s.proposals[proposal.execution_id] = copy.deepcopy(proposal)

    async def update_proposal(self, proposal: ProposalRecord) -> None:
        self._s.proposals[proposal.execution_id] = copy.deepcopy(proposal)

    async def add_events(self, *events: Event) -> list[Envelope]:
        envelopes = [Envelope.wrap(e) for e in events]
        self._s.outbox.extend(envelopes)
        return envelopes


class MemoryRelay:
    """Drains the fake's outbox to the bus, like ``shoal_common.db.OutboxRelay``."""

    def __init__(self, store: MemoryVerifierStore, publish: Publish, poll_interval: float) -> None:
        self._store = store
        self._publish = publish
        self._poll = poll_interval
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def notify(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll)
            self._wake.clear()
            await self._store.relay_once(self._publish)


class MemoryVerifierStore:
    """A dict-backed store; a transaction snapshots the state and restores it on error."""

    def __init__(self) -> None:
        self._state = _State()
        self._lock = asyncio.Lock()

    async def migrate(self) -> None:
        return None

    async def close(self) -> None:
        return None

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[MemoryTx]:
        async with self._lock:
            snapshot = copy.deepcopy(self._state)
            try:
                yield MemoryTx(self._state)
            except BaseException:
                self._state = snapshot
                raise

    def relay(self, publish: Publish, *, poll_interval: float = 1.0) -> MemoryRelay:
        return MemoryRelay(self, publish, poll_interval)

    async def relay_once(self, publish: Publish) -> int:
        async with self._lock:
            batch = list(self._state.outbox)
        for env in batch:
            await publish(env)
        async with self._lock:
            sent = {e.id for e in batch}
            self._state.outbox = [e for e in self._state.outbox if e.id not in sent]
        return len(batch)

    async def find_job(self, job_id: str) -> JobRecord | None:
        job = self._state.jobs.get(job_id)
        return copy.deepcopy(job) if job else None

    async def list_proposals(self, job_id: str) -> list[ProposalRecord]:
        return await MemoryTx(self._state).list_proposals(job_id)

    async def list_due_jobs(self, *, started_before: float, limit: int = 100) -> list[str]:
        due = [
            j
            for j in self._state.jobs.values()
            if j.status is JobStatus.OPEN
            and j.verifier is VerifierType.DETERMINISTIC
            and j.round_started is not None
            and j.round_started < started_before
        ]
        due.sort(key=lambda j: j.round_started or 0.0)
        return [j.job_id for j in due[:limit]]

    async def first_round_start(self) -> float | None:
        return min(
            (
                j.round_started
                for j in self._state.jobs.values()
                if j.status is JobStatus.OPEN
                and j.verifier is VerifierType.DETERMINISTIC
                and j.round_started is not None
            ),
            default=None,
        )

    async def load_or_create_key(self, candidate: bytes) -> bytes:
        if self._state.key is None:
            self._state.key = candidate
        return self._state.key

    async def outbox_size(self) -> int:
        return len(self._state.outbox)

    def processed_count(self) -> int:
        """How many consumed events were applied (tests wait on it)."""
        return len(self._state.processed)

    def outbox(self) -> list[Envelope]:
        """Staged events (tests)."""
        return list(self._state.outbox)
