"""Applies incoming events to the verifier's store through the rules in ``domain``.

Each event is handled in one transaction: the processed-event mark, the records and the
decision events commit together, so a redelivered event changes nothing and a crash never
loses a decision. Work on one job is serialised in-process (a lock per job) and guarded
across replicas by compare-and-set on the job's version.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import structlog

from shoal_common.commitments import CommitmentError, VerifierKey, is_sealed, open_proposal
from shoal_common.events import (
    Event,
    ExecutionsPlanned,
    ResultAccepted,
    ResultProposed,
    ResultRejected,
    VerificationEscalated,
    VerificationFailed,
    requester_verifies,
)
from shoal_common.spec import PublisherSpec, RunOutput, VerifierType
from shoal_verifier import metrics
from shoal_verifier.domain.decide import Policy, Verdict, evaluate
from shoal_verifier.domain.models import JobRecord, JobStatus, ProposalRecord, ProposalStatus
from shoal_verifier.store.base import VerifierStore, VerifierTx

log = structlog.get_logger(__name__)


@dataclass
class _Outcome:
    verifier: VerifierType
    verdict: Verdict
    deadline: float | None = None  # the job's round deadline, while it waits for one


class _KeyedLocks:
    """One asyncio lock per key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


class Coordinator:
    """The verifier's event handling: proposals, plans and the deadline sweep."""

    def __init__(
        self,
        store: VerifierStore,
        key: VerifierKey,
        *,
        policy: Policy,
        decision_timeout: float,
        on_commit: Callable[[], None] = lambda: None,
        on_deadline: Callable[[float], None] = lambda _: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._key = key
        self._policy = policy
        self._timeout = decision_timeout
        self._on_commit = on_commit
        self._on_deadline = on_deadline  # told after commit of each open round's deadline
        self._clock = clock
        self._locks = _KeyedLocks()

    # --- events ----------------------------------------------------------------------------------

    async def on_proposed(self, event_id: str, evt: ResultProposed) -> None:
        """A compute node proposed a result (sealed for deterministic jobs)."""
        if (
            requester_verifies(evt.verifier)
            and not is_sealed(evt)
            and await self._store.find_job(evt.job_id) is None
        ):
            # Noop verification is settled by the requester, from the job's own spec, and the
            # result goes straight to its publisher (ADR 0017). A job the requester planned
            # (a stricter verifier) still takes the proposal below: a claim cannot downgrade it.
            return
        async with self._locks.hold(evt.job_id), self._store.transaction() as tx:
            if not await tx.mark_processed(event_id):
                return
            now = self._clock()
            job = await tx.find_job(evt.job_id)
            is_new = job is None
            if job is None:
                job = JobRecord(job_id=evt.job_id, created=now, updated=now)
                job.verifier = evt.verifier
                job.base = max(1, evt.deal.concurrency or 1)
                job.confidence = evt.deal.confidence or 0
            elif not job.verifier_from_plan and evt.verifier is VerifierType.DETERMINISTIC:
                # Without the requester's plan, a proposal may only make a job stricter:
                # a node must not talk its way into noop acceptance.
                job.verifier = VerifierType.DETERMINISTIC
                job.base = max(job.base, evt.deal.concurrency or 1)
                job.confidence = max(job.confidence, evt.deal.confidence or 0)
            proposal = self._reveal(evt, event_id, now)
            if is_new:
                # A job and its first proposal are written in one transaction, so a job with no
                # record has no proposals yet: nothing to read, and the proposal is written
                # once, with its verdict.
                job.round_started = now
                outcome = await self._decide(tx, job, is_new=True, final=False, first=proposal)
                self._after_commit(outcome)
                return
            existing = await tx.find_proposal(evt.execution_id)
            if existing is None:
                await tx.insert_proposal(proposal)
                if job.round_started is None and job.status is JobStatus.OPEN:
                    job.round_started = now
            elif (
                existing.pending
                and proposal.invalid_reason is None
                and (
                    existing.result_cid != proposal.result_cid
                    or existing.node_id != proposal.node_id
                )
            ):
                # The same execution proposed two different valid results: trust neither.
                existing.invalid_reason = (
                    f"execution {evt.execution_id} equivocated: it proposed two different results"
                )
                await tx.update_proposal(existing)
            # Else a re-sent identical proposal, an unopenable duplicate (first one wins), or
            # one for an execution already decided: nothing changes.
            outcome = await self._decide(tx, job, is_new=is_new, final=False)
        self._after_commit(outcome)

    async def on_planned(self, event_id: str, evt: ExecutionsPlanned, *, sent_at: float) -> None:
        """The requester placed (more) executions; ``sent_at`` orders plans (latest wins)."""
        async with self._locks.hold(evt.job_id), self._store.transaction() as tx:
            if not await tx.mark_processed(event_id):
                return
            now = self._clock()
            job = await tx.find_job(evt.job_id)
            is_new = job is None
            if job is None:
                job = JobRecord(job_id=evt.job_id, created=now, updated=now)
            if job.plan_time is None or sent_at >= job.plan_time:
                # The first round's size sets the default confidence; later plans (after an
                # escalation) grow ``expected`` but must not move that bar.
                first_plan = job.plan_time is None
                job.plan_time = sent_at
                job.plan_expected = max(1, evt.expected)
                job.verifier = evt.verifier
                job.verifier_from_plan = True
                fallback = evt.expected if first_plan else job.base
                job.base = max(1, evt.deal.concurrency or fallback)
                job.confidence = evt.deal.confidence or 0
            # Placements only accumulate: a replaced execution's entry is harmless.
            job.planned = {**job.planned, **evt.executions}
            outcome = await self._decide(tx, job, is_new=is_new, final=False)
        self._after_commit(outcome)

    async def sweep(self) -> int:
        """Decide every deterministic job whose round deadline has passed; returns how many."""
        cutoff = self._clock() - self._timeout
        decided = 0
        for job_id in await self._store.list_due_jobs(started_before=cutoff):
            async with self._locks.hold(job_id), self._store.transaction() as tx:
                job = await tx.find_job(job_id)
                if (
                    job is None
                    or job.status is not JobStatus.OPEN
                    or job.round_started is None
                    or job.round_started >= self._clock() - self._timeout
                ):
                    continue
                outcome = await self._decide(tx, job, is_new=False, final=True)
            self._after_commit(outcome)
            decided += 1
        return decided

    async def next_deadline(self) -> float | None:
        """When the sweep has work next (clock time; maybe past); None when no round waits."""
        first = await self._store.first_round_start()
        return None if first is None else first + self._timeout

    # --- internals -------------------------------------------------------------------------------

    def _reveal(self, evt: ResultProposed, event_id: str, now: float) -> ProposalRecord:
        sealed = is_sealed(evt)
        invalid: str | None = None
        revealed = evt
        if sealed:
            try:
                revealed = open_proposal(evt, self._key)
            except CommitmentError as exc:
                invalid = f"commitment refused: {exc}"
        return ProposalRecord(
            execution_id=evt.execution_id,
            job_id=evt.job_id,
            node_id=evt.node_id,
            result_cid=revealed.result_cid if invalid is None else "",
            received=now,
            invalid_reason=invalid,
            sealed=sealed,
            publisher=revealed.publisher.model_dump(mode="json", by_alias=True, exclude_none=True),
            result_url=revealed.result_url,
            run_output=revealed.run_output.model_dump(mode="json", by_alias=True),
            event_id=event_id,
        )

    async def _decide(
        self,
        tx: VerifierTx,
        job: JobRecord,
        *,
        is_new: bool,
        final: bool,
        first: ProposalRecord | None = None,
    ) -> _Outcome:
        """``first``: the only proposal of a new job, not stored yet (inserted here, decided)."""
        proposals = [first] if first is not None else await tx.list_proposals(job.job_id)
        verdict = evaluate(job, proposals, final=final, policy=self._policy)
        now = self._clock()
        by_id = {p.execution_id: p for p in proposals}
        events: list[Event] = []
        # Rejections go out first: the requester ends a job as soon as enough results are
        # accepted (ADR 0017: at once, for the noop publisher), and a wrong result it hears of
        # only after that could no longer be recorded against its node.
        for execution_id, reason in verdict.reject.items():
            p = by_id[execution_id]
            p.status = ProposalStatus.REJECTED
            p.reason = reason
            if p is not first:
                await tx.update_proposal(p)
            events.append(
                ResultRejected(
                    job_id=job.job_id,
                    execution_id=p.execution_id,
                    node_id=p.node_id,
                    result_cid=p.result_cid,
                    reason=reason,
                    run_output=_run_output(p),
                )
            )
        for execution_id in verdict.accept:
            p = by_id[execution_id]
            p.status = ProposalStatus.ACCEPTED
            p.reason = (
                f"verified: agrees with {len(verdict.accept)} proposal(s)"
                if job.verifier is VerifierType.DETERMINISTIC
                else "accepted by the noop verifier"
            )
            if p is not first:
                await tx.update_proposal(p)
            events.append(
                ResultAccepted(
                    job_id=job.job_id,
                    execution_id=p.execution_id,
                    node_id=p.node_id,
                    result_cid=p.result_cid,
                    publisher=PublisherSpec.model_validate(p.publisher),
                    result_url=p.result_url,
                    run_output=_run_output(p),
                )
            )
        if verdict.status is not None:
            job.status = verdict.status
            job.accepted_cid = verdict.accepted_cid
            job.reason = verdict.reason
            if verdict.status is JobStatus.FAILED:
                events.append(VerificationFailed(job_id=job.job_id, reason=verdict.reason))
        if verdict.escalate:
            job.floor = job.expected + verdict.escalate
            job.escalations += 1
            job.extra_executions += verdict.escalate
            job.reason = verdict.reason
            # The fresh executions get a whole new round before the deadline bites.
            job.round_started = now
            events.append(
                VerificationEscalated(
                    job_id=job.job_id, additional=verdict.escalate, reason=verdict.reason
                )
            )
        job.updated = now
        if first is not None:
            await tx.insert_proposal(first)
        if is_new:
            await tx.insert_job(job)
        else:
            await tx.update_job(job, expected_version=job.version)
        await tx.add_events(*events)
        deadline = None
        if (
            job.status is JobStatus.OPEN
            and job.verifier is VerifierType.DETERMINISTIC
            and job.round_started is not None
        ):
            deadline = job.round_started + self._timeout
        return _Outcome(job.verifier, verdict, deadline)

    def _after_commit(self, outcome: _Outcome) -> None:
        if outcome.deadline is not None:
            self._on_deadline(outcome.deadline)
        verdict = outcome.verdict
        if verdict.empty:
            return
        self._on_commit()
        label = outcome.verifier.value.lower()
        if verdict.accept:
            metrics.RESULTS_ACCEPTED.labels(label).inc(len(verdict.accept))
        if verdict.reject:
            metrics.RESULTS_REJECTED.labels(label).inc(len(verdict.reject))
        if verdict.escalate:
            metrics.ESCALATIONS.inc()
            log.info("verification_escalated", additional=verdict.escalate, reason=verdict.reason)
        if verdict.status is JobStatus.FAILED:
            metrics.FAILURES.inc()
            log.info("verification_failed", reason=verdict.reason)


def _run_output(p: ProposalRecord) -> RunOutput | None:
    return RunOutput.model_validate(p.run_output) if p.run_output is not None else None
