"""Overhead of Shoal's Docker executor over a native `docker run --rm IMAGE true`.

Runs N iterations, interleaved (the order flips every iteration so neither side always runs on a
warmer daemon), of:

  executor   DockerExecutor.run() of `true`: create, attach, start, stream logs, wait, remove,
             results folder written (the whole per-job cost on a compute node)
  cli        `docker run --rm IMAGE true` through a subprocess (the issue's baseline)
  cli_nonet  the same with `--network none`, which is what Shoal jobs get by default, so the
             like-for-like comparison (bridge networking alone costs tens of milliseconds)

prints p50/p90/p99 of each and the overheads, and appends one JSON line with the figures to
benchmarks/results/docker_overhead.jsonl. Needs the engine and images from
scripts/docker-setup.sh.

    uv run python benchmarks/docker_overhead.py [-n 50] [--image shoal-test/busybox:latest]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker
import docker.errors
import structlog

from shoal_common.spec import Job
from shoal_compute.executors.base import ExecutionRequest, Limits
from shoal_compute.executors.docker import DockerExecutor, go_arch

HERE = Path(__file__).resolve().parent
DEFAULT_RESULTS = HERE / "results" / "docker_overhead.jsonl"
TARGET_P50_OVERHEAD_MS = 50.0


def percentile(samples: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(samples)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summary(samples_s: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in samples_s]
    return {
        "p50": round(percentile(ms, 0.50), 1),
        "p90": round(percentile(ms, 0.90), 1),
        "p99": round(percentile(ms, 0.99), 1),
        "mean": round(sum(ms) / len(ms), 1),
        "min": round(min(ms), 1),
        "max": round(max(ms), 1),
    }


def git_commit() -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:
        return ""
    return done.stdout.strip()


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    client = docker.from_env()
    try:
        client.images.get(args.image)
    except docker.errors.ImageNotFound:
        sys.exit(f"image {args.image} not found: run scripts/docker-setup.sh first")
    server = client.version()
    client.close()

    executor = DockerExecutor(go_arch())
    job = Job.model_validate(
        {"Spec": {"Engine": "Docker", "Docker": {"Image": args.image, "Entrypoint": ["true"]}}}
    )
    cli = [args.docker, "run", "--rm", args.image, "true"]
    cli_nonet = [args.docker, "run", "--rm", "--network", "none", args.image, "true"]
    tmp = tempfile.TemporaryDirectory(prefix="shoal-bench-")
    work = Path(tmp.name)
    counter = 0

    async def run_executor() -> float:
        nonlocal counter
        counter += 1
        request = ExecutionRequest(
            execution_id=f"bench-{counter}",
            job=job,
            inputs=[],
            outputs=[],
            results_dir=work / str(counter),
            limits=Limits(cpu=1.0, memory=256 * 1024 * 1024, disk=0),
            timeout=60,
        )
        started = time.perf_counter()
        result = await executor.run(request)
        elapsed = time.perf_counter() - started
        if result.exit_code != 0 or result.runner_error:
            sys.exit(f"executor run failed: {result}")
        return elapsed

    def run_cli(command: list[str]) -> float:
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - started

    samples: dict[str, list[float]] = {"executor": [], "cli": [], "cli_nonet": []}
    try:
        for _ in range(args.warmup):
            await run_executor()
            run_cli(cli)
            run_cli(cli_nonet)
        for i in range(args.iterations):
            order = ["executor", "cli", "cli_nonet"]
            if i % 2:
                order.reverse()
            for name in order:
                if name == "executor":
                    samples[name].append(await run_executor())
                else:
                    samples[name].append(run_cli(cli if name == "cli" else cli_nonet))
    finally:
        await executor.close()
        tmp.cleanup()

    figures = {name: summary(values) for name, values in samples.items()}
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "git_commit": git_commit(),
        "iterations": args.iterations,
        "image": args.image,
        "host": {
            "machine": platform.machine(),
            "kernel": platform.release(),
            "docker_server": server.get("Version", ""),
            "api_version": server.get("ApiVersion", ""),
        },
        "baseline_command": shlex.join(cli),
        "executor_ms": figures["executor"],
        "docker_run_ms": figures["cli"],
        "docker_run_network_none_ms": figures["cli_nonet"],
        "overhead_p50_ms": round(figures["executor"]["p50"] - figures["cli"]["p50"], 1),
        "overhead_p50_vs_network_none_ms": round(
            figures["executor"]["p50"] - figures["cli_nonet"]["p50"], 1
        ),
        "target_overhead_p50_ms": TARGET_P50_OVERHEAD_MS,
    }


def report(record: dict[str, Any]) -> None:
    rows = [
        ("DockerExecutor.run (true)", record["executor_ms"]),
        ("docker run --rm", record["docker_run_ms"]),
        ("docker run --rm --network none", record["docker_run_network_none_ms"]),
    ]
    print(f"{record['iterations']} iterations, image {record['image']}, interleaved")
    print(f"{'':34}{'p50':>9}{'p90':>9}{'p99':>9}{'mean':>9}   (ms)")
    for label, f in rows:
        print(f"{label:34}{f['p50']:>9.1f}{f['p90']:>9.1f}{f['p99']:>9.1f}{f['mean']:>9.1f}")
    print(
        f"overhead p50 vs docker run --rm: {record['overhead_p50_ms']:+.1f} ms; "
        f"vs --network none: {record['overhead_p50_vs_network_none_ms']:+.1f} ms "
        f"(target <= {TARGET_P50_OVERHEAD_MS:.0f} ms)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--iterations", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--image", default="shoal-test/busybox:latest")
    parser.add_argument("--docker", default="docker", help="the docker CLI to compare against")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--no-record", action="store_true", help="print only")
    args = parser.parse_args()
    if args.iterations < 1:
        parser.error("--iterations must be at least 1")

    # The executor logs each run at debug level; keep the report readable.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    record = asyncio.run(bench(args))
    report(record)
    if not args.no_record:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        with args.results.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"recorded in {args.results}")


if __name__ == "__main__":
    main()
