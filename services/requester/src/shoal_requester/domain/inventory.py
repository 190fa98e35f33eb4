"""The live node inventory, fed by heartbeats, with the requester's own capacity accounting.

A heartbeat says what a node had free when it was sent; everything the requester placed since
is not in it yet. So each node's free capacity is::

    free = reported - (holds placed since the last heartbeat)
                    + (holds released since the last heartbeat that the report still counted)

where a *hold* is one execution of ours in a capacity-holding state (asked, bid accepted,
running). Heartbeats reset the correction. It is an estimate: the node's own books decide, and
a node asked beyond its capacity just says no.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime

from shoal_common.protocol import Capacity, Heartbeat, NodeInfo
from shoal_common.spec import utcnow
from shoal_requester.domain.matching import Requirements, misfit
from shoal_requester.domain.model import NodeRecord, NodeStanding

LIVE = "live"
LOST = "lost"
STOPPING = "stopping"
# Loaded from the database at start-up: schedulable until it misses its first heartbeats.
PRESUMED = "presumed"

_NO_RECORD = NodeStanding()
_NOTHING_FREE = Capacity()
_VOLATILE = frozenset({"available", "running", "queued", "local_cids"})
_FITS_EPS = 1e-9  # as Capacity.fits_in
_MISFITS_KEPT = 256


@dataclass
class TrackedNode:
    """One node as the inventory sees it."""

    info: NodeInfo
    state: str
    first_seen: datetime
    last_seen: datetime  # wall clock of the last heartbeat (for people)
    last_seen_mono: float  # monotonic clock of the last heartbeat (for loss detection)
    epoch: int = 0  # heartbeats received; holds placed in the current epoch are not reported
    pending: Capacity = field(default_factory=Capacity)
    freed: Capacity = field(default_factory=Capacity)
    holds: int = 0
    signature: tuple[object, ...] = ()  # the non-volatile info, to persist only real changes
    persisted_mono: float = 0.0
    # The node refused a bid for capacity: nothing free until its next heartbeat says otherwise.
    full: bool = False
    # misfit verdicts by Requirements.fit_key, kept while the node's capabilities (its
    # signature: everything misfit reads of it) stay the same.
    misfits: dict[int, str | None] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.info.node_id

    @property
    def schedulable(self) -> bool:
        return self.state in (LIVE, PRESUMED)

    @property
    def free(self) -> Capacity:
        # Field by field into one model (not three): this runs for every candidate of every
        # placement.
        if self.full:
            return _NOTHING_FREE
        a, p, f, total = self.info.available, self.pending, self.freed, self.info.total
        return Capacity(
            cpu=min(a.cpu - p.cpu + f.cpu, total.cpu),
            memory=min(a.memory - p.memory + f.memory, total.memory),
            disk=min(a.disk - p.disk + f.disk, total.disk),
            gpu=min(a.gpu - p.gpu + f.gpu, total.gpu),
        )

    def misfit(self, req: Requirements) -> str | None:
        """``matching.misfit`` of this node for ``req``, remembered (every placement asks it of
        every candidate, and few jobs differ in what it reads)."""
        try:
            return self.misfits[req.fit_key]
        except KeyError:
            if len(self.misfits) >= _MISFITS_KEPT:
                self.misfits.clear()
            why = self.misfits[req.fit_key] = misfit(self.info, req)
            return why

    def room_for(self, need: Capacity) -> float | None:
        """``free.free_fraction(total)`` if ``need`` fits in :attr:`free` (``fits_in``), else
        None: what placement asks of every candidate, without building the free Capacity."""
        total = self.info.total
        if self.full:
            cpu, memory, disk, gpu = 0.0, 0, 0, 0
        else:
            a, p, f = self.info.available, self.pending, self.freed
            cpu = min(a.cpu - p.cpu + f.cpu, total.cpu)
            memory = min(a.memory - p.memory + f.memory, total.memory)
            disk = min(a.disk - p.disk + f.disk, total.disk)
            gpu = min(a.gpu - p.gpu + f.gpu, total.gpu)
        if not (
            need.cpu <= cpu + _FITS_EPS
            and need.memory <= memory
            and need.disk <= disk
            and need.gpu <= gpu
        ):
            return None
        share = cpu / total.cpu if total.cpu else 1.0
        if total.memory:
            share = min(share, memory / total.memory)
        return max(0.0, share)

    def record(self) -> NodeRecord:
        return NodeRecord(
            id=self.id,
            info=self.info.model_dump(mode="json"),
            state=self.state,
            first_seen=self.first_seen,
            last_seen=self.last_seen,
        )


def _grew(before: Capacity, after: Capacity) -> bool:
    return (
        after.cpu > before.cpu + 1e-9
        or after.memory > before.memory
        or after.gpu > before.gpu
        or after.disk > before.disk
    )


@dataclass(frozen=True)
class Observation:
    """What a heartbeat changed, so callers persist and wake queued jobs only when needed."""

    node: TrackedNode
    new: bool  # first heartbeat ever, or first since it was lost
    changed: bool  # capabilities, labels or totals differ from what was persisted
    more_free: bool  # free capacity grew


@dataclass
class _Hold:
    node_id: str
    need: Capacity
    epoch: int


def _signature(info: NodeInfo) -> tuple[object, ...]:
    # Compared, never stored: the field values themselves (~5 us), not a hash of their JSON
    # (~110 us, on every heartbeat: a tenth of a core at 1,000 nodes).
    return tuple(v for k, v in info.__dict__.items() if k not in _VOLATILE)


class Inventory:
    """Nodes by id, their liveness and their free capacity (single event loop, no locks)."""

    def __init__(
        self,
        *,
        lost_after: float,
        all_silent_after: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lost_after = lost_after
        # Every node silent at once is this requester's link (or NATS) failing far more often
        # than every node dying at once: then nodes are judged only once heartbeats flow again
        # (each gets ``lost_after`` from then), or after this long in any case (B21).
        self._all_silent_after = all_silent_after or max(30.0, 4 * lost_after)
        self._last_heard: float | None = None  # monotonic time of the last heartbeat of any node
        self._heard_again = float("-inf")  # when heartbeats came back after everyone was silent
        self._clock = clock
        self._nodes: dict[str, TrackedNode] = {}
        self._holds: dict[str, _Hold] = {}
        # Reputation by node id, lost nodes included (a node that comes back keeps its record):
        # loaded from the store, then kept up to date with what this process commits.
        self._standing: dict[str, NodeStanding] = {}
        # schedulable() per placement was O(cluster); rebuilt only when membership or a state
        # changes (heartbeats that change neither leave it be).
        self._schedulable: list[TrackedNode] | None = None

    # --- liveness ----------------------------------------------------------------------------

    def load(self, records: Iterable[NodeRecord]) -> None:
        """Nodes persisted by a previous run: presumed live until they miss heartbeats."""
        now = self._clock()
        for rec in records:
            self._standing.setdefault(rec.id, rec.standing)
            if rec.state == LOST or rec.id in self._nodes:
                continue
            info = NodeInfo.model_validate(rec.info)
            self._schedulable = None
            self._nodes[rec.id] = TrackedNode(
                info=info,
                state=PRESUMED,
                first_seen=rec.first_seen,
                last_seen=rec.last_seen,
                last_seen_mono=now,
                signature=_signature(info),
                persisted_mono=now,
            )

    def observe(self, beat: Heartbeat) -> Observation:
        info = beat.info
        now_mono, now = self._clock(), utcnow()
        if self._last_heard is not None and now_mono - self._last_heard > self._lost_after / 2:
            self._heard_again = now_mono
        self._last_heard = now_mono
        node = self._nodes.get(info.node_id)
        signature = _signature(info)
        if node is None:
            node = TrackedNode(
                info=info,
                state=STOPPING if beat.stopping else LIVE,
                first_seen=now,
                last_seen=now,
                last_seen_mono=now_mono,
                epoch=1,
                signature=signature,
            )
            self._nodes[info.node_id] = node
            self._schedulable = None
            return Observation(node=node, new=True, changed=True, more_free=True)
        before_free = node.free
        reported_before = node.info.available
        was = node.state
        node.info = info
        node.last_seen, node.last_seen_mono = now, now_mono
        node.state = STOPPING if beat.stopping else LIVE
        if node.state != was:
            self._schedulable = None
        node.epoch += 1
        node.pending, node.freed = Capacity(), Capacity()
        node.full = False
        if signature != node.signature:
            node.misfits.clear()  # its capabilities changed: judge it again
        changed = signature != node.signature or node.state != was
        node.signature = signature
        after = node.free
        # Also when the node itself reports more than last time, even if this process had
        # already counted the release: a bid refused in between (the node had not freed it yet)
        # left a job queued that only this wake-up retries.
        more_free = _grew(before_free, after) or _grew(reported_before, info.available)
        revived = was in (LOST, PRESUMED) and node.state == LIVE
        return Observation(
            node=node, new=was == LOST, changed=changed or revived, more_free=more_free or revived
        )

    def expire(self) -> list[TrackedNode]:
        """Mark nodes silent for longer than ``lost_after`` lost; return the newly lost.

        Only while heartbeats reach this requester (some node was heard within half of
        ``lost_after``), and counting each node's silence from when they came back after a
        silence of every node: a NATS restart or a cut between the requester and NATS must not
        fail every execution in flight while the nodes carry on (B21). A silence of everyone
        that lasts ``all_silent_after`` (the last node died) still marks them lost.
        """
        now = self._clock()
        heard_lately = self._last_heard is not None and now - self._last_heard <= (
            self._lost_after / 2
        )
        lost = []
        for node in self._nodes.values():
            if node.state == LOST:
                continue
            silent = now - max(node.last_seen_mono, self._heard_again)
            if (heard_lately and silent > self._lost_after) or (
                now - node.last_seen_mono > self._all_silent_after
            ):
                node.state = LOST
                self._schedulable = None
                lost.append(node)
        return lost

    def mark_persisted(self, node: TrackedNode) -> None:
        node.persisted_mono = self._clock()

    def due_for_persist(self, interval: float) -> list[TrackedNode]:
        now = self._clock()
        return [n for n in self._nodes.values() if now - n.persisted_mono >= interval]

    # --- reputation --------------------------------------------------------------------------

    def standing(self, node_id: str) -> NodeStanding:
        return self._standing.get(node_id, _NO_RECORD)

    def add_standing(self, deltas: dict[str, NodeStanding]) -> None:
        """Count what a committed change added (``model.standing_changes``)."""
        for node_id, delta in deltas.items():
            self._standing[node_id] = self.standing(node_id) + delta

    # --- reading -----------------------------------------------------------------------------

    def get(self, node_id: str) -> TrackedNode | None:
        return self._nodes.get(node_id)

    def all(self) -> list[TrackedNode]:
        return [self._nodes[k] for k in sorted(self._nodes)]

    def schedulable(self) -> list[TrackedNode]:
        """Live (or presumed live) nodes, in a stable order; callers must not modify it."""
        if self._schedulable is None:
            self._schedulable = [n for n in self._nodes.values() if n.schedulable]
        return self._schedulable

    def live_count(self) -> int:
        return sum(1 for n in self._nodes.values() if n.state == LIVE)

    def count_by_state(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self._nodes.values():
            counts[node.state] = counts.get(node.state, 0) + 1
        return counts

    # --- capacity ----------------------------------------------------------------------------

    def hold(self, node_id: str, execution_id: str, need: Capacity) -> None:
        """Count ``need`` against the node until :meth:`release` (idempotent)."""
        node = self._nodes.get(node_id)
        if node is None or execution_id in self._holds:
            return
        self._holds[execution_id] = _Hold(node_id, need, node.epoch)
        node.pending = node.pending + need
        node.holds += 1

    def mark_full(self, node_id: str) -> None:
        """The node refused a bid for capacity: count it as full until it next reports."""
        node = self._nodes.get(node_id)
        if node is not None:
            node.full = True

    def release(self, execution_id: str) -> bool:
        """Give an execution's capacity back; True if it held any."""
        hold = self._holds.pop(execution_id, None)
        if hold is None:
            return False
        node = self._nodes.get(hold.node_id)
        if node is None:
            return True
        node.holds -= 1
        if hold.epoch == node.epoch:
            node.pending = node.pending - hold.need
        else:
            node.freed = node.freed + hold.need
        return True

    def holds_on(self, node_id: str) -> int:
        node = self._nodes.get(node_id)
        return node.holds if node else 0
