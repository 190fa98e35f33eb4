"""Scheduling behaviours (13-24, 27, 31 of behaviours.md) on a devstack with the noop engine.

Each test builds the cluster it needs, submits through the real client, waits on the job's
state with a deadline, then checks what happened to every execution.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal_client.client import ShoalClient, ShoalClientError
from shoal_common.selectors import parse_selector
from shoal_common.spec import (
    Deal,
    DockerSpec,
    Engine,
    JobHistoryType,
    JobState,
    PublisherType,
    ResourcesSpec,
    Spec,
    VerifierType,
)
from tests.conftest import StackFactory
from tests.support import count

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


def noop_spec(
    *,
    concurrency: int = 1,
    min_bids: int = 0,
    timeout: float | None = None,
    selector: str | None = None,
    cpu: str | None = None,
    memory: str | None = None,
    engine: Engine = Engine.NOOP,
    publisher: PublisherType = PublisherType.NOOP,
) -> Spec:
    return Spec(
        Engine=engine,
        Verifier=VerifierType.NOOP,
        Publisher=publisher,
        Docker=DockerSpec(Image="busybox", Entrypoint=["echo", "hello"]),
        Deal=Deal(Concurrency=concurrency, MinBids=min_bids or None),
        Timeout=timeout,
        NodeSelectors=parse_selector(selector) if selector else None,
        Resources=ResourcesSpec(CPU=cpu, Memory=memory) if cpu or memory else None,
    )


def run(client: ShoalClient, spec: Spec, timeout: float = 30) -> JobState:
    job = client.submit(spec)
    return client.wait(job.metadata.id, timeout=timeout)


def comments(client: ShoalClient, job_id: str) -> list[str]:
    return [h.comment for h in client.events(job_id)]


def test_concurrency_two_of_three_nodes_completes_exactly_two(
    make_devstack: StackFactory, tmp_path: Path
) -> None:
    """Behaviour 13."""
    client = make_devstack(compute_nodes=3).client(tmp_path / "key")
    state = run(client, noop_spec(concurrency=2))
    assert state.state.value == "Completed"
    assert count(state, "Completed") == 2


def test_single_node_min_bids_zero(make_devstack: StackFactory, tmp_path: Path) -> None:
    """Behaviour 14: 1 completes, none fail."""
    client = make_devstack(compute_nodes=1).client(tmp_path / "key")
    state = run(client, noop_spec())
    assert state.state.value == "Completed"
    assert count(state, "Completed") == 1
    assert count(state, "Failed") == 0


def test_min_bids_above_concurrency_rejects_surplus_bids(
    make_devstack: StackFactory, tmp_path: Path
) -> None:
    """Behaviour 15: concurrency 1, min bids 3 -> 1 completes, 2 bids rejected."""
    client = make_devstack(compute_nodes=3).client(tmp_path / "key")
    state = run(client, noop_spec(concurrency=1, min_bids=3))
    assert state.state.value == "Completed"
    assert count(state, "Completed") == 1
    assert count(state, "BidRejected") == 2


def test_min_bids_not_met_fails_and_cancels_good_bid(
    make_devstack: StackFactory, tmp_path: Path
) -> None:
    """Behaviour 16: two nodes' bid strategy errors, retries off -> the job fails, none complete."""
    stack = make_devstack(
        compute_nodes=3,
        node_settings={0: {"bad_bids": True}, 1: {"bad_bids": True}},
        requester_settings={"max_retries": 0},
    )
    client = stack.client(tmp_path / "key")
    # Rank the good node first, so it is among the min_bids nodes asked.
    state = run(client, noop_spec(concurrency=1, min_bids=2, selector="favour_name=compute-2"))
    assert state.state.value == "Error"
    assert count(state, "Completed") == 0
    good = [e for e in state.executions if e.node_id == "compute-2"]
    assert good, "the good node was asked for a bid"
    assert all(e.state.value in ("BidRejected", "Cancelled") for e in good)


def test_concurrency_three_min_bids_three(make_devstack: StackFactory, tmp_path: Path) -> None:
    """Behaviour 17."""
    client = make_devstack(compute_nodes=3).client(tmp_path / "key")
    state = run(client, noop_spec(concurrency=3, min_bids=3))
    assert state.state.value == "Completed"
    assert count(state, "Completed") == 3


def test_more_min_bids_than_nodes_is_refused_at_submit(
    make_devstack: StackFactory, tmp_path: Path
) -> None:
    """Behaviour 18."""
    client = make_devstack(compute_nodes=3).client(tmp_path / "key")
    with pytest.raises(ShoalClientError) as err:
        client.submit(noop_spec(concurrency=3, min_bids=5))
    assert err.value.status == 400
    assert "not enough nodes" in err.value.message.lower()
    assert client.list_jobs(limit=10) == []


def test_rejecting_node_then_good_node(make_devstack: StackFactory, tmp_path: Path) -> None:
    """Behaviour 19: completes on the good node after the rejection, which is recorded."""
    stack = make_devstack(compute_nodes=2, node_settings={0: {"reject_bids": True}})
    client = stack.client(tmp_path / "key")
    asked_bad_node = 0
    # Rendezvous ranking differs per job: some jobs ask the bad node first. Until three have
    # (at most 20 jobs), so the rejection path is really taken.
    for _ in range(20):
        state = run(client, noop_spec())
        assert state.state.value == "Completed"
        completed = [e for e in state.executions if e.state.value == "Completed"]
        assert [e.node_id for e in completed] == ["compute-1"]
        rejected = [e for e in state.executions if e.node_id == "compute-0"]
        assert all(e.state.value == "AskForBidRejected" for e in rejected)
        asked_bad_node += bool(rejected)
        if asked_bad_node >= 3:
            break
    assert asked_bad_node >= 3, "the rejecting node was asked in fewer than 3 of 20 jobs"


def test_only_rejecting_node_fails_with_the_rejection_recorded(
    make_devstack: StackFactory, tmp_path: Path
) -> None:
    """Behaviour 20."""
    stack = make_devstack(
        compute_nodes=1,
        node_settings={0: {"reject_bids": True}},
        requester_settings={"queue_timeout": 1.0},
    )
    client = stack.client(tmp_path / "key")
    state = run(client, noop_spec())
    assert state.state.value == "Error"
    assert count(state, "Completed") == 0
    assert any("reject" in c.lower() for c in comments(client, state.job_id))


def test_failing_executor_then_good_node(make_devstack: StackFactory, tmp_path: Path) -> None:
    """Behaviour 21: completes after one failure; the failure message is recorded."""
    stack = make_devstack(compute_nodes=2, node_settings={0: {"fail_executions": True}})
    client = stack.client(tmp_path / "key")
    # Prefer the failing node, so the first attempt fails and the retry goes elsewhere.
    state = run(client, noop_spec(selector="favour_name=compute-0"))
    assert state.state.value == "Completed"
    assert [e.node_id for e in state.executions if e.state.value == "Completed"] == ["compute-1"]
    failed = [e for e in state.executions if e.state.value == "Failed"]
    assert [e.node_id for e in failed] == ["compute-0"]
    assert failed[0].status, "the failure says why"


def test_only_failing_executor_fails_after_bounded_retries(
    make_devstack: StackFactory, tmp_path: Path
) -> None:
    """Behaviour 22: each failure is recorded; the job ends in Error."""
    stack = make_devstack(compute_nodes=1, node_settings={0: {"fail_executions": True}})
    client = stack.client(tmp_path / "key")
    state = run(client, noop_spec())
    assert state.state.value == "Error"
    failed = [e for e in state.executions if e.state.value == "Failed"]
    assert len(failed) >= 1
    assert all(e.status for e in failed)


def test_timeouts(make_devstack: StackFactory, tmp_path: Path) -> None:
    """Behaviour 23: within the timeout completes, past it fails "timed out", above a node's
    maximum is not bid on (unless the client is on the node's bypass list)."""
    bypass_key = tmp_path / "bypass"
    from shoal_common.signing import ClientKey

    bypass_id = ClientKey.load_or_create(bypass_key).client_id
    stack = make_devstack(
        compute_nodes=1,
        extra_compute={
            "noop_delay_s": 0.5,
            "timeout_max": 100.0,
            "timeout_bypass_clients": [bypass_id],
        },
    )
    client = stack.client(tmp_path / "key")
    assert run(client, noop_spec(timeout=30)).state.value == "Completed"
    late = run(client, noop_spec(timeout=0.2))
    assert late.state.value == "Error"
    assert any("timed out" in c.lower() for c in comments(client, late.job_id))
    with pytest.raises(ShoalClientError, match=r"(?i)not enough nodes"):
        client.submit(noop_spec(timeout=1000))
    bypass = stack.client(bypass_key)
    assert run(bypass, noop_spec(timeout=1000)).state.value == "Completed"


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("name=compute-1", {"compute-1"}),
        ("env=prod", {"compute-0", "compute-1"}),
        ("env!=prod", {"compute-2"}),
        ("env in (prod,test)", {"compute-0", "compute-1", "compute-2"}),
    ],
)
def test_label_selectors(
    make_devstack: StackFactory, tmp_path: Path, selector: str, expected: set[str]
) -> None:
    """Behaviour 24: selectors choose exactly the matching nodes."""
    stack = make_devstack(compute_nodes=3, labels=["env=prod", "env=prod", "env=test"])
    client = stack.client(tmp_path / "key")
    state = run(client, noop_spec(concurrency=len(expected), selector=selector))
    assert state.state.value == "Completed"
    assert {e.node_id for e in state.executions if e.state.value == "Completed"} == expected


def test_label_selector_matching_no_node_is_refused(
    make_devstack: StackFactory, tmp_path: Path
) -> None:
    stack = make_devstack(compute_nodes=3, labels=["env=prod", "env=prod", "env=test"])
    client = stack.client(tmp_path / "key")
    with pytest.raises(ShoalClientError, match=r"(?i)not enough nodes"):
        client.submit(noop_spec(selector="env notin (prod,test)"))


def test_favour_label_is_a_preference(make_devstack: StackFactory, tmp_path: Path) -> None:
    """``favour_`` selectors prefer matching nodes without excluding the others."""
    stack = make_devstack(compute_nodes=3, labels=["env=prod", "env=prod", "env=test"])
    client = stack.client(tmp_path / "key")
    for _ in range(3):
        state = run(client, noop_spec(selector="favour_env=test"))
        assert [e.node_id for e in state.executions if e.state.value == "Completed"] == [
            "compute-2"
        ]
    state = run(client, noop_spec(concurrency=3, selector="favour_env=test"))
    assert count(state, "Completed") == 3


def test_resource_defaults_and_per_job_limit(make_devstack: StackFactory, tmp_path: Path) -> None:
    """Behaviour 27: no resources -> defaults (runs); above the per-job limit -> not bid on."""
    stack = make_devstack(compute_nodes=1, extra_compute={"max_job_cpu": 1.0})
    client = stack.client(tmp_path / "key")
    assert run(client, noop_spec()).state.value == "Completed"
    with pytest.raises(ShoalClientError, match=r"(?i)not enough nodes"):
        client.submit(noop_spec(cpu="2"))


def test_missing_capability_is_refused_at_submit(
    make_devstack: StackFactory, tmp_path: Path
) -> None:
    """Behaviour 31: no node has the engine or the verifier -> "not enough nodes" at submit."""
    stack = make_devstack(
        compute_nodes=2,
        extra_compute={"engines": ["Noop"], "verifiers": ["Noop"]},
    )
    client = stack.client(tmp_path / "key")
    with pytest.raises(ShoalClientError, match=r"(?i)not enough nodes"):
        client.submit(noop_spec(engine=Engine.DOCKER))
    spec = noop_spec()
    spec.verifier = VerifierType.DETERMINISTIC
    with pytest.raises(ShoalClientError, match=r"(?i)not enough nodes"):
        client.submit(spec)


def test_history_records_every_step(make_devstack: StackFactory, tmp_path: Path) -> None:
    """Every state change is history: job-level first "Job created", execution-level after."""
    client = make_devstack(compute_nodes=1).client(tmp_path / "key")
    state = run(client, noop_spec())
    events = client.events(state.job_id)
    assert events[0].type is JobHistoryType.JOB_LEVEL
    assert events[0].comment == "Job created"
    job_states = [e.job_state.new for e in events if e.job_state and e.job_state.new]
    assert job_states[-1] == "Completed"
    exec_states = [
        e.execution_state.new for e in events if e.execution_state and e.execution_state.new
    ]
    for expected in ("BidAccepted", "WaitingVerification", "ResultAccepted", "Completed"):
        assert expected in exec_states
