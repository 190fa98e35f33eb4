"""Runs one accepted execution from its inputs to a durable outcome.

prepare folders -> fetch inputs -> executor.run -> content-address the results folder into
the local cache -> one state change + event, committed together:

    completed   ResultProposed (sealed to the verifier for deterministic jobs)
    failed      ExecutionFailed (retryable unless the job itself is at fault, or timed out)
    cancelled   ExecutionCancelled

Cancellation: a cancel during the fetch cancels the task; during the run it asks the executor
to stop, which then returns ``cancelled=True`` after cleaning up. A node shutdown cancels the
task too, but records "node stopped" (retryable) so the requester re-places the work at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import structlog

from shoal_common import tracing
from shoal_common.cid import cid_and_size_of_path, cid_of_small_tree
from shoal_common.errors import ShoalError
from shoal_common.events import Event, ExecutionCancelled, ExecutionFailed, ResultProposed
from shoal_common.protocol import LogChunk
from shoal_common.spec import Deal, Engine, Job, PublisherSpec, RunOutput
from shoal_compute import metrics
from shoal_compute.adapters.content import ContentCache
from shoal_compute.domain.bidding import job_inputs, job_wants_network
from shoal_compute.domain.capacity import Allocation
from shoal_compute.domain.execution import ExecutionRecord, LocalState
from shoal_compute.domain.results import (
    ExecutionPaths,
    address_files,
    output_mounts,
    prepare_outputs,
    read_run_output,
    utf8_cut,
)
from shoal_compute.executors.base import (
    ExecutionRequest,
    Executor,
    Limits,
    LogStream,
    Mount,
    RunFiles,
    RunResult,
)
from shoal_compute.inputs.fetcher import InputFetcher
from shoal_compute.store.base import ExecutionStore

log = structlog.get_logger(__name__)

LogPublisher = Callable[[LogChunk], Awaitable[None]]
Sealer = Callable[[ResultProposed], Awaitable[ResultProposed]]


class Phase(StrEnum):
    QUEUED = "queued"
    FETCHING = "fetching"
    RUNNING = "running"
    FINISHING = "finishing"


@dataclass
class Active:
    """In-memory state of one started execution."""

    record: ExecutionRecord
    job: Job
    allocation: Allocation
    live: LiveLog
    phase: Phase = Phase.QUEUED
    cancel_reason: str | None = None
    stopping: bool = False  # node shutdown, not a user cancel
    fetches_inputs: bool = False  # an inputs folder may exist, to remove at the end
    task: asyncio.Task[None] | None = None
    started: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class RunnerConfig:
    node_id: str
    executions_dir: Path
    default_timeout: float
    allow_networking: bool
    max_run_output_bytes: int
    # Extra time an executor gets past the job timeout before the runner stops waiting.
    timeout_grace_s: float = 30.0
    live_log_bytes: int = 1 << 20  # recent output per stream kept for LOGS while running


def effective_timeout(job: Job, default: float) -> float:
    timeout = job.spec.timeout
    return float(timeout) if timeout and timeout > 0 else default


class ExecutionRunner:
    """Starts, tracks and cancels the node's running executions."""

    def __init__(
        self,
        config: RunnerConfig,
        *,
        store: ExecutionStore,
        executors: Mapping[Engine, Executor],
        fetcher: InputFetcher,
        cache: ContentCache,
        committed: Callable[[], None],
        publish_log: LogPublisher,
        seal: Sealer,
        content_url: Callable[[], str | None],
        finished: Callable[[str], None],
        row_written: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self._config = config
        self._store = store
        self._executors = executors
        self._fetcher = fetcher
        self._cache = cache
        self._committed = committed
        self._publish_log = publish_log
        self._seal = seal
        self._content_url = content_url
        self._finished = finished
        self._row_written = row_written
        self.active: dict[str, Active] = {}

    def paths(self, execution_id: str) -> ExecutionPaths:
        return ExecutionPaths.under(self._config.executions_dir, execution_id)

    # --- control ---

    def start(self, record: ExecutionRecord, job: Job, allocation: Allocation) -> None:
        live = LiveLog(record.id, self._publish_log, keep=self._config.live_log_bytes)
        active = Active(record=record, job=job, allocation=allocation, live=live)
        self.active[record.id] = active

        async def run() -> None:
            with tracing.start_span(
                "execute", service="compute", job_id=record.job_id, execution_id=record.id
            ):
                await self._run(active)

        active.task = asyncio.create_task(run(), name=f"execution-{record.id}")

    async def cancel(self, execution_id: str, reason: str) -> bool:
        """Stop a started execution; False if it is not running here."""
        active = self.active.get(execution_id)
        if active is None or active.task is None or active.cancel_reason is not None:
            return active is not None
        active.cancel_reason = reason or "cancelled"
        if active.phase is Phase.RUNNING:
            executor = self._executors.get(active.job.spec.engine or Engine.NOOP)
            if executor is not None:
                await executor.cancel(execution_id)
                return True
        if active.phase is Phase.FETCHING:
            active.task.cancel()
        # QUEUED: the task has not run yet (cancelling it now would skip its clean-up); it
        # sees cancel_reason on its first step. FINISHING: the outcome is being recorded.
        return True

    async def shutdown(self) -> None:
        """Node stopping: interrupt everything, recording each as failed (retryable)."""
        tasks = []
        for active in list(self.active.values()):
            active.stopping = True
            if active.task is not None:
                if active.phase is not Phase.QUEUED:  # not started: it sees `stopping` first
                    active.task.cancel()
                tasks.append(active.task)
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- one execution ---

    async def _run(self, active: Active) -> None:
        record, job = active.record, active.job
        try:
            events = await self._execute(active)
            await self._commit(record, *events)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # we still need to await the commit below
            if active.stopping:
                await self._commit_quietly(record, self._failed(record, "node stopped", True))
                raise
            reason = active.cancel_reason or "cancelled"
            await self._commit_quietly(record, self._cancelled(record, reason))
        except ShoalError as exc:  # e.g. no verifier to seal the result to
            await self._commit_quietly(record, self._failed(record, exc.detail, exc.retryable))
        except Exception as exc:  # a bug or an engine blowing up: fail, never hang
            full = disk_full_reason(exc, self._config.node_id)
            if full is None:
                log.exception("execution_crashed", execution_id=record.id, job_id=job.metadata.id)
            else:  # not a bug: say so plainly, and let another node try (retryable)
                log.warning("execution_disk_full", execution_id=record.id, error=str(exc))
            why = full or f"execution failed on node: {exc!r}"
            await self._commit_quietly(record, self._failed(record, why, True))
        finally:
            engine = (job.spec.engine or Engine.NOOP).value
            _duration_metric(engine).observe(time.monotonic() - active.started)
            self.active.pop(record.id, None)
            self._finished(record.id)
            if active.fetches_inputs:
                self._cleanup_inputs(record.id)

    async def _execute(self, active: Active) -> list[tuple[LocalState, Event, dict[str, object]]]:
        record, job = active.record, active.job
        spec = job.spec
        paths = self.paths(record.id)
        timeout = effective_timeout(job, self._config.default_timeout)
        if active.stopping or active.cancel_reason is not None:  # before it ever started
            raise asyncio.CancelledError
        active.phase = Phase.FETCHING
        engine = spec.engine or Engine.NOOP
        executor = self._executors.get(engine)
        if executor is None:
            return [self._failed(record, f"no executor for engine {engine.value}", True)]
        # An executor that returns its results in memory gets no folders made for it (ADR 0030).
        in_memory = getattr(executor, "results_in_memory", False)
        try:
            outputs = (output_mounts if in_memory else prepare_outputs)(spec.outputs, paths.results)
            wanted = job_inputs(spec)
            if wanted:
                active.fetches_inputs = True
                fetch_started = time.perf_counter()
                inputs = await self._fetcher.fetch_inputs(wanted, paths.inputs)
                metrics.INPUT_FETCH_DURATION.observe(time.perf_counter() - fetch_started)
            else:
                inputs = []
        except ShoalError as exc:
            return [self._failed(record, exc.detail, exc.retryable)]
        request = ExecutionRequest(
            execution_id=record.id,
            job=job,
            inputs=inputs,
            outputs=outputs,
            results_dir=paths.results,
            limits=Limits(
                cpu=active.allocation.capacity.cpu,
                memory=active.allocation.capacity.memory,
                disk=active.allocation.capacity.disk,
                gpu_ids=active.allocation.gpu_ids,
            ),
            timeout=timeout,
            network=job_wants_network(spec) and self._config.allow_networking,
            log_sink=active.live.sink,
        )
        active.phase = Phase.RUNNING
        if active.cancel_reason is not None:  # cancelled while fetching, just before the run
            raise asyncio.CancelledError
        try:
            async with asyncio.timeout(timeout + self._config.timeout_grace_s):
                result = await executor.run(request)
        except TimeoutError:
            # The executor ignored its own timeout; it has been cancelled by now.
            result = RunResult(exit_code=124, timed_out=True)
        active.phase = Phase.FINISHING
        if in_memory:
            result = await self._in_memory(result, outputs, paths.results)
        return [await self._outcome(active, result, timeout)]

    async def _in_memory(
        self, result: RunResult, outputs: list[Mount], results_dir: Path
    ) -> RunResult:
        """The run's results as the node keeps them: in memory (and the execution's row) when
        small, else written out now like any executor's, so rows stay small."""
        files = result.files or RunFiles(b"", b"", result.exit_code)
        files = replace(files, folders=tuple(mount.source.name for mount in outputs))
        if files.size <= _ROW_BYTES:
            return replace(result, files=files)
        await asyncio.to_thread(files.write_to, results_dir)
        return replace(result, files=None)

    async def _outcome(
        self, active: Active, result: RunResult, timeout: float
    ) -> tuple[LocalState, Event, dict[str, object]]:
        record, job = active.record, active.job
        results_dir = self.paths(record.id).results
        # At most 2 x max_run_output_bytes read: cheaper inline than a thread hop.
        run_output = read_run_output(results_dir, result, self._config.max_run_output_bytes)
        if result.cancelled or active.cancel_reason is not None:
            return self._cancelled(record, active.cancel_reason or "cancelled")
        spec = job.spec
        publisher = spec.publisher_spec or PublisherSpec(type=spec.effective_publisher)
        if result.timed_out:
            return self._failed(
                record,
                f"timed out after {timeout:g}s",
                False,
                run_output=run_output,
                timed_out=True,
                partial=await self._partial(record, result.files),
                files=result.files,
                publisher=publisher,
            )
        if result.runner_error:
            return self._failed(
                record,
                result.runner_error,
                True,
                run_output=run_output,
                partial=await self._partial(record, result.files),
                files=result.files,
                publisher=publisher,
            )
        return await self._proposed(record, job, run_output, result.files)

    async def _partial(
        self, record: ExecutionRecord, files: RunFiles | None
    ) -> tuple[str, int] | None:
        """What a failed run wrote, content-addressed and served like a result (or None)."""
        results_dir = self.paths(record.id).results
        try:
            cid, size = await _address(results_dir, files)
        except (ValueError, OSError) as exc:  # refused content, or nothing was written
            log.info("partial_result_dropped", execution_id=record.id, reason=str(exc))
            return None
        self._cache.add_result(cid, results_dir)
        return cid, size

    async def _proposed(
        self, record: ExecutionRecord, job: Job, run_output: RunOutput, files: RunFiles | None
    ) -> tuple[LocalState, Event, dict[str, object]]:
        results_dir = self.paths(record.id).results
        try:
            cid, size = await _address(results_dir, files)
        except ValueError as exc:  # a symlink or device file in an output volume
            return self._failed(record, f"results refused: {exc}", False, run_output=run_output)
        self._cache.add_result(cid, results_dir)
        base = self._content_url()
        spec = job.spec
        proposal = ResultProposed(
            job_id=record.job_id,
            execution_id=record.id,
            node_id=self._config.node_id,
            result_cid=cid,
            run_output=run_output,
            verifier=spec.effective_verifier,
            deal=spec.deal or Deal(),
            publisher=spec.publisher_spec or PublisherSpec(type=spec.effective_publisher),
            result_url=f"{base}/content/{cid}" if base else None,
            size=size,
        )
        proposal = await self._seal(proposal)
        changes: dict[str, object] = {"result_cid": cid, "run_output": run_output}
        if files is not None:
            changes["result_files"] = files
        return LocalState.COMPLETED, proposal, changes

    # --- outcomes ---

    def _failed(
        self,
        record: ExecutionRecord,
        error: str,
        retryable: bool,
        *,
        run_output: RunOutput | None = None,
        timed_out: bool = False,
        partial: tuple[str, int] | None = None,
        files: RunFiles | None = None,  # the results ``partial`` addresses, if in memory
        publisher: PublisherSpec | None = None,
    ) -> tuple[LocalState, Event, dict[str, object]]:
        cid, size = partial or (None, 0)
        base = self._content_url() if cid else None
        event = ExecutionFailed(
            job_id=record.job_id,
            execution_id=record.id,
            node_id=self._config.node_id,
            error=error,
            run_output=run_output,
            retryable=retryable,
            timed_out=timed_out,
            result_cid=cid,
            result_url=f"{base}/content/{cid}" if base else None,
            size=size,
            publisher=publisher or PublisherSpec(),
        )
        changes: dict[str, object] = {"error": error, "run_output": run_output}
        if cid:
            changes["result_cid"] = cid  # so GET /content/{cid} finds it after a restart
            if files is not None:
                changes["result_files"] = files
        return LocalState.FAILED, event, changes

    def _cancelled(
        self, record: ExecutionRecord, reason: str
    ) -> tuple[LocalState, Event, dict[str, object]]:
        event = ExecutionCancelled(
            job_id=record.job_id,
            execution_id=record.id,
            node_id=self._config.node_id,
            reason=reason,
        )
        return LocalState.CANCELLED, event, {"error": reason}

    async def _commit(
        self, record: ExecutionRecord, *outcomes: tuple[LocalState, Event, dict[str, object]]
    ) -> None:
        if self._row_written is not None:
            await self._row_written(record.id)  # the run may have outpaced the accept's write
        for state, event, changes in outcomes:
            await self._store.transition(
                record.id,
                expected=[LocalState.ACCEPTED],
                new=state,
                events=[event],
                **changes,
            )
            active = self.active.get(record.id)
            engine = (active.job.spec.engine if active else None) or Engine.NOOP
            _executions_metric(engine.value, state.value).inc()
            log.info(
                "execution_" + state.value,
                execution_id=record.id,
                job_id=record.job_id,
                error=changes.get("error") or None,
            )
        self._committed()

    async def _commit_quietly(
        self, record: ExecutionRecord, outcome: tuple[LocalState, Event, dict[str, object]]
    ) -> None:
        try:
            await self._commit(record, outcome)
        except ShoalError as exc:  # already ended (e.g. cancelled while finishing)
            log.info("execution_outcome_dropped", execution_id=record.id, reason=exc.detail)
        except Exception:
            log.exception("execution_outcome_lost", execution_id=record.id)

    def _cleanup_inputs(self, execution_id: str) -> None:
        inputs = self.paths(execution_id).inputs
        if not os.path.isdir(inputs):
            return
        # Downloads are not needed once the run ended; the results folder stays (logs, serving).
        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop().run_in_executor(None, shutil.rmtree, inputs, True)


# Labelled children looked up once: labels() validates and hashes its arguments on every call.
@functools.cache
def _duration_metric(engine: str) -> Any:
    return metrics.EXECUTION_DURATION.labels(engine)


@functools.cache
def _executions_metric(engine: str, outcome: str) -> Any:
    return metrics.EXECUTIONS.labels(engine=engine, outcome=outcome)


def disk_full_reason(exc: BaseException, node_id: str) -> str | None:
    """A clear failure reason when ``exc`` is the node's disk (or quota) running out."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full on node {node_id}: no space left to write the execution's files"
    return None


# In-memory results up to this big are kept in the execution's row; bigger ones are written
# out at once (a row is read whole, and a noop run's output is usually a line).
_ROW_BYTES = 64 * 1024

# A results folder up to this big is content-addressed on the event loop: a handful of small
# files (stdout, stderr, exitCode) take tens of microseconds, less than the hop to a thread.
_INLINE_BYTES = 256 * 1024
_INLINE_ENTRIES = 32


async def _address(folder: Path, files: RunFiles | None = None) -> tuple[str, int]:
    """CID and content size of a results folder (refuses symlinks and special files), or of
    ``files`` when the run's results are in memory."""
    if files is not None:
        return address_files(files)
    small = cid_of_small_tree(folder, max_bytes=_INLINE_BYTES, max_entries=_INLINE_ENTRIES)
    if small is not None:
        return small
    return await asyncio.to_thread(cid_and_size_of_path, folder)


class LiveLog:
    """Executor output -> LogChunks on the bus, cut at UTF-8 boundaries, with byte offsets.

    Also keeps the most recent output of each stream (up to ``keep`` bytes) for LOGS queries
    while the run lasts: executors may buffer their results files, so those can lag behind.
    """

    def __init__(self, execution_id: str, publish: LogPublisher, *, keep: int) -> None:
        self._execution_id = execution_id
        self._publish = publish
        self._keep = keep
        self._offsets = {LogStream.STDOUT: 0, LogStream.STDERR: 0}
        self._held = {LogStream.STDOUT: b"", LogStream.STDERR: b""}
        # Recent bytes of each stream and the stream offset where they start.
        self._recent = {LogStream.STDOUT: bytearray(), LogStream.STDERR: bytearray()}
        self._base = {LogStream.STDOUT: 0, LogStream.STDERR: 0}

    def read(self, stream: LogStream, offset: int, max_bytes: int) -> tuple[bytes, int] | None:
        """Bytes from ``offset`` if still held in memory, with the offset after them."""
        base, recent = self._base[stream], self._recent[stream]
        if offset < base:
            return None  # older than what is kept: the caller reads the file
        start = min(offset - base, len(recent))
        data = bytes(recent[start : start + max(0, max_bytes)])
        data = data[: utf8_cut(data)]
        return data, base + start + len(data)

    def _remember(self, stream: LogStream, data: bytes) -> None:
        recent = self._recent[stream]
        recent += data
        extra = len(recent) - self._keep
        if extra > 0:
            del recent[:extra]
            self._base[stream] += extra

    async def sink(self, stream: LogStream, chunk: bytes) -> None:
        self._remember(stream, chunk)
        data = self._held[stream] + chunk
        cut = utf8_cut(data)
        self._held[stream] = data[cut:]
        if not cut:
            return
        offset = self._offsets[stream]
        self._offsets[stream] = offset + cut
        message = LogChunk(
            execution_id=self._execution_id,
            stream=stream.value,
            data=data[:cut].decode("utf-8", errors="replace"),
            offset=offset,
        )
        try:
            await self._publish(message)
        except Exception as exc:  # live logs are best effort; the files are the record
            log.debug("log_chunk_dropped", execution_id=self._execution_id, error=str(exc))
