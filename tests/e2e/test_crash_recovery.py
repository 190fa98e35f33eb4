"""kill -9 of the requester or a compute node while jobs run: nothing acknowledged is lost."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from shoal_common.spec import Deal, DockerSpec, Engine, PublisherType, Spec
from tests.processes import ProcessCluster
from tests.support import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.xdist_group("processes")]


def spec() -> Spec:
    return Spec(
        Engine=Engine.NOOP,
        Publisher=PublisherType.NOOP,
        Docker=DockerSpec(Image="busybox", Entrypoint=["echo", "survive"]),
        Deal=Deal(Concurrency=1),
    )


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ProcessCluster]:
    env = getattr(request, "param", {})
    c = ProcessCluster(tmp_path / "cluster", compute_nodes=2, compute_env=env).start()
    try:
        yield c
    finally:
        c.stop()


@pytest.mark.parametrize("cluster", [{"SHOAL_COMPUTE_NOOP_DELAY_S": "0.3"}], indirect=True)
def test_requester_kill_9_loses_no_acknowledged_job(
    cluster: ProcessCluster, tmp_path: Path
) -> None:
    client = cluster.client(tmp_path / "key")
    job_ids = [client.submit(spec()).metadata.id for _ in range(30)]
    cluster.services["requester"].kill()
    cluster.services["requester"].start()
    cluster.wait_ready()

    def all_terminal() -> list[str] | None:
        states = [client.state(j).state for j in job_ids]
        return [s.value for s in states] if all(s.terminal for s in states) else None

    final = wait_until(all_terminal, timeout=60, what="every acknowledged job terminal")
    assert final == ["Completed"] * len(job_ids)


@pytest.mark.parametrize("cluster", [{"SHOAL_COMPUTE_NOOP_DELAY_S": "4"}], indirect=True)
def test_compute_kill_9_mid_execution_completes_elsewhere(
    cluster: ProcessCluster, tmp_path: Path
) -> None:
    client = cluster.client(tmp_path / "key")
    job_id = client.submit(spec()).metadata.id

    def running_node() -> str | None:
        for e in client.state(job_id).executions:
            if e.state.value == "BidAccepted":
                return e.node_id
        return None

    victim = wait_until(running_node, timeout=10, what="an execution running")
    cluster.services[victim].kill()
    final = client.wait(job_id, timeout=40)
    assert final.state.value == "Completed"
    completed = [e.node_id for e in final.executions if e.state.value == "Completed"]
    assert completed
    assert victim not in completed
    lost = [e for e in final.executions if e.node_id == victim]
    assert lost
    assert lost[0].state.value == "Failed"
