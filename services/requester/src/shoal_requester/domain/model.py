"""The requester's records and the unit of change its store applies atomically.

Records are immutable: a transition builds the record *after* the change with
:func:`dataclasses.replace` and hands both versions to the store, which compare-and-sets on the
*before* (state, version) and writes the history rows the transition implies, in one transaction.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Any, Literal

from shoal_common.events import Event
from shoal_common.protocol import Capacity, job_resources
from shoal_common.spec import (
    ExecutionStateType,
    Job,
    JobHistoryType,
    JobStateType,
    Spec,
    VerifierType,
    to_wire,
)

# Executions in these states hold (or are about to hold) capacity on their node.
HOLDS_CAPACITY = frozenset(
    {
        ExecutionStateType.NEW,
        ExecutionStateType.ASK_FOR_BID,
        ExecutionStateType.ASK_FOR_BID_ACCEPTED,
        ExecutionStateType.BID_ACCEPTED,
    }
)
# Executions that will produce (or have produced) a result proposal: what the verifier waits for.
PROPOSING = frozenset(
    {
        ExecutionStateType.BID_ACCEPTED,
        ExecutionStateType.WAITING_VERIFICATION,
        ExecutionStateType.RESULT_ACCEPTED,
        ExecutionStateType.COMPLETED,
    }
)
# Forward order of the happy path, so late or out-of-order events can be merged (see lifecycle).
STAGE = {
    ExecutionStateType.NEW: 0,
    ExecutionStateType.ASK_FOR_BID: 1,
    ExecutionStateType.ASK_FOR_BID_ACCEPTED: 2,
    ExecutionStateType.BID_ACCEPTED: 3,
    ExecutionStateType.WAITING_VERIFICATION: 4,
    ExecutionStateType.RESULT_ACCEPTED: 5,
    ExecutionStateType.COMPLETED: 6,
}


@dataclass(frozen=True)
class JobRecord:
    """One job as the requester stores it; ``job`` is the wire form (``to_wire(Job)``)."""

    id: str
    client_id: str
    job: Mapping[str, Any]
    state: JobStateType
    version: int
    created: datetime
    updated: datetime
    # When the job as a whole gives up (set when it starts running: now + its timeout).
    timeout_at: datetime | None = None
    # When a Queued job stops waiting for capacity.
    queue_deadline: datetime | None = None
    # Replacement rounds placed after failures or refusals (bounded by settings.max_retries).
    retries_used: int = 0
    # Executions wanted on top of the deal's concurrency (verification escalations).
    extra_executions: int = 0
    # Why the job is where it is ("timed out after 30s", "no node accepted the job: ...").
    status: str = ""
    # sha256 of the signed payload bytes: a replayed submit finds its original job.
    submit_key: str | None = None

    @classmethod
    def of(cls, job: Job, **fields: Any) -> JobRecord:
        """A record of ``job`` (stored in its wire form) that keeps the parsed model: placement
        reads every new job's spec, and parsing the wire form again costs ~0.2 ms a job."""
        record = cls(job=to_wire(job), **fields)
        record.__dict__["model"] = job
        return record

    @cached_property
    def model(self) -> Job:
        return Job.model_validate(self.job)

    @property
    def spec(self) -> Spec:
        return self.model.spec

    @cached_property
    def resources(self) -> Capacity:
        """What one execution of this job needs, defaults applied (validated at submit)."""
        return job_resources(self.spec)

    @property
    def annotations(self) -> tuple[str, ...]:
        return tuple(self.spec.annotations or ())

    @property
    def concurrency(self) -> int:
        return self.spec.concurrency

    @property
    def required(self) -> int:
        """Completed executions that make the job Completed.

        The deal's concurrency, except under deterministic verification, where a result
        verified with the needed confidence is the answer (ADR 0004): ``Confidence`` when set,
        else a strict majority of the concurrency.
        """
        spec = self.spec
        if spec.effective_verifier is VerifierType.DETERMINISTIC:
            return spec.confidence or spec.concurrency // 2 + 1
        return spec.concurrency

    @property
    def target(self) -> int:
        """How many executions should reach a result (concurrency plus escalations)."""
        return self.spec.concurrency + self.extra_executions

    @property
    def timeout_s(self) -> float:
        return float(self.spec.timeout or 0.0)

    def evolve(self, **changes: Any) -> JobRecord:
        new = dataclasses.replace(self, **changes)
        if "job" not in changes:
            # Same wire job: keep the parsed forms instead of validating it again.
            for cached in ("model", "resources"):
                if cached in self.__dict__:
                    new.__dict__[cached] = self.__dict__[cached]
        return new


@dataclass(frozen=True)
class ExecutionRecord:
    """One attempt to run a job on one node (``ComputeReference`` on the wire)."""

    id: str
    job_id: str
    node_id: str
    state: ExecutionStateType
    version: int
    created: datetime
    updated: datetime
    accepted_ask_for_bid: bool = False
    status: str = ""
    run_output: Mapping[str, Any] | None = None
    result_cid: str | None = None
    published: Mapping[str, Any] | None = None
    verification: Mapping[str, Any] | None = None  # {"Complete": bool, "Result": bool}
    # False when a failure says the job itself is bad (or the result exists but could not be
    # published): the requester does not place a replacement for it.
    retryable: bool = True

    def evolve(self, **changes: Any) -> ExecutionRecord:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class HistoryRecord:
    """One row of a job's history: a job-level or an execution-level state change."""

    job_id: str
    type: JobHistoryType
    new: str
    version: int
    time: datetime
    previous: str | None = None
    comment: str = ""
    execution_id: str | None = None
    node_id: str | None = None
    seq: int = 0  # assigned by the store; increases with every row written


@dataclass(frozen=True)
class NodeStanding:
    """What a node's executions came to, as the requester judged them: its reputation.

    ``completed``: results the verifier accepted; ``rejected``: results it rejected (the node
    was caught returning a wrong result); ``failed``: executions that failed in a way another
    node might not (retryable failures: a job that is bad everywhere says nothing about the
    node). Counted once per execution, in the transaction that records the state change.
    """

    completed: int = 0
    failed: int = 0
    rejected: int = 0
    last_rejected: datetime | None = None

    def __add__(self, other: NodeStanding) -> NodeStanding:
        last = [t for t in (self.last_rejected, other.last_rejected) if t is not None]
        return NodeStanding(
            completed=self.completed + other.completed,
            failed=self.failed + other.failed,
            rejected=self.rejected + other.rejected,
            last_rejected=max(last) if last else None,
        )


@dataclass(frozen=True)
class NodeRecord:
    """A compute node as last seen (persisted for ``shoal node list`` and restarts).

    ``standing`` is read-only here: :meth:`RequesterStore.upsert_node` ignores it; only
    :meth:`RequesterStore.apply` changes it (see :func:`standing_changes`).
    """

    id: str
    info: Mapping[str, Any]  # NodeInfo, JSON form
    state: str  # "live" | "lost" | "stopping"
    first_seen: datetime
    last_seen: datetime
    standing: NodeStanding = NodeStanding()


# --- the unit of change ------------------------------------------------------------------------

Step = tuple[ExecutionStateType, str]


@dataclass(frozen=True)
class JobUpdate:
    """Compare-and-set ``before`` -> ``after``; a state change writes a JobLevel history row.

    ``record`` writes the row even without a state change (an escalation, a retry round).
    """

    before: JobRecord
    after: JobRecord
    comment: str = ""
    record: bool = False


@dataclass(frozen=True)
class ExecutionUpdate:
    """Insert (``before is None``) or compare-and-set an execution.

    ``steps`` are the states passed through, oldest first, each with its history comment; the
    last is ``after.state``. ``after.version`` is ``before.version + len(steps)`` (at least +1),
    so each history row carries the version it produced.
    """

    before: ExecutionRecord | None
    after: ExecutionRecord
    steps: tuple[Step, ...] = ()


@dataclass
class Changes:
    """Everything one transition writes, applied in a single transaction (or not at all)."""

    jobs: list[JobUpdate] = field(default_factory=list)
    executions: list[ExecutionUpdate] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    # The bus event this change handles: applied at most once (redeliveries change nothing).
    processed_event: str | None = None

    def __bool__(self) -> bool:
        return bool(self.jobs or self.executions or self.events)


def history_for(changes: Changes) -> list[HistoryRecord]:
    """The history rows a change implies, in the order they happened."""
    rows: list[HistoryRecord] = []
    for ju in changes.jobs:
        if ju.before.state != ju.after.state or ju.record:
            rows.append(
                HistoryRecord(
                    job_id=ju.after.id,
                    type=JobHistoryType.JOB_LEVEL,
                    previous=ju.before.state.value,
                    new=ju.after.state.value,
                    version=ju.after.version,
                    time=ju.after.updated,
                    comment=ju.comment,
                )
            )
    execution_rows: list[HistoryRecord] = []
    for eu in changes.executions:
        previous = eu.before.state.value if eu.before else None
        base = eu.before.version if eu.before else 0
        for i, (state, comment) in enumerate(eu.steps, start=1):
            execution_rows.append(
                HistoryRecord(
                    job_id=eu.after.job_id,
                    type=JobHistoryType.EXECUTION_LEVEL,
                    previous=previous,
                    new=state.value,
                    version=base + i,
                    time=eu.after.updated,
                    comment=comment,
                    execution_id=eu.after.id,
                    node_id=eu.after.node_id,
                )
            )
            previous = state.value
    # Execution steps usually cause the job change (bids accepted -> InProgress), so they come
    # first; a job that ends is recorded after the execution that ended it.
    return execution_rows + rows


def standing_changes(changes: Changes) -> dict[str, NodeStanding]:
    """What a change adds to each node's standing (empty for most changes).

    Derived from the execution steps, so a redelivered event (not applied twice) or a lost
    compare-and-set (not applied at all) cannot count twice.
    """
    out: dict[str, NodeStanding] = {}
    for eu in changes.executions:
        entered = {state for state, _ in eu.steps}
        after = eu.after
        delta = NodeStanding(
            completed=1 if ExecutionStateType.RESULT_ACCEPTED in entered else 0,
            failed=1 if ExecutionStateType.FAILED in entered and after.retryable else 0,
            rejected=1 if ExecutionStateType.RESULT_REJECTED in entered else 0,
        )
        if delta.rejected:
            delta = dataclasses.replace(delta, last_rejected=after.updated)
        if delta.completed or delta.failed or delta.rejected:
            out[after.node_id] = out.get(after.node_id, NodeStanding()) + delta
    return out


def new_execution_update(record: ExecutionRecord, steps: Sequence[Step]) -> ExecutionUpdate:
    """An insert whose record has already walked ``steps`` (versions 1..n)."""
    if not steps or steps[-1][0] != record.state:
        raise ValueError("the last step must be the execution's state")
    return ExecutionUpdate(before=None, after=record.evolve(version=len(steps)), steps=tuple(steps))


def advance(
    before: ExecutionRecord, steps: Sequence[Step], *, now: datetime, **fields: Any
) -> ExecutionUpdate:
    """Move an execution through ``steps`` (or only change fields when ``steps`` is empty)."""
    state = steps[-1][0] if steps else before.state
    after = before.evolve(
        state=state,
        version=before.version + max(1, len(steps)),
        updated=now,
        **fields,
    )
    return ExecutionUpdate(before=before, after=after, steps=tuple(steps))


def job_transition(
    before: JobRecord,
    state: JobStateType,
    *,
    now: datetime,
    comment: str = "",
    record: bool = False,
    **fields: Any,
) -> JobUpdate:
    after = before.evolve(state=state, version=before.version + 1, updated=now, **fields)
    return JobUpdate(before=before, after=after, comment=comment, record=record)


SortKey = Literal["created_at", "id"]


@dataclass(frozen=True)
class JobQuery:
    """Filters of the legacy list endpoint (and the CLI's ``shoal list``)."""

    client_id: str | None = None  # None = every client's jobs
    include_tags: tuple[str, ...] = ()  # keep jobs with at least one of these annotations
    exclude_tags: tuple[str, ...] = ()  # drop jobs with any of these
    sort_by: SortKey = "created_at"
    reverse: bool = False
    limit: int = 0  # 0 = no limit
    states: tuple[JobStateType, ...] = ()
