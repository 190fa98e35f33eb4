"""The node's own view of an execution it accepted.

The requester owns the global execution state machine (AskForBid ... Completed); a node only
tracks what it must remember across a crash: what it accepted, whether it was running, and how
it ended. Bids that were not (yet) accepted live in memory only: losing one on a crash is
recovered by the requester's reconciliation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from shoal_common.protocol import Capacity
from shoal_common.spec import Job, RunOutput
from shoal_compute.executors.base import RunFiles


class LocalState(StrEnum):
    """Persisted states. "Running" is not one: it changes nothing a crash must remember (an
    accepted execution is reported failed on restart whether it had started or not), so it
    is kept in memory and spares the hot path a commit."""

    ACCEPTED = "accepted"  # bid accepted: queued or running
    COMPLETED = "completed"  # result proposed
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (LocalState.COMPLETED, LocalState.FAILED, LocalState.CANCELLED)


ACTIVE_STATES = frozenset({LocalState.ACCEPTED})


@dataclass(frozen=True)
class ExecutionRecord:
    """One accepted execution as the node stores it."""

    id: str
    job_id: str
    job: dict[str, Any]  # wire form, parsed on demand
    state: LocalState = LocalState.ACCEPTED
    version: int = 1
    requester_id: str = ""
    resources: Capacity = field(default_factory=Capacity)
    result_cid: str | None = None
    error: str = ""
    run_output: RunOutput | None = None
    # A run's results kept in the row instead of files until something reads them (ADR 0030).
    result_files: RunFiles | None = None
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)

    def job_model(self) -> Job:
        return Job.model_validate(self.job)

    def moved_to(self, state: LocalState, **changes: Any) -> ExecutionRecord:
        return replace(self, state=state, version=self.version + 1, updated=time.time(), **changes)
