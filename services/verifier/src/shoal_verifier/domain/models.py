"""The verifier's records: one per job being verified, one per proposed execution result."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from shoal_common.spec import VerifierType


class JobStatus(StrEnum):
    OPEN = "open"  # collecting proposals (noop jobs stay open: each proposal stands alone)
    ACCEPTED = "accepted"  # a result reached confidence; later proposals are refused
    FAILED = "failed"  # no result reached confidence and escalation is exhausted


class ProposalStatus(StrEnum):
    PENDING = "pending"
    ACCEPTED = "accepted"
    REJECTED = "rejected"


@dataclass
class JobRecord:
    """What the verifier knows about one job.

    ``plan_expected`` is the requester's latest ``ExecutionsPlanned.expected`` (absolute,
    latest by event time wins); ``floor`` is what our own escalations asked for, so a plan
    that was sent before the requester saw an escalation cannot shrink the wait again.
    ``base`` is the first round's size (the deal's concurrency): the default confidence is a
    strict majority of it.
    """

    job_id: str
    verifier: VerifierType = VerifierType.NOOP
    verifier_from_plan: bool = False
    base: int = 1
    plan_expected: int | None = None
    plan_time: float | None = None
    floor: int = 0
    confidence: int = 0
    planned: dict[str, str] = field(default_factory=dict)  # execution id -> node id
    escalations: int = 0
    extra_executions: int = 0
    status: JobStatus = JobStatus.OPEN
    accepted_cid: str | None = None
    reason: str = ""
    round_started: float | None = None
    version: int = 0
    created: float = 0.0
    updated: float = 0.0

    @property
    def expected(self) -> int:
        """Proposals to wait for before deciding (without a deadline)."""
        return max(self.plan_expected or self.base, self.floor, 1)

    @property
    def threshold(self) -> int:
        """Matching proposals a result needs: the deal's confidence, else a strict majority.

        The majority is of the first round's size, not of the grown count after escalation:
        otherwise each added execution would raise the bar as much as it can help clear it
        (a 1-vs-1 draw plus one fresh node would need 2 of 3, then 3 of 4, ...).
        """
        if self.confidence > 0:
            return self.confidence
        return self.base // 2 + 1


@dataclass
class ProposalRecord:
    """One execution's proposal, as revealed to the verifier.

    ``invalid_reason`` is set for a proposal that can never count (unopenable or copied
    commitment, equivocation, wrong node); such a proposal is rejected at once.
    """

    execution_id: str
    job_id: str
    node_id: str
    result_cid: str
    received: float
    status: ProposalStatus = ProposalStatus.PENDING
    reason: str = ""
    invalid_reason: str | None = None
    sealed: bool = False
    publisher: dict[str, Any] = field(default_factory=dict)
    result_url: str | None = None
    run_output: dict[str, Any] | None = None
    event_id: str = ""

    @property
    def pending(self) -> bool:
        return self.status is ProposalStatus.PENDING
