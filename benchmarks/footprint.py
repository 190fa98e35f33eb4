"""Footprint of an idle devstack: memory and CPU (issue 6, target 7).

    uv run python benchmarks/footprint.py --idle 30

Starts ``shoal devstack --noop`` (requester + 3 compute nodes + verifier + publisher in one
Python process, nats-server as its child), lets it settle (``--settle`` s: start-up work such
as migrations and first heartbeats is over), then measures over ``--idle`` seconds:

* RSS of the process tree (sum; PSS and USS too, which do not count shared pages twice),
* CPU time the tree used, as % of one core.

``--after-jobs N`` then runs N noop jobs and measures both again (growth after work: caches,
leaks, housekeeping that scans what the jobs left). 1,000 simulated nodes in one process need
the devstack's simulated-nodes mode; until it exists that part says what it needs.

Targets: idle RSS <= 300 MB, idle CPU < 2% of a core; 1,000 simulated nodes <= 1 GiB.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # type: ignore[import-untyped]

from benchmarks.common import (
    DevstackProcess,
    JobWatcher,
    add_common_args,
    bench_key,
    closed_loop,
    devstack_supports,
    emit,
    loadavg,
    signed_submits,
    tree_cpu_seconds,
    tree_memory,
)

SIM_FLAG = "--simulated-nodes"


def idle_figures(stack: DevstackProcess, seconds: float, prefix: str = "") -> dict[str, Any]:
    procs = stack.tree()
    load = loadavg()
    cpu0, t0 = tree_cpu_seconds(procs), time.monotonic()
    time.sleep(seconds)
    cpu = tree_cpu_seconds(procs) - cpu0
    elapsed = time.monotonic() - t0
    mem = tree_memory(stack.tree())
    return {
        f"{prefix}rss_mib": mem["rss_mib"],
        f"{prefix}pss_mib": mem["pss_mib"],
        f"{prefix}uss_mib": mem["uss_mib"],
        f"{prefix}rss_by_process_mib": mem["by_process_rss_mib"],
        f"{prefix}cpu_pct_of_core": round(100 * cpu / elapsed, 2),
        f"{prefix}loadavg": load,
    }


def run_jobs(stack: DevstackProcess, count: int) -> None:
    """``count`` noop jobs through the devstack, 10 clients in a closed loop."""
    key = bench_key()
    bodies = signed_submits(0, count)

    async def load() -> None:
        watcher = await JobWatcher(stack.api_url).start()
        try:
            await closed_loop(stack.api_url, bodies, 10, client_id=key.client_id, watcher=watcher)
        finally:
            await watcher.stop()

    asyncio.run(load())


def simulated(nodes: int, seconds: float) -> dict[str, Any]:
    """RSS and idle CPU of ``nodes`` simulated nodes (the simulator process, else the delta)."""
    with DevstackProcess.start("--noop", "--compute-nodes", "0", SIM_FLAG, str(nodes)) as stack:
        time.sleep(5)
        sim_pid = stack.info.get("simulator_pid")
        if sim_pid:
            proc = psutil.Process(int(sim_pid))
            cpu0 = tree_cpu_seconds([proc])
            time.sleep(seconds)
            return {
                f"sim{nodes}_process_rss_mib": round(proc.memory_info().rss / 2**20, 1),
                f"sim{nodes}_cpu_pct_of_core": round(
                    100 * (tree_cpu_seconds([proc]) - cpu0) / seconds, 2
                ),
            }
        figures = idle_figures(stack, seconds, prefix=f"sim{nodes}_tree_")
        figures.pop(f"sim{nodes}_tree_rss_by_process_mib")
        return figures


def measure(args: argparse.Namespace) -> dict[str, Any]:
    figures: dict[str, Any] = {"compute_nodes": 3, "idle_s": args.idle}
    with DevstackProcess.start("--noop", "--compute-nodes", "3") as stack:
        time.sleep(args.settle)
        figures.update(idle_figures(stack, args.idle))
        if args.after_jobs:
            run_jobs(stack, args.after_jobs)
            time.sleep(args.settle)
            after = idle_figures(stack, args.idle, prefix=f"after_{args.after_jobs}_jobs_")
            after.pop(f"after_{args.after_jobs}_jobs_rss_by_process_mib")
            figures.update(after)
    if devstack_supports(SIM_FLAG):
        figures.update(simulated(1000, args.idle))
    else:
        figures["sim1000"] = f"skipped: needs `shoal devstack {SIM_FLAG} N`"
        print(f"1,000 simulated nodes: SKIPPED, needs `shoal devstack {SIM_FLAG} N`")
    return figures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--idle", type=float, default=30.0, help="Seconds of idle CPU measurement.")
    p.add_argument("--settle", type=float, default=10.0, help="Seconds to wait before measuring.")
    p.add_argument("--after-jobs", type=int, default=0, help="Then run N jobs and measure again.")
    add_common_args(p)
    args = p.parse_args()
    emit("footprint", measure(args), args.json_out)


if __name__ == "__main__":
    main()
