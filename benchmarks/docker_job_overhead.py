"""A whole Shoal job running ``busybox true``, end to end, next to a native ``docker run``.

Where benchmarks/docker_overhead.py times the Docker executor alone, this times what a user
waits for: submit (signed) -> scheduled -> bid -> container run -> results addressed -> verified
-> published -> ``Completed`` seen by the client. A devstack (1 compute node, real Docker) runs
in a child process; the client polls the job's state every ``--poll-ms`` (fixed, so the poll adds
at most that much). Interleaved with each job (order flipped every iteration, so neither side
always meets a warmer daemon):

  shoal_job        submit -> Completed observed by the client
  shoal_server     the job's own CreateTime -> terminal UpdateTime (no client or poll error)
  docker_run       ``docker run --rm IMAGE true`` (the issue's baseline)
  docker_run_nonet the same with ``--network none``, which is what Shoal jobs get by default

It prints p50/p90 of each, the overheads (Shoal job minus docker run), and the median time
between the job's history entries (schedule, run, verify, publish). The issue's target: p50
overhead <= 50 ms (the reference system: ~200 ms). Appends one JSON line to
benchmarks/results/docker_job_overhead.jsonl.

    uv run python benchmarks/docker_job_overhead.py [-n 30] [--warmup 3]
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from shoal_client.client import ShoalClient
from shoal_common.signing import ClientKey
from shoal_common.spec import Deal, DockerSpec, Engine, JobState, Spec

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import DevstackProcess, percentile, record

IMAGE = "shoal-test/busybox:latest"
TARGET_P50_OVERHEAD_MS = 50.0
PHASES = (
    ("schedule", "Job created", "bid accepted"),
    ("run", "bid accepted", "result proposed"),
    ("verify", "result proposed", "result accepted"),
    ("publish", "result accepted", "result published"),
    ("finish", "result published", "job completed"),
)


def stats_ms(samples_s: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in samples_s]
    return {
        "p50": round(percentile(ms, 50), 1),
        "p90": round(percentile(ms, 90), 1),
        "mean": round(statistics.fmean(ms), 1),
        "min": round(min(ms), 1),
        "max": round(max(ms), 1),
    }


def wait_completed(client: ShoalClient, job_id: str, poll_s: float, timeout: float) -> JobState:
    deadline = time.monotonic() + timeout
    while True:
        state = client.state(job_id)
        if state.state.terminal:
            return state
        if time.monotonic() > deadline:
            sys.exit(f"job {job_id} still {state.state.value} after {timeout}s")
        time.sleep(poll_s)


def shoal_job(client: ShoalClient, poll_s: float) -> tuple[float, float, str]:
    """One job; (client-observed seconds, server-side seconds, job id)."""
    spec = Spec(
        Engine=Engine.DOCKER,
        Docker=DockerSpec(Image=IMAGE, Entrypoint=["true"]),
        Deal=Deal(Concurrency=1),
    )
    started = time.perf_counter()
    job = client.submit(spec)
    state = wait_completed(client, job.metadata.id, poll_s, timeout=60)
    elapsed = time.perf_counter() - started
    if state.state.value != "Completed":
        events = "\n".join(h.comment for h in client.events(job.metadata.id))
        sys.exit(f"job {job.metadata.id} ended {state.state.value}:\n{events}")
    server = (state.update_time - state.create_time).total_seconds()
    return elapsed, server, job.metadata.id


def phase_ms(client: ShoalClient, job_id: str) -> dict[str, float]:
    at: dict[str, float] = {}
    for entry in client.events(job_id):
        at.setdefault(entry.comment, entry.time.timestamp())
    return {
        name: (at[end] - at[start]) * 1000
        for name, start, end in PHASES
        if start in at and end in at
    }


def docker_run(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def bench(args: argparse.Namespace) -> dict[str, Any]:
    load_before = [round(x, 2) for x in os.getloadavg()]
    native = [args.docker, "run", "--rm", IMAGE, "true"]
    native_nonet = [args.docker, "run", "--rm", "--network", "none", IMAGE, "true"]
    samples: dict[str, list[float]] = {
        "shoal_job": [],
        "shoal_server": [],
        "docker_run": [],
        "docker_run_nonet": [],
    }
    jobs: list[str] = []
    with tempfile.TemporaryDirectory(prefix="shoal-overhead-") as work:
        stack = DevstackProcess.start("--compute-nodes", "1")
        try:
            client = ShoalClient(stack.info["api_url"], key=ClientKey.load_or_create(Path(work)))
            poll_s = args.poll_ms / 1000
            for _ in range(args.warmup):
                shoal_job(client, poll_s)
                docker_run(native)
                docker_run(native_nonet)
            for i in range(args.iterations):
                order = ["shoal", "docker_run", "docker_run_nonet"]
                if i % 2:
                    order.reverse()
                for name in order:
                    if name == "shoal":
                        elapsed, server, job_id = shoal_job(client, poll_s)
                        samples["shoal_job"].append(elapsed)
                        samples["shoal_server"].append(server)
                        jobs.append(job_id)
                    else:
                        command = native if name == "docker_run" else native_nonet
                        samples[name].append(docker_run(command))
            per_phase: dict[str, list[float]] = {}
            for job_id in jobs:
                for name, ms in phase_ms(client, job_id).items():
                    per_phase.setdefault(name, []).append(ms)
            client.close()
        finally:
            stack.stop()
            shutil.rmtree(stack.state_dir, ignore_errors=True)

    figures = {name: stats_ms(values) for name, values in samples.items()}
    return {
        "iterations": args.iterations,
        "image": IMAGE,
        "poll_ms": args.poll_ms,
        "baseline_command": shlex.join(native),
        **{f"{name}_ms": f for name, f in figures.items()},
        "overhead_p50_ms": round(figures["shoal_job"]["p50"] - figures["docker_run"]["p50"], 1),
        "overhead_p90_ms": round(figures["shoal_job"]["p90"] - figures["docker_run"]["p90"], 1),
        "overhead_p50_vs_network_none_ms": round(
            figures["shoal_job"]["p50"] - figures["docker_run_nonet"]["p50"], 1
        ),
        "phases_p50_ms": {
            name: round(percentile(values, 50), 1) for name, values in per_phase.items()
        },
        "target_overhead_p50_ms": TARGET_P50_OVERHEAD_MS,
        "loadavg_before": load_before,
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }


def report(figures: dict[str, Any]) -> None:
    rows = [
        ("Shoal job, submit -> Completed", figures["shoal_job_ms"]),
        ("Shoal job, server-side", figures["shoal_server_ms"]),
        ("docker run --rm", figures["docker_run_ms"]),
        ("docker run --rm --network none", figures["docker_run_nonet_ms"]),
    ]
    print(f"{figures['iterations']} iterations, image {figures['image']}, interleaved")
    print(f"{'':34}{'p50':>9}{'p90':>9}{'mean':>9}{'min':>9}{'max':>9}   (ms)")
    for label, f in rows:
        print(
            f"{label:34}{f['p50']:>9.1f}{f['p90']:>9.1f}{f['mean']:>9.1f}"
            f"{f['min']:>9.1f}{f['max']:>9.1f}"
        )
    print(
        f"overhead vs docker run --rm: p50 {figures['overhead_p50_ms']:+.1f} ms, "
        f"p90 {figures['overhead_p90_ms']:+.1f} ms; vs --network none: p50 "
        f"{figures['overhead_p50_vs_network_none_ms']:+.1f} ms "
        f"(target p50 <= {TARGET_P50_OVERHEAD_MS:.0f} ms)"
    )
    print(f"phases (p50 ms): {figures['phases_p50_ms']}")
    print(f"load average before/after: {figures['loadavg_before']} / {figures['loadavg_after']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--iterations", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--poll-ms", type=float, default=5.0)
    parser.add_argument("--docker", default="docker", help="The docker CLI to compare against.")
    parser.add_argument("--no-record", action="store_true", help="Print only.")
    args = parser.parse_args()
    if args.iterations < 1:
        parser.error("--iterations must be at least 1")
    figures = bench(args)
    report(figures)
    if not args.no_record:
        record("docker_job_overhead", figures)


if __name__ == "__main__":
    main()
