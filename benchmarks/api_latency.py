"""Submit API latency at 200 req/s and job-state read latency (issue 6, target 6).

    uv run python benchmarks/api_latency.py --rate 200 --read-rate 200 --duration 60

Open loop (benchmarks/openloop.py): pre-signed noop submits at ``--rate`` per second and, at the
same time, ``/requester/states`` reads at ``--read-rate`` of jobs that exist (submitted in a
warm-up, then completed), each from its scheduled send time to the full response. The submits
are durable (the 2xx means the job is on disk) and the jobs run, so the reads and submits share
the requester with the scheduling work they cause, as they would in production.

Records submit and read p50/p99, errors, the generator's lag (results/api_latency.jsonl).

Target: submit p99 <= 50 ms at 200 req/s; job state read p99 <= 20 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    DevstackProcess,
    Environment,
    JobWatcher,
    add_common_args,
    bench_key,
    closed_loop,
    emit,
    signed_submits,
)
from benchmarks.openloop import Plan, Run, Stream, stream_figures


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rate", type=float, default=200.0, help="Submits per second.")
    p.add_argument("--read-rate", type=float, default=200.0, help="State reads per second.")
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--procs", type=int, default=1, help="Load-generator processes.")
    p.add_argument("--warmup", type=int, default=300, help="Jobs run first (the read targets).")
    p.add_argument("--compute-nodes", type=int, default=3)
    add_common_args(p)
    return p.parse_args()


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    key = bench_key()
    submits = math.ceil(args.rate * args.duration)
    reads = math.ceil(args.read_rate * args.duration)
    warm = signed_submits(0, args.warmup)
    signed_submits(args.warmup, submits)
    with DevstackProcess.start("--noop", "--compute-nodes", str(args.compute_nodes)) as stack:
        watcher = await JobWatcher(stack.api_url).start()
        try:
            done = await closed_loop(
                stack.api_url, warm, 10, client_id=key.client_id, watcher=watcher
            )
        finally:
            await watcher.stop()
        streams = [Stream("submit", "submit", args.rate, submits, body_start=args.warmup)]
        if reads:
            streams.append(
                Stream(
                    "read",
                    "state",
                    args.read_rate,
                    reads,
                    ids=tuple(done.job_ids),
                    client_id=key.client_id,
                )
            )
        run = Run(Plan(api_url=stack.api_url, streams=tuple(streams), procs=args.procs))
        with Environment(devstack=stack.pids()) as env:
            await run.start()
            sent = await run.join()
    figures: dict[str, Any] = {
        "submit_rate": args.rate,
        "read_rate": args.read_rate,
        "duration_s": args.duration,
        "procs": args.procs,
        **stream_figures(sent, "submit"),
    }
    if reads:
        figures.update(stream_figures(sent, "read"))
    errors = [s for s in sent if s.status != 200]
    figures["errors_sample"] = [f"{s.stream} HTTP {s.status} {s.job_id[:120]}" for s in errors[:5]]
    figures.update(env.figures())
    return figures


def main() -> None:
    args = parse_args()
    emit("api_latency", asyncio.run(measure(args)), args.json_out)


if __name__ == "__main__":
    main()
