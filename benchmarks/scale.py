"""Bid traffic and latency against cluster size: 10, 100, 1,000 compute nodes (issue 6, target 4).

    uv run python benchmarks/scale.py --nodes 10,100,1000 --jobs 300

For each cluster size: a devstack with that many compute nodes, then noop jobs at concurrency 1
(as benchmarks/latency.py), measuring p50/p99 latency and NATS messages per job. Heartbeats are
counted by a subscriber and taken out: they are the cluster's fixed cost (N a second), not what
a job adds. Scheduling asks only the top-ranked nodes, so messages per job should not move with
N, and neither should latency.

``bid_msgs_per_job`` is the node-addressed part alone: requests on ``shoal.compute.<node>.*``
(ask_bid, bid_accepted, bid_rejected, cancel) and their replies, counted by a subscriber on
``shoal.compute.>``. The rest of ``nats_msgs_per_job`` is the durable lifecycle (JetStream
publishes, their acks, consumer pulls and acks), which no node count touches; ``--tap``
breaks it down by subject (a ``>`` subscriber: it also receives every heartbeat, so it costs
the load generator more at 1,000 nodes).

Many nodes need the devstack's simulated-nodes mode (``shoal devstack --simulated-nodes N``:
lightweight nodes over the real NATS server; see docs/benchmarks.md). Until it exists, sizes up
to ``--real-nodes-max`` run with real compute nodes and the others are skipped with a "needs"
line. When it exists every size uses it, so the points compare like with like.

Target: messages per job <= 8 at every size; p50 at 1,000 nodes <= 1.25 x p50 at 10 nodes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    DevstackProcess,
    Environment,
    JobWatcher,
    NatsTap,
    add_common_args,
    bench_key,
    closed_loop,
    devstack_supports,
    emit,
    nats_in_msgs,
    signed_submits,
    skipped,
    summary_ms,
)

SIM_FLAG = "--simulated-nodes"
NEEDS = (
    f"`shoal devstack --noop --compute-nodes 0 {SIM_FLAG} N` "
    "(N lightweight compute nodes over the real NATS server; see docs/benchmarks.md)"
)


class Counters:
    """Heartbeats and node-addressed requests (each request has exactly one reply), counted by
    one subscriber; ``settle()`` before a snapshot, so a backlog is not counted late.

    At 1,000 nodes heartbeats are 1,000 messages a second against a few per job: a subscriber
    half a second behind at one snapshot would take hundreds of job messages out with them.
    """

    def __init__(self, nats_url: str) -> None:
        self._url = nats_url
        self.heartbeats = 0
        self.bid_requests = 0
        self._nc: Any = None
        self._subs: list[Any] = []

    async def __aenter__(self) -> Counters:
        import nats

        self._nc = await nats.connect(self._url, name="bench-scale-counters", pending_size=1 << 26)

        async def beat(_msg: Any) -> None:
            self.heartbeats += 1

        async def bid(_msg: Any) -> None:
            self.bid_requests += 1

        self._subs = [
            await self._nc.subscribe("shoal.node.heartbeat.>", cb=beat),
            await self._nc.subscribe("shoal.compute.>", cb=bid),
        ]
        await self._nc.flush()
        return self

    async def settle(self) -> tuple[int, int]:
        """Counts of everything the server routed to us before now (a PING round trip)."""
        await self._nc.flush(timeout=10)
        deadline = asyncio.get_running_loop().time() + 10
        while any(sub.pending_msgs for sub in self._subs):
            if asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.001)
        return self.heartbeats, self.bid_requests

    async def __aexit__(self, *_: object) -> None:
        if self._nc is not None:
            await self._nc.close()


async def one_size(nodes: int, simulated: bool, args: argparse.Namespace) -> dict[str, Any]:
    key = bench_key()
    warm = signed_submits(0, args.warmup)
    bodies = signed_submits(args.warmup, args.jobs)
    if simulated:
        devstack_args = ["--noop", "--compute-nodes", "0", SIM_FLAG, str(nodes)]
    else:
        devstack_args = ["--noop", "--compute-nodes", str(nodes)]
    with DevstackProcess.start(*devstack_args, timeout=300) as stack:
        monitor = stack.info.get("nats_monitor_url")
        watcher = await JobWatcher(stack.api_url).start()
        try:
            await closed_loop(stack.api_url, warm, 1, client_id=key.client_id, watcher=watcher)
            url = stack.info["nats_url"]
            tap = NatsTap(url) if args.tap else contextlib.nullcontext()
            async with Counters(url) as counters, tap:
                msgs_before = nats_in_msgs(monitor)
                beats_before, bids_before = await counters.settle()
                with Environment(devstack=stack.pids()) as env:
                    result = await closed_loop(
                        stack.api_url, bodies, 1, client_id=key.client_id, watcher=watcher
                    )
                total_msgs = nats_in_msgs(monitor) - msgs_before
                beats_after, bids_after = await counters.settle()
                heartbeats, bid_requests = beats_after - beats_before, bids_after - bids_before
            breakdown = tap.per_job(len(bodies)) if isinstance(tap, NatsTap) else None
        finally:
            await watcher.stop()
    stats = summary_ms(result.latencies)
    return {
        "mode": "simulated" if simulated else "real",
        "p50_ms": stats["p50_ms"],
        "p99_ms": stats["p99_ms"],
        "nats_msgs_per_job": round((total_msgs - heartbeats) / len(bodies), 2),
        "bid_msgs_per_job": round(2 * bid_requests / len(bodies), 2),
        "heartbeats_per_s": round(heartbeats / max(1e-9, result.wall), 1),
        "success_rate": round(len(result.latencies) / len(bodies), 4),
        "loadavg_1m_mean": env.figures()["loadavg_1m_mean"],
        "other_cpu_cores": env.figures()["other_cpu_cores"],
        **({"nats_routed_per_job_by_subject": breakdown} if breakdown else {}),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--nodes", default="10,100,1000", help="Cluster sizes, comma-separated.")
    p.add_argument("--jobs", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--real-nodes-max", type=int, default=10, help="Without simulated nodes.")
    p.add_argument("--tap", action="store_true", help="Also count NATS messages by subject.")
    add_common_args(p)
    args = p.parse_args()
    sizes = [int(x) for x in args.nodes.split(",") if x.strip()]
    sim = devstack_supports(SIM_FLAG)
    figures: dict[str, Any] = {"jobs_per_size": args.jobs, "simulated_mode": sim}
    needs: list[int] = []
    for n in sizes:
        if not sim and n > args.real_nodes_max:
            print(f"{n} nodes: SKIPPED, needs {NEEDS}")
            needs.append(n)
            continue
        point = asyncio.run(one_size(n, sim, args))
        figures.update({f"n{n}_{k}": v for k, v in point.items()})
        print(f"{n} nodes: {point}")
    lo, hi = min(sizes), max(sizes)
    if f"n{lo}_p50_ms" in figures and f"n{hi}_p50_ms" in figures and lo != hi:
        figures[f"p50_ratio_{hi}_vs_{lo}"] = round(
            figures[f"n{hi}_p50_ms"] / figures[f"n{lo}_p50_ms"], 3
        )
    for what in ("nats_msgs_per_job", "bid_msgs_per_job"):
        per_job = [v for k, v in figures.items() if k.endswith(what)]
        if per_job:
            figures[f"max_{what}"] = max(per_job)
    if needs:
        figures["skipped_sizes"] = needs
        figures["needs"] = NEEDS
    if len(needs) == len(sizes):
        skipped("scale", NEEDS, args.json_out)
        return
    emit("scale", figures, args.json_out)


if __name__ == "__main__":
    main()
