"""The compute node's logic behind its request/reply operations.

ask_bid      strategies -> yes (capacity committed, reservation timer armed) / no / wait
bid_accepted reservation -> stored execution (ACCEPTED) -> executor queue
bid_rejected reservation released
cancel       held, reserved, queued or running: each stopped its own way
approve      a held ask gets exactly one answer, as a BidAnswered event
logs         stdout/stderr from the results files, from byte offsets

Everything that touches the books (ledger, queue, reservations, held asks) runs without an
``await`` in between, so concurrent requests on the one event loop cannot interleave there.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
from pydantic import ValidationError

from shoal_common import tracing
from shoal_common.errors import ShoalError
from shoal_common.events import BidAnswered, ExecutionCancelled, ExecutionFailed
from shoal_common.protocol import (
    AT_CAPACITY,
    Ack,
    ApproveBid,
    AskBid,
    BidAnswer,
    BidDecision,
    CancelExecution,
    Capacity,
    LogsAnswer,
    LogsQuery,
    job_resources,
)
from shoal_common.spec import Job
from shoal_compute import metrics
from shoal_compute.domain.bidding import BidOutcome, BidRequest, BidStrategy
from shoal_compute.domain.capacity import Allocation, CapacityLedger
from shoal_compute.domain.execution import ExecutionRecord, LocalState
from shoal_compute.domain.queue import ExecutorQueue
from shoal_compute.domain.results import file_size, read_from, text_from
from shoal_compute.domain.runner import ExecutionRunner, effective_timeout
from shoal_compute.executors.base import LogStream
from shoal_compute.store.base import ExecutionStore

log = structlog.get_logger(__name__)


class RowNotWritten(ShoalError):
    """An accepted execution's row could not be stored: its outcome cannot be recorded."""

    code = "not_stored"
    retryable = True


@dataclass
class Reservation:
    """A yes not yet confirmed: capacity is committed until accepted, rejected or expired."""

    ask: AskBid
    job: Job
    resources: Capacity
    timer: asyncio.TimerHandle | None = None
    created: float = field(default_factory=time.monotonic)


@dataclass
class HeldAsk:
    """An ask held by the approval policy (no capacity committed until approved)."""

    ask: AskBid
    job: Job
    resources: Capacity


class ComputeNode:
    """Bids, reservations, the executor queue and cancellation of one node."""

    def __init__(
        self,
        *,
        node_id: str,
        ledger: CapacityLedger,
        strategy: BidStrategy,
        store: ExecutionStore,
        runner: ExecutionRunner,
        committed: Callable[[], None],
        default_timeout: float,
        reservation_timeout_s: float,
        max_log_bytes: int = 1 << 20,
    ) -> None:
        self.node_id = node_id
        self.ledger = ledger
        self._strategy = strategy
        self._store = store
        self.runner = runner
        self._committed = committed
        self._default_timeout = default_timeout
        self._reservation_timeout = reservation_timeout_s
        self._max_log_bytes = max_log_bytes
        self.reservations: dict[str, Reservation] = {}
        # Rows being written by bid_accepted (the run may already be going).
        self._rows: dict[str, asyncio.Future[None]] = {}
        self.held: dict[str, HeldAsk] = {}
        # Accepted executions not finished yet (queued or running), with their parsed job.
        self._accepted: dict[str, tuple[ExecutionRecord, Job]] = {}
        self._traces: dict[str, dict[str, str]] = {}  # execution -> trace context at accept
        self.queue = ExecutorQueue(ledger, self._start)
        self.stopping = False

    # --- bidding ---

    async def ask_bid(self, ask: AskBid) -> BidAnswer:
        """Decide on one ask; a yes commits capacity until accepted/rejected/expired.

        Raises :class:`BidStrategyError` when a strategy cannot decide (``bad_bids``).
        """
        eid = ask.execution_id
        if self.stopping:
            return BidAnswer(execution_id=eid, accepted=False, reason="node is shutting down")
        if eid in self._accepted:  # a retried ask: the same answer
            await self.row_written(eid)
            return BidAnswer(execution_id=eid, accepted=True, taken=ask.take)
        if eid in self.reservations:
            if ask.take:
                return await self._take(eid)
            return BidAnswer(execution_id=eid, accepted=True)
        if eid in self.held:
            return BidAnswer(execution_id=eid, accepted=False, waiting=True)
        try:
            job = ask.job_model()
            resources = job_resources(job.spec)
        except (ValidationError, ValueError) as exc:
            return BidAnswer(execution_id=eid, accepted=False, reason=f"invalid job: {exc}")
        request = BidRequest(
            execution_id=eid,
            job=job,
            resources=resources,
            timeout=effective_timeout(job, self._default_timeout),
            requester_id=ask.requester_id,
        )
        try:
            outcome = await self._strategy.decide(request)
        except Exception:
            metrics.BIDS.labels("error").inc()
            raise
        if outcome.wait:
            metrics.BIDS.labels("wait").inc()
            self.held[eid] = HeldAsk(ask=ask, job=job, resources=resources)
            log.info("bid_held_for_approval", execution_id=eid)
            return BidAnswer(execution_id=eid, accepted=False, waiting=True, reason=outcome.reason)
        if outcome.accepted:
            outcome = self._reserve(ask, job, resources)
        metrics.BIDS.labels("yes" if outcome.accepted else "no").inc()
        log.debug("bid_answered", execution_id=eid, accepted=outcome.accepted)
        if outcome.accepted and ask.take:
            return await self._take(eid)
        return BidAnswer(execution_id=eid, accepted=outcome.accepted, reason=outcome.reason)

    async def _take(self, execution_id: str) -> BidAnswer:
        """Accept our own reserved bid, as the requester said it would (``AskBid.take``):
        answered once the execution is stored, exactly as ``bid_accepted`` acknowledges.

        Called with the reservation in place and no await since, so ``bid_accepted`` either
        stores the execution or raises (a refusal comes only for a missing reservation)."""
        # No job id: bid_accepted takes it from the reservation's parsed job.
        await self.bid_accepted(BidDecision(execution_id=execution_id, job_id=""))
        return BidAnswer(execution_id=execution_id, accepted=True, taken=True)

    def _reserve(self, ask: AskBid, job: Job, resources: Capacity) -> BidOutcome:
        eid = ask.execution_id
        if not self.ledger.try_commit(eid, resources):
            return BidOutcome.no(AT_CAPACITY)
        reservation = Reservation(ask=ask, job=job, resources=resources)
        reservation.timer = asyncio.get_running_loop().call_later(
            self._reservation_timeout, self._expire, eid
        )
        self.reservations[eid] = reservation
        return BidOutcome.yes()

    def _expire(self, execution_id: str) -> None:
        if self.reservations.pop(execution_id, None) is not None:
            self.ledger.release(execution_id)
            self.queue.pump()
            log.info("bid_reservation_expired", execution_id=execution_id)

    def _drop_reservation(self, execution_id: str) -> Reservation | None:
        reservation = self.reservations.pop(execution_id, None)
        if reservation is not None and reservation.timer is not None:
            reservation.timer.cancel()
        return reservation

    async def bid_accepted(self, decision: BidDecision) -> Ack:
        eid = decision.execution_id
        reservation = self._drop_reservation(eid)
        if reservation is None:
            return await self._no_reservation(eid, accepting=True)
        job = reservation.job
        record = ExecutionRecord(
            id=eid,
            job_id=decision.job_id or job.metadata.id,
            job=reservation.ask.job,
            requester_id=reservation.ask.requester_id,
            resources=reservation.resources,
        )
        # Booked before the await, so a concurrent cancel finds it (and a repeated accept
        # is recognised) while the row is being written.
        self._accepted[eid] = (record, job)
        self._traces[eid] = tracing.inject({})
        row = asyncio.get_running_loop().create_future()
        self._rows[eid] = row

        def ordered() -> None:
            if not row.done():
                row.set_result(None)

        # Queued at once: a short run overlaps the write instead of following it; whatever
        # records its outcome waits for the row first (row_written), and with group commit
        # only until the row is in the open group, so a quick result commits with it.
        self.queue.push(eid)
        try:
            await self._store.create(record, on_ordered=ordered)
        except BaseException as exc:
            # A writer already let through fails on its own: its write joined this one's
            # failed group, or finds no row.
            if not row.done():
                row.set_exception(RowNotWritten(f"execution {eid} could not be stored: {exc!r}"))
                row.exception()  # retrieved: waiters re-raise it, nobody else needs to
            del self._rows[eid]
            await self._abandon(eid)
            raise
        ordered()
        del self._rows[eid]
        return Ack()

    async def row_written(self, execution_id: str) -> None:
        """Return once writes of the execution's row are ordered after its creation: it is
        stored, or (group commit) in the open group (raises RowNotWritten if it never is)."""
        pending = self._rows.get(execution_id)
        if pending is not None:
            await asyncio.shield(pending)

    async def _abandon(self, execution_id: str) -> None:
        """Stop an execution that could not be stored, recording nothing."""
        if self.queue.remove(execution_id):
            self._accepted.pop(execution_id, None)
            self.queue.pump()
        else:
            await self.runner.cancel(execution_id, "could not be stored")

    async def _no_reservation(self, execution_id: str, *, accepting: bool) -> Ack:
        if accepting and execution_id in self._accepted:
            return Ack()  # repeated accept: already ours
        record = await self._store.find(execution_id)
        if record is None:
            return Ack(
                ok=False,
                code="not_found",
                error=f"no bid for execution {execution_id} on node {self.node_id}",
            )
        if accepting and record.state is LocalState.ACCEPTED:
            return Ack()
        return Ack(
            ok=False,
            code="invalid_transition",
            error=f"execution {execution_id} is already {record.state.value} on this node",
        )

    async def bid_rejected(self, decision: BidDecision) -> Ack:
        eid = decision.execution_id
        if self._drop_reservation(eid) is not None:
            self.ledger.release(eid)
            self.queue.pump()
            return Ack()
        if self.held.pop(eid, None) is not None:
            return Ack()
        return await self._no_reservation(eid, accepting=False)

    async def approve(self, decision: ApproveBid) -> Ack:
        """Answer a held ask exactly once, as a ``BidAnswered`` event."""
        eid = decision.execution_id
        held = self.held.pop(eid, None)
        if held is None:
            return Ack(ok=False, code="not_found", error=f"no held bid for execution {eid}")
        if decision.approved:
            outcome = self._reserve(held.ask, held.job, held.resources)
        else:
            outcome = BidOutcome.no(decision.reason or "not approved")
        event = BidAnswered(
            job_id=decision.job_id or held.job.metadata.id,
            execution_id=eid,
            node_id=self.node_id,
            accepted=outcome.accepted,
            reason=outcome.reason,
        )
        try:
            await self._store.stage_events(event)
        except BaseException:
            if self._drop_reservation(eid) is not None:
                self.ledger.release(eid)
            self.held[eid] = held  # nothing was sent: the decision can be made again
            raise
        self._committed()
        return Ack()

    # --- execution ---

    def _start(self, execution_id: str, allocation: Allocation) -> None:
        record, job = self._accepted[execution_id]
        with tracing.continued_from(self._traces.pop(execution_id, None)):
            self.runner.start(record, job, allocation)

    def finished(self, execution_id: str) -> None:
        """The runner ended an execution (any outcome): free its capacity."""
        self._accepted.pop(execution_id, None)
        self.queue.done(execution_id)

    async def cancel(self, request: CancelExecution) -> Ack:
        eid = request.execution_id
        reason = request.reason or "cancelled by the requester"
        if self.held.pop(eid, None) is not None:
            return Ack()
        if self._drop_reservation(eid) is not None:
            self.ledger.release(eid)
            self.queue.pump()
            return Ack()
        if await self.runner.cancel(eid, reason):
            return Ack()
        entry = self._accepted.get(eid)
        if entry is not None:
            if self.queue.remove(eid):
                self._accepted.pop(eid, None)
                await self._cancel_stored(entry[0], reason)
                self.queue.pump()
            return Ack()
        record = await self._store.find(eid)
        if record is None:
            return Ack(ok=False, code="not_found", error=f"execution {eid} is not on this node")
        if record.state is LocalState.CANCELLED:
            return Ack()
        return Ack(
            ok=False,
            code="already_terminal",
            error=f"execution {eid} already ended here ({record.state.value})",
        )

    async def _cancel_stored(self, record: ExecutionRecord, reason: str) -> None:
        try:
            await self.row_written(record.id)
        except RowNotWritten:
            return
        event = ExecutionCancelled(
            job_id=record.job_id, execution_id=record.id, node_id=self.node_id, reason=reason
        )
        try:
            await self._store.transition(
                record.id,
                expected=[LocalState.ACCEPTED],
                new=LocalState.CANCELLED,
                events=[event],
                error=reason,
            )
        except ShoalError as exc:
            log.info("cancel_raced", execution_id=record.id, reason=exc.detail)
            return
        self._committed()

    # --- restart ---

    async def recover(self) -> int:
        """Report executions a previous run of this node accepted but never finished.

        They may have been half-way through anything; the requester re-places them.
        """
        interrupted = await self._store.list_executions(states=[LocalState.ACCEPTED], limit=100_000)
        for record in interrupted:
            event = ExecutionFailed(
                job_id=record.job_id,
                execution_id=record.id,
                node_id=self.node_id,
                error="node restarted",
                retryable=True,
            )
            try:
                await self._store.transition(
                    record.id,
                    expected=[LocalState.ACCEPTED],
                    new=LocalState.FAILED,
                    events=[event],
                    error="node restarted",
                )
            except ShoalError as exc:
                log.warning("recover_skipped", execution_id=record.id, reason=exc.detail)
        if interrupted:
            log.info("executions_interrupted_by_restart", count=len(interrupted))
            self._committed()
        return len(interrupted)

    # --- logs ---

    async def logs(self, query: LogsQuery) -> LogsAnswer:
        eid = query.execution_id
        running = eid in self._accepted
        kept: dict[LogStream, bytes] | None = None  # a finished run's row holds them (ADR 0030)
        if not running:
            record = await self._store.find(eid)
            if record is None:
                return LogsAnswer(execution_id=eid, error=f"execution {eid} is not on this node")
            files = record.result_files
            if files is not None:
                kept = {LogStream.STDOUT: files.stdout, LogStream.STDERR: files.stderr}
        paths = self.runner.paths(eid)
        limit = max(0, min(query.max_bytes, self._max_log_bytes))
        final = not running
        active = self.runner.active.get(eid)

        async def read(stream: LogStream, offset: int) -> tuple[str, int]:
            if kept is not None:
                return text_from(kept[stream], offset, limit, final=final)
            if active is not None:
                held = active.live.read(stream, offset, limit)
                if held is not None:  # recent output, even if the executor buffers its file
                    return held[0].decode("utf-8", errors="replace"), held[1]
            return await asyncio.to_thread(
                read_from, paths.stream(stream.value), offset, limit, final=final
            )

        def size(stream: LogStream) -> int:
            if kept is not None:
                return len(kept[stream])
            return file_size(paths.stream(stream.value))

        stdout, stdout_next = await read(LogStream.STDOUT, query.stdout_offset)
        stderr, stderr_next = await read(LogStream.STDERR, query.stderr_offset)
        finished = final and (
            stdout_next >= size(LogStream.STDOUT) and stderr_next >= size(LogStream.STDERR)
        )
        return LogsAnswer(
            execution_id=eid,
            stdout=stdout,
            stderr=stderr,
            stdout_offset=stdout_next,
            stderr_offset=stderr_next,
            finished=finished,
        )

    # --- views ---

    @property
    def queued_count(self) -> int:
        return self.queue.waiting_count

    @property
    def running_count(self) -> int:
        return self.queue.running_count
