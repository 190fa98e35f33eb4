"""F6: the disk of a compute node fills up (a tiny tmpfs under its executions folder)."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from shoal_common.spec import LabelSelector, SelectionOperator, Spec
from tests.faults.cluster import FaultCluster, completed_executions, noop_spec, wait_all_terminal

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.xdist_group("processes")]


@contextlib.contextmanager
def tiny_disk(path: Path, size: str = "256k") -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _write_forever(fd: int) -> None:
    while True:
        os.write(fd, b"\0" * 4096)


def fill(disk: Path) -> Path:
    """Write until the disk says ENOSPC; return the file holding the space."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError, match="No space left") as full:
            _write_forever(fd)
        assert full.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def on(node_label: str, spec: Spec | None = None) -> Spec:
    spec = spec or writing()
    spec.node_selectors = [
        LabelSelector(Key="disk", Operator=SelectionOperator.EQUALS, Values=[node_label])
    ]
    return spec


def writing() -> Spec:
    """A noop job whose output is bigger than a row keeps, so its node writes it to the
    executions disk at once (ADR 0030): smaller results need no disk to complete."""
    spec = noop_spec()
    assert spec.docker is not None
    spec.docker.entrypoint = ["echo", "f" * (64 * 1024)]
    return spec


def test_full_disk_fails_the_execution_clearly_and_loses_nothing(tmp_path: Path) -> None:
    root = tmp_path / "cluster"
    with tiny_disk(root / "compute-0" / "executions") as disk:
        cluster = FaultCluster(
            root,
            compute_nodes=2,
            args_of={"compute-0": ["--labels", "disk=full"], "compute-1": ["--labels", "disk=ok"]},
        ).start()
        try:
            client = cluster.client(tmp_path / "key")
            filler = fill(disk)

            # Only the full node may run it: the job fails, saying why.
            pinned = client.wait(client.submit(on("full")).metadata.id, timeout=30)
            assert pinned.state.value == "Error", pinned
            reasons = [e.status for e in pinned.executions if e.node_id == "compute-0"]
            assert reasons, pinned
            assert all("disk full on node compute-0" in r for r in reasons), reasons
            # A result small enough for its row needs no disk: that job completes there.
            small = client.wait(client.submit(on("full", noop_spec())).metadata.id, timeout=30)
            assert small.state.value == "Completed", small

            # Anywhere: what lands on the full node is re-placed; every job completes.
            job_ids = [client.submit(writing()).metadata.id for _ in range(8)]
            states = wait_all_terminal(client.state, job_ids, timeout=40)
            assert [s.state.value for s in states] == ["Completed"] * len(job_ids)
            for state in states:
                assert len(completed_executions(state)) == 1
                for e in state.executions:
                    if e.node_id == "compute-0":
                        assert e.state.value == "Failed", state
                        assert "disk full" in e.status

            # The node stayed up; with space again it runs jobs.
            assert cluster.nodes()["compute-0"] == "live"
            filler.unlink()
            again = client.wait(client.submit(on("full")).metadata.id, timeout=30)
            assert again.state.value == "Completed", again
        finally:
            cluster.stop()
