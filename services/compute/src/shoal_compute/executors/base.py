"""The executor contract: what every engine (noop, docker, wasm, python) implements.

An executor runs one execution to its end. The compute node prepares everything around it
(inputs fetched to host paths, empty output folders, the results folder), so executors only map
those onto their sandbox and run. The results folder layout is fixed and engine-independent:

    <results_dir>/stdout, <results_dir>/stderr, <results_dir>/exitCode,
    <results_dir>/<output name>/...
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from shoal_common.result_folder import EXIT_CODE, exit_code_bytes
from shoal_common.spec import Engine, Job


@dataclass(frozen=True)
class Mount:
    """A host path shown to the job at ``target`` (an absolute path inside the sandbox)."""

    source: Path
    target: str
    read_only: bool


@dataclass(frozen=True)
class Limits:
    """Resources granted to one execution (already defaulted and checked against the node)."""

    cpu: float  # cores
    memory: int  # bytes
    disk: int  # bytes
    gpu_ids: tuple[str, ...] = ()  # concrete devices assigned to this execution
    pids: int = 1024


class LogStream(StrEnum):
    STDOUT = "stdout"
    STDERR = "stderr"


# Called with each chunk of output as it is produced, for live logs (`shoal logs -f`).
LogSink = Callable[[LogStream, bytes], Awaitable[None]]


async def discard_logs(stream: LogStream, chunk: bytes) -> None:
    """A LogSink that drops everything."""


@dataclass
class ExecutionRequest:
    """Everything an executor needs to run one execution."""

    execution_id: str
    job: Job
    inputs: list[Mount]
    outputs: list[Mount]  # writable, each inside results_dir/<name>
    results_dir: Path  # stdout, stderr and exitCode are written here by the executor
    limits: Limits
    timeout: float | None  # seconds; None = no limit
    network: bool = False  # already checked against the node's policy
    log_sink: LogSink = discard_logs
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RunResult:
    """How a run ended. A non-zero exit code is a result, not a failure."""

    exit_code: int
    runner_error: str = ""  # set when the sandbox itself failed (image missing, trap, ...)
    timed_out: bool = False
    cancelled: bool = False


@dataclass(frozen=True)
class BidCheck:
    """An executor's opinion of whether this node can run a job at all."""

    ok: bool
    reason: str = ""


class Executor(Protocol):
    """One engine. Implementations must never block the event loop."""

    engine: Engine

    async def is_available(self) -> bool:
        """Whether the engine can run here (daemon reachable, runtime installed)."""
        ...

    async def check(self, job: Job) -> BidCheck:
        """Engine-specific admission (image exists and matches the node's arch, module valid)."""
        ...

    async def run(self, request: ExecutionRequest) -> RunResult:
        """Run to the end; write stdout, stderr and exitCode into ``request.results_dir``.

        Must honour ``request.timeout`` and clean up everything it started, whatever happens.
        """
        ...

    async def cancel(self, execution_id: str) -> None:
        """Stop a running execution; ``run`` then returns with ``cancelled=True``."""
        ...

    async def close(self) -> None:
        """Release engine resources at node shutdown (stop and remove what is still running)."""
        ...


def write_small_file(path: str, data: bytes) -> None:
    """Create or replace a small file: one open, write and close (no buffered file object:
    three of these per execution were a visible share of a noop job's CPU). A symlink in its
    place is refused (OSError), not written through: results folders hold what jobs wrote."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(path, flags, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def write_exit_code(results_dir: Path, exit_code: int) -> None:
    """The exitCode file holds the number alone, as the reference system wrote it."""
    write_small_file(os.path.join(results_dir, EXIT_CODE), exit_code_bytes(exit_code))


def write_run_files(results_dir: Path, stdout: bytes, stderr: bytes, exit_code: int) -> None:
    """stdout, stderr and exitCode of a run whose output is in memory (into an existing
    folder, as the runner prepares it; made here only when it is missing)."""
    folder = os.fspath(results_dir)
    try:
        write_small_file(os.path.join(folder, "stdout"), stdout)
    except FileNotFoundError:
        os.makedirs(folder, exist_ok=True)
        write_small_file(os.path.join(folder, "stdout"), stdout)
    write_small_file(os.path.join(folder, "stderr"), stderr)
    write_exit_code(results_dir, exit_code)
