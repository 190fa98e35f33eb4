"""Housekeeping: heartbeats in, lost nodes out, job timeouts, periodic reconciliation."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta

import structlog

from shoal_common.protocol import HEARTBEAT_INTERVAL_S, Heartbeat
from shoal_common.spec import JobHistoryType, JobStateType, utcnow
from shoal_requester import metrics
from shoal_requester.domain.inventory import Inventory, TrackedNode
from shoal_requester.domain.model import HistoryRecord, JobRecord
from shoal_requester.domain.orchestrator import Orchestrator
from shoal_requester.settings import RequesterSettings
from shoal_requester.store.base import RequesterStore

log = structlog.get_logger(__name__)

# list_expired_jobs' default page: a full page may not hold the soonest deadline.
_EXPIRY_PAGE = 1000
_MAX_HORIZON_S = 60.0


class Housekeeper:
    """Keeps the inventory current and re-drives whatever time alone decides."""

    def __init__(
        self,
        *,
        store: RequesterStore,
        inventory: Inventory,
        orchestrator: Orchestrator,
        settings: RequesterSettings,
    ) -> None:
        self._store = store
        self._inventory = inventory
        self._orchestrator = orchestrator
        self._settings = settings
        self._task: asyncio.Task[None] | None = None
        self._persisting: set[asyncio.Task[None]] = set()
        self._persist_lock = asyncio.Lock()
        # When the jobs table may next hold an expired job; None: look at the next tick.
        self._expiry_check_at: datetime | None = None
        self._requeued = 0  # jobs (re-)entering Queued, counted by the history listener
        self._unsubscribe: Callable[[], None] | None = None

    def start(self) -> None:
        self._unsubscribe = self._store.subscribe_history(self._history)
        self._task = asyncio.create_task(self._run(), name="requester-housekeeping")

    async def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.gather(*self._persisting, return_exceptions=True)

    # --- heartbeats --------------------------------------------------------------------------

    def observe(self, beat: Heartbeat) -> None:
        """Take in one heartbeat (called for every heartbeat: kept cheap, no I/O inline)."""
        seen = self._inventory.observe(beat)
        if seen.new or seen.changed:
            if seen.new:
                log.info("node_joined", node_id=seen.node.id)
            self._persist(seen.node)
            # Counting live nodes is O(cluster): only when a state may have changed (a node
            # joined, came back or is stopping), never on every heartbeat; tick() recounts.
            metrics.LIVE_NODES.set(self._inventory.live_count())
        if seen.more_free:
            self._orchestrator.capacity_freed()

    def _persist(self, node: TrackedNode) -> None:
        self._inventory.mark_persisted(node)
        record = node.record()

        async def write() -> None:
            async with self._persist_lock:  # keep writes of one node in order
                try:
                    await self._store.upsert_node(record)
                except Exception as exc:  # persisted for display only; memory is the truth
                    log.warning("node_persist_failed", node_id=record.id, error=repr(exc))

        task = asyncio.create_task(write())
        self._persisting.add(task)
        task.add_done_callback(self._persisting.discard)

    # --- the loop ----------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        # Give live nodes a heartbeat to report before re-driving what the last run left.
        await asyncio.sleep(min(HEARTBEAT_INTERVAL_S * 1.5, self._settings.node_lost_after))
        await self._guard(self._orchestrator.reconcile(), "reconcile_failed")
        next_reconcile = loop.time() + self._settings.reconcile_interval
        while True:
            await asyncio.sleep(self._settings.housekeeping_interval)
            await self._guard(self.tick(), "housekeeping_failed")
            if loop.time() >= next_reconcile:
                next_reconcile = loop.time() + self._settings.reconcile_interval
                await self._guard(
                    self._orchestrator.reconcile(older_than=self._settings.stuck_after),
                    "reconcile_failed",
                )

    async def _guard(self, work: Awaitable[None], what: str) -> None:
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(what)

    async def tick(self) -> None:
        """Lost nodes, expired jobs, node persistence: one pass."""
        for node in self._inventory.expire():
            metrics.NODES_LOST.inc()
            log.warning("node_lost", node_id=node.id)
            self._persist(node)
            await self._orchestrator.node_lost(node.id)
        metrics.LIVE_NODES.set(self._inventory.live_count())
        if self._expiry_check_at is None or utcnow() >= self._expiry_check_at:
            await self._expire_jobs()
        for node in self._inventory.due_for_persist(self._settings.node_persist_interval):
            self._persist(node)

    # --- job timeouts --------------------------------------------------------------------------
    #
    # Instead of asking the database for expired jobs on every tick, ask it for the jobs due
    # within a horizon and look again at the soonest of their deadlines, or at the horizon. A
    # deadline set after that query is never sooner than the horizon: a job entering InProgress
    # gets now + its timeout + job_timeout_grace, one entering Queued now + queue_timeout, and
    # the horizon is the smaller of the two (grace and queue timeout; never below a tick). The
    # one exception is a job queued again, which keeps its first queue deadline: the history
    # listener makes the next tick look. Nothing is skipped after a restart: the first tick asks.

    def _horizon(self) -> timedelta:
        s = self._settings
        gap = min(s.queue_timeout, s.job_timeout_grace, _MAX_HORIZON_S)
        return timedelta(seconds=max(s.housekeeping_interval, gap))

    async def _expire_jobs(self) -> None:
        self._expiry_check_at = None  # stays so if anything below fails: retried next tick
        requeued = self._requeued
        now = utcnow()
        horizon = now + self._horizon()
        found = await self._store.list_expired_jobs(horizon, limit=_EXPIRY_PAGE)
        later: list[datetime] = []
        for job in found:
            due = _deadline(job)
            if due is None:
                continue
            if due <= now:
                await self._orchestrator.expire(job, utcnow())
            else:
                later.append(due)
        # A job queued while the query ran may not be in its answer: then look again next tick.
        if len(found) < _EXPIRY_PAGE and requeued == self._requeued:
            self._expiry_check_at = min(later, default=horizon)

    def _history(self, rows: Sequence[HistoryRecord]) -> None:
        """After each commit: a job queued (again) may carry a deadline sooner than planned."""
        for row in rows:
            if row.new == _QUEUED and row.type is JobHistoryType.JOB_LEVEL:
                self._requeued += 1
                self._expiry_check_at = None
                return


_QUEUED = JobStateType.QUEUED.value


def _deadline(job: JobRecord) -> datetime | None:
    """When ``job`` expires, as list_expired_jobs reads it (timeout, or queue deadline)."""
    dates = []
    if job.state in (JobStateType.IN_PROGRESS, JobStateType.QUEUED) and job.timeout_at:
        dates.append(job.timeout_at)
    if job.state is JobStateType.QUEUED and job.queue_deadline:
        dates.append(job.queue_deadline)
    return min(dates, default=None)
