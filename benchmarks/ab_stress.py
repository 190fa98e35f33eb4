"""Compare two checkouts (or two settings) on the stress load, in A B B A order.

    uv run python benchmarks/ab_stress.py --b . --a /tmp/ab-old --rounds 3 --jobs 4000
    uv run python benchmarks/ab_stress.py --a . --b . --b-env SHOAL_X=1

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

FIGURES = ("mean_ms", "p99_ms", "jobs_per_s", "cpu_ms_per_job", "nats_msgs_per_job")
HIGHER_IS_BETTER = {"jobs_per_s"}


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
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as out:
        json_out = Path(out.name)
    env = {**os.environ, STATE_ROOT_ENV: str(state_root), KEEP_STATE_ENV: "1", **side.env}
    command = [str(python), str(script), "--jobs", str(args.jobs)]
    command += ["--concurrency", str(args.concurrency), "--json-out", str(json_out)]
    try:
        done = subprocess.run(command, cwd=side.checkout, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{side.name}: stress.py failed\n{done.stdout}\n{done.stderr}")
        figures = with_cpu_per_job(json.loads(json_out.read_text()))
    finally:
        json_out.unlink(missing_ok=True)
        if before is None:
            results.unlink(missing_ok=True)
        else:
            results.write_bytes(before)
    side.runs.append(figures)
    return figures


def summary(a: Side, b: Side) -> list[str]:
    """Per figure: B - A per round (mean of each side's two runs), median, rounds B won."""
    lines = []
    rounds = len(a.runs) // 2
    for fig in FIGURES:
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
    args = p.parse_args()
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
                figures = stress_once(side, args, state_root)
                shown = "  ".join(f"{fig} {figures[fig]}" for fig in FIGURES)
                print(f"round {r} {side.name}: {shown}", flush=True)
    finally:
        # Removed once, at the end: deleting between runs would slow the next one (docs/
        # benchmarks.md). Leave the machine a few minutes before timing anything else.
        shutil.rmtree(state_root, ignore_errors=True)
    for line in summary(a, b):
        print(line)


if __name__ == "__main__":
    main()
