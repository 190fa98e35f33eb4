"""The executor contract: what every engine (noop, docker, wasm, python) implements.

An executor runs one execution to its end. The compute node prepares everything around it
(inputs fetched to host paths, empty output folders, the results folder), so executors only map
those onto their sandbox and run. The results folder layout is fixed and engine-independent:

    <results_dir>/stdout, <results_dir>/stderr, <results_dir>/exitCode,
    <results_dir>/<output name>/...
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol

import orjson

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
class RunFiles:
    """A run's whole results folder held in memory: stdout, stderr, exitCode and one empty
    folder per output volume. An executor whose runs write nothing else (noop) returns this
    instead of writing files: creating a folder and three files was about a quarter of a noop
    job's CPU on this VM's disk (ADR 0030). The node keeps it in the execution's row and
    writes the folder only when something reads it."""

    stdout: bytes
    stderr: bytes
    exit_code: int
    folders: tuple[str, ...] = ()  # output volumes: empty folders in the tree

    @property
    def size(self) -> int:
        """Content size as the CID counts it: the sum of the file sizes."""
        return len(self.stdout) + len(self.stderr) + len(exit_code_bytes(self.exit_code))

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "stdout": base64.b64encode(self.stdout).decode(),
                "stderr": base64.b64encode(self.stderr).decode(),
                "exit_code": self.exit_code,
                "folders": list(self.folders),
            }
        )

    @classmethod
    def decode(cls, raw: bytes) -> RunFiles:
        data = orjson.loads(raw)
        return cls(
            stdout=base64.b64decode(data["stdout"]),
            stderr=base64.b64decode(data["stderr"]),
            exit_code=int(data["exit_code"]),
            folders=tuple(data["folders"]),
        )

    def write_to(self, results_dir: Path) -> None:
        """Write the folder unless it is there: whole or not at all (built beside it and
        renamed into place), so two readers writing it at once, or a crash half-way, never
        leave a partial folder."""
        if results_dir.is_dir():
            return
        results_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = results_dir.with_name(f"{results_dir.name}.{secrets.token_hex(4)}.partial")
        os.mkdir(staging)
        try:
            write_run_files(staging, self.stdout, self.stderr, self.exit_code)
            for name in self.folders:
                os.mkdir(staging / name)
            os.rename(staging, results_dir)
        except OSError:
            if not results_dir.is_dir():
                raise
        finally:  # left only when another writer got there first
            shutil.rmtree(staging, ignore_errors=True)


@dataclass(frozen=True)
class RunResult:
    """How a run ended. A non-zero exit code is a result, not a failure."""

    exit_code: int
    runner_error: str = ""  # set when the sandbox itself failed (image missing, trap, ...)
    timed_out: bool = False
    cancelled: bool = False
    # Set by executors with ``results_in_memory``: the results folder, which they did not write.
    files: RunFiles | None = None


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
        """Run to the end; write stdout, stderr and exitCode into ``request.results_dir``
        (or, for an executor with ``results_in_memory``, return them in ``RunResult.files``).

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
