"""The noop engine: runs nothing, but behaves like a real executor for tests and stress runs.

By default it answers like ``echo``: stdout is the job's entrypoint (Docker) or parameters
(WASM) joined by spaces, so ``shoal docker run ubuntu echo hello`` prints ``hello``. A delay,
exit code, fixed output and misbehaviour (failing runs, wrong output) are configurable, and a
hook lets in-process tests decide per execution.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from shoal_common.spec import Engine, Job
from shoal_compute.executors.base import (
    BidCheck,
    ExecutionRequest,
    LogStream,
    RunFiles,
    RunResult,
    write_run_files,
)


@dataclass(frozen=True)
class NoopBehaviour:
    """What every noop run does unless a hook says otherwise."""

    delay_s: float = 0.0
    exit_code: int = 0
    stdout: str | None = None  # None: echo the job's command
    stderr: str = ""
    fail: bool = False  # the run fails (runner error), as a broken sandbox would
    bad_results: bool = False  # the run returns different output (for the verifier)
    bad_token: str = "bad result"


@dataclass
class NoopOutput:
    """What a hook may return to script one run; unset fields keep the node's behaviour."""

    stdout: str | None = None
    stderr: str | None = None
    exit_code: int | None = None
    runner_error: str | None = None
    delay_s: float | None = None


NoopHook = Callable[[ExecutionRequest], Awaitable[NoopOutput | None]]


def echo_output(job: Job) -> str:
    """What ``echo`` would print for the job's command (``-n`` honoured)."""
    spec = job.spec
    words: list[str] = []
    if spec.docker is not None and spec.docker.entrypoint:
        words = list(spec.docker.entrypoint)
    elif spec.wasm is not None and spec.wasm.parameters:
        words = list(spec.wasm.parameters)
    elif spec.language is not None and spec.language.command:
        words = [spec.language.command]
    if words and words[0].rsplit("/", 1)[-1] == "echo":
        words = words[1:]
    newline = "\n"
    if words and words[0] == "-n":
        words, newline = words[1:], ""
    return " ".join(words) + newline if words else ""


class NoopExecutor:
    """:class:`Executor` that pretends; ``engine`` is whichever engine it stands in for.

    Its runs write nothing: their results come back in ``RunResult.files`` (ADR 0030).
    Unless a hook scripts the runs: a hook may write into the output folders, as a real job
    does, so those runs get a results folder and write their files into it."""

    def __init__(
        self,
        behaviour: NoopBehaviour | None = None,
        *,
        engine: Engine = Engine.NOOP,
        hook: NoopHook | None = None,
        node_id: str = "",
    ) -> None:
        self.engine = engine
        self.behaviour = behaviour or NoopBehaviour()
        self.hook = hook
        self._node_id = node_id
        self._cancels: dict[str, asyncio.Event] = {}

    @property
    def results_in_memory(self) -> bool:
        return self.hook is None

    async def is_available(self) -> bool:
        return True

    async def check(self, job: Job) -> BidCheck:
        return BidCheck(ok=True)

    async def run(self, request: ExecutionRequest) -> RunResult:
        self._cancels[request.execution_id] = asyncio.Event()
        try:
            return await self._run(request)
        finally:
            self._cancels.pop(request.execution_id, None)

    async def _run(self, request: ExecutionRequest) -> RunResult:
        b = self.behaviour
        scripted = await self.hook(request) if self.hook is not None else None
        scripted = scripted or NoopOutput()
        delay = scripted.delay_s if scripted.delay_s is not None else b.delay_s

        if delay > 0:
            stopped = await self._wait(request, delay)
            if stopped is not None:
                return self._finish(request, stopped, b"", b"")

        stdout = scripted.stdout if scripted.stdout is not None else b.stdout
        if stdout is None:
            stdout = echo_output(request.job)
        if b.bad_results:
            # Different bytes on every bad node, so bad nodes do not agree with each other.
            stdout = f"{stdout}{b.bad_token} from {self._node_id or 'noop'}\n"
        stderr = scripted.stderr if scripted.stderr is not None else b.stderr
        exit_code = scripted.exit_code if scripted.exit_code is not None else b.exit_code
        runner_error = scripted.runner_error or (
            "noop executor failed (node configured with fail_executions)" if b.fail else ""
        )

        out, err = stdout.encode(), stderr.encode()
        if out:
            await request.log_sink(LogStream.STDOUT, out)
        if err:
            await request.log_sink(LogStream.STDERR, err)
        result = RunResult(exit_code=exit_code, runner_error=runner_error)
        return self._finish(request, result, out, err)

    def _finish(
        self, request: ExecutionRequest, result: RunResult, stdout: bytes, stderr: bytes
    ) -> RunResult:
        if self.results_in_memory:
            return replace(result, files=RunFiles(stdout, stderr, result.exit_code))
        # Small files, written synchronously: cheaper than a thread hop.
        write_run_files(request.results_dir, stdout, stderr, result.exit_code)
        return result

    async def _wait(self, request: ExecutionRequest, delay: float) -> RunResult | None:
        """Sleep ``delay`` unless cancelled or timed out first; None when it ran to the end."""
        cancel = self._cancels[request.execution_id]
        limit = delay if request.timeout is None else min(delay, request.timeout)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(cancel.wait(), limit)
        if cancel.is_set():
            return RunResult(exit_code=137, cancelled=True)
        if request.timeout is not None and delay > request.timeout:
            return RunResult(exit_code=124, timed_out=True)
        return None

    async def cancel(self, execution_id: str) -> None:
        event = self._cancels.get(execution_id)
        if event is not None:
            event.set()

    async def close(self) -> None:
        for event in self._cancels.values():
            event.set()
