"""The requester's datastore interface.

Two implementations follow it: :class:`~shoal_requester.store.sql.SqlRequesterStore` (SQLite or
Postgres, the source of truth in production) and :class:`~shoal_requester.store.memory.
MemoryRequesterStore` (unit tests). One contract test suite runs against all of them.

Writes happen only through :meth:`RequesterStore.create_job` and :meth:`RequesterStore.apply`,
each one transaction that compare-and-sets on (state, version), records history and stages the
events for other services in the outbox.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Protocol

from shoal_common.events import Envelope
from shoal_common.spec import ExecutionStateType, JobHistoryType, JobStateType
from shoal_requester.domain.model import (
    Changes,
    ExecutionRecord,
    HistoryRecord,
    JobQuery,
    JobRecord,
    NodeRecord,
)

HistoryListener = Callable[[Sequence[HistoryRecord]], None]
Publish = Callable[[Envelope], Awaitable[None]]


class RequesterStore(Protocol):
    """Jobs, executions, history, nodes and the outbox of one requester."""

    async def open(self) -> None:
        """Make the store usable (SQL: apply migrations, open the engine)."""
        ...

    async def close(self) -> None: ...

    # --- writes ---

    async def create_job(
        self,
        job: JobRecord,
        *,
        comment: str = "Job created",
        on_ordered: Callable[[], None] | None = None,
    ) -> tuple[JobRecord, bool]:
        """Insert a job in state New with its first history row.

        If another job already has the same ``submit_key`` (a replayed signed submit), nothing
        is written and that job is returned with ``False``.

        ``on_ordered``, where the store can tell, is called as soon as any write started after
        the call will commit after this one (SQLite's single writer: once the insert is
        queued), so a placement may record its decision without waiting for this commit (ADR
        0026). A store that cannot tell never calls it.
        """
        ...

    async def apply(self, changes: Changes) -> list[HistoryRecord] | None:
        """Apply one transition atomically; return the history rows written.

        Raises :class:`shoal_common.errors.Conflict` (and writes nothing) if any record is no
        longer at its expected (state, version). Adds what the change means for each node's
        standing (:func:`~shoal_requester.domain.model.standing_changes`) in the same
        transaction. Returns None, writing nothing, when
        ``changes.processed_event`` was applied before.
        """
        ...

    # --- reads ---

    async def ping(self) -> None:
        """Round-trip to the database (readiness); raises when it is unreachable."""
        ...

    async def find_job(self, job_id: str) -> JobRecord | None: ...

    async def get_job(self, job_id: str) -> JobRecord:
        """Raises :class:`shoal_common.errors.NotFound`."""
        ...

    async def find_job_by_submit_key(self, submit_key: str) -> JobRecord | None:
        """The job a signed payload created, if it was submitted before."""
        ...

    async def find_job_ids(self, prefix: str, *, limit: int = 2, suffix: bool = False) -> list[str]:
        """Ids starting with ``prefix`` (short ids), at most ``limit``; with ``suffix``, ids
        ending with it instead (a scan: for interactive lookups only)."""
        ...

    async def list_jobs(self, query: JobQuery) -> list[JobRecord]: ...

    async def list_jobs_in_states(
        self,
        states: Sequence[JobStateType],
        *,
        updated_before: datetime | None = None,
        limit: int = 1000,
    ) -> list[JobRecord]:
        """Oldest first."""
        ...

    async def list_expired_jobs(self, now: datetime, *, limit: int = 1000) -> list[JobRecord]:
        """InProgress jobs past ``timeout_at`` and Queued jobs past ``queue_deadline``."""
        ...

    async def find_execution(self, execution_id: str) -> ExecutionRecord | None: ...

    async def list_executions(self, job_ids: Sequence[str]) -> dict[str, list[ExecutionRecord]]:
        """Executions of several jobs in one query, each list oldest first."""
        ...

    async def list_executions_in_states(
        self,
        states: Sequence[ExecutionStateType],
        *,
        node_ids: Sequence[str] | None = None,
        updated_before: datetime | None = None,
        limit: int = 10_000,
    ) -> list[ExecutionRecord]: ...

    async def list_history(
        self,
        job_id: str,
        *,
        since: datetime | None = None,
        types: Sequence[JobHistoryType] | None = None,
    ) -> list[HistoryRecord]:
        """Oldest first."""
        ...

    # --- nodes ---

    async def upsert_node(self, node: NodeRecord) -> None:
        """Insert or rewrite a node's row; keeps ``first_seen``, ignores ``node.standing``."""
        ...

    async def list_nodes(self) -> list[NodeRecord]:
        """Every node, with its standing as :meth:`apply` has counted it (by id)."""
        ...

    # --- fan-out and outbox ---

    def subscribe_history(self, listener: HistoryListener) -> Callable[[], None]:
        """Call ``listener`` (synchronously, after commit) with every batch of history rows."""
        ...

    async def start_outbox(self, publish: Publish) -> None:
        """Start relaying committed events to ``publish`` (at least once)."""
        ...

    async def stop_outbox(self) -> None: ...


class HistoryFanout:
    """Listener bookkeeping shared by the store implementations."""

    def __init__(self) -> None:
        self._listeners: list[HistoryListener] = []

    def subscribe(self, listener: HistoryListener) -> Callable[[], None]:
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def notify(self, rows: Sequence[HistoryRecord]) -> None:
        if not rows:
            return
        for listener in list(self._listeners):
            listener(rows)
