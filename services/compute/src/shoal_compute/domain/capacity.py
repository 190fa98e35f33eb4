"""Capacity accounting of one node: what is promised (bids) and what is in use (runs).

Two levels, so a node can hold a small queue without ever over-committing its hardware:

* **committed** = reserved (said yes, no decision yet) + queued + running. A bid is only
  answered yes while ``committed + job`` fits in ``total x (1 + queue_factor)`` (GPUs: in
  ``total``; they are never queued for).
* **running** = what the executor queue has started. A start needs ``running + job <= total``
  and enough free GPU ids, which are then assigned to that execution alone (behaviour 26).

Everything here is synchronous and runs on the event loop thread, so no locks are needed.
"""

from __future__ import annotations

from dataclasses import dataclass

from shoal_common.protocol import Capacity
from shoal_compute import metrics


@dataclass(frozen=True)
class Allocation:
    """What one started execution holds: its resources and its concrete GPU devices."""

    capacity: Capacity
    gpu_ids: tuple[str, ...] = ()


def _scaled(total: Capacity, factor: float) -> Capacity:
    # GPUs are not queued for: a GPU job waiting here behind another would hold its place while
    # a GPU on another node sits idle (behaviour 26). It waits at the requester instead, which
    # places it on whichever node frees a GPU first.
    return Capacity(
        cpu=total.cpu * factor,
        memory=int(total.memory * factor),
        disk=int(total.disk * factor),
        gpu=total.gpu,
    )


class CapacityLedger:
    """The node's books: commitments (bids) and allocations (runs)."""

    def __init__(
        self, total: Capacity, gpu_ids: tuple[str, ...] = (), *, queue_factor: float = 1.0
    ) -> None:
        if len(gpu_ids) != total.gpu:
            raise ValueError(f"{total.gpu} GPUs declared but {len(gpu_ids)} GPU ids given")
        self.total = total
        self.gpu_ids = gpu_ids
        self.commit_limit = _scaled(total, 1.0 + max(0.0, queue_factor))
        self._committed: dict[str, Capacity] = {}
        self._running: dict[str, Allocation] = {}
        self._committed_sum = Capacity()
        self._running_sum = Capacity()
        metrics.watch_capacity(self)

    # --- bids ---

    def fits_node(self, need: Capacity) -> bool:
        """Whether a job of this size could ever run here (whole node free)."""
        return need.fits_in(self.total)

    def try_commit(self, execution_id: str, need: Capacity) -> bool:
        """Promise ``need`` to an execution if the books allow; idempotent per execution."""
        if execution_id in self._committed:
            return True
        if not self.fits_node(need) or not (self._committed_sum + need).fits_in(self.commit_limit):
            return False
        self._committed[execution_id] = need
        self._committed_sum = self._committed_sum + need
        return True

    def is_committed(self, execution_id: str) -> bool:
        return execution_id in self._committed

    def release(self, execution_id: str) -> None:
        """Drop an execution's commitment and allocation (bid rejected, expired, finished)."""
        self._stop(execution_id)
        need = self._committed.pop(execution_id, None)
        if need is not None:
            self._committed_sum = self._committed_sum - need

    # --- runs ---

    def try_start(self, execution_id: str) -> Allocation | None:
        """Allocate a committed execution if it fits in what is free right now."""
        if execution_id in self._running:
            return self._running[execution_id]
        need = self._committed.get(execution_id)
        if need is None:
            raise KeyError(f"execution {execution_id} holds no commitment")
        if not (self._running_sum + need).fits_in(self.total):
            return None
        busy = {gpu for alloc in self._running.values() for gpu in alloc.gpu_ids}
        free = [gpu for gpu in self.gpu_ids if gpu not in busy]
        if len(free) < need.gpu:
            return None
        alloc = Allocation(capacity=need, gpu_ids=tuple(free[: need.gpu]))
        self._running[execution_id] = alloc
        self._running_sum = self._running_sum + need
        return alloc

    def _stop(self, execution_id: str) -> None:
        alloc = self._running.pop(execution_id, None)
        if alloc is not None:
            self._running_sum = self._running_sum - alloc.capacity

    # --- views ---

    @property
    def committed(self) -> Capacity:
        return self._committed_sum

    @property
    def in_use(self) -> Capacity:
        return self._running_sum

    @property
    def running_count(self) -> int:
        return len(self._running)

    def available(self) -> Capacity:
        """What a new job could still get without waiting (never negative), for heartbeats."""
        free = self.total - self._committed_sum
        return Capacity(
            cpu=max(0.0, round(free.cpu, 6)),
            memory=max(0, free.memory),
            disk=max(0, free.disk),
            gpu=max(0, free.gpu),
        )

    def allocation(self, execution_id: str) -> Allocation | None:
        return self._running.get(execution_id)
