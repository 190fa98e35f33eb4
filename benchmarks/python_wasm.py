"""Warm latency of deterministic Python: ``print(1+1)`` through the PythonWasmExecutor.

Fetches the pinned runtime if needed (scripts/fetch-python-wasm.py), prepares the executor (a
compile the first time on a machine, ~0.2 s from the on-disk cache after that), runs one warm-up,
then times ``--iterations`` runs (default 50) of three paths:

* ``executor_run``: :meth:`PythonWasmExecutor.run` awaited from the event loop, what a compute
  node pays per job once the runtime is warm: the results folder, a fresh ``/tmp``, the worker
  thread hop, instantiating the 100 MB snapshot, the bootstrap, the program, exitCode and log
  forwarding;
* ``worker_path``: the same run's :meth:`WasmRuntime.run` called directly in this thread;
* ``worker_no_bootstrap``: ``python -c 'print(1+1)'`` without Shoal's bootstrap, to show its cost.

Appends one JSON line to benchmarks/results/python_wasm.jsonl.

    uv run python benchmarks/python_wasm.py [--iterations 50]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import structlog

from shoal_common.spec import Engine, Job, LanguageSpec, Spec
from shoal_compute.executors.base import ExecutionRequest, Limits, Mount
from shoal_compute.executors.python_wasm import (
    ENTRY_POINT,
    GUEST_ENV,
    PYTHON_ARGV0,
    STDLIB_MOUNT,
    PythonWasmExecutor,
    python_argv,
)
from shoal_compute.executors.wasm import RunControl, WasmRun

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import record, summary_ms

FETCH_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "fetch-python-wasm.py"
CODE = "print(1+1)"


def fetch_runtime() -> Path:
    done = subprocess.run(
        [sys.executable, str(FETCH_SCRIPT)], capture_output=True, text=True, check=True
    )
    return Path(done.stdout.strip().splitlines()[-1])


def request_for(work: Path, index: int) -> ExecutionRequest:
    results = work / f"run-{index}"
    results.mkdir()
    job = Job(
        Spec=Spec(
            Engine=Engine.LANGUAGE,
            Language=LanguageSpec(
                Language="python", LanguageVersion="3", DeterministicExecution=True, Command=CODE
            ),
        )
    )
    return ExecutionRequest(
        execution_id=f"bench-{index}",
        job=job,
        inputs=[],
        outputs=[],
        results_dir=results,
        limits=Limits(cpu=1, memory=512 << 20, disk=0),
        timeout=60,
    )


def worker_run(executor: PythonWasmExecutor, work: Path, name: str, argv: list[str]) -> None:
    folder = work / name
    folder.mkdir()
    tmp = folder / "tmp"
    tmp.mkdir()
    job = WasmRun(
        entry=executor.snapshot,
        stdout=folder / "stdout",
        stderr=folder / "stderr",
        entry_point=ENTRY_POINT,
        argv=argv,
        env=dict(GUEST_ENV),
        inputs=[Mount(executor.stdlib.parent, STDLIB_MOUNT, True)],
        outputs=[Mount(tmp, "/tmp", False)],
        memory_limit=512 << 20,
    )
    result = executor._wasm.runtime.run(job, RunControl(60))
    if result.exit_code != 0 or (folder / "stdout").read_bytes() != b"2\n":
        raise RuntimeError(f"unexpected result {result}: {(folder / 'stderr').read_text()}")


async def bench(iterations: int) -> dict[str, Any]:
    runtime_dir = fetch_runtime()
    executor = PythonWasmExecutor(runtime_dir, max_workers=1)
    started = time.perf_counter()
    await executor.prepare()
    prepare_s = time.perf_counter() - started
    try:
        with tempfile.TemporaryDirectory(prefix="shoal-bench-python-") as tmp:
            work = Path(tmp)
            samples: list[float] = []
            for index in range(iterations + 1):
                request = request_for(work, index)
                started = time.perf_counter()
                result = await executor.run(request)
                elapsed = time.perf_counter() - started
                stdout = (request.results_dir / "stdout").read_bytes()
                if result.exit_code != 0 or stdout != b"2\n":
                    raise RuntimeError(f"unexpected result {result}: {stdout!r}")
                if index:  # the first run is the warm-up
                    samples.append(elapsed)

            lang = request_for(work, -1).job.spec.language
            assert lang is not None
            paths: dict[str, list[str]] = {
                "worker_path": python_argv(lang, "", ""),
                "worker_no_bootstrap": [PYTHON_ARGV0, "-c", CODE],
            }
            worker: dict[str, list[float]] = {name: [] for name in paths}
            for index in range(iterations + 1):
                for name, argv in paths.items():
                    started = time.perf_counter()
                    worker_run(executor, work, f"{name}-{index}", argv)
                    if index:
                        worker[name].append(time.perf_counter() - started)
    finally:
        await executor.close()
    return {
        "benchmark": "python_wasm_print",
        "code": CODE,
        "iterations": iterations,
        "wasmtime": metadata.version("wasmtime"),
        "prepare_s": round(prepare_s, 3),
        "executor_run": summary_ms(samples),
        **{name: summary_ms(values) for name, values in worker.items()},
        "target": "warm print(1+1) under 1 s",
        "target_met": max(samples) < 1.0,
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=50)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    figures = asyncio.run(bench(args.iterations))
    record("python_wasm", figures)
    print(figures)


if __name__ == "__main__":
    main()
