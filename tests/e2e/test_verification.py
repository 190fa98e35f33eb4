"""Deterministic verification on a devstack with wrong-result nodes (behaviours 34-37, issue 4)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from shoal_client.client import ShoalClient
from shoal_common.selectors import parse_selector
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
from tests.e2e.test_cli import shoal
from tests.support import count

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


def deterministic(concurrency: int, confidence: int = 0, selector: str | None = None) -> Spec:
    return Spec(
        Engine=Engine.NOOP,
        Verifier=VerifierType.DETERMINISTIC,
        Publisher=PublisherType.NOOP,
        Docker=DockerSpec(Image="busybox", Entrypoint=["echo", "same bytes everywhere"]),
        Deal=Deal(Concurrency=concurrency, Confidence=confidence or None),
        NodeSelectors=parse_selector(selector) if selector else None,
    )


def run(client: ShoalClient, spec: Spec) -> JobState:
    return client.wait(client.submit(spec).metadata.id, timeout=45)


def bad_nodes(*indexes: int) -> dict[int, dict[str, bool]]:
    return {i: {"bad_results": True} for i in indexes}


def test_all_agree(make_devstack: StackFactory, tmp_path: Path) -> None:
    """Behaviour 34: 3 verified, 0 rejected."""
    client = make_devstack(compute_nodes=3).client(tmp_path / "k")
    state = run(client, deterministic(3))
    assert state.state.value == "Completed"
    assert count(state, "Completed") == 3
    assert count(state, "ResultRejected") == 0


def test_one_wrong_of_three_is_rejected(make_devstack: StackFactory, tmp_path: Path) -> None:
    """Behaviour 35: 2 verified, 1 rejected, and the wrong one is the bad node's."""
    client = make_devstack(compute_nodes=3, node_settings=bad_nodes(0)).client(tmp_path / "k")
    state = run(client, deterministic(3))
    assert state.state.value == "Completed"
    assert count(state, "Completed") == 2
    rejected = [e for e in state.executions if e.state.value == "ResultRejected"]
    assert [e.node_id for e in rejected] == ["compute-0"]


def test_draw_escalates_to_a_fresh_node(make_devstack: StackFactory, tmp_path: Path) -> None:
    """Behaviour 36, Shoal's way: a 1-vs-1 draw asks a third node, which settles it."""
    stack = make_devstack(compute_nodes=3, node_settings=bad_nodes(0))
    client = stack.client(tmp_path / "k")
    state = run(client, deterministic(2, selector="favour_name in (compute-0,compute-1)"))
    assert state.state.value == "Completed"
    by_node = {e.node_id: e.state.value for e in state.executions}
    assert by_node["compute-0"] == "ResultRejected"
    assert by_node["compute-1"] == "Completed"
    assert by_node["compute-2"] == "Completed"


def test_draw_without_a_fresh_node_fails_clearly(
    make_devstack: StackFactory, tmp_path: Path
) -> None:
    stack = make_devstack(compute_nodes=2, node_settings=bad_nodes(0))
    client = stack.client(tmp_path / "k")
    state = run(client, deterministic(2))
    assert state.state.value == "Error"
    assert count(state, "Completed") == 0
    events = client.events(state.job_id)
    assert any("verif" in e.comment.lower() for e in events), [e.comment for e in events]


def test_confidence_not_reached_verifies_nothing(
    make_devstack: StackFactory, tmp_path: Path
) -> None:
    """Behaviour 37: 5 nodes, 2 bad, confidence 4: none verified."""
    stack = make_devstack(compute_nodes=5, node_settings=bad_nodes(0, 1))
    client = stack.client(tmp_path / "k")
    state = run(client, deterministic(5, confidence=4))
    assert state.state.value == "Error"
    assert count(state, "Completed") == 0


def test_bad_node_is_flagged_and_then_chosen_less(
    make_devstack: StackFactory, tmp_path: Path
) -> None:
    """Issue 4: a node caught returning wrong results is flagged (API, `shoal node list` and
    `describe`) and the scheduler asks it less: of 5 nodes, 3 per job, a clean node would run
    in 3 jobs of 5 (18 of the last 30); the flagged one runs in far fewer."""
    stack = make_devstack(compute_nodes=5, bad_compute_actors=1)
    client = stack.client(tmp_path / "k")
    ran_on_bad: list[bool] = []
    for _ in range(40):
        state = run(client, deterministic(3))
        assert state.state.value == "Completed"
        on_bad = [e for e in state.executions if e.node_id == "compute-0"]
        # Never a wrong result accepted: whenever the bad node ran, it was rejected.
        assert all(e.state.value == "ResultRejected" for e in on_bad)
        ran_on_bad.append(bool(on_bad))
    assert any(ran_on_bad), "the bad node never ran: nothing was tested"
    assert sum(ran_on_bad[10:]) <= 9, ran_on_bad

    nodes = {n["id"]: n for n in client.nodes()}
    bad = nodes["compute-0"]["reputation"]
    assert bad["rejected"] == sum(ran_on_bad)
    assert bad["flagged"] is True
    assert bad["completed"] == 0
    assert bad["weight"] < 0.5
    for node_id in ("compute-1", "compute-2", "compute-3", "compute-4"):
        assert nodes[node_id]["reputation"]["flagged"] is False
        assert nodes[node_id]["reputation"]["rejected"] == 0
    assert sum(n["reputation"]["completed"] for n in nodes.values()) == 3 * 40 - bad["rejected"]

    home = tmp_path / "home"
    listed = shoal(stack, home, "node", "list")
    assert listed.exit_code == 0, listed.output
    rows = {line.split()[0]: line for line in listed.stdout.splitlines() if line.strip()}
    assert f"{bad['weight']:.2f} ({bad['rejected']} wrong)" in rows["compute-0"]
    assert not any("wrong" in rows[f"compute-{i}"] for i in range(1, 5))
    described = shoal(stack, home, "node", "describe", "compute-0")
    assert described.exit_code == 0, described.output
    reputation = yaml.safe_load(described.stdout)["reputation"]
    assert (reputation["rejected"], reputation["flagged"]) == (bad["rejected"], True)
