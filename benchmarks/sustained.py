"""Sustained rate: open-loop noop job arrivals at R jobs/s for D seconds (issue 6, target 3).

    uv run python benchmarks/sustained.py --rate 500 --duration 600

Submits are pre-signed and sent on a fixed schedule (paced, or ``--poisson``) by ``--procs``
load-generator processes (benchmarks/openloop.py), whatever the server is doing; the end of each
job is timestamped from the requester's event stream. Latency counts from each job's scheduled
send time, so falling behind shows. The run stops early when the backlog (jobs due minus jobs
ended) passes ``--max-backlog`` (default: 10 s of arrivals): the system is not sustaining the
rate, and the completions per second up to then are its throughput under overload.

Records (results/sustained.jsonl): offered and achieved rate, failures, latency p50/p99, the
generator's own lag and CPU (to show it was not the bottleneck), the load average. The achieved
rate is the steady-state completion rate: jobs that ended between 10 s after the first arrival
and the end of the schedule (or the early stop), over that span, so a system that keeps up reads
the offered rate.

Target: >= 500 jobs/s for 10 minutes with durable submits, 0 failures, p99 <= 250 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    DevstackProcess,
    Environment,
    HeartbeatCounter,
    HttpPool,
    JobWatcher,
    add_common_args,
    bench_key,
    closed_loop,
    emit,
    nats_in_msgs,
    signed_submits,
    stage_breakdown,
    summary_ms,
)
from benchmarks.openloop import Plan, Run, Stream, stream_figures

# Seconds after the first arrival before completions count towards the achieved rate.
_SETTLE_S = 10.0
_P99_GOAL_MS = 250.0


def steady_rate(ended_at: list[float], t0: float, span_end: float) -> float:
    """Completions per second in steady state: jobs that ended between a settling edge after
    the first arrival (t0) and the end of the schedule (or the early stop), over that span.

    Counted from t0, a run that keeps up reads low by the first jobs' latency; counted to the
    poll after the last send, low by up to half a second more.
    """
    span_start = t0 + min(_SETTLE_S, (span_end - t0) / 4)
    ended = sum(1 for at in ended_at if span_start < at <= span_end)
    return ended / max(1e-9, span_end - span_start)


def tail_seconds(
    by_second: dict[int, list[float]], offset: float, env: Environment, worst: int = 5
) -> dict[str, Any]:
    """Where the tail came from: how many seconds of arrivals had a job over the p99 goal, and
    the worst few, each with the steal and iowait the machine showed around it. A backlog that
    builds slowly spreads its slow jobs over many seconds; a stall puts them in a few."""
    goal_s = _P99_GOAL_MS / 1000
    ranked = sorted(by_second.items(), key=lambda item: max(item[1]), reverse=True)
    return {
        "seconds_over_p99_goal": sum(1 for lat in by_second.values() if max(lat) > goal_s),
        "worst_seconds": [
            {
                "at_s": second,
                "max_ms": round(max(lat) * 1000, 1),
                "jobs_over_goal": sum(1 for x in lat if x > goal_s),
                **env.around(second + offset),
            }
            for second, lat in ranked[:worst]
        ],
    }


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rate", type=float, default=500.0, help="Offered jobs per second.")
    p.add_argument("--duration", type=float, default=600.0, help="Seconds of arrivals.")
    p.add_argument("--procs", type=int, default=1, help="Load-generator processes.")
    p.add_argument("--poisson", action="store_true", help="Poisson arrivals instead of paced.")
    p.add_argument("--compute-nodes", type=int, default=3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--max-backlog", type=int, default=None, help="Default: 10 s of arrivals.")
    p.add_argument("--drain", type=float, default=60.0, help="Seconds to wait for stragglers.")
    p.add_argument("--devstack-arg", action="append", default=[], help="Extra devstack flag.")
    add_common_args(p)
    return p.parse_args()


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    key = bench_key()
    count = math.ceil(args.rate * args.duration)
    max_backlog = args.max_backlog or max(100, int(args.rate * 10))
    warm = signed_submits(0, args.warmup)
    signed_submits(args.warmup, count)  # sign (or load) before the clock starts
    devstack_args = ["--noop", "--compute-nodes", str(args.compute_nodes), *args.devstack_arg]
    stopped_early = ""
    with DevstackProcess.start(*devstack_args) as stack:
        monitor = stack.info.get("nats_monitor_url")
        watcher = await JobWatcher(stack.api_url).start()
        try:
            await closed_loop(stack.api_url, warm, 10, client_id=key.client_id, watcher=watcher)
            plan = Plan(
                api_url=stack.api_url,
                streams=(Stream("submit", "submit", args.rate, count, body_start=args.warmup),),
                procs=args.procs,
                poisson=args.poisson,
            )
            ended_before = len(watcher.ended)
            async with HeartbeatCounter(stack.info["nats_url"]) as beats:
                msgs_before, beats_before = nats_in_msgs(monitor), beats.count
                run = Run(plan)
                with Environment(devstack=stack.pids()) as env:
                    t0 = await run.start()
                    last_report = t0
                    while run.alive():
                        await asyncio.sleep(0.5)
                        now = time.monotonic()
                        due = min(count, int((now - t0) * args.rate))
                        done = len(watcher.ended) - ended_before
                        if due - done > max_backlog and not stopped_early:
                            stopped_early = (
                                f"backlog of {due - done} jobs after {now - t0:.0f} s "
                                f"(limit {max_backlog})"
                            )
                            print(f"stopping early: {stopped_early}", file=sys.stderr)
                            run.request_stop()
                        if now - last_report >= 10:
                            last_report = now
                            print(
                                f"{now - t0:6.0f} s  due {due}  ended {done}  "
                                f"backlog {due - done}  stream rows {watcher.rows}",
                                file=sys.stderr,
                            )
                    t_stop = time.monotonic()
                    sent = await run.join()
                span_end = min(t_stop, t0 + count / args.rate)
                achieved = steady_rate(
                    [at for at, _ in list(watcher.ended.values())[ended_before:]], t0, span_end
                )
                job_ids = [s.job_id for s in sent if s.status == 200 and s.job_id]
                deadline = time.monotonic() + args.drain
                for job_id in job_ids:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    with contextlib.suppress(TimeoutError):
                        await watcher.wait(job_id, left)
                msgs = nats_in_msgs(monitor) - msgs_before - (beats.count - beats_before)
            pool = HttpPool(stack.api_url, limit=4)
            polled = await watcher.settle(pool, job_ids, key.client_id) if watcher.overflows else 0
            await pool.close()
            stages = await stage_breakdown(stack.api_url, key.client_id, job_ids)
        finally:
            await watcher.stop()

    window = max(1e-9, t_stop - t0)
    submit_errors = [s for s in sent if s.status != 200]
    latencies, unknown, not_completed, unfinished = [], 0, 0, 0
    by_second: dict[int, list[float]] = {}  # scheduled second of the run -> latencies
    by_index = {s.job_id: s for s in sent if s.job_id}
    for job_id in job_ids:
        end = watcher.ended.get(job_id)
        if end is None:
            unfinished += 1
        elif end[1] != "Completed":
            not_completed += 1
        elif math.isnan(end[0]):
            unknown += 1
        else:
            scheduled = by_index[job_id].scheduled
            latency = end[0] - scheduled
            latencies.append(latency)
            by_second.setdefault(int(scheduled - t0), []).append(latency)
    failures = len(submit_errors) + not_completed + unfinished
    ok = not stopped_early and failures == 0 and achieved >= 0.99 * args.rate
    return {
        "offered_rate": args.rate,
        "duration_s": args.duration,
        "ran_s": round(window, 1),
        "procs": args.procs,
        "arrivals": "poisson" if args.poisson else "paced",
        "sustained": ok,
        "stopped_early": stopped_early,
        "jobs_sent": len(sent),
        "achieved_rate": round(achieved, 1),
        "submit_rate": round(sum(1 for s in sent if s.status == 200) / max(1e-9, span_end - t0), 1),
        "failures": failures,
        "submit_errors": len(submit_errors),
        "jobs_not_completed": not_completed,
        "jobs_unfinished_after_drain": unfinished,
        "latency_unknown": unknown,
        **summary_ms(latencies),
        **{k: v for k, v in stream_figures(sent, "submit").items() if "p99" in k or "p50" in k},
        "nats_msgs_per_job": round(msgs / max(1, len(job_ids)), 2),
        "stages": stages,
        "stream_overflows": watcher.overflows,
        "polled_after_overflow": polled,
        "compute_nodes": args.compute_nodes,
        **env.figures(),
        **tail_seconds(by_second, t0 - env.started, env),
        "submit_errors_sample": [f"HTTP {s.status} {s.job_id[:120]}" for s in submit_errors[:5]],
    }


def main() -> None:
    args = parse_args()
    emit("sustained", asyncio.run(measure(args)), args.json_out)


if __name__ == "__main__":
    main()
