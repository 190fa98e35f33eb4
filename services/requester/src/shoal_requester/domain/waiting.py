"""Why a job waits, in plain words: what ``shoal describe`` shows for a Queued job.

The scheduler knows which nodes could run a job at all (matching) and which have room now
(the inventory); an operator wants the difference said plainly, e.g. "no node with 2 GPUs free;
3 nodes match the selector", not a state name.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from shoal_common.protocol import Capacity, NodeInfo
from shoal_requester.domain.matching import Requirements, misfit


def explain_wait(
    req: Requirements,
    nodes: Sequence[tuple[NodeInfo, Capacity]],
    *,
    taken: frozenset[str] = frozenset(),
    min_free: int = 1,
) -> str | None:
    """Why no node can take the job right now, in plain words (``shoal describe`` shows it).

    ``nodes`` are the schedulable nodes with their free capacity, ``taken`` the nodes already
    running one of the job's executions, ``min_free`` how many nodes must be free at once (min
    bids). The answer says what is short and how many nodes could run the job at all, e.g.
    "no node with 2 GPUs free; 3 nodes match the selector". None when enough nodes have room
    (then only their bid answers can say why the job waits).
    """
    if not nodes:
        return "no compute node is live"
    fitting: list[tuple[NodeInfo, Capacity]] = []
    misfits: Counter[str] = Counter()
    for info, free in nodes:
        why = misfit(info, req)
        if why is None:
            fitting.append((info, free))
        else:
            misfits[why] += 1
    if not fitting:
        shown = "; ".join(f"{why} on {_count(n, 'node')}" for why, n in misfits.most_common(3))
        return f"none of the {_count(len(nodes), 'live node')} can run the job ({shown})"
    matched = _matched(len(fitting), selectors=bool(req.selectors))
    running = sum(1 for info, _ in fitting if info.node_id in taken)
    if running:
        matched += f" ({running} already running it)"
    candidates = [free for info, free in fitting if info.node_id not in taken]
    if not candidates:
        return f"every node that can run the job already runs it; {matched}"
    need = req.resources
    free_now = sum(1 for free in candidates if need.fits_in(free))
    if free_now >= min_free:
        return None
    if free_now:
        # Some have room, but not enough of them at once (min bids).
        verb = "is" if free_now == 1 else "are"
        return (
            f"{free_now} of the {min_free} nodes needed at once (min bids) {verb} free; {matched}"
        )
    wanted = [(amount, text) for amount, text in _amounts(need) if amount > 0]
    short = [
        text
        for (amount, text), dim in zip(_amounts(need), _DIMENSIONS, strict=True)
        if amount > 0 and not any(getattr(free, dim) >= amount - 1e-9 for free in candidates)
    ]
    if short:
        return f"no node with {' or '.join(short)} free; {matched}"
    together = " and ".join(text for _, text in wanted)
    return f"no node with {together} free at once; {matched}"


def explain_declined(said: Sequence[tuple[str, str]], fitting: int, *, selectors: bool) -> str:
    """Why a job waits after every node asked said no: (node id, its reason), a few shown."""
    words = sorted({f"{node}: {reason}" for node, reason in said})
    shown = "; ".join(words[:3]) + (f"; and {len(words) - 3} more" if len(words) > 3 else "")
    asked = _count(len(said), "node")
    return f"{asked} asked, none took the job ({shown}); {_matched(fitting, selectors=selectors)}"


def _matched(n: int, *, selectors: bool) -> str:
    verb = "matches" if n == 1 else "match"
    return f"{_count(n, 'node')} {verb} " + ("the selector" if selectors else "the job")


_DIMENSIONS = ("gpu", "cpu", "memory", "disk")


def _amounts(c: Capacity) -> list[tuple[float, str]]:
    """Each dimension of ``c`` (in :data:`_DIMENSIONS` order) with its plain-words form."""
    return [
        (c.gpu, _count(c.gpu, "GPU")),
        (c.cpu, f"{c.cpu:g} CPU" + ("s" if c.cpu > 1 else "")),
        (c.memory, f"{_size(c.memory)} of memory"),
        (c.disk, f"{_size(c.disk)} of disk"),
    ]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _size(n: int) -> str:
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= factor:
            return f"{n / factor:.3g} {unit}"
    return f"{n} bytes"
