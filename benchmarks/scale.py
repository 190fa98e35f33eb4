"""Bid traffic and latency against cluster size: 10, 100, 1,000 compute nodes (issue 6, target 4).

    uv run python benchmarks/scale.py --nodes 10,100,1000 --jobs 300

For each cluster size: a devstack with that many compute nodes, then noop jobs at concurrency 1
(as benchmarks/latency.py), measuring p50/p99 latency and NATS messages per job. Heartbeats are
counted by a subscriber and taken out: they are the cluster's fixed cost (N a second), not what
a job adds. Scheduling asks only the top-ranked nodes, so messages per job should not move with
N, and neither should latency.

Many nodes need the devstack's simulated-nodes mode (``shoal devstack --simulated-nodes N``:
lightweight nodes over the real NATS server; see docs/benchmarks.md). Until it exists, sizes up
to ``--real-nodes-max`` run with real compute nodes and the others are skipped with a "needs"
line. When it exists every size uses it, so the points compare like with like.

Target: messages per job <= 8 at every size; p50 at 1,000 nodes <= 1.25 x p50 at 10 nodes.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    DevstackProcess,
    Environment,
    HeartbeatCounter,
    JobWatcher,
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
            async with HeartbeatCounter(stack.info["nats_url"]) as beats:
                msgs_before, beats_before = nats_in_msgs(monitor), beats.count
                with Environment(devstack=stack.pids()) as env:
                    result = await closed_loop(
                        stack.api_url, bodies, 1, client_id=key.client_id, watcher=watcher
                    )
                total_msgs = nats_in_msgs(monitor) - msgs_before
                heartbeats = beats.count - beats_before
        finally:
            await watcher.stop()
    stats = summary_ms(result.latencies)
    return {
        "mode": "simulated" if simulated else "real",
        "p50_ms": stats["p50_ms"],
        "p99_ms": stats["p99_ms"],
        "nats_msgs_per_job": round((total_msgs - heartbeats) / len(bodies), 2),
        "heartbeats_per_s": round(heartbeats / max(1e-9, result.wall), 1),
        "success_rate": round(len(result.latencies) / len(bodies), 4),
        "loadavg_1m_mean": env.figures()["loadavg_1m_mean"],
        "other_cpu_cores": env.figures()["other_cpu_cores"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--nodes", default="10,100,1000", help="Cluster sizes, comma-separated.")
    p.add_argument("--jobs", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--real-nodes-max", type=int, default=10, help="Without simulated nodes.")
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
    per_job = [v for k, v in figures.items() if k.endswith("nats_msgs_per_job")]
    if per_job:
        figures["max_nats_msgs_per_job"] = max(per_job)
    if needs:
        figures["skipped_sizes"] = needs
        figures["needs"] = NEEDS
    if len(needs) == len(sizes):
        skipped("scale", NEEDS, args.json_out)
        return
    emit("scale", figures, args.json_out)


if __name__ == "__main__":
    main()
