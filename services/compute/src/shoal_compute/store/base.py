"""The compute node's datastore contract: accepted executions plus the event outbox."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any, Protocol

from shoal_common.events import Envelope, Event
from shoal_compute.domain.execution import ExecutionRecord, LocalState

PublishFn = Callable[[Envelope], Awaitable[None]]


class Relay(Protocol):
    """Moves committed outbox events onto the bus (at least once)."""

    def notify(self) -> None:
        """Wake up now: something was just committed."""
        ...

    def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def relay_once(self) -> int:
        """Publish one batch; returns how many events went out."""
        ...


class ExecutionStore(Protocol):
    """Executions the node accepted, changed only by compare-and-set on their state.

    Every change that has consequences elsewhere stages its events in the same transaction
    (``events=``), so a crash can never keep the change and lose the event or the reverse.
    """

    async def start(self) -> None:
        """Open the database and apply migrations."""
        ...

    async def close(self) -> None: ...

    async def create(
        self,
        record: ExecutionRecord,
        *,
        events: Sequence[Event] = (),
        on_ordered: Callable[[], None] | None = None,
    ) -> None:
        """Store a new execution; raises Conflict if the id exists.

        ``on_ordered`` is called once any write started after it is ordered after this one,
        even before this one is durable: it then commits with it, or after it, or fails with
        it. With SQLite's group commit that is as soon as the row is in the open group; else
        when it is committed.
        """
        ...

    async def find(self, execution_id: str) -> ExecutionRecord | None: ...

    async def get(self, execution_id: str) -> ExecutionRecord:
        """Raises NotFound."""
        ...

    async def transition(
        self,
        execution_id: str,
        *,
        expected: Collection[LocalState],
        new: LocalState,
        events: Sequence[Event] = (),
        **changes: Any,
    ) -> None:
        """Move to ``new`` if the current state is one of ``expected``; stage ``events``.

        Raises NotFound for an unknown id and InvalidTransition when the state moved on.
        ``changes`` may set ``result_cid``, ``error`` and ``run_output``. Returns nothing:
        every caller already holds the record, and reading the row back (with its job) cost
        more than the update (ADR 0024).
        """
        ...

    async def find_by_result(self, result_cid: str) -> ExecutionRecord | None:
        """The execution whose results folder has this CID (completed, or a failed run's
        partial result), if any."""
        ...

    async def list_executions(
        self,
        *,
        states: Collection[LocalState] | None = None,
        limit: int = 1000,
        newest_first: bool = False,
    ) -> list[ExecutionRecord]: ...

    async def stage_events(self, *events: Event) -> None:
        """Put events in the outbox without any state change (e.g. a late bid answer)."""
        ...

    def relay(self, publish: PublishFn, *, service: str) -> Relay:
        """The relay that publishes this store's outbox."""
        ...
