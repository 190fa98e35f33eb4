"""Instantiate-and-run latency of a cached trivial WASM module (target: p99 <= 1 ms).

Two figures, 1,000 runs each after one warm-up run that compiles the module:

* ``worker_path``: :meth:`WasmRuntime.run` timed inside one of the executor's worker threads,
  i.e. what a cached module costs once the execution reaches its thread: a new store, the WASI
  context (argv, env, stdout/stderr files, one preopen), instantiation, the call.
* ``executor_run``: :meth:`WasmExecutor.run` awaited from the event loop, i.e. plus the thread
  hop, the results folder, the exitCode file and the log forwarding.

Appends one JSON line to benchmarks/results/wasm.jsonl.

    uv run python benchmarks/wasm_instantiate.py [--iterations 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import wasmtime

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import add_common_args
from shoal_common.spec import Engine, Job, Spec, StorageSpec, WasmSpec
from shoal_compute.executors.base import ExecutionRequest, Limits, Mount
from shoal_compute.executors.wasm import WasmExecutor, WasmRun

RESULTS = Path(__file__).parent / "results" / "wasm.jsonl"

HELLO_WAT = """
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "Hello, world!\\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 14))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
"""


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in samples_s)
    return {
        "p50_ms": round(statistics.median(ms), 4),
        "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 4),
        "max_ms": round(ms[-1], 4),
        "mean_ms": round(statistics.fmean(ms), 4),
    }


async def resolve_local(spec: StorageSpec) -> Path:
    assert spec.path is not None
    return Path(spec.path)


async def main(iterations: int) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="shoal-wasm-bench-"))
    module = work / "hello.wasm"
    module.write_bytes(wasmtime.wat2wasm(HELLO_WAT))
    inputs = work / "inputs"
    inputs.mkdir()
    (inputs / "data.txt").write_text("x")
    executor = WasmExecutor(resolve_local, max_workers=2, cache_dir=work / "cache")
    runtime = executor.runtime
    try:
        started = time.perf_counter()
        runtime.load_module(module)
        compile_s = time.perf_counter() - started

        def worker_path() -> list[float]:
            samples = []
            for i in range(iterations + 1):
                out = work / "worker" / str(i % 16)
                out.mkdir(parents=True, exist_ok=True)
                run = WasmRun(
                    entry=module,
                    stdout=out / "stdout",
                    stderr=out / "stderr",
                    argv=["hello.wasm"],
                    env={"B": "2", "A": "1"},
                    inputs=[Mount(inputs, "/inputs", read_only=True)],
                    memory_limit=64 * 1024 * 1024,
                )
                t0 = time.perf_counter()
                result = runtime.run(run)
                samples.append(time.perf_counter() - t0)
                assert result.exit_code == 0, result
            return samples[1:]

        loop = asyncio.get_running_loop()
        worker = await loop.run_in_executor(executor._pool, worker_path)

        job = Job(
            spec=Spec(
                engine=Engine.WASM,
                wasm=WasmSpec(entry_module=StorageSpec(name="hello.wasm", path=str(module))),
            )
        )
        end_to_end = []
        for i in range(iterations + 1):
            results = work / "results" / str(i)
            request = ExecutionRequest(
                execution_id=f"bench-{i}",
                job=job,
                inputs=[Mount(inputs, "/inputs", read_only=True)],
                outputs=[],
                results_dir=results,
                limits=Limits(cpu=1, memory=64 * 1024 * 1024, disk=0),
                timeout=10,
            )
            t0 = time.perf_counter()
            result = await executor.run(request)
            end_to_end.append(time.perf_counter() - t0)
            assert result.exit_code == 0, result
            assert (results / "stdout").read_text() == "Hello, world!\n"
        end_to_end = end_to_end[1:]
    finally:
        await executor.close()

    worker_ms, run_ms = percentiles(worker), percentiles(end_to_end)
    return {
        "benchmark": "wasm_instantiate",
        "command": " ".join(["uv run python", *sys.argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": {
            "machine": platform.machine(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "wasmtime": metadata.version("wasmtime"),
        },
        "iterations": iterations,
        "compile_ms": round(compile_s * 1000, 3),
        "worker_path": worker_ms,
        "executor_run": run_ms,
        # Flat copies for benchmarks/run_all.py's table.
        "instantiate_p50_ms": worker_ms["p50_ms"],
        "instantiate_p99_ms": worker_ms["p99_ms"],
        "executor_run_p50_ms": run_ms["p50_ms"],
        "target": "worker_path p99 <= 1 ms",
        "target_met": worker_ms["p99_ms"] <= 1.0,
        # The 2-core machine is shared: a p99 of milliseconds is other processes' time slices.
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=1000)
    add_common_args(parser)
    args = parser.parse_args()
    record = asyncio.run(main(args.iterations))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as file:
        file.write(json.dumps(record) + "\n")
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(record))
    print(json.dumps(record, indent=2))
