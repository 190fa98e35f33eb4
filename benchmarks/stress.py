"""The reference system's stress test: N noop jobs at concurrency C through the HTTP API.

    uv run python benchmarks/stress.py --jobs 10000 --concurrency 10

A devstack (--noop, 3 compute nodes, durable SQLite + JetStream with fsync) runs in a child
process; C clients each submit a pre-signed job and wait until it is terminal, then submit the
next (closed loop). Latency = submit sent -> terminal state observed. The end of each job is
timestamped from the requester's event stream (one SSE connection for all jobs; ``--observe
poll`` polls /requester/states instead, as a legacy client does). Prints and records success
rate, mean/p50/p99 latency, wall time, jobs/s and NATS messages per job (heartbeats excluded),
with the load average and the CPU other processes used meanwhile
(benchmarks/results/stress.jsonl).

Issue 6, target 2: 100% success, mean <= 30 ms, p99 <= 150 ms, wall <= 60 s (the reference
system: 100% success, 630 ms mean, about 16 jobs/s).
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
    HeartbeatCounter,
    JobWatcher,
    NatsTap,
    add_common_args,
    bench_key,
    closed_loop,
    emit,
    nats_in_msgs,
    signed_submits,
    stage_breakdown,
    summary_ms,
)


def parser(doc: str, *, jobs: int, concurrency: int, warmup: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--jobs", type=int, default=jobs)
    p.add_argument("--concurrency", type=int, default=concurrency)
    p.add_argument("--compute-nodes", type=int, default=3)
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument(
        "--observe",
        choices=["stream", "poll"],
        default="stream",
        help="How clients see a job end: the event stream (exact, no extra load) or polling.",
    )
    p.add_argument(
        "--tap",
        action="store_true",
        help="Also count NATS messages by subject (a '>' subscriber; adds a little load).",
    )
    p.add_argument("--devstack-arg", action="append", default=[], help="Extra devstack flag.")
    add_common_args(p)
    return p


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    key = bench_key()
    # Disjoint index ranges: the warm-up jobs are not replays of the measured ones.
    warm = signed_submits(0, args.warmup)
    bodies = signed_submits(args.warmup, args.jobs)
    devstack_args = ["--noop", "--compute-nodes", str(args.compute_nodes), *args.devstack_arg]
    with DevstackProcess.start(*devstack_args) as stack:
        monitor = stack.info.get("nats_monitor_url")
        watcher = await JobWatcher(stack.api_url).start()
        try:
            observer = watcher if args.observe == "stream" else None
            if warm:
                await closed_loop(
                    stack.api_url, warm, args.concurrency, client_id=key.client_id, watcher=watcher
                )
            tap = NatsTap(stack.info["nats_url"]) if args.tap else contextlib.nullcontext()
            async with HeartbeatCounter(stack.info["nats_url"]) as beats, tap:
                msgs_before, beats_before = nats_in_msgs(monitor), beats.count
                with Environment(devstack=stack.pids()) as env:
                    result = await closed_loop(
                        stack.api_url,
                        bodies,
                        args.concurrency,
                        client_id=key.client_id,
                        watcher=observer,
                    )
                msgs = nats_in_msgs(monitor) - msgs_before - (beats.count - beats_before)
            breakdown = tap.per_job(len(bodies)) if isinstance(tap, NatsTap) else None
            stages = await stage_breakdown(stack.api_url, key.client_id, result.job_ids)
        finally:
            await watcher.stop()
    total = len(bodies)
    return {
        "jobs": total,
        "concurrency": args.concurrency,
        "compute_nodes": args.compute_nodes,
        "observe": args.observe,
        "success_rate": round(len(result.latencies) / total, 5),
        **summary_ms(result.latencies),
        "wall_s": round(result.wall, 2),
        "jobs_per_s": round(total / result.wall, 1),
        "submit_p50_ms": summary_ms(result.submit_latencies)["p50_ms"],
        "submit_p99_ms": summary_ms(result.submit_latencies)["p99_ms"],
        "nats_msgs_per_job": round(msgs / total, 2),
        **env.figures(),
        "stages": stages,
        **({"nats_routed_per_job_by_subject": breakdown} if breakdown else {}),
        "failures": len(result.failures),
        "failures_sample": result.failures[:5],
    }


def main(name: str = "stress", doc: str = __doc__ or "", **defaults: int) -> None:
    args = parser(
        doc,
        jobs=defaults.get("jobs", 1000),
        concurrency=defaults.get("concurrency", 10),
        warmup=defaults.get("warmup", 100),
    ).parse_args()
    figures = asyncio.run(measure(args))
    emit(name, figures, args.json_out)


if __name__ == "__main__":
    main()
