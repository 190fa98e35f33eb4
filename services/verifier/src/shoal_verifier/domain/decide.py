"""The verification rules, as pure functions over a job's records.

Noop: every valid proposal is accepted on arrival. Deterministic: once ``expected``
proposals are in (or the round's deadline passed), group the valid ones by result CID; the
largest group wins if it reaches the threshold and no other group is as large; the rest are
rejected. A draw or a missed threshold escalates (more executions on fresh nodes) while the
bounds allow, and otherwise fails the job with a reason that says why.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from shoal_common.spec import VerifierType
from shoal_verifier.domain.models import JobRecord, JobStatus, ProposalRecord


@dataclass(frozen=True)
class Policy:
    """How far escalation may go for one job, and whether unsealed proposals may vote."""

    max_escalations: int = 2
    max_extra_executions: int = 4
    require_sealed: bool = True


@dataclass
class Verdict:
    """What to do now: per-proposal decisions and at most one job-level outcome."""

    accept: list[str] = field(default_factory=list)  # execution ids
    reject: dict[str, str] = field(default_factory=dict)  # execution id -> reason
    status: JobStatus | None = None  # a new job status, if the job closes
    accepted_cid: str | None = None
    escalate: int = 0  # additional executions to ask the requester for
    reason: str = ""  # why the job escalated or failed

    @property
    def empty(self) -> bool:
        return not (self.accept or self.reject or self.status or self.escalate)


def counts_towards_round(job: JobRecord, proposal: ProposalRecord) -> bool:
    """Whether a proposal fills one of the ``expected`` slots (invalid ones do: they came)."""
    return not job.planned or proposal.execution_id in job.planned


def problem(job: JobRecord, proposal: ProposalRecord, policy: Policy) -> str | None:
    """Why a proposal can never count for this job, or None.

    Checked again at every evaluation, because the plan (verifier type, placements) may
    arrive after the proposal: the requester's and the compute node's streams are not ordered.
    """
    if proposal.invalid_reason is not None:
        return proposal.invalid_reason
    placed_on = job.planned.get(proposal.execution_id)
    if placed_on is not None and placed_on != proposal.node_id:
        return (
            f"execution {proposal.execution_id} was placed on node {placed_on}, but the "
            f"proposal came from {proposal.node_id}"
        )
    if job.verifier is VerifierType.DETERMINISTIC and not proposal.sealed and policy.require_sealed:
        return (
            "unsealed proposal: a deterministic job's result must be sealed to the verifier "
            "(shoal_common.commitments.seal_proposal), or it could have been copied from a peer"
        )
    if not proposal.result_cid:
        return "the proposal carries no result CID"
    return None


def eligible(job: JobRecord, proposal: ProposalRecord, policy: Policy) -> bool:
    """Whether a proposal may vote now."""
    return (
        proposal.pending
        and problem(job, proposal, policy) is None
        and counts_towards_round(job, proposal)
    )


def evaluate(
    job: JobRecord, proposals: list[ProposalRecord], *, final: bool, policy: Policy
) -> Verdict:
    """Decide what can be decided for ``job`` now; ``final`` means the round's deadline passed."""
    verdict = Verdict()
    for p in proposals:
        # Invalid proposals are refused at once, whatever the verifier.
        why = problem(job, p, policy) if p.pending else None
        if why is not None:
            verdict.reject[p.execution_id] = why
    if job.verifier is VerifierType.DETERMINISTIC:
        _deterministic(job, proposals, final=final, policy=policy, verdict=verdict)
    else:
        # Noop (and External, which Shoal treats as noop): each valid proposal stands alone.
        verdict.accept.extend(
            p.execution_id for p in proposals if p.pending and p.execution_id not in verdict.reject
        )
    return verdict


def _deterministic(
    job: JobRecord,
    proposals: list[ProposalRecord],
    *,
    final: bool,
    policy: Policy,
    verdict: Verdict,
) -> None:
    if job.status is not JobStatus.OPEN:
        # The decision is public now: a later proposal could have copied it.
        ended = (
            f"the accepted result {job.accepted_cid}"
            if job.status is JobStatus.ACCEPTED
            else "failed verification"
        )
        for p in proposals:
            if p.pending and p.execution_id not in verdict.reject:
                verdict.reject[p.execution_id] = f"arrived after verification ended ({ended})"
        return
    arrived = sum(1 for p in proposals if counts_towards_round(job, p))
    if not final and arrived < job.expected:
        return
    voters = [p for p in proposals if eligible(job, p, policy)]
    groups = Counter(p.result_cid for p in voters)
    need = job.threshold
    ranked = groups.most_common()
    best_cid, best = ranked[0] if ranked else ("", 0)
    tied = sum(1 for _, n in ranked if n == best) if ranked else 0
    if best >= need and tied == 1:
        verdict.status = JobStatus.ACCEPTED
        verdict.accepted_cid = best_cid
        for p in voters:
            if p.result_cid == best_cid:
                verdict.accept.append(p.execution_id)
            else:
                verdict.reject[p.execution_id] = (
                    f"result {p.result_cid} disagrees with the accepted result {best_cid} "
                    f"({best} of {len(voters)} valid proposals agreed on it)"
                )
        _reject_leftovers(job, proposals, verdict, "the job's verification ended without it")
        return

    if not voters:
        why = "no valid proposal arrived"
    elif tied > 1:
        why = f"draw: {tied} different results with {best} proposal(s) each"
    else:
        why = (
            f"confidence not reached: {best} of {len(voters)} proposals agree on {best_cid}, "
            f"{need} needed"
        )
    additional = max(1, need - best)
    if (
        job.escalations < policy.max_escalations
        and job.extra_executions + additional <= policy.max_extra_executions
    ):
        verdict.escalate = additional
        verdict.reason = f"{why}; asking for {additional} more execution(s)"
        return
    verdict.status = JobStatus.FAILED
    verdict.reason = (
        f"verification failed: {why}, after {job.escalations} escalation(s) "
        f"(limit {policy.max_escalations} escalations, {policy.max_extra_executions} extra "
        "executions)"
    )
    for p in voters:
        verdict.reject[p.execution_id] = verdict.reason
    _reject_leftovers(job, proposals, verdict, verdict.reason)


def _reject_leftovers(
    job: JobRecord, proposals: list[ProposalRecord], verdict: Verdict, why: str
) -> None:
    """Pending proposals that could not vote (not a planned execution) close with the job."""
    decided = set(verdict.accept) | set(verdict.reject)
    for p in proposals:
        if p.pending and p.execution_id not in decided:
            verdict.reject[p.execution_id] = (
                f"execution {p.execution_id} was not planned for this job; {why}"
            )
