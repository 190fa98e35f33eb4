"""The benchmarks' devstack (``benchmarks.common.DevstackProcess``) dies with the benchmark.

A benchmark stopped by a signal used to leave its whole cluster running (found when a killed
``stress.py`` left two devstacks loading the machine for the runs after it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.support import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.xdist_group("processes")]

ROOT = Path(__file__).resolve().parents[2]

BENCHMARK = """
import shutil
import signal
from benchmarks.common import DevstackProcess
stack = DevstackProcess.start("--noop", "--compute-nodes", "1")
print(stack.pid, flush=True)
signal.pause()  # until the test kills it
"""


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_killed_benchmark_takes_its_devstack_with_it() -> None:
    with subprocess.Popen(
        [sys.executable, "-c", BENCHMARK], cwd=ROOT, stdout=subprocess.PIPE, text=True
    ) as bench:
        tree: list[int] = []
        try:
            assert bench.stdout is not None
            line = bench.stdout.readline()
            assert line.strip().isdigit(), f"the benchmark printed {line!r}"
            devstack = int(line)
            tree = [devstack, *(c.pid for c in psutil.Process(devstack).children(recursive=True))]
            assert len(tree) >= 3  # the devstack, its NATS server and its requester process
            os.kill(bench.pid, signal.SIGKILL)
            bench.wait(10)
            for pid in tree:
                wait_until(lambda pid=pid: _gone(pid), timeout=30, what=f"process {pid} to stop")
        finally:
            bench.kill()
            for pid in tree:  # whatever outlived it (a failure): not left loading the machine
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def test_a_benchmark_devstack_removes_its_state_unless_the_run_failed_or_run_all_owns_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(ROOT))  # benchmarks/ is not a package the suite imports
    from benchmarks.common import KEEP_STATE_ENV, STATE_ROOT_ENV, DevstackProcess

    monkeypatch.delenv(STATE_ROOT_ENV, raising=False)
    monkeypatch.delenv(KEEP_STATE_ENV, raising=False)
    with DevstackProcess.start("--noop", "--compute-nodes", "1") as stack:
        done = stack.state_dir
        assert (done / "devstack.log").exists()
    assert not done.exists()  # a clean run: its executions' files do not pile up

    def failing_run() -> Path:
        with DevstackProcess.start("--noop", "--compute-nodes", "1") as stack:
            failed.append(stack.state_dir)
            raise RuntimeError("the benchmark failed")

    failed: list[Path] = []
    with pytest.raises(RuntimeError):
        failing_run()
    assert (failed[0] / "devstack.log").exists()  # kept to look at
    shutil.rmtree(failed[0])

    monkeypatch.setenv(STATE_ROOT_ENV, str(tmp_path))  # as run_all sets it: removed at its end
    with DevstackProcess.start("--noop", "--compute-nodes", "1") as stack:
        owned = stack.state_dir
    assert owned.parent == tmp_path
    assert owned.exists()
