"""Pure rules of a job's lifecycle: how events move executions, and when a job is over.

Events from different producers travel on different streams, so the requester may hear
``ResultAccepted`` (verifier) before the ``ResultProposed`` (compute) it follows. Transitions
therefore *advance to at least* a stage: a late event only fills in its data, an early one
records the stages it implies. Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from shoal_common.events import noop_publication
from shoal_common.spec import ExecutionStateType, JobStateType, RunOutput, to_wire
from shoal_requester.domain.model import (
    HOLDS_CAPACITY,
    PROPOSING,
    STAGE,
    ExecutionRecord,
    ExecutionUpdate,
    JobRecord,
    Step,
    advance,
)

ES = ExecutionStateType

# States that take part in the job's outcome (not to be replaced by a new execution).
_COUNTED = frozenset(
    {
        ES.NEW,
        ES.ASK_FOR_BID,
        ES.ASK_FOR_BID_ACCEPTED,
        ES.BID_ACCEPTED,
        ES.WAITING_VERIFICATION,
        ES.RESULT_ACCEPTED,
        ES.COMPLETED,
        ES.RESULT_REJECTED,
    }
)
_STEP_COMMENTS = {
    ES.WAITING_VERIFICATION: "result proposed",
    ES.RESULT_ACCEPTED: "result accepted",
    ES.COMPLETED: "result published",
}


def truncate_output(output: Mapping[str, Any] | None, max_bytes: int) -> dict[str, Any] | None:
    """Cut stdout/stderr at ``max_bytes`` bytes of UTF-8 and set the truncated flags.

    A text of exactly ``max_bytes`` is kept whole; one byte more is cut (behaviour 12). A cut
    never splits a character. Flags already set by the node are kept.
    """
    if output is None:
        return None
    out = RunOutput.model_validate(dict(output)).model_dump(by_alias=True)
    for stream, flag in (("stdout", "stdouttruncated"), ("stderr", "stderrtruncated")):
        raw = out[stream].encode()
        if len(raw) > max_bytes:
            out[stream] = raw[:max_bytes].decode(errors="ignore")
            out[flag] = True
    return out


def forward(
    ex: ExecutionRecord, target: ExecutionStateType, comment: str
) -> tuple[Step, ...] | None:
    """The steps from ``ex.state`` up to ``target`` on the happy path; None if already there."""
    if ex.state.terminal or STAGE.get(ex.state, -1) >= STAGE[target]:
        return None
    start = max(STAGE.get(ex.state, 0), STAGE[ES.BID_ACCEPTED])
    steps = [
        (state, _STEP_COMMENTS.get(state, ""))
        for state, stage in STAGE.items()
        if start < stage < STAGE[target]
    ]
    steps.append((target, comment))
    return tuple(steps)


def _blank(output: Mapping[str, Any] | None) -> bool:
    """No run output yet, or only the empty one a sealed proposal carries."""
    if not output:
        return True
    return not (output.get("stdout") or output.get("stderr") or output.get("exitCode"))


def on_result_proposed(
    ex: ExecutionRecord,
    *,
    result_cid: str,
    run_output: Mapping[str, Any] | None,
    now: datetime,
    max_output_bytes: int,
) -> ExecutionUpdate | None:
    # A sealed proposal (deterministic verification, ADR 0004) carries no CID or output: they
    # arrive with the verifier's decision.
    output = None if _blank(run_output) else truncate_output(run_output, max_output_bytes)
    fields: dict[str, Any] = {}
    if output is not None:
        fields["run_output"] = output
    if result_cid:
        fields["result_cid"] = result_cid
    steps = forward(ex, ES.WAITING_VERIFICATION, "result proposed")
    if steps is not None:
        return advance(ex, steps, now=now, **fields)
    return _fill_in(ex, output, result_cid, now)


def _fill_in(
    ex: ExecutionRecord, output: dict[str, Any] | None, result_cid: str, now: datetime
) -> ExecutionUpdate | None:
    """Data a late event carries that an execution already past its stage lacks."""
    if ex.state.terminal and ex.state not in (ES.COMPLETED, ES.RESULT_REJECTED):
        return None
    fields: dict[str, Any] = {}
    if output is not None and _blank(ex.run_output):
        fields["run_output"] = output
    if result_cid and not ex.result_cid:
        fields["result_cid"] = result_cid
    return advance(ex, (), now=now, **fields) if fields else None


def on_result_accepted(
    ex: ExecutionRecord,
    *,
    result_cid: str,
    now: datetime,
    run_output: Mapping[str, Any] | None = None,
    max_output_bytes: int = 0,
) -> ExecutionUpdate | None:
    output = None if _blank(run_output) else truncate_output(run_output, max_output_bytes)
    steps = forward(ex, ES.RESULT_ACCEPTED, "result accepted")
    if steps is None:
        return _fill_in(ex, output, result_cid, now)
    fields: dict[str, Any] = {
        "result_cid": result_cid or ex.result_cid,
        "verification": {"Complete": True, "Result": True},
    }
    if output is not None:
        fields["run_output"] = output
    return advance(ex, steps, now=now, **fields)


def on_result_rejected(
    ex: ExecutionRecord,
    *,
    reason: str,
    now: datetime,
    result_cid: str = "",
    run_output: Mapping[str, Any] | None = None,
    max_output_bytes: int = 0,
) -> ExecutionUpdate | None:
    if ex.state.terminal or ex.state is ES.RESULT_ACCEPTED:
        return None
    steps: list[Step] = []
    if ex.state is not ES.WAITING_VERIFICATION:
        steps.append((ES.WAITING_VERIFICATION, "result proposed"))
    steps.append((ES.RESULT_REJECTED, reason))
    fields: dict[str, Any] = {
        "status": reason,
        "verification": {"Complete": True, "Result": False},
    }
    if result_cid:
        fields["result_cid"] = result_cid
    if not _blank(run_output):
        fields["run_output"] = truncate_output(run_output, max_output_bytes)
    return advance(ex, steps, now=now, **fields)


def on_result_published(
    ex: ExecutionRecord, *, published: Mapping[str, Any], now: datetime, partial: bool = False
) -> ExecutionUpdate | None:
    if partial:
        return _partial_settled(ex, dict(published), now)
    steps = forward(ex, ES.COMPLETED, "result published")
    if steps is None:
        return None
    fields: dict[str, Any] = {"published": dict(published)}
    if ex.verification is None:
        fields["verification"] = {"Complete": True, "Result": True}
    if ex.result_cid is None and published.get("CID"):
        fields["result_cid"] = published["CID"]
    return advance(ex, steps, now=now, **fields)


def settled_here(
    update: ExecutionUpdate | None,
    *,
    job_id: str,
    verify: bool,
    publish: bool,
    now: datetime,
) -> ExecutionUpdate | None:
    """Carry ``update`` on through the stages the requester settles itself (ADR 0017).

    ``verify``: the job's verifier is noop, so a just-proposed result is accepted at once.
    ``publish``: the job's publisher is noop, so a just-accepted result is recorded as
    published under its CID. The history gets the same steps as when the verifier and the
    publisher answered, written in the one commit that records the proposal.
    """
    if update is None or not update.steps:
        return update  # only a fill-in of a late event's data: nothing was just reached
    steps = list(update.steps)
    ex = update.after
    if verify and ex.state is ES.WAITING_VERIFICATION and ex.result_cid:
        accepted = on_result_accepted(ex, result_cid=ex.result_cid, now=now)
        if accepted is not None:
            steps.extend(accepted.steps)
            ex = accepted.after
    if publish and ex.state is ES.RESULT_ACCEPTED and ex.result_cid:
        publication = to_wire(noop_publication(job_id, ex.node_id, ex.result_cid))
        published = on_result_published(ex, published=publication, now=now)
        if published is not None:
            steps.extend(published.steps)
            ex = published.after
    return ExecutionUpdate(update.before, ex, tuple(steps))


def on_partial_publish_failed(
    ex: ExecutionRecord, *, error: str, now: datetime
) -> ExecutionUpdate | None:
    """A failed run's partial result could not be published: the job need not wait for it."""
    update = _partial_settled(ex, {}, now)
    if update is None or update.after.state is not ES.FAILED:
        return update
    status = f"{ex.status}; partial results not published: {error}".lstrip("; ")
    return ExecutionUpdate(update.before, update.after.evolve(status=status), update.steps)


def on_publish_failed(ex: ExecutionRecord, *, error: str, now: datetime) -> ExecutionUpdate | None:
    """An accepted result could not be published. The execution fails (running it elsewhere
    would not help the publisher), and is settled: nothing more will be published for it, so
    the job must not wait for it as for a partial result (``awaiting_partial``)."""
    update = end_execution(ex, ES.FAILED, f"publishing failed: {error}", now=now, retryable=False)
    if update is None:
        return None
    return ExecutionUpdate(update.before, update.after.evolve(published={}), update.steps)


def _partial_settled(
    ex: ExecutionRecord, published: dict[str, Any], now: datetime
) -> ExecutionUpdate | None:
    """Record where a failed run's partial result went (``{}``: nowhere); the state stays.

    It may arrive before the ``ExecutionFailed`` it follows (another stream): it is then kept
    on the still-running execution, and the failure finds it settled.
    """
    if ex.published is not None or (ex.state.terminal and ex.state is not ES.FAILED):
        return None
    fields: dict[str, Any] = {"published": published}
    if published.get("CID") and not ex.result_cid:
        fields["result_cid"] = published["CID"]
    return advance(ex, (), now=now, **fields)


def awaiting_partial(ex: ExecutionRecord) -> bool:
    """A failed execution whose partial result is being published (behaviour 11)."""
    return ex.state is ES.FAILED and bool(ex.result_cid) and ex.published is None


def end_execution(
    ex: ExecutionRecord,
    state: ExecutionStateType,
    reason: str,
    *,
    now: datetime,
    retryable: bool = True,
    run_output: Mapping[str, Any] | None = None,
    max_output_bytes: int = 0,
    result_cid: str | None = None,
) -> ExecutionUpdate | None:
    """Move a not-yet-terminal execution to Failed, Cancelled, BidRejected, ...

    ``result_cid``: what a failed run wrote before it failed, which the publisher publishes.
    """
    if ex.state.terminal:
        return None
    fields: dict[str, Any] = {"status": reason, "retryable": retryable}
    if run_output is not None:
        fields["run_output"] = truncate_output(run_output, max_output_bytes)
    if result_cid:
        fields["result_cid"] = result_cid
    return advance(ex, [(state, reason)], now=now, **fields)


# --- the job as a whole -------------------------------------------------------------------------


@dataclass(frozen=True)
class Tally:
    """Where a job's executions stand."""

    completed: int
    active: int  # may still produce a result
    holding: int  # hold node capacity (asked, accepted, running)
    proposing: int  # the verifier should expect a proposal from these
    counted: int  # count towards the target (not to be replaced)
    failures: tuple[str, ...]  # what went wrong, for the job's status
    publishing: int = 0  # failed, with their partial results still being published

    def needed(self, job: JobRecord) -> int:
        return max(0, job.target - self.counted)


def planned(executions: Sequence[ExecutionRecord]) -> dict[str, str]:
    """Executions whose proposals the verifier should count: execution id -> node id."""
    return {
        e.id: e.node_id for e in executions if e.state in PROPOSING or e.state is ES.RESULT_REJECTED
    }


def tally(executions: Sequence[ExecutionRecord]) -> Tally:
    completed = active = holding = proposing = counted = publishing = 0
    failures: list[str] = []
    for e in executions:
        if awaiting_partial(e):
            publishing += 1
        state = e.state
        if state is ES.COMPLETED:
            completed += 1
        elif state.active:
            active += 1
        if state in HOLDS_CAPACITY:
            holding += 1
        if state in PROPOSING:
            proposing += 1
        if state in _COUNTED or (state is ES.FAILED and not e.retryable):
            counted += 1
        if state in (ES.FAILED, ES.ASK_FOR_BID_REJECTED, ES.RESULT_REJECTED) and e.status:
            failures.append(f"{e.node_id}: {e.status}")
    return Tally(completed, active, holding, proposing, counted, tuple(failures), publishing)


@dataclass(frozen=True)
class Outcome:
    state: JobStateType
    status: str


def outcome(job: JobRecord, t: Tally, *, can_place_more: bool) -> Outcome | None:
    """The job's final state if it is over, else None (something may still happen)."""
    concurrency = job.concurrency
    if t.completed >= concurrency:
        return Outcome(JobStateType.COMPLETED, "")
    if t.active > 0:
        return None
    if t.completed >= job.required:
        # Verified with the confidence the deal asks for: that is the job's answer.
        return Outcome(JobStateType.COMPLETED, "")
    if t.needed(job) > 0 and can_place_more:
        return None
    if t.completed > 0:
        return Outcome(
            JobStateType.COMPLETED_PARTIALLY,
            f"{t.completed} of {concurrency} executions completed"
            + (f"; {summarise(t.failures)}" if t.failures else ""),
        )
    if t.publishing > 0:
        # What the failed runs wrote is on its way to the content store: end the job once
        # it is downloadable (or known not to be), so `shoal get` right after works.
        return None
    return Outcome(JobStateType.ERROR, failure_status(t.failures))


def failure_status(failures: Sequence[str]) -> str:
    if not failures:
        return "no execution completed"
    return f"no execution completed: {summarise(failures)}"


def summarise(failures: Sequence[str], *, limit: int = 5) -> str:
    shown = "; ".join(failures[-limit:])
    more = len(failures) - limit
    return shown if more <= 0 else f"{shown} (and {more} earlier)"
