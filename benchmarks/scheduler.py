"""Placement decisions per second with 1,000 nodes, in process (issue 6, target 5).

    uv run python benchmarks/scheduler.py --nodes 1000 --jobs 5000

The requester's own domain objects, as ``RequesterService`` wires them: an ``Inventory`` fed
one heartbeat per fake node (4 CPU / 8 GiB each, every engine), the ``Orchestrator`` on the SQL
store on SQLite (WAL, synchronous=FULL: each decision is durably recorded before it counts),
and a ``ComputeClient`` whose nodes say yes at once (the round trip to a node is the devstack
benchmarks' business; here it is what the requester decides and writes). The request and answer
are still encoded and decoded (``--no-wire`` skips that).

One decision = ``Orchestrator.place`` of a New job with concurrency 1: filter the live nodes,
rank them (rendezvous hash weighted by free capacity), ask the top one, record the execution
BidAccepted and the job InProgress in one transaction (with history rows), then send the
acceptance. Jobs are created first (not timed); ``--inflight`` placements run at once, as
concurrent submits would make them (the SQLite store commits them in groups).

Also measured: the same on the memory store (the store's share of the cost), and the filter +
rank step alone per job (the part that grows with the cluster).

Target: >= 2,000 decisions/s with 1,000 nodes, decision durably recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Environment, add_common_args, emit
from shoal_common import collector, event_loop
from shoal_common.protocol import (
    Ack,
    AskBid,
    BidAnswer,
    BidDecision,
    CancelExecution,
    Heartbeat,
    LogsAnswer,
    LogsQuery,
)
from shoal_common.spec import JobStateType
from shoal_requester.domain.inventory import Inventory
from shoal_requester.domain.orchestrator import Orchestrator
from shoal_requester.settings import RequesterSettings
from shoal_requester.store.base import RequesterStore
from shoal_requester.store.memory import MemoryRequesterStore
from shoal_requester.store.sql import SqlRequesterStore
from shoal_requester.testing import make_job, node_info


class YesCompute:
    """Every node bids yes at once; messages are encoded and decoded as on the wire."""

    def __init__(self, *, wire: bool) -> None:
        self.wire = wire
        self.asked = 0
        self.accepted = 0

    async def ask_bid(self, node_id: str, ask: AskBid, *, timeout: float) -> BidAnswer:
        self.asked += 1
        answer = BidAnswer(execution_id=ask.execution_id, accepted=True)
        if self.wire:
            ask.to_bytes()
            return BidAnswer.model_validate(orjson.loads(answer.to_bytes()))
        return answer

    async def bid_accepted(self, node_id: str, decision: BidDecision) -> Ack:
        self.accepted += 1
        if self.wire:
            decision.to_bytes()
        return Ack()

    async def bid_rejected(self, node_id: str, decision: BidDecision) -> Ack:
        return Ack()

    async def cancel(self, node_id: str, request: CancelExecution) -> Ack:
        return Ack()

    async def logs(self, node_id: str, query: LogsQuery) -> LogsAnswer:
        return LogsAnswer(execution_id=query.execution_id, finished=True)

    async def approve(self, node_id: str, decision: Any) -> Ack:
        return Ack()


def inventory_of(nodes: int) -> Inventory:
    inventory = Inventory(lost_after=3600.0)
    for i in range(nodes):
        beat = Heartbeat(info=node_info(f"node-{i:04d}"), seq=1, sent_at=time.time())
        inventory.observe(beat)
    return inventory


async def placement_rate(
    store: RequesterStore,
    *,
    nodes: int,
    jobs: int,
    inflight: int,
    wire: bool,
    profiler: cProfile.Profile | None = None,
) -> dict[str, Any]:
    settings = RequesterSettings(state_dir=Path(tempfile.mkdtemp()), node_id="requester")
    compute = YesCompute(wire=wire)
    orchestrator = Orchestrator(
        store=store, inventory=inventory_of(nodes), compute=compute, settings=settings
    )
    await store.open()
    orchestrator.start()
    collector.tune_for_service()  # as `shoal serve` does once the service is up (ADR 0018)
    try:
        records = [make_job() for _ in range(jobs)]
        for i in range(0, jobs, 256):  # create in batches (group commit), untimed
            await asyncio.gather(*(store.create_job(r) for r in records[i : i + 256]))
        queue = list(reversed(records))
        per_decision: list[float] = []

        async def worker() -> None:
            while queue:
                job = queue.pop()
                t = time.perf_counter()
                await orchestrator.place(job.id, fresh=job, executions=[])
                per_decision.append(time.perf_counter() - t)

        if profiler is not None:  # the timed part only, not the creation of the jobs
            profiler.enable()
        t0, cpu0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker() for _ in range(inflight)))
        await orchestrator.idle()
        elapsed = time.perf_counter() - t0
        if profiler is not None:
            profiler.disable()
        # CPU of this process (every thread) per decision: comparable on a busy machine.
        cpu = time.process_time() - cpu0
        placed = await store.list_jobs_in_states([JobStateType.IN_PROGRESS], limit=jobs + 1)
    finally:
        await orchestrator.stop()
        await store.close()
    return {
        "decisions_per_s": round(jobs / elapsed, 1),
        "placed": len(placed),
        "decision_p50_ms": round(statistics.median(per_decision) * 1000, 2),
        "cpu_us_per_decision": round(cpu / jobs * 1e6, 1),
        "asked": compute.asked,
    }


def filter_rank_cost(nodes: int, samples: int) -> float | None:
    """CPU microseconds to filter and rank ``nodes`` for one job (the O(cluster) step)."""
    settings = RequesterSettings(state_dir=Path(tempfile.mkdtemp()), node_id="requester")
    orchestrator = Orchestrator(
        store=MemoryRequesterStore(),
        inventory=inventory_of(nodes),
        compute=YesCompute(wire=False),
        settings=settings,
    )
    try:
        candidates = orchestrator._candidates
        requirements = orchestrator._requirements
    except AttributeError:  # private helpers: renamed since this was written
        return None
    jobs = [make_job() for _ in range(samples)]
    t = time.process_time()
    for job in jobs:
        candidates(job, requirements(job), [])
    return (time.process_time() - t) / samples * 1e6


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    figures: dict[str, Any] = {
        "nodes": args.nodes,
        "jobs": args.jobs,
        "inflight": args.inflight,
        "wire": not args.no_wire,
    }
    with Environment() as env:
        db = Path(tempfile.mkdtemp(prefix="shoal-sched-")) / "requester.sqlite"
        sql = await placement_rate(
            SqlRequesterStore(f"sqlite+aiosqlite:///{db}"),
            nodes=args.nodes,
            jobs=args.jobs,
            inflight=args.inflight,
            wire=not args.no_wire,
        )
    figures.update({f"sqlite_{k}": v for k, v in sql.items()})
    figures["decisions_per_s"] = sql["decisions_per_s"]
    mem = await placement_rate(
        MemoryRequesterStore(),
        nodes=args.nodes,
        jobs=args.jobs,
        inflight=args.inflight,
        wire=not args.no_wire,
    )
    figures.update({f"memory_{k}": v for k, v in mem.items()})
    cost = filter_rank_cost(args.nodes, 200)
    figures["filter_rank_us_per_job"] = round(cost, 1) if cost is not None else None
    small = filter_rank_cost(10, 2000)
    figures["filter_rank_us_per_job_10_nodes"] = round(small, 1) if small is not None else None
    figures.update(env.figures())
    return figures


def write_profile(args: argparse.Namespace) -> Path:
    """cProfile of the SQLite placement run (deterministic, so percentages of profiled time).

    The timed placements only (creating the jobs is left out), and the event loop's thread
    only: the store's writer thread (statements, commit) is not in it.
    """
    import io
    import pstats
    from datetime import UTC, datetime

    from benchmarks.common import HERE, command_line, git_commit

    db = Path(tempfile.mkdtemp(prefix="shoal-sched-")) / "requester.sqlite"
    profiler = cProfile.Profile()
    figures = asyncio.run(
        placement_rate(
            SqlRequesterStore(f"sqlite+aiosqlite:///{db}"),
            nodes=args.nodes,
            jobs=args.profile_jobs,
            inflight=args.inflight,
            wire=not args.no_wire,
            profiler=profiler,
        )
    )
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(r"shoal_", 25)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = HERE / "profiles" / f"scheduler-{stamp}.txt"
    out.parent.mkdir(exist_ok=True)
    out.write_text(
        f"# cProfile of Orchestrator.place, {args.nodes} nodes, {args.profile_jobs} jobs, "
        f"SQLite ({stamp}); placements only, event-loop thread only\n"
        f"command: {command_line()}\ngit: {git_commit()}\n"
        f"figures under the profiler (slower than without): {figures}\n\n"
        + "\n".join(line.rstrip() for line in text.getvalue().splitlines())
        + "\n"
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--jobs", type=int, default=5000)
    p.add_argument("--inflight", type=int, default=64, help="Placements running at once.")
    p.add_argument("--no-wire", action="store_true", help="Skip message encoding/decoding.")
    p.add_argument(
        "--profile-jobs",
        type=int,
        default=0,
        help="Instead: profile N placements (cProfile) into benchmarks/profiles/.",
    )
    add_common_args(p)
    args = p.parse_args()
    if args.profile_jobs:
        print(f"written {write_profile(args)}")
        return
    # On the loop `shoal serve` runs the requester on (uvloop unless SHOAL_EVENT_LOOP=asyncio).
    emit("scheduler", event_loop.run(measure(args)), args.json_out)


if __name__ == "__main__":
    main()
