"""`shoal devstack --processes all|2`: services in child processes run jobs, keep them across a
restart, and leave no process behind, whether the devstack stops or is killed (SIGKILL)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import pytest

from shoal_client.client import ShoalClient
from shoal_common.signing import ClientKey
from shoal_common.spec import Deal, DockerSpec, Engine, PublisherType, Spec
from tests.support import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.xdist_group("processes")]


def spec() -> Spec:
    return Spec(
        Engine=Engine.NOOP,
        Publisher=PublisherType.NOOP,
        Docker=DockerSpec(Image="busybox", Entrypoint=["echo", "apart"]),
        Deal=Deal(Concurrency=1),
    )


class Devstack:
    """``python -m shoal_cli devstack`` as a user starts it, with its process tree."""

    def __init__(self, state_dir: Path, processes: str) -> None:
        (state_dir / "ready").unlink(missing_ok=True)
        self.state_dir = state_dir
        log = (state_dir.parent / f"devstack-{processes}.log").open("ab")
        args = [sys.executable, "-m", "shoal_cli", "devstack", "--noop", "--compute-nodes", "1"]
        self.proc = subprocess.Popen(
            [*args, "--processes", processes, "--state-dir", str(state_dir)],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        wait_until(self._ready, timeout=60, what=f"devstack --processes {processes} ready")
        self.info = json.loads((state_dir / "devstack.json").read_text())
        self.children = psutil.Process(self.proc.pid).children(recursive=True)

    def _ready(self) -> bool:
        assert self.proc.poll() is None, f"devstack exited; see {self.state_dir.parent}"
        return (self.state_dir / "ready").exists()

    def client(self, key_dir: Path) -> ShoalClient:
        return ShoalClient(self.info["api_url"], key=ClientKey.load_or_create(key_dir))

    def gone(self) -> bool:
        """Every process of the tree has exited (zombies of the killed parent count as gone)."""
        for p in self.children:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    return False
            except psutil.NoSuchProcess:
                continue
        return True

    def kill_all(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for p in self.children:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                continue


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[Devstack]]:
    stacks: list[Devstack] = []
    yield stacks
    for stack in stacks:  # a failed test must not leave its devstacks behind
        stack.kill_all()


def test_devstack_in_processes_runs_a_job_keeps_it_and_leaves_no_orphans(
    tmp_path: Path, started: list[Devstack]
) -> None:
    state = tmp_path / "stack"
    state.mkdir()

    # Every service its own process: a job runs to completion.
    stack = Devstack(state, "all")
    started.append(stack)
    assert stack.info["processes"] == "all"
    names = {"nats", "publisher", "verifier", "requester", "compute-0"}
    assert names <= set(stack.info["pids"])
    assert {p.pid for p in stack.children} >= {stack.info["pids"][n] for n in names}
    with stack.client(tmp_path / "key") as client:
        job_id = client.submit(spec()).metadata.id
        assert client.wait(job_id, timeout=30).state.value == "Completed"

    # A clean stop (SIGTERM) stops every child.
    stack.proc.send_signal(signal.SIGTERM)
    assert stack.proc.wait(30) == 0
    wait_until(stack.gone, timeout=10, what="no child left after a stop")

    # Restarted on the same state dir (the requester alone in a child now): same API address,
    # the job is still there.
    stack = Devstack(state, "2")
    started.append(stack)
    assert stack.info["api_url"] == json.loads((state / "devstack.json").read_text())["api_url"]
    assert set(stack.info["pids"]) == {"devstack", "nats", "requester"}
    with stack.client(tmp_path / "key") as client:
        assert client.state(job_id).state.value == "Completed"

    # SIGKILL of the devstack: the kernel's parent-death signal stops every child.
    t0 = time.monotonic()
    stack.proc.kill()
    stack.proc.wait(10)
    wait_until(stack.gone, timeout=20, what="no orphan after the devstack was killed")
    assert time.monotonic() - t0 < 20
