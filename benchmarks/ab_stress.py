"""Compare two checkouts (or two settings) on the stress load, in A B B A order.

    uv run python benchmarks/ab_stress.py --b . --a /tmp/ab-old --rounds 3 --jobs 4000
    uv run python benchmarks/ab_stress.py --a . --b . --b-env SHOAL_X=1
    uv run python benchmarks/ab_stress.py --load requester-cpu --a /tmp/ab-old --b . --rounds 3

``--load requester-cpu`` compares the requester's CPU per job in one process instead
(benchmarks/requester_cpu.py, this checkout's copy run by each side's Python): steadier than a
devstack's figures, for changes to the requester's own code.

A change worth a few percent cannot be seen in one run after another on this VM: its speed
drifts by 10-20% within minutes, and a run right after a mass deletion pays for it (docs/
benchmarks.md). So each round runs A, B, B, A (a linear drift cancels out of the round's
difference), every devstack keeps its state folder until the end (no deletion between runs),
and the result is the difference per round, B minus A, with the count of rounds B won.

Each side is a checkout with its own ``.venv`` (e.g. ``git worktree add /tmp/ab-old <rev> &&
(cd /tmp/ab-old && uv sync --frozen)``) plus optional ``KEY=VALUE`` environment. The
benchmark's own results files are left as they were: these runs are not runs of record.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import KEEP_STATE_ENV, STATE_ROOT_ENV

FIGURES = {
    "stress": ("mean_ms", "p99_ms", "jobs_per_s", "cpu_ms_per_job", "nats_msgs_per_job"),
    "requester-cpu": ("cpu_us_per_job", "jobs_per_s"),
}
HIGHER_IS_BETTER = {"jobs_per_s"}
REQUESTER_CPU = Path(__file__).resolve().parent / "requester_cpu.py"


def with_cpu_per_job(figures: dict[str, Any]) -> dict[str, Any]:
    """Add the devstack's CPU milliseconds per job (all its processes, NATS included): work
    saved shows here even when the latency it would save is hidden by queueing elsewhere."""
    cpu_s = figures["devstack_cpu_cores"] * figures["wall_s"]
    return {**figures, "cpu_ms_per_job": round(cpu_s * 1000 / figures["jobs"], 3)}


@dataclass
class Side:
    name: str
    checkout: Path
    env: dict[str, str] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)

    def describe(self) -> str:
        extra = " ".join(f"{k}={v}" for k, v in self.env.items())
        return f"{self.name}: {self.checkout}" + (f" ({extra})" if extra else "")


def parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--a-env/--b-env take KEY=VALUE, not {pair!r}")
        env[key] = value
    return env


def stress_once(side: Side, args: argparse.Namespace, state_root: Path) -> dict[str, Any]:
    """One stress run in ``side``'s checkout; its results file is restored afterwards."""
    python = side.checkout / ".venv" / "bin" / "python"
    script = side.checkout / "benchmarks" / "stress.py"
    results = side.checkout / "benchmarks" / "results" / "stress.jsonl"
    before = results.read_bytes() if results.exists() else None
    env = {**os.environ, STATE_ROOT_ENV: str(state_root), KEEP_STATE_ENV: "1", **side.env}
    command = [str(python), str(script), "--jobs", str(args.jobs)]
    command += ["--concurrency", str(args.concurrency)]
    try:
        figures = with_cpu_per_job(run_json(side, command, env))
    finally:
        if before is None:
            results.unlink(missing_ok=True)
        else:
            results.write_bytes(before)
    side.runs.append(figures)
    return figures


def requester_cpu_once(side: Side, args: argparse.Namespace, state_root: Path) -> dict[str, Any]:
    """One in-process requester run (benchmarks/requester_cpu.py) on ``side``'s packages."""
    python = side.checkout / ".venv" / "bin" / "python"
    command = [str(python), str(REQUESTER_CPU), "--jobs", str(args.jobs)]
    env = {**os.environ, **side.env}
    figures = run_json(side, command, env)
    side.runs.append(figures)
    return figures


def run_json(side: Side, command: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run a benchmark with ``--json-out`` in ``side``'s checkout; its figures."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as out:
        json_out = Path(out.name)
    try:
        done = subprocess.run(
            [*command, "--json-out", str(json_out)],
            cwd=side.checkout,
            env=env,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise SystemExit(f"{side.name}: {command[1]} failed\n{done.stdout}\n{done.stderr}")
        figures: dict[str, Any] = json.loads(json_out.read_text())
        return figures
    finally:
        json_out.unlink(missing_ok=True)


def summary(a: Side, b: Side, figures: tuple[str, ...]) -> list[str]:
    """Per figure: B - A per round (mean of each side's two runs), median, rounds B won."""
    lines = []
    rounds = len(a.runs) // 2
    for fig in figures:
        higher_is_better = fig in HIGHER_IS_BETTER
        diffs = []
        for r in range(rounds):
            a_mean = statistics.fmean(run[fig] for run in a.runs[2 * r : 2 * r + 2])
            b_mean = statistics.fmean(run[fig] for run in b.runs[2 * r : 2 * r + 2])
            diffs.append((b_mean - a_mean) / a_mean * 100)
        won = sum(1 for d in diffs if (d > 0) == higher_is_better and d != 0)
        shown = ", ".join(f"{d:+.1f}%" for d in diffs)
        lines.append(
            f"{fig:>11}: B vs A per round {shown}; median {statistics.median(diffs):+.1f}%; "
            f"B better in {won} of {rounds}"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--a", type=Path, required=True, help="Checkout of side A (the baseline).")
    p.add_argument("--b", type=Path, required=True, help="Checkout of side B (the change).")
    p.add_argument("--a-env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--b-env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--jobs", type=int, default=4000)
    p.add_argument("--concurrency", type=int, default=10)
    p.add_argument("--load", choices=sorted(FIGURES), default="stress")
    args = p.parse_args()
    once = requester_cpu_once if args.load == "requester-cpu" else stress_once
    figures_shown = FIGURES[args.load]
    a = Side("A", args.a.resolve(), parse_env(args.a_env))
    b = Side("B", args.b.resolve(), parse_env(args.b_env))
    for side in (a, b):
        if not (side.checkout / ".venv" / "bin" / "python").exists():
            raise SystemExit(f"{side.describe()}: no .venv there (run `uv sync --frozen` in it)")
    print(a.describe())
    print(b.describe())
    state_root = Path(tempfile.mkdtemp(prefix="shoal-ab-states-"))
    try:
        for r in range(1, args.rounds + 1):
            for side in (a, b, b, a):
                figures = once(side, args, state_root)
                shown = "  ".join(f"{fig} {figures[fig]}" for fig in figures_shown)
                print(f"round {r} {side.name}: {shown}", flush=True)
    finally:
        # Removed once, at the end: deleting between runs would slow the next one (docs/
        # benchmarks.md). Leave the machine a few minutes before timing anything else.
        shutil.rmtree(state_root, ignore_errors=True)
    for line in summary(a, b, figures_shown):
        print(line)


if __name__ == "__main__":
    main()
