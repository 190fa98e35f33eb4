"""Chaos: N noop jobs while a random compute node is killed (SIGKILL) every K seconds and
restarted (issue 8).

    uv run --frozen python -m benchmarks.chaos                      # 10,000 jobs, 5 nodes, 30 s
    uv run --frozen python -m benchmarks.chaos --jobs 1000 --kill-every 10   # a short run

Every service is its own process (``shoal serve``: requester, verifier, publisher and the
compute nodes, on nats-server with JetStream fsync always and SQLite), as in production, so a
node can die alone. C clients submit pre-signed noop jobs in a closed loop (benchmarks/common.py)
while a chaos task kills a random compute node with SIGKILL every ``--kill-every`` seconds and
starts it again ``--down`` seconds later on the same state dir and node id.

Figures: success rate, jobs lost (acknowledged, never terminal), duplicates (a job with more
than one completed execution, or more than one result), latency p50/p99 (submit -> terminal,
from the event stream), and per kill: time to detect (kill -> the requester lists the node as
not live), time to rejoin (restart -> live again), time to recover (kill -> every job that had
an execution on the victim at the kill is terminal), and how many such jobs there were.

Target (issue 8): >= 99.9 % success, 0 lost, p99 <= 15 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    TERMINAL,
    Cluster,
    HttpPool,
    JobWatcher,
    add_common_args,
    bench_key,
    closed_loop,
    emit,
    epoch,
    final_states,
    loadavg,
    percentile,
    results_count,
    signed_submits,
    summary_ms,
    wait_nodes,
)

TARGET = {"success_rate": 0.999, "lost": 0, "p99_ms": 15_000}


@dataclass
class Kill:
    node: str
    at_wall: float  # time.time() of the SIGKILL
    detect_s: float | None = None
    rejoin_s: float | None = None
    recover_s: float | None = None
    stranded_jobs: int = 0


async def chaos(
    cluster: Cluster, pool: HttpPool, kills: list[Kill], *, every: float, down: float, seed: int
) -> None:
    """Kill a random live compute node every ``every`` s (a fixed cadence, whatever restarts
    take); each one is started again ``down`` s after its kill."""
    rng = random.Random(seed)
    down_now: set[str] = set()
    cycles: set[asyncio.Task[None]] = set()

    async def kill_and_restart(victim: str) -> None:
        service = cluster.services[victim]
        kill = Kill(victim, time.time())
        kills.append(kill)
        t0 = time.monotonic()
        try:
            await asyncio.to_thread(service.kill)
            with contextlib.suppress(TimeoutError):
                kill.detect_s = round(
                    await wait_nodes(pool, lambda s: s.get(victim, "live") != "live", 60), 2
                )
            await asyncio.sleep(max(0.0, down - (time.monotonic() - t0)))
            restarted = time.monotonic()
            await asyncio.to_thread(service.start)
            with contextlib.suppress(TimeoutError):
                await wait_nodes(pool, lambda s: s.get(victim) == "live", 120)
                kill.rejoin_s = round(time.monotonic() - restarted, 2)
        finally:
            down_now.discard(victim)

    started = time.monotonic()
    try:
        for tick in itertools.count(1):
            await asyncio.sleep(max(0.0, started + tick * every - time.monotonic()))
            alive = [n for n in cluster.compute_names() if n not in down_now]
            if not alive:
                continue
            victim = rng.choice(alive)
            down_now.add(victim)
            task = asyncio.create_task(kill_and_restart(victim))
            cycles.add(task)
            task.add_done_callback(cycles.discard)
    finally:
        # Leave no node down: a cycle in progress still restarts its node.
        await asyncio.gather(*cycles, return_exceptions=True)


def attribute(kills: list[Kill], states: dict[str, dict[str, Any]], window: float) -> None:
    """Jobs stranded by each kill: an execution on the victim that failed after the kill (and
    before the next one); recover = kill -> the last of those jobs terminal."""
    for i, kill in enumerate(kills):
        end = kills[i + 1].at_wall if i + 1 < len(kills) else kill.at_wall + window
        finished: list[float] = []
        for state in states.values():
            for ex in state.get("Executions") or []:
                if ex.get("NodeId") != kill.node or ex.get("State") != "Failed":
                    continue
                failed_at = epoch(ex["UpdateTime"])
                if kill.at_wall <= failed_at < end:
                    finished.append(epoch(state["UpdateTime"]))
                    break
        kill.stranded_jobs = len(finished)
        if finished:
            kill.recover_s = round(max(finished) - kill.at_wall, 2)


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    key = bench_key()
    bodies = signed_submits(args.warmup, args.jobs)
    warm = signed_submits(0, args.warmup)
    root = Path(tempfile.mkdtemp(prefix="shoal-chaos-"))
    cluster = Cluster(root, args.compute_nodes).start()
    print(f"cluster in {root}; API {cluster.api_url}", flush=True)
    pool = HttpPool(cluster.api_url, limit=16)
    kills: list[Kill] = []
    try:
        await wait_nodes(
            pool, lambda s: sum(v == "live" for v in s.values()) == args.compute_nodes, 180
        )
        watcher = await JobWatcher(cluster.api_url).start()
        try:
            if warm:
                await closed_loop(
                    cluster.api_url,
                    warm,
                    args.concurrency,
                    client_id=key.client_id,
                    watcher=watcher,
                )
            load_before = loadavg()
            task = asyncio.create_task(
                chaos(cluster, pool, kills, every=args.kill_every, down=args.down, seed=args.seed)
            )
            try:
                result = await closed_loop(
                    cluster.api_url,
                    bodies,
                    args.concurrency,
                    client_id=key.client_id,
                    watcher=watcher,
                    job_timeout=args.job_timeout,
                )
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            load_after = loadavg()
            # Let anything still moving (a kill just before the end) finish, then read all.
            deadline = time.monotonic() + args.settle
            while time.monotonic() < deadline:
                missing = [j for j in result.job_ids if j not in watcher.ended]
                if not missing:
                    break
                await watcher.settle(pool, missing, key.client_id)
                await asyncio.sleep(1)
        finally:
            await watcher.stop()
        states = await final_states(pool, key.client_id, result.job_ids)
        attribute(kills, states, args.kill_every)
        completed_counts = {
            j: sum(ex.get("State") == "Completed" for ex in s.get("Executions") or [])
            for j, s in states.items()
        }
        multi = [j for j, n in completed_counts.items() if n > 1]
        # Results users see, for every job that any kill touched (and the multi ones).
        touched = [
            j
            for j, s in states.items()
            if any(ex.get("State") == "Failed" for ex in s.get("Executions") or [])
        ]
        result_counts = {j: await results_count(pool, key.client_id, j) for j in touched + multi}
    finally:
        await pool.close()
        cluster.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    acknowledged = len(result.job_ids)
    final = {j: s.get("State") for j, s in states.items()}
    terminal = sum(1 for v in final.values() if v in TERMINAL)
    completed = sum(1 for v in final.values() if v == "Completed")
    lost = acknowledged - terminal
    refused = len(bodies) - acknowledged
    duplicates = len(multi) + sum(1 for n in result_counts.values() if n > 1)
    lat = summary_ms(result.latencies)
    detect = [k.detect_s for k in kills if k.detect_s is not None]
    recover = [k.recover_s for k in kills if k.recover_s is not None]
    rejoin = [k.rejoin_s for k in kills if k.rejoin_s is not None]
    figures: dict[str, Any] = {
        "jobs": len(bodies),
        "concurrency": args.concurrency,
        "compute_nodes": args.compute_nodes,
        "kill_every_s": args.kill_every,
        "down_s": args.down,
        "kills": len(kills),
        "acknowledged": acknowledged,
        "refused_at_submit": refused,
        "completed": completed,
        "success_rate": round(completed / len(bodies), 5) if bodies else 0.0,
        "lost": lost,
        "non_completed_states": {
            s: sum(1 for v in final.values() if v == s) for s in set(final.values()) - {"Completed"}
        },
        "duplicates": duplicates,
        "jobs_touched_by_kills": len(touched),
        **lat,
        "wall_s": round(result.wall, 1),
        "jobs_per_s": round(len(bodies) / result.wall, 1) if result.wall else 0.0,
        "detect_s_p50": percentile(detect, 50) if detect else None,
        "detect_s_max": max(detect) if detect else None,
        "recover_s_p50": percentile(recover, 50) if recover else None,
        "recover_s_max": max(recover) if recover else None,
        "rejoin_s_p50": percentile(rejoin, 50) if rejoin else None,
        "kill_log": [vars(k) | {"at_wall": round(k.at_wall, 1)} for k in kills],
        "failures_sample": result.failures[:5],
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "loadavg": load_after,  # what run_all's table shows
        "target": "success >= 99.9 %, 0 lost, p99 <= 15 s",
    }
    figures["target_met"] = bool(
        figures["success_rate"] >= TARGET["success_rate"]
        and lost == 0
        and lat["p99_ms"] <= TARGET["p99_ms"]
    )
    return figures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--jobs", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=10)
    p.add_argument("--compute-nodes", type=int, default=5)
    p.add_argument("--kill-every", type=float, default=30.0, help="Seconds between kills.")
    p.add_argument("--down", type=float, default=5.0, help="Seconds a killed node stays down.")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(2), "big"))
    p.add_argument("--job-timeout", type=float, default=120.0)
    p.add_argument("--settle", type=float, default=60.0, help="Max wait for stragglers.")
    p.add_argument("--keep", action="store_true", help="Keep the cluster's state and logs.")
    add_common_args(p)
    args = p.parse_args()
    figures = asyncio.run(measure(args))
    figures["seed"] = args.seed
    emit("chaos", figures, args.json_out)


if __name__ == "__main__":
    main()
