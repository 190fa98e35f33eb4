"""The requester's orchestration: placing executions on nodes and reacting to what happens.

One :class:`Orchestrator` per requester. Every change to a job runs under that job's lock and
is one store transaction (compare-and-set + history + outbox); messages to nodes go out only
after the commit, so a node never runs an execution the requester has not recorded.

Placement (``place``) filters and ranks the live nodes (``matching``), asks the top
``max(needed, min_bids) x over_ask`` free ones for bids in parallel, accepts the first
``needed`` yes answers and rejects the rest. Too few answers: another round on the next nodes
(each counts against ``max_retries``), or ``Queued`` while nodes that fit are busy; the job is
re-tried when capacity frees (a heartbeat shows more, or one of our executions ends).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog

from shoal_common.db import DATABASE_UNAVAILABLE
from shoal_common.errors import AlreadyTerminal, Conflict, NotFound
from shoal_common.events import (
    BidAnswered,
    Event,
    ExecutionCancelled,
    ExecutionFailed,
    ExecutionsPlanned,
    PublishFailed,
    ResultAccepted,
    ResultProposed,
    ResultPublished,
    ResultRejected,
    VerificationEscalated,
    VerificationFailed,
    new_id,
    requester_publishes,
    requester_verifies,
)
from shoal_common.protocol import AT_CAPACITY, AskBid, BidDecision, CancelExecution
from shoal_common.spec import (
    Deal,
    ExecutionStateType,
    JobStateType,
    RunOutput,
    VerifierType,
    to_wire,
    utcnow,
)
from shoal_requester import metrics
from shoal_requester.domain import lifecycle
from shoal_requester.domain.inventory import Inventory, TrackedNode
from shoal_requester.domain.lanes import PlacementLanes
from shoal_requester.domain.lifecycle import Outcome, Tally, tally
from shoal_requester.domain.locks import KeyedLocks
from shoal_requester.domain.matching import (
    Reputation,
    Requirements,
    full_reputation,
    preference_score,
    rendezvous,
    rendezvous_start,
    reputation_weight,
    requirements,
    room_weight,
)
from shoal_requester.domain.model import (
    HOLDS_CAPACITY,
    Changes,
    ExecutionRecord,
    ExecutionUpdate,
    HistoryRecord,
    JobRecord,
    JobUpdate,
    NodeStanding,
    advance,
    job_transition,
    new_execution_update,
    standing_changes,
)
from shoal_requester.domain.ports import ComputeClient, NodeCallFailed
from shoal_requester.domain.waiting import explain_declined, explain_wait
from shoal_requester.settings import RequesterSettings
from shoal_requester.store.base import RequesterStore

log = structlog.get_logger(__name__)

ES = ExecutionStateType
JS = JobStateType

WAITING_FOR_APPROVAL = "waiting for approval"
RECONCILE_PARALLELISM = 16
_END_COMMENTS = {
    JS.COMPLETED: "job completed",
    JS.COMPLETED_PARTIALLY: "job completed partially",
    JS.ERROR: "job failed",
    JS.CANCELLED: "job cancelled",
}
# Execution states in which a node is running (or about to run) it: cancel goes to the node.
_ON_NODE = frozenset({ES.BID_ACCEPTED, ES.WAITING_VERIFICATION, ES.RESULT_ACCEPTED})


class JobNotStored(Conflict):
    """A just-submitted job turned out never to have been stored (a replayed submit answered
    with the earlier job, or the write failed): its eager placement records nothing."""


class NewJobWrite:
    """The write of a just-submitted job, as its eager placement sees it (ADR 0026).

    The placement asks nodes for bids while the job's row is being written, and records its
    decision once writes started after the row's are sure to commit after it
    (:meth:`row_ordered`, from the store) or the row is stored (:meth:`finished`).
    """

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self._ordered: asyncio.Future[bool] = loop.create_future()
        self._stored: asyncio.Future[bool] = loop.create_future()

    def row_ordered(self) -> None:
        if not self._ordered.done():
            self._ordered.set_result(True)

    def finished(self, stored: bool) -> None:
        """The write returned (``stored``: it inserted the job) or failed (False)."""
        if not self._ordered.done():
            self._ordered.set_result(stored)
        if not self._stored.done():
            self._stored.set_result(stored)

    async def may_write(self) -> bool:
        """Wait until a write may follow the row's; False: the row will never exist."""
        return await asyncio.shield(self._ordered)

    async def stored(self) -> bool:
        return await asyncio.shield(self._stored)


@dataclass
class _Answer:
    node: TrackedNode
    execution_id: str
    kind: str  # "yes" | "no" | "error" | "waiting"
    reason: str = ""
    take: bool = False  # asked with AskBid.take: a yes is already accepted on the node
    taken: bool = False  # ... and the node said so (a node of an earlier build does not)

    @property
    def may_run(self) -> bool:
        """The node took it, or may have (a taking ask whose answer was lost): not recorded,
        it must be cancelled there, not merely rejected."""
        return self.taken or (self.take and self.kind == "error")


@dataclass
class _AfterCommit:
    """Node messages and bookkeeping that must wait until the transaction committed."""

    accept: list[ExecutionRecord] = field(default_factory=list)
    reject: list[tuple[ExecutionRecord, str]] = field(default_factory=list)
    cancel: list[tuple[ExecutionRecord, str]] = field(default_factory=list)
    release: list[str] = field(default_factory=list)
    place_again: bool = False
    finished: JobRecord | None = None
    waiting: JobRecord | None = None  # wants capacity: keep it in the pending queue


# The status of an ask that never reached the node (no responders, timeout): not a refusal.
NOT_ASKED = "no bid: "
# After asks that could not be delivered, try the queue again this soon (NATS coming back, a node
# re-subscribing) instead of waiting for a node's capacity to change.
_REDELIVER_ASKS_AFTER_S = 1.0
# Requirements remembered by job id (a job's spec never changes): bounds the memory of a
# requester with a long queue; past it the memory starts again, costing a recomputation.
_REQUIREMENTS_KEPT = 16384
# A placement that found the database unreachable is tried again after 0.5 s, 1 s, ... 5 s.
PLACEMENT_RETRY_FIRST = 0.5
PLACEMENT_RETRY_MAX = 5.0
# The longest a placement waits for a congested event loop before it starts anyway (seconds).
PLACEMENT_MAX_YIELD = 1.0
# A placement whose write failed with one of these recorded nothing.
_NOT_RECORDED: tuple[type[Exception], ...] = (Conflict, *DATABASE_UNAVAILABLE)


def _unreached(e: ExecutionRecord) -> bool:
    return e.state is ES.ASK_FOR_BID_REJECTED and e.status.startswith(NOT_ASKED)


def _may_ask_again(e: ExecutionRecord) -> bool:
    """The node only could not be reached, or was full: asking it again is fair."""
    return _unreached(e) or (e.state is ES.ASK_FOR_BID_REJECTED and e.status == AT_CAPACITY)


def _only_full(answer: _Answer) -> bool:
    return answer.kind == "no" and answer.reason == AT_CAPACITY


def _is_retry_round(executions: Sequence[ExecutionRecord]) -> bool:
    """A round replaces something that failed or was refused (the first round is free, and an
    ask that never reached its node does not count)."""
    return any(
        e.state in (ES.FAILED, ES.ASK_FOR_BID_REJECTED, ES.BID_REJECTED, ES.CANCELLED)
        and not _may_ask_again(e)
        for e in executions
    )


class Orchestrator:
    """Placement, lifecycle events, cancellation, timeouts and reconciliation of jobs."""

    def __init__(
        self,
        *,
        store: RequesterStore,
        inventory: Inventory,
        compute: ComputeClient,
        settings: RequesterSettings,
        reputation: Reputation | None = None,
    ) -> None:
        self._store = store
        self._inventory = inventory
        self._compute = compute
        self._settings = settings
        # By default, each node's record as the inventory keeps it (see matching).
        if reputation is None:
            reputation = (
                self._recorded_reputation if settings.rank_by_reputation else full_reputation
            )
        self._reputation = reputation
        self._requester_id = settings.node_id or "requester"
        self._locks = KeyedLocks()
        # Jobs waiting for capacity (Queued, or InProgress but short of executions), FIFO.
        self._pending: dict[str, JobRecord] = {}
        self._requirements_of: dict[str, Requirements] = {}
        # Non-terminal jobs with their executions as last written by this process: event
        # handling reads them from here instead of the database (writes stay compare-and-set,
        # and a conflict drops the entry, so another writer cannot leave it stale for long).
        self._working: dict[str, tuple[JobRecord, list[ExecutionRecord]]] = {}
        # Jobs whose placement started while their row was being written (ADR 0026).
        self._new_jobs: dict[str, NewJobWrite] = {}
        self._placing: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._drain_wanted = asyncio.Event()
        self._drainer: asyncio.Task[None] | None = None
        self._closing = False
        # Placements of new jobs running at once; the rest wait their turn, oldest first. A
        # burst of submits thus becomes a queue of durable New jobs instead of a flood of
        # placement steps in the event loop, where they delayed every API request behind them
        # (issue 6 target 6: submits stay fast while the backlog drains).
        # Jobs leaving Queued go first (``PlacementLanes``).
        self._placement_lanes = PlacementLanes(settings.placement_parallelism)

    def reputation(self, node_id: str) -> float:
        """The reputation factor ranking gives this node now, in (0, 1]."""
        return self._reputation(node_id)

    def _recorded_reputation(self, node_id: str) -> float:
        standing = self._inventory.standing(node_id)
        if not (standing.rejected or standing.failed):
            return 1.0  # the common case, without a clock read per candidate node
        return reputation_weight(standing, utcnow())

    # --- lifecycle of the orchestrator itself ---------------------------------------------------

    def start(self) -> None:
        self._drainer = asyncio.create_task(self._drain_loop(), name="requester-queue-drain")

    async def stop(self) -> None:
        self._closing = True
        tasks = list(self._tasks)
        if self._drainer is not None:
            tasks.append(self._drainer)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        if self._closing:
            coro.close()  # never awaited: close it, or Python warns at garbage collection
            return

        # The task runs ``coro`` itself (no wrapper coroutine: one per placement and per
        # decision sent); a task cancelled before its first step closes ``coro`` by throwing
        # CancelledError into it.
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("requester_task_failed", task=task.get_name(), exc_info=exc)

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    async def idle(self) -> None:
        """Wait until no background work (placements, node messages) is running (tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # --- the working set ----------------------------------------------------------------------

    async def _load(self, job_id: str) -> tuple[JobRecord | None, list[ExecutionRecord]]:
        """A job and its executions: from the working set, else from the store."""
        hit = self._working.get(job_id)
        if hit is not None:
            return hit[0], list(hit[1])
        job = await self._store.find_job(job_id)
        if job is None:
            return None, []
        executions = (await self._store.list_executions([job_id]))[job_id]
        if not job.state.terminal:
            self._working[job_id] = (job, executions)
        return job, list(executions)

    def snapshot(self, job_id: str) -> tuple[JobRecord, list[ExecutionRecord]] | None:
        """A job in flight and its executions as last committed, if this process has it."""
        hit = self._working.get(job_id)
        return (hit[0], list(hit[1])) if hit is not None else None

    async def _apply(
        self, changes: Changes, job: JobRecord, executions: Sequence[ExecutionRecord]
    ) -> list[HistoryRecord] | None:
        """Write ``changes`` (made from ``job`` and ``executions``) and remember the result."""
        new_job = self._new_jobs.get(job.id)
        if new_job is not None and not await new_job.may_write():
            raise JobNotStored(f"job {job.id} was not stored")
        try:
            rows = await self._store.apply(changes)
        except Conflict:
            self._working.pop(job.id, None)
            if new_job is not None and not await new_job.stored():
                raise JobNotStored(f"job {job.id} was not stored") from None
            raise
        if rows is None:  # the event was applied before: what we read may be stale
            self._working.pop(job.id, None)
            return None
        _observe_stages(changes, self._settings.queue_timeout)
        standing = standing_changes(changes)
        if standing:
            self._inventory.add_standing(standing)
            _observe_standing(standing)
        after_job = job
        for ju in changes.jobs:
            if ju.after.id == job.id:
                after_job = ju.after
        updated = {eu.after.id: eu.after for eu in changes.executions}
        after = [updated.pop(e.id, e) for e in executions]
        after.extend(e for e in updated.values() if e.job_id == job.id)
        if after_job.state.terminal:
            self._working.pop(job.id, None)
            self._requirements_of.pop(job.id, None)
        else:
            self._working[job.id] = (after_job, after)
        return rows

    # --- placement -----------------------------------------------------------------------------

    def schedule(self, job: JobRecord, write: NewJobWrite) -> None:
        """Place a just-submitted job in the background (no executions exist yet).

        The job is still being written (``write``): its nodes are asked meanwhile, and what
        placement decides is recorded only after the job's row (ADR 0026).
        """
        self._spawn(self._place_while_stored(job, write), f"place-{job.id}")

    async def _place_while_stored(self, job: JobRecord, write: NewJobWrite) -> None:
        self._new_jobs[job.id] = write
        try:
            await self._place_when_reachable(job.id, fresh=job)
        except JobNotStored:
            pass  # nothing recorded, the asks released: there is no job to place
        finally:
            self._new_jobs.pop(job.id, None)

    def request_placement(self, job_id: str) -> None:
        self._spawn(self._place_when_reachable(job_id), f"place-{job_id}")

    async def _place_when_reachable(
        self, job_id: str, *, fresh: JobRecord | None = None, queued: bool = False
    ) -> None:
        """Place a job; while the database cannot be reached, try again with backoff.

        Without this, a placement that met a database outage waited for the stuck-job sweep
        (``stuck_after``, 30 s) after the database came back (B12).
        """
        delay = PLACEMENT_RETRY_FIRST
        while True:
            try:
                async with self._lane(first=queued):
                    if fresh is not None:
                        await self.place(job_id, fresh=fresh, executions=[])
                    else:
                        await self.place(job_id)
                return
            except DATABASE_UNAVAILABLE as exc:
                log.warning(
                    "placement_waits_for_database", job_id=job_id, retry_in=delay, error=repr(exc)
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, PLACEMENT_RETRY_MAX)
            fresh = None  # read the job again: the database is the truth after an outage

    @contextlib.asynccontextmanager
    async def _lane(self, *, first: bool = False) -> AsyncIterator[None]:
        """A placement lane, taken once the event loop is not congested (ADR 0018)."""
        waiting = True
        metrics.PLACEMENTS_WAITING.inc()
        try:
            async with self._placement_lanes.lane(first=first):
                await self._yield_to_busy_loop()
                waiting = False
                metrics.PLACEMENTS_WAITING.dec()
                yield
        finally:
            if waiting:
                metrics.PLACEMENTS_WAITING.dec()

    async def _yield_to_busy_loop(self) -> None:
        """Wait while the event loop is congested, so API requests go before new placements.

        The probe is one trip through the loop's ready queue (``sleep(0)``): it costs nothing
        while idle (no timer ticks), and its time is what any request arriving now would wait
        for its next step. Placements already running finish; only new ones wait, at most
        ``PLACEMENT_MAX_YIELD`` each, so a saturated API still cannot starve the pipeline.
        """
        limit = self._settings.placement_yield_lag
        if not limit:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PLACEMENT_MAX_YIELD
        while True:
            started = loop.time()
            await asyncio.sleep(0)
            lag = loop.time() - started
            if lag <= limit or started >= deadline:
                return
            await asyncio.sleep(lag)

    def capacity_freed(self) -> None:
        """Capacity appeared somewhere: try the jobs waiting for it."""
        if self._pending:
            self._drain_wanted.set()

    async def place(
        self,
        job_id: str,
        *,
        fresh: JobRecord | None = None,
        executions: list[ExecutionRecord] | None = None,
    ) -> None:
        """Bring a job up to its target number of executions, or queue or end it."""
        if job_id in self._placing:
            return  # a placement of this job is already running; it sees the latest state
        self._placing.add(job_id)
        try:
            async with self._locks.hold(job_id):
                if fresh is not None and executions is not None:
                    job: JobRecord | None = fresh
                else:
                    job, executions = await self._load(job_id)
                if job is None or job.state.terminal:
                    self._pending.pop(job_id, None)
                    return
                await self._place_locked(job, executions)
        finally:
            self._placing.discard(job_id)

    def _requirements(self, job: JobRecord) -> Requirements:
        # Remembered: every pass over the queue asks it of every waiting job (~9 us each).
        req = self._requirements_of.get(job.id)
        if req is None:
            if len(self._requirements_of) >= _REQUIREMENTS_KEPT:
                self._requirements_of.clear()
            req = requirements(job.spec, client_id=job.client_id, resources=job.resources)
            self._requirements_of[job.id] = req
        return req

    def _candidates(
        self,
        job: JobRecord,
        req: Requirements,
        executions: Sequence[ExecutionRecord],
        *,
        want: int = 1,
    ) -> tuple[list[TrackedNode], list[TrackedNode], int]:
        """(free candidates in asking order, busy candidates, nodes that fit at all).

        In a large cluster only a window of nodes is looked at: checking and scoring every node
        for every job made placement O(cluster) (~40 us a node: 25 decisions/s at 1,000 nodes).
        The window starts at a place drawn from the job id and ends once it holds
        ``candidate_sample`` free fitting nodes (more if the job wants more executions than
        that, every ask round included), which rendezvous then ranks ("power of d choices":
        near-even spread at O(d) a job). Jobs with data-locality or label preferences
        still look at every node, and so does any job the window cannot serve: ``fitting`` is
        exact whenever no free candidate was found.
        """
        # A node keeps one execution per job; a node where it failed is a last resort; a node
        # that was only full when asked may be asked again.
        taken = {
            e.node_id for e in executions if e.state is not ES.FAILED and not _may_ask_again(e)
        }
        failed_here = {e.node_id for e in executions if e.state is ES.FAILED}
        nodes = self._inventory.schedulable()
        count = len(nodes)
        wanted_cids = {i.cid for i in job.spec.inputs or [] if i.cid}
        sample = self._settings.candidate_sample
        if sample:
            sample = max(sample, want * (self._settings.max_retries + 1))
        order: Iterable[int]
        if sample and count > sample and not wanted_cids and not req.preferences:
            # Indexes from the window's start round to it (no rotated copy of the node list).
            start = rendezvous_start(job.id, count)
            order = itertools.chain(range(start, count), range(start))
        else:
            sample = 0
            order = range(count)
        free: list[tuple[tuple[int, int, int, float], TrackedNode]] = []
        busy: list[TrackedNode] = []
        fitting = 0
        need = req.resources
        reputation = self._reputation
        for i in order:
            node = nodes[i]
            if node.misfit(req) is not None:
                continue
            info = node.info
            fitting += 1
            node_id = info.node_id
            if node_id in taken:
                continue
            room = node.room_for(need)
            if room is None:
                busy.append(node)
                continue
            weight = room_weight(room) * reputation(node_id)
            rank = (
                1 if node_id in failed_here else 0,
                -preference_score(info, req),
                # Data locality: a node that already holds the job's input CIDs is asked first.
                -len(wanted_cids.intersection(info.local_cids)) if wanted_cids else 0,
                -rendezvous(job.id, node_id, weight),
            )
            free.append((rank, node))
            if sample and len(free) >= sample and not failed_here:
                break
        free.sort(key=lambda pair: pair[0])
        return [n for _, n in free], busy, fitting

    async def _place_locked(self, job: JobRecord, executions: list[ExecutionRecord]) -> None:
        settings = self._settings
        t = tally(executions)
        needed = t.needed(job)
        if needed <= 0:
            self._pending.pop(job.id, None)
            await self._settle(job, executions, t)
            return
        first_placement = not executions
        min_bids = job.spec.min_bids if first_placement else 0
        want = max(needed, min_bids)
        retries = job.retries_used
        retry_round = _is_retry_round(executions)
        if retry_round and retries >= settings.max_retries:
            await self._settle(job, executions, t, can_place_more=False)
            return

        req = self._requirements(job)
        free, busy, fitting = self._candidates(job, req, executions, want=want)
        if min_bids and len(free) < min_bids:
            # Too few nodes free to collect min_bids at once: wait for them (the submit check
            # made sure enough nodes exist).
            await self._wait_for_capacity(job, executions, t, min_free=min_bids)
            return
        if not free:
            if busy or fitting == 0:
                await self._wait_for_capacity(job, executions, t)
            elif job.extra_executions and t.active:
                # The verifier asked for more executions on fresh nodes and there are none:
                # its round can never complete, so end the job now with the reason (ADR 0004).
                await self._settle(
                    job,
                    executions,
                    t,
                    can_place_more=False,
                    force=Outcome(
                        JS.ERROR,
                        f"verification needs {needed} more execution(s) on fresh nodes, but "
                        "every node that can run the job already ran it",
                    ),
                )
            else:
                await self._settle(job, executions, t, can_place_more=False)
            return

        started = asyncio.get_running_loop().time()
        answers: list[_Answer] = []
        yes: list[_Answer] = []
        rounds = 0
        spend = retry_round
        while True:
            if spend:
                if retries >= settings.max_retries:
                    break
                retries += 1
            rounds += 1
            k = min(len(free), math.ceil((want - len(yes)) * settings.over_ask))
            batch, free = free[:k], free[k:]
            # One node asked for the one execution wanted: its yes is taken at once (ADR 0029),
            # once the job itself is stored, so no node runs a job whose submit failed. Only
            # when the requester settles verification itself: should a taken ask's answer be
            # lost, the copy the node runs anyway must not reach a verifier (it would count).
            take = (
                settings.take_single_bids
                and want == 1
                and k == 1
                and not yes
                and requester_verifies(job.spec.effective_verifier)
            )
            if take:
                await self._job_stored(job)
            got = await self._ask(job, batch, take=take)
            answers += got
            yes += [a for a in got if a.kind == "yes"]
            for a in got:
                if _only_full(a):
                    self._inventory.mark_full(a.node.id)
            if len(yes) >= want or not free:
                break
            # Asking others costs a retry, unless every refusal only said "full" or never
            # reached its node: those are no verdict on the job (B16, B18).
            spend = any(a.kind != "yes" and not _only_full(a) and a.kind != "error" for a in got)

        now = utcnow()
        min_met = len(yes) >= min_bids
        accepted = yes[:needed] if min_met else []
        accepted_ids = {a.execution_id for a in accepted}
        changes = Changes()
        effects = _AfterCommit()
        new_records: list[ExecutionRecord] = []
        for answer in answers:
            update = self._answer_update(job, answer, now, accepted_ids, min_met, len(yes))
            changes.executions.append(update)
            new_records.append(update.after)
            if update.after.state is ES.BID_ACCEPTED:
                if not answer.taken:
                    effects.accept.append(update.after)
            elif answer.may_run:
                # A lost answer lost the reply, not necessarily the ask: the node may have it.
                why = update.after.status if answer.taken else "the node's answer did not arrive"
                effects.cancel.append((update.after, why))
            elif answer.kind == "yes":
                effects.reject.append((update.after, update.after.status))
            if update.after.state not in HOLDS_CAPACITY:
                effects.release.append(answer.execution_id)
        after = [*executions, *new_records]
        t_after = tally(after)
        fields: dict[str, Any] = {"retries_used": retries}
        if not min_met:
            status = f"not enough bids: {len(yes)} of the {min_bids} required (min bids)" + (
                f"; {lifecycle.summarise(t_after.failures)}" if t_after.failures else ""
            )
            changes.jobs.append(
                job_transition(job, JS.ERROR, now=now, comment=status, status=status, **fields)
            )
            effects.finished = changes.jobs[-1].after
        elif accepted:
            if job.state in (JS.NEW, JS.QUEUED):
                fields["timeout_at"] = job.timeout_at or now + timedelta(
                    seconds=job.timeout_s + settings.job_timeout_grace
                )
                changes.jobs.append(
                    job_transition(
                        job,
                        JS.IN_PROGRESS,
                        now=now,
                        comment=f"{len(accepted)} bid(s) accepted",
                        status="",
                        **fields,
                    )
                )
            else:
                changes.jobs.append(_touch(job, now, **fields))
            if t_after.needed(job) > 0:
                effects.waiting = changes.jobs[-1].after
        else:
            # Nothing accepted: try again later, or stop if nothing can ever fit.
            job_now = job.evolve(retries_used=retries)
            unreached = any(a.kind == "error" for a in answers)
            # A node that was only full is busy, not a verdict on the job: wait in Queued (B18:
            # a burst that filled every node at once ended jobs in Error).
            full = any(a.kind == "no" and a.reason == AT_CAPACITY for a in answers)
            can_more = retries < settings.max_retries and (
                bool(busy) or bool(free) or unreached or full
            )
            if unreached:
                asyncio.get_running_loop().call_later(_REDELIVER_ASKS_AFTER_S, self.capacity_freed)
            out = lifecycle.outcome(job_now, t_after, can_place_more=can_more)
            if out is not None:
                changes.jobs.append(_end(job, out, now, **fields))
                effects.finished = changes.jobs[-1].after
                self._cancel_leftovers(after, changes, effects, now, out)
            elif any(a.kind == "waiting" for a in answers) and job.state is not JS.IN_PROGRESS:
                held = sorted({a.node.id for a in answers if a.kind == "waiting"})
                why = f"{WAITING_FOR_APPROVAL} on {', '.join(held)}"
                changes.jobs.append(self._queued(job, now, why=why, **fields))
            elif job.state is JS.NEW or (job.state is JS.IN_PROGRESS and t_after.active == 0):
                said = [(a.node.id, a.reason or a.kind) for a in answers]
                why = explain_declined(said, fitting, selectors=bool(req.selectors))
                changes.jobs.append(self._queued(job, now, why=why, **fields))
                effects.waiting = changes.jobs[-1].after
            else:
                changes.jobs.append(_touch(job, now, **fields))
                effects.waiting = changes.jobs[-1].after
        self._plan_event(job, executions, after, changes)
        try:
            await self._apply(changes, job, executions)
        except _NOT_RECORDED as exc:
            # Nothing recorded: free what the asks reserved, here and on the nodes (a bid left
            # open holds the node's capacity until its reservation times out, 30 s).
            taken = {a.execution_id for a in answers if a.may_run}
            effects = _AfterCommit(
                reject=[
                    (r, "placement abandoned")
                    for r in new_records
                    if r.accepted_ask_for_bid and r.id not in taken
                ],
                cancel=[(r, "placement abandoned") for r in new_records if r.id in taken],
                release=[a.execution_id for a in answers],
            )
            self._after_commit(job, effects)
            if isinstance(exc, JobNotStored) or not isinstance(exc, Conflict):
                # The database is away: placement is tried again (B12). Or the job was never
                # stored: its eager placement ends quietly.
                raise
            log.warning("placement_conflict", job_id=job.id)
            return
        if accepted:
            took = asyncio.get_running_loop().time() - started
            metrics.PLACEMENT_LATENCY.observe(took)
            _BIDDING_STAGE.observe(took)
        self._after_commit(job, effects)

    def _answer_update(
        self,
        job: JobRecord,
        answer: _Answer,
        now: datetime,
        accepted_ids: set[str],
        min_met: bool,
        yes_count: int,
    ) -> ExecutionUpdate:
        def record(state: ES, status: str = "", accepted: bool = False) -> ExecutionRecord:
            return ExecutionRecord(
                id=answer.execution_id,
                job_id=job.id,
                node_id=answer.node.id,
                state=state,
                version=1,
                created=now,
                updated=now,
                accepted_ask_for_bid=accepted,
                status=status,
            )

        asked = (ES.ASK_FOR_BID, "asked for a bid")
        if answer.kind == "waiting":
            reason = WAITING_FOR_APPROVAL
            if answer.reason and answer.reason != WAITING_FOR_APPROVAL:
                reason += f": {answer.reason}"
            return new_execution_update(record(ES.ASK_FOR_BID, reason), [(ES.ASK_FOR_BID, reason)])
        if answer.kind != "yes":
            reason = answer.reason or "bid rejected"
            if answer.kind == "error":
                reason = f"{NOT_ASKED}{reason}"
            rec = record(ES.ASK_FOR_BID_REJECTED, reason)
            return new_execution_update(rec, [asked, (ES.ASK_FOR_BID_REJECTED, reason)])
        got = (ES.ASK_FOR_BID_ACCEPTED, "bid received")
        if answer.execution_id in accepted_ids:
            rec = record(ES.BID_ACCEPTED, accepted=True)
            return new_execution_update(rec, [asked, got, (ES.BID_ACCEPTED, "bid accepted")])
        if not min_met:
            reason = f"not enough bids: {yes_count} of the {job.spec.min_bids} required (min bids)"
            rec = record(ES.CANCELLED, reason, accepted=True)
            return new_execution_update(rec, [asked, got, (ES.CANCELLED, reason)])
        reason = "enough bids accepted"
        rec = record(ES.BID_REJECTED, reason, accepted=True)
        return new_execution_update(rec, [asked, got, (ES.BID_REJECTED, reason)])

    async def _job_stored(self, job: JobRecord) -> None:
        """Wait until a just-submitted job's row is durable; JobNotStored if it never is."""
        write = self._new_jobs.get(job.id)
        if write is not None and not await write.stored():
            raise JobNotStored(f"job {job.id} was not stored")

    async def _ask(
        self, job: JobRecord, nodes: Sequence[TrackedNode], *, take: bool = False
    ) -> list[_Answer]:
        """Ask nodes for bids in parallel; answers in the order they arrived."""
        arrival = itertools.count()
        timeout = self._settings.bid_timeout
        # Hold the capacity before the first await, so a placement running concurrently
        # already sees these nodes as (partly) taken.
        asks = []
        for node in nodes:
            execution_id = new_id()
            self._inventory.hold(node.id, execution_id, job.resources)
            asks.append((node, execution_id))

        async def ask(node: TrackedNode, execution_id: str) -> tuple[int, _Answer]:
            request = AskBid(
                execution_id=execution_id,
                job=dict(job.job),
                requester_id=self._requester_id,
                take=take,
            )
            try:
                bid = await self._compute.ask_bid(node.id, request, timeout=timeout)
            except NodeCallFailed as exc:
                answer = _Answer(node, execution_id, "error", exc.detail, take=take)
            else:
                kind = "yes" if bid.accepted else ("waiting" if bid.waiting else "no")
                taken = take and bid.accepted and bid.taken
                answer = _Answer(node, execution_id, kind, bid.reason, take=take, taken=taken)
            _bids_counter(answer.kind).inc()
            return next(arrival), answer

        if len(asks) == 1:  # the usual single ask: no task and gather around it
            return [(await ask(*asks[0]))[1]]
        results = await asyncio.gather(*(ask(n, e) for n, e in asks))
        return [a for _, a in sorted(results, key=lambda pair: pair[0])]

    def _queued(self, job: JobRecord, now: datetime, *, why: str, **fields: Any) -> JobUpdate:
        deadline = job.queue_deadline or now + timedelta(seconds=self._settings.queue_timeout)
        if job.state is JS.QUEUED:
            return _touch(job, now, queue_deadline=deadline, status=why, **fields)
        return job_transition(
            job, JS.QUEUED, now=now, comment=why, status=why, queue_deadline=deadline, **fields
        )

    def waiting_reason(
        self, job: JobRecord, executions: Sequence[ExecutionRecord], *, min_free: int = 1
    ) -> str | None:
        """Why the job finds no free node now, from the live inventory (None: nodes have room)."""
        nodes = [(n.info, n.free) for n in self._inventory.schedulable()]
        taken = frozenset(e.node_id for e in executions if e.state is not ES.FAILED)
        return explain_wait(self._requirements(job), nodes, taken=taken, min_free=min_free)

    async def _wait_for_capacity(
        self,
        job: JobRecord,
        executions: Sequence[ExecutionRecord],
        t: Tally,
        *,
        min_free: int = 1,
    ) -> None:
        queue = job.state is JS.NEW or (job.state is JS.IN_PROGRESS and t.active == 0)
        # A job already Queued gets its status refreshed when the reason changed (a write only
        # then), so its status says why it still waits; the history keeps the first reason.
        why = self.waiting_reason(job, executions, min_free=min_free) or "waiting for capacity"
        if queue:
            update = self._queued(job, utcnow(), why=why)
            await self._apply(Changes(jobs=[update]), job, executions)
            job = update.after
        elif job.state is JS.QUEUED and job.status != why:
            update = self._queued(job, utcnow(), why=why)
            try:
                await self._apply(Changes(jobs=[update]), job, executions)
            except Conflict:
                pass  # changed meanwhile: whoever changed it decides what comes next
            else:
                job = update.after
        if job.id not in self._pending:
            self._pending[job.id] = job
            metrics.QUEUED_JOBS.set(len(self._pending))

    async def _drain_loop(self) -> None:
        while True:
            await self._drain_wanted.wait()
            self._drain_wanted.clear()
            try:
                await self._drain_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("queue_drain_failed")

    async def _drain_once(self) -> None:
        """Place the waiting jobs some node now has room for, oldest first, several at once.

        Each placement takes a lane ahead of new jobs (``PlacementLanes``), so capacity that
        frees under a stream of submits goes to the jobs that waited for it. A pass takes at
        most ``placement_parallelism`` jobs, waits for them, and looks again while jobs that
        fit are left and the last batch placed at least one of them.
        """
        batch_size = self._settings.placement_parallelism
        while True:
            nodes = self._inventory.schedulable()
            batch: list[str] = []
            # Whether a job fits now, by fit_key: queued jobs are mostly alike, and a pass over
            # a long queue that fits nowhere must not cost per job what placement costs.
            fits: dict[int, bool] = {}
            for job_id, job in list(self._pending.items()):
                req = self._requirements(job)
                fit = fits.get(req.fit_key)
                if fit is None:
                    fit = fits[req.fit_key] = any(
                        n.room_for(req.resources) is not None and n.misfit(req) is None
                        for n in nodes
                    )
                if not fit:
                    continue
                self._pending.pop(job_id, None)
                batch.append(job_id)
                if len(batch) >= batch_size:
                    break
            metrics.QUEUED_JOBS.set(len(self._pending))
            if not batch:
                return
            await asyncio.gather(
                *(self._place_when_reachable(job_id, queued=True) for job_id in batch)
            )
            if all(job_id in self._pending for job_id in batch):
                return  # none of them found room after all: wait for the next capacity event

    # --- the end of a job ----------------------------------------------------------------------

    async def _settle(
        self,
        job: JobRecord,
        executions: Sequence[ExecutionRecord],
        t: Tally,
        *,
        can_place_more: bool = True,
        force: Outcome | None = None,
    ) -> None:
        """End the job if its executions decide it (or as ``force`` says)."""
        out = force or lifecycle.outcome(job, t, can_place_more=can_place_more)
        if out is None:
            return
        now = utcnow()
        changes = Changes(jobs=[_end(job, out, now)])
        effects = _AfterCommit(finished=changes.jobs[0].after)
        self._cancel_leftovers(executions, changes, effects, now, out)
        await self._apply(changes, job, executions)
        self._after_commit(job, effects)

    def _cancel_leftovers(
        self,
        executions: Sequence[ExecutionRecord],
        changes: Changes,
        effects: _AfterCommit,
        now: datetime,
        out: Outcome,
    ) -> None:
        touched = {u.after.id for u in changes.executions}
        reason = f"{_END_COMMENTS.get(out.state, 'job ended')}"
        for ex in executions:
            if ex.id in touched or ex.state.terminal:
                continue
            update = lifecycle.end_execution(ex, ES.CANCELLED, reason, now=now)
            if update is None:
                continue
            changes.executions.append(update)
            self._node_stop(ex, reason, effects)

    def _node_stop(self, ex: ExecutionRecord, reason: str, effects: _AfterCommit) -> None:
        if ex.state in _ON_NODE:
            effects.cancel.append((ex, reason))
        elif ex.accepted_ask_for_bid or ex.state is ES.ASK_FOR_BID:
            effects.reject.append((ex, reason))
        effects.release.append(ex.id)

    def _plan_event(
        self,
        job: JobRecord,
        before: Sequence[ExecutionRecord],
        after: Sequence[ExecutionRecord],
        changes: Changes,
    ) -> None:
        """Tell the verifier which proposals to expect whenever that set changes (ADR 0004:
        only proposals of planned executions, from the node they were placed on, vote)."""
        spec = job.spec
        if spec.effective_verifier is VerifierType.NOOP:
            return  # the noop verifier accepts each proposal on its own
        plan = lifecycle.planned(after)
        if plan == lifecycle.planned(before):
            return
        changes.events.append(
            ExecutionsPlanned(
                job_id=job.id,
                expected=len(plan),
                verifier=spec.effective_verifier,
                deal=spec.deal or Deal(),
                executions=plan,
            )
        )

    def _after_commit(self, job: JobRecord, effects: _AfterCommit) -> None:
        released = False
        for execution_id in effects.release:
            released = self._inventory.release(execution_id) or released
        if effects.finished is not None:
            self._pending.pop(job.id, None)
            metrics.labelled(metrics.JOBS_FINISHED, effects.finished.state.value).inc()
            metrics.JOB_DURATION.observe(
                max(0.0, (effects.finished.updated - effects.finished.created).total_seconds())
            )
            log.info("job_finished", job_id=job.id, state=effects.finished.state.value)
        elif effects.waiting is not None and effects.waiting.id not in self._pending:
            self._pending[job.id] = effects.waiting
        metrics.QUEUED_JOBS.set(len(self._pending))
        if effects.accept or effects.reject or effects.cancel:
            self._spawn(self._send(job, effects), f"decisions-{job.id}")
        if effects.place_again:
            self.request_placement(job.id)
        if released:
            self.capacity_freed()

    async def _send(self, job: JobRecord, effects: _AfterCommit) -> None:
        async def accept(ex: ExecutionRecord) -> None:
            decision = BidDecision(execution_id=ex.id, job_id=job.id)
            loop = asyncio.get_running_loop()
            give_up_at = loop.time() + self._settings.acceptance_delivery_window
            delay = PLACEMENT_RETRY_FIRST
            while True:
                try:
                    ack = await self._compute.bid_accepted(ex.node_id, decision)
                    break
                except NodeCallFailed as exc:
                    # Not delivered, or delivered with the answer lost (NATS restarting): ask
                    # again (a node acknowledges a repeated acceptance) while the execution
                    # still waits for it, rather than failing work the node may be doing (B22).
                    if loop.time() + delay >= give_up_at or not self._awaits_node(ex):
                        await self._fail_if_still_accepted(
                            ex, f"bid acceptance not delivered: {exc.detail}"
                        )
                        return
                await asyncio.sleep(delay)
                delay = min(delay * 2, PLACEMENT_RETRY_MAX)
            if not ack.ok:
                await self._fail_if_still_accepted(
                    ex, f"node refused the accepted bid: {ack.error}"
                )

        async def reject(ex: ExecutionRecord, reason: str) -> None:
            with contextlib.suppress(NodeCallFailed):
                await self._compute.bid_rejected(
                    ex.node_id, BidDecision(execution_id=ex.id, job_id=job.id, reason=reason)
                )

        async def cancel(ex: ExecutionRecord, reason: str) -> None:
            try:
                await self._compute.cancel(
                    ex.node_id, CancelExecution(execution_id=ex.id, job_id=job.id, reason=reason)
                )
            except NodeCallFailed as exc:
                # Already recorded as cancelled; a node that missed this finds out when it
                # reports, and its late events change nothing.
                log.info("cancel_not_delivered", execution_id=ex.id, error=exc.detail)

        sends = [
            *(accept(e) for e in effects.accept),
            *(reject(e, r) for e, r in effects.reject),
            *(cancel(e, r) for e, r in effects.cancel),
        ]
        if len(sends) == 1:  # the usual single acceptance: no task and gather around it
            await sends[0]
        else:
            await asyncio.gather(*sends)

    # --- events from compute, verifier and publisher -------------------------------------------

    async def handle_event(self, event: Event, *, event_id: str) -> None:
        """Apply one lifecycle event (idempotent on ``event_id``)."""
        metrics.labelled(metrics.EVENTS_HANDLED, event.type).inc()
        if isinstance(event, VerificationEscalated):
            await self._escalate(event, event_id)
        elif isinstance(event, VerificationFailed):
            await self._end_job(
                event.job_id,
                JS.ERROR,
                f"verification failed: {event.reason}",
                event_id=event_id,
            )
        elif isinstance(event, BidAnswered):
            await self._bid_answered(event, event_id)
        elif isinstance(
            event,
            ResultProposed
            | ExecutionFailed
            | ExecutionCancelled
            | ResultAccepted
            | ResultRejected
            | ResultPublished
            | PublishFailed,
        ):
            await self._execution_event(event, event_id)
        else:
            log.debug("event_ignored", type=event.type)

    def _transition(
        self, job: JobRecord, ex: ExecutionRecord, event: Event
    ) -> ExecutionUpdate | None:
        now = utcnow()
        max_out = self._settings.max_output_bytes
        # Noop verification and noop publishing are settled here, from the job's own spec
        # (what a node claims does not count), in the commit of the event (ADR 0017).
        verify_here = requester_verifies(job.spec.effective_verifier)
        publish_here = requester_publishes(job.spec.effective_publisher)
        unverified = isinstance(event, ResultPublished | PublishFailed) and event.unverified
        if unverified and not verify_here:
            # Published from a proposal that claimed noop verification, for a job that has a
            # verifier: the node's claim does not count (ADR 0017).
            log.warning("unverified_publication_ignored", execution_id=ex.id, node_id=ex.node_id)
            return None
        if isinstance(event, ResultProposed):
            proposed = lifecycle.on_result_proposed(
                ex,
                result_cid=event.result_cid,
                run_output=event.run_output.model_dump(by_alias=True),
                now=now,
                max_output_bytes=max_out,
            )
            return lifecycle.settled_here(
                proposed, job_id=job.id, verify=verify_here, publish=publish_here, now=now
            )
        if isinstance(event, ExecutionFailed):
            timed_out = event.timed_out
            reason = event.error or ("timed out" if timed_out else "execution failed")
            if timed_out and "timed out" not in reason:
                reason = f"timed out: {reason}"
            return lifecycle.end_execution(
                ex,
                ES.FAILED,
                reason,
                now=now,
                # Another node would time out too: a timeout is not worth a replacement.
                retryable=event.retryable and not timed_out,
                run_output=event.run_output.model_dump(by_alias=True) if event.run_output else None,
                max_output_bytes=max_out,
                result_cid=event.result_cid,
            )
        if isinstance(event, ExecutionCancelled):
            reason = f"cancelled by the node: {event.reason}" if event.reason else "cancelled"
            return lifecycle.end_execution(ex, ES.CANCELLED, reason, now=now)
        if isinstance(event, ResultAccepted):
            accepted = lifecycle.on_result_accepted(
                ex,
                result_cid=event.result_cid,
                now=now,
                run_output=_output(event.run_output),
                max_output_bytes=max_out,
            )
            return lifecycle.settled_here(
                accepted, job_id=job.id, verify=False, publish=publish_here, now=now
            )
        if isinstance(event, ResultRejected):
            return lifecycle.on_result_rejected(
                ex,
                reason=event.reason,
                now=now,
                result_cid=event.result_cid,
                run_output=_output(event.run_output),
                max_output_bytes=max_out,
            )
        if isinstance(event, ResultPublished):
            return lifecycle.on_result_published(
                ex, published=to_wire(event.result), now=now, partial=event.partial
            )
        if isinstance(event, PublishFailed) and event.partial:
            return lifecycle.on_partial_publish_failed(ex, error=event.error, now=now)
        if isinstance(event, PublishFailed):
            return lifecycle.on_publish_failed(ex, error=event.error, now=now)
        return None

    async def _execution_event(
        self,
        event: ResultProposed
        | ExecutionFailed
        | ExecutionCancelled
        | ResultAccepted
        | ResultRejected
        | ResultPublished
        | PublishFailed,
        event_id: str | None,
    ) -> None:
        await self._update_execution(
            event.execution_id,
            lambda job, ex: self._transition(job, ex, event),
            event_id=event_id,
            job_id=event.job_id,
        )

    def _awaits_node(self, ex: ExecutionRecord) -> bool:
        """Whether ``ex`` is, as last committed here, still only accepted (no word from the
        node since)."""
        hit = self._working.get(ex.job_id)
        if hit is None:
            return False  # the job ended (or another process has it): nothing to wait for
        current = next((e for e in hit[1] if e.id == ex.id), None)
        return current is not None and current.state is ES.BID_ACCEPTED

    async def _fail_if_still_accepted(self, ex: ExecutionRecord, reason: str) -> None:
        """Fail an execution whose acceptance did not get through, unless it moved on: any
        later state proves the node had it (B22: a result already accepted was failed)."""

        def transition(_job: JobRecord, current: ExecutionRecord) -> ExecutionUpdate | None:
            if current.state is not ES.BID_ACCEPTED:
                return None
            return lifecycle.end_execution(current, ES.FAILED, reason, now=utcnow())

        await self._update_execution(ex.id, transition, event_id=None, job_id=ex.job_id)

    async def fail_execution(
        self, execution_id: str, reason: str, *, retryable: bool = True
    ) -> None:
        """Fail an execution the requester gave up on (lost node, undelivered decision)."""
        await self._update_execution(
            execution_id,
            lambda _job, ex: lifecycle.end_execution(
                ex, ES.FAILED, reason, now=utcnow(), retryable=retryable
            ),
            event_id=None,
        )

    async def _update_execution(
        self,
        execution_id: str,
        transition: Callable[[JobRecord, ExecutionRecord], ExecutionUpdate | None],
        *,
        event_id: str | None,
        job_id: str | None = None,
    ) -> None:
        if job_id is None:
            found = await self._store.find_execution(execution_id)
            if found is None:
                log.warning("unknown_execution", execution_id=execution_id)
                return
            job_id = found.job_id
        async with self._locks.hold(job_id):
            for _attempt in range(3):
                job, executions = await self._load(job_id)
                ex = next((e for e in executions if e.id == execution_id), None)
                if job is None or ex is None:
                    log.warning("unknown_execution", execution_id=execution_id, job_id=job_id)
                    return
                update = transition(job, ex)
                if update is None:
                    return  # a duplicate or a late event: nothing changes
                try:
                    await self._commit_execution(job, executions, [update], event_id=event_id)
                except Conflict:
                    continue
                return
            raise Conflict(f"execution {execution_id} kept changing")

    async def _commit_execution(
        self,
        job: JobRecord,
        executions: Sequence[ExecutionRecord],
        updates: list[ExecutionUpdate],
        *,
        event_id: str | None,
    ) -> None:
        """Write execution changes plus whatever they mean for the job, in one transaction."""
        now = utcnow()
        by_id = {u.after.id: u.after for u in updates}
        after = [by_id.get(e.id, e) for e in executions]
        t = tally(after)
        changes = Changes(executions=list(updates), processed_event=event_id)
        effects = _AfterCommit()
        for u in updates:
            left_node = u.before is not None and u.before.state in HOLDS_CAPACITY
            if left_node and u.after.state not in HOLDS_CAPACITY:
                effects.release.append(u.after.id)
        if not job.state.terminal:
            can_more = t.needed(job) > 0 and job.retries_used < self._settings.max_retries
            out = lifecycle.outcome(job, t, can_place_more=can_more)
            if out is not None:
                changes.jobs.append(_end(job, out, now))
                effects.finished = changes.jobs[-1].after
                self._cancel_leftovers(after, changes, effects, now, out)
            elif t.needed(job) > 0 and can_more:
                effects.place_again = True
            self._plan_event(job, executions, after, changes)
        if await self._apply(changes, job, executions) is None:
            return  # this event was applied before (a redelivery): nothing more to do
        self._after_commit(job, effects)

    async def _bid_answered(self, event: BidAnswered, event_id: str) -> None:
        """A node held an ask for approval and has now decided (compute's BidAnswered)."""
        async with self._locks.hold(event.job_id):
            job, executions = await self._load(event.job_id)
            ex = next((e for e in executions if e.id == event.execution_id), None)
            if job is None or ex is None or ex.state is not ES.ASK_FOR_BID:
                return  # unknown, or answered already: nothing changes
            now = utcnow()
            if not event.accepted:
                reason = event.reason or "bid rejected"
                update = advance(ex, [(ES.ASK_FOR_BID_REJECTED, reason)], now=now, status=reason)
                await self._commit_execution(job, executions, [update], event_id=event_id)
                return
            got = (ES.ASK_FOR_BID_ACCEPTED, "bid received")
            effects = _AfterCommit()
            changes = Changes(processed_event=event_id)
            if job.state.terminal:
                reason = f"job already {job.state.value}"
                update = advance(
                    ex, [got, (ES.BID_REJECTED, reason)], now=now, accepted_ask_for_bid=True
                )
                effects.reject.append((update.after, reason))
                effects.release.append(ex.id)
            else:
                update = advance(
                    ex,
                    [got, (ES.BID_ACCEPTED, "bid accepted")],
                    now=now,
                    accepted_ask_for_bid=True,
                    status="",
                )
                effects.accept.append(update.after)
                if job.state in (JS.NEW, JS.QUEUED):
                    changes.jobs.append(
                        job_transition(
                            job,
                            JS.IN_PROGRESS,
                            now=now,
                            comment="1 bid(s) accepted",
                            status="",
                            timeout_at=job.timeout_at
                            or now
                            + timedelta(seconds=job.timeout_s + self._settings.job_timeout_grace),
                        )
                    )
            changes.executions.append(update)
            after = [update.after if e.id == ex.id else e for e in executions]
            self._plan_event(job, executions, after, changes)
            if await self._apply(changes, job, executions) is not None:
                self._after_commit(job, effects)

    async def _escalate(self, event: VerificationEscalated, event_id: str) -> None:
        async with self._locks.hold(event.job_id):
            job, executions = await self._load(event.job_id)
            if job is None or job.state.terminal or event.additional <= 0:
                return
            now = utcnow()
            comment = f"verification escalated: {event.additional} more execution(s)"
            if event.reason:
                comment += f" ({event.reason})"
            update = _touch(
                job,
                now,
                record=True,
                comment=comment,
                extra_executions=job.extra_executions + event.additional,
            )
            rows = await self._apply(
                Changes(jobs=[update], processed_event=event_id), job, executions
            )
        if rows is not None:
            self.request_placement(job.id)

    # --- commands ------------------------------------------------------------------------------

    async def cancel(self, job_id: str, reason: str) -> JobRecord:
        """Cancel a job and stop its executions on their nodes; returns the cancelled job."""
        job = await self._end_job(job_id, JS.CANCELLED, reason or "cancelled", event_id=None)
        return job

    async def _end_job(
        self, job_id: str, state: JobStateType, reason: str, *, event_id: str | None
    ) -> JobRecord:
        async with self._locks.hold(job_id):
            for _attempt in range(3):
                job, executions = await self._load(job_id)
                if job is None:
                    raise NotFound(f"job {job_id} not found")
                if job.state.terminal:
                    if event_id is not None:
                        return job  # late verifier verdict on a finished job
                    raise AlreadyTerminal(f"job {job_id} is already {job.state.value}")
                now = utcnow()
                out = Outcome(state, reason)
                changes = Changes(jobs=[_end(job, out, now)], processed_event=event_id)
                effects = _AfterCommit(finished=changes.jobs[0].after)
                prefix = "job cancelled" if state is JS.CANCELLED else "job failed"
                for ex in executions:
                    update = lifecycle.end_execution(
                        ex, ES.CANCELLED, f"{prefix}: {reason}", now=now
                    )
                    if update is not None:
                        changes.executions.append(update)
                        self._node_stop(ex, f"{prefix}: {reason}", effects)
                try:
                    if await self._apply(changes, job, executions) is None:
                        return job  # a redelivered verdict: applied before
                except Conflict:
                    continue
                self._after_commit(job, effects)
                return changes.jobs[0].after
            raise Conflict(f"job {job_id} kept changing")

    async def expire(self, job: JobRecord, now: datetime) -> None:
        """End a job past its timeout, or a Queued job past its queue deadline."""
        if job.state is JS.QUEUED and job.queue_deadline and job.queue_deadline <= now:
            waited_for = (
                "approval"
                if job.status.startswith(WAITING_FOR_APPROVAL)
                else "a node with free capacity"
            )
            reason = (
                f"timed out waiting for {waited_for} "
                f"(queued longer than {self._settings.queue_timeout:g}s)"
            )
        else:
            reason = f"timed out: the job ran longer than its timeout of {job.timeout_s:g}s"
        with contextlib.suppress(AlreadyTerminal, NotFound):
            await self._end_job(job.id, JS.ERROR, reason, event_id=None)

    async def node_lost(self, node_id: str) -> None:
        """Fail (and so re-place) the executions a lost node was asked for or running."""
        executions = await self._store.list_executions_in_states(
            [ES.ASK_FOR_BID, ES.ASK_FOR_BID_ACCEPTED, ES.BID_ACCEPTED], node_ids=[node_id]
        )
        for ex in executions:
            await self.fail_execution(ex.id, f"node {node_id} lost (no heartbeat)")

    async def _confirm_on_node(self, ex: ExecutionRecord) -> None:
        """After a restart: does the node know this accepted execution? The acceptance may
        have been lost with the previous process (it is sent after the commit)."""
        decision = BidDecision(execution_id=ex.id, job_id=ex.job_id)
        try:
            ack = await self._compute.bid_accepted(ex.node_id, decision)
        except NodeCallFailed:
            return  # the node is away: loss detection re-places it if it stays away
        if not ack.ok and ack.code == "not_found":
            await self.fail_execution(ex.id, "the node never received the bid acceptance")

    async def _reconcile_job(
        self,
        job: JobRecord,
        mine: list[ExecutionRecord],
        stuck_before: datetime,
        *,
        confirm: bool = False,
    ) -> None:
        if confirm:
            for ex in mine:
                if ex.state is ES.BID_ACCEPTED:
                    await self._confirm_on_node(ex)
        for ex in mine:
            # An ask held for approval waits for a person (bounded by the queue deadline and
            # the job timeout); any other unanswered ask is left over from a crash.
            held = ex.status.startswith(WAITING_FOR_APPROVAL)
            if (
                ex.state in (ES.ASK_FOR_BID, ES.ASK_FOR_BID_ACCEPTED)
                and not held
                and ex.updated < stuck_before
            ):
                await self._update_execution(
                    ex.id,
                    lambda _job, e: lifecycle.end_execution(
                        e, ES.ASK_FOR_BID_REJECTED, "no bid answer in time", now=utcnow()
                    ),
                    event_id=None,
                    job_id=job.id,
                )
        # Re-hold capacity for what runs on nodes, so accounting survives a restart.
        for ex in mine:
            if ex.state in HOLDS_CAPACITY:
                self._inventory.hold(ex.node_id, ex.id, job.resources)
        needed = tally(mine).needed(job)
        if (job.state is JS.QUEUED or needed > 0) and job.id not in self._pending:
            self._pending[job.id] = job
        if job.state is JS.NEW or needed > 0:
            await self.place(job.id)
            return
        async with self._locks.hold(job.id):
            fresh = await self._store.find_job(job.id)
            if fresh is not None and not fresh.state.terminal:
                current = (await self._store.list_executions([job.id]))[job.id]
                await self._settle(
                    fresh,
                    current,
                    tally(current),
                    can_place_more=fresh.retries_used < self._settings.max_retries,
                )

    async def reconcile(self, *, older_than: float | None = None) -> None:
        """Re-drive anything stuck: jobs never placed, short of executions, or decided but not
        ended; executions waiting for a bid answer too long (e.g. after a crash).

        The full pass (``older_than=None``, at start-up) also asks each node whether it knows
        the executions accepted on it, since an acceptance is sent after its commit.
        """
        now = utcnow()
        before = now - timedelta(seconds=older_than) if older_than is not None else None
        jobs = await self._store.list_jobs_in_states(
            [JS.NEW, JS.QUEUED, JS.IN_PROGRESS], updated_before=before, limit=5000
        )
        jobs = [j for j in jobs if j.id not in self._placing]
        if not jobs:
            return
        executions = await self._store.list_executions([j.id for j in jobs])
        stuck_before = now - timedelta(seconds=self._settings.stuck_after)
        # Jobs are independent: re-drive several at once (bounded), so a restart with a
        # backlog does not place it one network round trip at a time.
        gate = asyncio.Semaphore(RECONCILE_PARALLELISM)

        async def redrive(job: JobRecord) -> None:
            async with gate:
                try:
                    await self._reconcile_job(
                        job, executions[job.id], stuck_before, confirm=older_than is None
                    )
                except Exception:
                    log.exception("reconcile_job_failed", job_id=job.id)

        await asyncio.gather(*(redrive(j) for j in jobs))
        metrics.QUEUED_JOBS.set(len(self._pending))


def _touch(
    job: JobRecord, now: datetime, *, record: bool = False, comment: str = "", **fields: Any
) -> JobUpdate:
    """A job update without a state change (fields only), still compare-and-set."""
    return job_transition(job, job.state, now=now, comment=comment, record=record, **fields)


def _end(job: JobRecord, out: Outcome, now: datetime, **fields: Any) -> JobUpdate:
    comment = out.status or _END_COMMENTS.get(out.state, "")
    return job_transition(job, out.state, now=now, comment=comment, status=out.status, **fields)


def _output(run_output: RunOutput | None) -> dict[str, Any] | None:
    return run_output.model_dump(by_alias=True) if run_output is not None else None


_BIDDING_STAGE = metrics.labelled(metrics.JOB_STAGE, "bidding")


def _bids_counter(kind: str) -> Any:
    return metrics.labelled(metrics.BIDS, kind)


# Execution stage left -> metric stage name (``shoal_requester_job_stage_seconds``).
_STAGE_OF = {
    ES.BID_ACCEPTED: "running",
    ES.WAITING_VERIFICATION: "verifying",
    ES.RESULT_ACCEPTED: "publishing",
}


def _observe_stages(changes: Changes, queue_timeout: float) -> None:
    """Time spent in the stages this change leaves (one observation per stage left)."""
    for eu in changes.executions:
        if eu.before is None or not eu.steps:
            continue
        spent = max(0.0, (eu.after.updated - eu.before.updated).total_seconds())
        # States passed through within this change (a noop result settled in the commit of its
        # proposal, ADR 0017) are stages left at once: observed, with no time spent.
        passed = [eu.before.state, *(state for state, _ in eu.steps[:-1])]
        for i, state in enumerate(passed):
            stage = _STAGE_OF.get(state)
            if stage is not None:
                metrics.labelled(metrics.JOB_STAGE, stage).observe(spent if i == 0 else 0.0)
    for ju in changes.jobs:
        if ju.before.state is JS.QUEUED and ju.after.state is not JS.QUEUED:
            deadline = ju.before.queue_deadline
            if deadline is not None:
                entered = deadline - timedelta(seconds=queue_timeout)
                spent = (ju.after.updated - entered).total_seconds()
                metrics.labelled(metrics.JOB_STAGE, "queued").observe(max(0.0, spent))


def _observe_standing(standing: dict[str, NodeStanding]) -> None:
    for delta in standing.values():
        for outcome, n in (
            ("completed", delta.completed),
            ("failed", delta.failed),
            ("rejected", delta.rejected),
        ):
            if n:
                metrics.labelled(metrics.NODE_OUTCOMES, outcome).inc(n)
