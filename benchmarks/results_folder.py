"""CPU of a noop execution's results folder, step by step (no devstack, no NATS, no database).

    uv run python benchmarks/results_folder.py [--executions 3000] [--rounds 3]

Every execution on a compute node makes ``executions/<id>/results``, the executor writes
stdout, stderr and exitCode there, and the runner reads the run output and the folder's CID
back (``shoal_compute.domain.runner``). This times those steps for a noop run, the way the
runner calls them, over ``--executions`` new folders per round in the temp folder, and reports
the median round, in microseconds per execution:

* ``prepare``: ``prepare_outputs`` (the execution and results folders),
* ``write``: the noop executor's three files,
* ``read_output``: ``read_run_output`` (stdout/stderr for the API),
* ``address``: ``_address`` (the results folder's CID, inline for a small tree).

Nothing is deleted unless ``--clean``: on this VM a deletion of thousands of files slows the
inode creations after it down 10-25x for minutes (docs/benchmarks.md), so deleting would slow
the next run down; the folder (about 20 KB per execution) is printed, to remove when done.
Appends one JSON line to benchmarks/results/results_folder.jsonl.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import add_common_args, emit
from shoal_compute.domain.results import ExecutionPaths, prepare_outputs, read_run_output
from shoal_compute.domain.runner import _address
from shoal_compute.executors.base import RunResult
from shoal_compute.executors.noop import _write

STEPS = ("prepare", "write", "read_output", "address")


async def one_round(root: Path, executions: int) -> dict[str, float]:
    spent = dict.fromkeys(STEPS, 0.0)
    result = RunResult(exit_code=0)
    for i in range(executions):
        paths = ExecutionPaths.under(root, f"execution-{i:07d}")
        t0 = time.process_time()
        prepare_outputs(None, paths.results)
        t1 = time.process_time()
        _write(paths.results, f"{i}\n", "", 0)
        t2 = time.process_time()
        read_run_output(paths.results, result, 64 * 1024)
        t3 = time.process_time()
        await _address(paths.results)
        t4 = time.process_time()
        for step, took in zip(STEPS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            spent[step] += took
    return {step: took / executions * 1e6 for step, took in spent.items()}


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--executions", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clean", action="store_true", help="Delete the folders at the end.")
    add_common_args(p)
    args = p.parse_args()
    base = Path(tempfile.mkdtemp(prefix="shoal-results-folder-"))
    try:
        rounds = [await one_round(base / f"round-{r}", args.executions) for r in range(args.rounds)]
    finally:
        if args.clean:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"left in place (remove when done): {base}")
    totals = [sum(r.values()) for r in rounds]
    median = rounds[totals.index(statistics.median_low(totals))]
    figures = {
        "executions": args.executions,
        "rounds": args.rounds,
        "total_us": round(sum(median.values()), 1),
        **{f"{step}_us": round(median[step], 1) for step in STEPS},
        "round_totals_us": [round(t, 1) for t in totals],
    }
    emit("results_folder", figures, args.json_out)


if __name__ == "__main__":
    asyncio.run(main())
