"""The devstack's process layouts compared back to back (`shoal devstack --processes`, ADR 0012).

    uv run --frozen python benchmarks/devstack_modes.py                      # 1, 2, all
    uv run --frozen python benchmarks/devstack_modes.py --modes 1,2 --rounds 2 --stress-jobs 2000

For each benchmark in turn, one run per layout, one right after the other (the machine is
shared: runs minutes apart are not comparable), the order rotated each round:

* ``stress``: the stress load (benchmarks/stress.py: closed loop, ``--concurrency`` clients,
  noop jobs, 3 nodes): jobs/s, latency, and the devstack's CPU: cores and ms of CPU per job;
* ``latency``: one client (benchmarks/latency.py): p50/p99;
* ``idle``: an idle devstack of 3 nodes (benchmarks/footprint.py): RSS/PSS of the whole process
  tree and CPU in % of a core (target 7: <= 286 MiB, < 2 %); ``--after-jobs N``: again after N
  jobs (growth).

Each figure comes with the load average and the CPU other processes used meanwhile. The layout
reaches ``shoal devstack`` through ``SHOAL_DEVSTACK_PROCESSES`` (the same works for every other
benchmark). Nothing is written to results/ unless ``--record`` (results/devstack_modes.jsonl).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import stress
from benchmarks.common import DevstackProcess, Environment, loadavg, record
from benchmarks.footprint import idle_figures, run_jobs

ENV = "SHOAL_DEVSTACK_PROCESSES"


def load_run(mode: str, args: argparse.Namespace, *, jobs: int, concurrency: int) -> dict[str, Any]:
    ns = stress.parser("", jobs=jobs, concurrency=concurrency, warmup=args.warmup).parse_args([])
    figures = asyncio.run(stress.measure(ns))
    cores = figures.get("devstack_cpu_cores", float("nan"))
    rate = figures["jobs_per_s"]
    keep = (
        "jobs_per_s",
        "mean_ms",
        "p50_ms",
        "p99_ms",
        "submit_p99_ms",
        "success_rate",
        "devstack_cpu_cores",
        "generator_cpu_cores",
        "other_cpu_cores",
        "loadavg_start",
        "loadavg_1m_mean",
    )
    out = {k: figures.get(k) for k in keep}
    out["cpu_ms_per_job"] = round(1000 * cores / rate, 2) if rate else None
    out["stages"] = figures.get("stages")
    return out


def idle_run(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    with DevstackProcess.start("--noop", "--compute-nodes", "3") as stack:
        time.sleep(args.settle)
        with Environment(devstack=stack.pids()) as env:
            figures = idle_figures(stack, args.idle)
        figures["other_cpu_cores"] = env.figures()["other_cpu_cores"]
        if args.after_jobs:
            run_jobs(stack, args.after_jobs)
            time.sleep(args.settle)
            prefix = f"after_{args.after_jobs}_jobs_"
            figures.update(idle_figures(stack, args.idle, prefix=prefix))
    return figures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--modes", default="1,2,all", help="Layouts to compare (--processes values).")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--benchmarks", default="stress,latency,idle")
    p.add_argument("--stress-jobs", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=10)
    p.add_argument("--latency-jobs", type=int, default=300)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--idle", type=float, default=30.0, help="Seconds of idle measurement.")
    p.add_argument("--settle", type=float, default=10.0, help="Seconds before measuring idle.")
    p.add_argument("--after-jobs", type=int, default=0, help="idle: then N jobs, idle again.")
    p.add_argument("--record", action="store_true", help="Append to results/devstack_modes.jsonl.")
    p.add_argument("--json-out", type=Path, default=None, help="Also write every run here.")
    args = p.parse_args()
    modes = args.modes.split(",")
    runs: list[dict[str, Any]] = []
    for r in range(args.rounds):
        order = modes[r % len(modes) :] + modes[: r % len(modes)]
        for bench in args.benchmarks.split(","):
            for mode in order:
                os.environ[ENV] = mode
                started = time.strftime("%H:%M:%S", time.gmtime())
                load = loadavg()
                if bench == "stress":
                    figures = load_run(
                        mode, args, jobs=args.stress_jobs, concurrency=args.concurrency
                    )
                elif bench == "latency":
                    figures = load_run(mode, args, jobs=args.latency_jobs, concurrency=1)
                else:
                    figures = idle_run(mode, args)
                row = {"round": r, "bench": bench, "processes": mode, "utc": started}
                row |= {"loadavg_before": load, **figures}
                runs.append(row)
                print(json.dumps(row), flush=True)
                if args.record:
                    record("devstack_modes", row)
    os.environ.pop(ENV, None)
    if args.json_out:
        args.json_out.write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
