"""Which nodes can run a job (filter) and in which order to ask them (rank).

The filter is static: capabilities, labels, per-job limits, timeout bounds. Whether a node has
room *now* is a separate question (free capacity), so a job that fits only busy nodes waits in
Queued instead of failing.

Ranking is weighted rendezvous hashing of (job id, node id): every requester (and every retry)
computes the same order for a job without coordination, consecutive jobs spread across nodes,
and the weight (free capacity times reputation) tilts the choice towards emptier nodes with a
good record.
Soft ``favour_<key>`` selectors come first: a node that satisfies more preferences always ranks
above one that satisfies fewer.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from shoal_common.protocol import Capacity, NodeInfo
from shoal_common.selectors import matches
from shoal_common.spec import (
    Engine,
    LabelSelector,
    PublisherType,
    Spec,
    StorageSourceType,
    StorageSpec,
    VerifierType,
)
from shoal_requester.domain.model import NodeStanding

FAVOUR_PREFIX = "favour_"

# Reputation of a node in (0, 1] (1 = trusted): a factor of its ranking weight.
Reputation = Callable[[str], float]

# How a node's record becomes that factor (see reputation_weight).
PRIOR_GOOD = 5.0  # a new node counts as if this many executions had gone well
REJECTION_COST = 10.0  # one wrong result weighs as much as this many good ones
FAILURE_COST = 1.0
REJECTION_HALF_LIFE = 3600.0  # seconds: the cost of past rejections halves this often
MIN_REPUTATION = 0.02  # never 0: a flagged node keeps a small share and can earn its way back


def full_reputation(_node_id: str) -> float:
    return 1.0


def reputation_weight(standing: NodeStanding, now: datetime) -> float:
    """A node's reputation factor from its record: the share of its weighted history that was
    good, with ``PRIOR_GOOD`` good runs assumed, in ``[MIN_REPUTATION, 1]``.

    A wrong result costs ``REJECTION_COST`` good runs, so one rejection takes a new node to a
    third of a clean node's share of jobs, and a node caught repeatedly soon gets almost none.
    Nothing bans a node: accepted results raise it again, and the weight of rejections halves
    every ``REJECTION_HALF_LIFE`` after the last one (a fixed node is not punished for ever).
    """
    rejected = float(standing.rejected)
    if rejected and standing.last_rejected is not None:
        age = max(0.0, (now - standing.last_rejected).total_seconds())
        rejected *= 0.5 ** (age / REJECTION_HALF_LIFE)
    good = standing.completed + PRIOR_GOOD
    bad = REJECTION_COST * rejected + FAILURE_COST * standing.failed
    return max(MIN_REPUTATION, good / (good + bad))


_FIT_KEY_IDS = itertools.count()


@dataclass(frozen=True)
class Requirements:
    """What a node must offer to run one execution of a job."""

    engine: Engine | None
    storage_sources: frozenset[StorageSourceType]
    publisher: PublisherType
    verifier: VerifierType
    resources: Capacity
    timeout: float
    client_id: str
    selectors: tuple[LabelSelector, ...]
    preferences: tuple[LabelSelector, ...]
    # The same number for requirements that ``misfit`` cannot tell apart (see ``fit_key``):
    # nodes remember their verdict by it. Unique unless built by ``requirements``.
    fit_key: int = field(default_factory=lambda: next(_FIT_KEY_IDS), compare=False)


@functools.lru_cache(maxsize=4096)
def fit_key(parts: tuple[object, ...]) -> int:
    """What misfit reads of a job's requirements -> its fit_key. Numbers are never reused, so
    an eviction only costs the nodes' remembered verdicts a recomputation."""
    return next(_FIT_KEY_IDS)


def storage_specs(spec: Spec) -> list[StorageSpec]:
    """Everything a node must fetch: inputs plus WASM modules (as the compute node sees it)."""
    specs = list(spec.inputs or [])
    if spec.wasm is not None:
        if spec.wasm.entry_module is not None and (
            spec.wasm.entry_module.storage_source or spec.wasm.entry_module.cid
        ):
            specs.append(spec.wasm.entry_module)
        specs.extend(spec.wasm.import_modules or [])
    return specs


def storage_source(storage: StorageSpec) -> StorageSourceType | None:
    return storage.storage_source or (StorageSourceType.IPFS if storage.cid else None)


def split_selectors(
    selectors: Sequence[LabelSelector],
) -> tuple[tuple[LabelSelector, ...], tuple[LabelSelector, ...]]:
    """Hard requirements and ``favour_`` preferences (with the prefix removed)."""
    hard, soft = [], []
    for s in selectors:
        if s.key.startswith(FAVOUR_PREFIX) and len(s.key) > len(FAVOUR_PREFIX):
            soft.append(s.model_copy(update={"key": s.key[len(FAVOUR_PREFIX) :]}))
        else:
            hard.append(s)
    return tuple(hard), tuple(soft)


def requirements(spec: Spec, *, client_id: str, resources: Capacity) -> Requirements:
    hard, soft = split_selectors(spec.node_selectors or [])
    sources = frozenset(src for s in storage_specs(spec) if (src := storage_source(s)) is not None)
    publisher, verifier = spec.effective_publisher, spec.effective_verifier
    timeout = float(spec.timeout or 0.0)
    # Everything misfit reads of the requirements, as strings and numbers: they hash in C (an
    # enum member's hash is a Python call), and this runs once per placement.
    parts = (
        spec.engine.value if spec.engine is not None else None,
        tuple(sorted(src.value for src in sources)) if sources else (),
        publisher.value,
        verifier.value,
        (resources.cpu, resources.memory, resources.disk, resources.gpu),
        timeout,
        client_id,
        tuple((s.key, s.operator.value, tuple(s.values or ())) for s in hard),
    )
    return Requirements(
        engine=spec.engine,
        storage_sources=sources,
        publisher=publisher,
        verifier=verifier,
        resources=resources,
        timeout=timeout,
        client_id=client_id,
        selectors=hard,
        preferences=soft,
        fit_key=fit_key(parts),
    )


def node_labels(info: NodeInfo) -> dict[str, str]:
    """The node's labels plus implicit ones a selector may use (explicit labels win)."""
    labels = {"name": info.node_id, "node-id": info.node_id, "arch": info.arch}
    labels.update(info.labels)
    return labels


def per_job_limit(info: NodeInfo) -> Capacity:
    """The node's per-job maximum; a node that reports none is limited by its total only."""
    limit = info.max_per_job
    if limit.cpu == 0 and limit.memory == 0 and limit.disk == 0 and limit.gpu == 0:
        return info.total
    return limit


def misfit(info: NodeInfo, req: Requirements) -> str | None:
    """Why this node can never run the job, or None if it can (given free capacity)."""
    if req.engine is None or req.engine not in info.engines:
        return f"engine {req.engine.value if req.engine else '?'} not available"
    missing = req.storage_sources.difference(info.storage_sources)
    if missing:
        return f"storage source {sorted(m.value for m in missing)[0]} not supported"
    if req.publisher not in info.publishers:
        return f"publisher {req.publisher.value} not supported"
    if req.verifier not in info.verifiers:
        return f"verifier {req.verifier.value} not supported"
    if req.selectors:
        labels = node_labels(info)
        for selector in req.selectors:
            if not matches(selector, labels):
                return f"label selector {describe_selector(selector)} not matched"
    need, limit = req.resources, per_job_limit(info)
    if not need.fits_in(limit) or not need.fits_in(info.total):
        return f"job needs more resources than the node allows per job ({_describe(need)})"
    if req.client_id not in info.bypass_clients:
        if info.timeout_max is not None and req.timeout > info.timeout_max:
            return f"timeout {req.timeout:g}s above the node's maximum {info.timeout_max:g}s"
        if info.timeout_min is not None and req.timeout < info.timeout_min:
            return f"timeout {req.timeout:g}s below the node's minimum {info.timeout_min:g}s"
    return None


def preference_score(info: NodeInfo, req: Requirements) -> int:
    if not req.preferences:
        return 0
    labels = node_labels(info)
    return sum(1 for s in req.preferences if matches(s, labels))


def rendezvous(job_id: str, node_id: str, weight: float) -> float:
    """Weighted rendezvous score: higher wins; ``weight`` scales a node's share of jobs."""
    digest = hashlib.blake2b(f"{job_id}\x00{node_id}".encode(), digest_size=8).digest()
    # A uniform draw in (0, 1), never 0 or 1, so the logarithm is finite and negative.
    u = (int.from_bytes(digest, "big") + 1) / (2**64 + 1)
    return -max(weight, 1e-6) / math.log(u)


def rendezvous_start(job_id: str, count: int) -> int:
    """Where a job's window over ``count`` nodes starts: uniform, and the same on every retry."""
    digest = hashlib.blake2b(job_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count if count else 0


def capacity_weight(free: Capacity, total: Capacity) -> float:
    return room_weight(free.free_fraction(total))


def room_weight(free_fraction: float) -> float:
    """A node's ranking weight for its free share (``Capacity.free_fraction``)."""
    # A floor so a nearly-full node still gets a (small) share instead of none.
    return 0.05 + free_fraction


def describe_selector(s: LabelSelector) -> str:
    values = s.values or []
    if s.operator.value in ("in", "notin"):
        return f"{s.key} {s.operator.value} ({','.join(values)})"
    if s.operator.value in ("exists",):
        return s.key
    if s.operator.value == "!":
        return f"!{s.key}"
    if s.operator.value in ("gt", "lt"):
        return f"{s.key} {'>' if s.operator.value == 'gt' else '<'} {values[0] if values else ''}"
    return f"{s.key}{s.operator.value}{values[0] if values else ''}"


def _describe(c: Capacity) -> str:
    parts = [f"cpu {c.cpu:g}", f"memory {c.memory}"]
    if c.disk:
        parts.append(f"disk {c.disk}")
    if c.gpu:
        parts.append(f"gpu {c.gpu}")
    return ", ".join(parts)
