"""A devstack of simulated compute nodes only (``--simulated-nodes``): the scale benchmarks' mode.

The requester, verifier and publisher are the real ones; the 50 nodes are a SimulatedFleet
over the real NATS server, in the devstack's process (to reach the fleet) or, as the
benchmarks run it, in a child process. Jobs must complete through the same protocol as on
real nodes: bids, accept, a ResultProposed (sealed for deterministic jobs), verification,
publishing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal_common.spec import (
    Deal,
    DockerSpec,
    Engine,
    JobState,
    PublisherType,
    Spec,
    VerifierType,
)
from tests.conftest import StackFactory
from tests.support import count, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

NODES = 50


def spec(
    *,
    concurrency: int = 1,
    verifier: VerifierType = VerifierType.NOOP,
    publisher: PublisherType = PublisherType.LOCAL,
) -> Spec:
    return Spec(
        Engine=Engine.NOOP,
        Verifier=verifier,
        Publisher=publisher,
        Docker=DockerSpec(Image="busybox", Entrypoint=["true"]),
        Deal=Deal(Concurrency=concurrency),
    )


def test_fifty_simulated_nodes_list_and_run_jobs(
    make_devstack: StackFactory, tmp_path: Path
) -> None:
    stack = make_devstack(compute_nodes=0, simulated_nodes=NODES, simulated_in_process=True)
    client = stack.client(tmp_path / "k")

    nodes = client.nodes()
    assert len(nodes) == NODES
    assert all(n["state"] == "live" for n in nodes)
    assert all(n["labels"]["simulated"] == "true" for n in nodes)
    fleet_ids = {n["id"] for n in nodes}
    assert fleet_ids == set(stack.stack.fleet.node_ids)

    # Local publisher: the publisher fetches the result from the fleet's content endpoint.
    states: list[JobState] = [
        client.wait(client.submit(spec()).metadata.id, timeout=30) for _ in range(5)
    ]
    assert [s.state.value for s in states] == ["Completed"] * 5
    executions = [e for s in states for e in s.executions]
    assert {e.node_id for e in executions} <= fleet_ids
    assert all(e.state.value == "Completed" for e in executions)
    assert all(e.published_results is not None for e in executions)
    published = {e.published_results.cid for e in executions if e.published_results}
    assert len(published) == 1  # every noop run leaves the same (empty) result


def test_deterministic_job_is_sealed_and_verified_on_simulated_nodes(
    make_devstack: StackFactory, tmp_path: Path
) -> None:
    """Sealed proposals: the verifier opens them, finds three equal results, accepts all.

    The fleet runs in a child process here, as ``shoal devstack --simulated-nodes`` runs it.
    """
    stack = make_devstack(compute_nodes=0, simulated_nodes=NODES)
    assert stack.stack.fleet.pid > 0
    client = stack.client(tmp_path / "k")
    assert len(client.nodes()) == NODES
    job = client.submit(
        spec(concurrency=3, verifier=VerifierType.DETERMINISTIC, publisher=PublisherType.NOOP)
    )
    state = client.wait(job.metadata.id, timeout=45)
    assert state.state.value == "Completed"
    assert count(state, "Completed") == 3
    assert len({e.node_id for e in state.executions}) == 3


def test_stopped_fleet_leaves_the_schedulable_inventory(
    make_devstack: StackFactory, tmp_path: Path
) -> None:
    """A stopping heartbeat per node: the requester stops scheduling there at once."""
    stack = make_devstack(compute_nodes=0, simulated_nodes=5, simulated_in_process=True)
    client = stack.client(tmp_path / "k")
    assert {n["state"] for n in client.nodes()} == {"live"}
    stack.call(stack.stack.fleet.stop())

    def none_live() -> dict[str, str] | None:
        states = {n["id"]: n["state"] for n in client.nodes()}
        return states if "live" not in states.values() else None

    states = wait_until(none_live, timeout=10, what="every simulated node leaving")
    assert len(states) == 5
