"""What the verifier needs from its datastore.

Everything a handler changes (records, the processed-event mark, the events it emits) goes
through one :class:`VerifierTx`, so a decision and its events commit together or not at all.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from shoal_common.events import Envelope, Event
from shoal_verifier.domain.models import JobRecord, ProposalRecord

Publish = Callable[[Envelope], Awaitable[None]]


class Relay(Protocol):
    """Publishes committed outbox events; :meth:`notify` after a commit for low latency."""

    def start(self) -> None: ...

    async def stop(self) -> None: ...

    def notify(self) -> None: ...


class VerifierTx(Protocol):
    """One transaction. Leaving the context commits; an exception rolls everything back."""

    async def mark_processed(self, event_id: str) -> bool:
        """Record a consumed event id; False if it was already applied (skip the event)."""
        ...

    async def find_job(self, job_id: str) -> JobRecord | None: ...

    async def insert_job(self, job: JobRecord) -> None: ...

    async def update_job(self, job: JobRecord, *, expected_version: int) -> None:
        """Compare-and-set on ``version``; bumps it. Raises ``Conflict`` if it moved on."""
        ...

    async def list_proposals(self, job_id: str) -> list[ProposalRecord]:
        """The job's proposals, oldest first."""
        ...

    async def find_proposal(self, execution_id: str) -> ProposalRecord | None: ...

    async def insert_proposal(self, proposal: ProposalRecord) -> None: ...

    async def update_proposal(self, proposal: ProposalRecord) -> None: ...

    async def add_events(self, *events: Event) -> list[Envelope]:
        """Stage events for the relay; they go out only if the transaction commits."""
        ...


class VerifierStore(Protocol):
    """The verifier's datastore."""

    async def migrate(self) -> None:
        """Bring the schema to the latest version (Alembic; no-op for the fake)."""
        ...

    async def close(self) -> None: ...

    def transaction(self) -> AbstractAsyncContextManager[VerifierTx]: ...

    def relay(self, publish: Publish, *, poll_interval: float = 1.0) -> Relay:
        """The outbox relay for this store."""
        ...

    async def find_job(self, job_id: str) -> JobRecord | None: ...

    async def list_proposals(self, job_id: str) -> list[ProposalRecord]: ...

    async def list_due_jobs(self, *, started_before: float, limit: int = 100) -> list[str]:
        """Open deterministic jobs whose round started before the given time (deadline sweep)."""
        ...

    async def first_round_start(self) -> float | None:
        """When the oldest round of an open deterministic job started (the next deadline is
        then plus the decision timeout); None when no such job waits."""
        ...

    async def load_or_create_key(self, candidate: bytes) -> bytes:
        """The verifier's sealing key; stores ``candidate`` if there is none yet.

        Replicas sharing a database race here harmlessly: the first insert wins and every
        replica returns the stored key.
        """
        ...

    async def outbox_size(self) -> int:
        """Events committed but not relayed yet."""
        ...
