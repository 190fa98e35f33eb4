"""The executor queue: accepted executions wait here until the node has room to run them.

Starting is event-driven (a push or a finished run re-examines the queue), never polled. The
queue is FIFO with backfill: an execution that fits starts even if an older, bigger one is still
waiting, which keeps the node busy; the older one starts as soon as enough frees up.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from shoal_compute import metrics
from shoal_compute.domain.capacity import Allocation, CapacityLedger

StartFn = Callable[[str, Allocation], None]


class ExecutorQueue:
    """Holds accepted executions and starts them when their allocation fits (never over)."""

    def __init__(self, ledger: CapacityLedger, start: StartFn) -> None:
        self._ledger = ledger
        self._start = start
        self._waiting: OrderedDict[str, None] = OrderedDict()
        self._running: set[str] = set()

    def push(self, execution_id: str) -> None:
        """Queue an execution whose capacity is already committed, and start what fits."""
        if execution_id in self._waiting or execution_id in self._running:
            return
        self._waiting[execution_id] = None
        metrics.QUEUED.inc()
        self.pump()

    def remove(self, execution_id: str) -> bool:
        """Take a waiting execution out (cancelled); False if it is not waiting."""
        if execution_id not in self._waiting:
            return False
        del self._waiting[execution_id]
        metrics.QUEUED.dec()
        self._ledger.release(execution_id)
        return True

    def done(self, execution_id: str) -> None:
        """A run ended: free its allocation and commitment, start whatever now fits."""
        if execution_id in self._running:
            self._running.discard(execution_id)
            metrics.RUNNING.dec()
        if execution_id in self._waiting:
            del self._waiting[execution_id]
            metrics.QUEUED.dec()
        self._ledger.release(execution_id)
        self.pump()

    def pump(self) -> None:
        """Start every waiting execution that fits, oldest first."""
        for execution_id in list(self._waiting):
            alloc = self._ledger.try_start(execution_id)
            if alloc is None:
                continue
            del self._waiting[execution_id]
            self._running.add(execution_id)
            metrics.QUEUED.dec()
            metrics.RUNNING.inc()
            self._start(execution_id, alloc)

    def is_waiting(self, execution_id: str) -> bool:
        return execution_id in self._waiting

    def is_running(self, execution_id: str) -> bool:
        return execution_id in self._running

    @property
    def waiting_count(self) -> int:
        return len(self._waiting)

    @property
    def running_count(self) -> int:
        return len(self._running)
