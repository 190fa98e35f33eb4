"""F3 (the test-sized run): ``kill -9`` of the requester, the verifier, the publisher or the NATS
server with ~150 jobs in flight, then a restart on the same state (NATS: same port and store).

The jobs go through every service: a noop run, the result sealed to and decided on by the
deterministic verifier (Deal concurrency 1), then published to the local content store (the
publisher fetches it from the node). Compute node kills are F2, F8 and F9 (chaos benchmark).
The full-size run with 1,000 jobs and timings: ``python -m benchmarks.crash``.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest

from shoal_client.client import ShoalClient, ShoalClientError
from shoal_common.spec import JobState, JobStateType, PublisherType, VerifierType
from tests.faults.cluster import FaultCluster, completed_executions, noop_spec
from tests.support import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.xdist_group("processes")]

JOBS = 150
SUBMITTERS = 16
DOWN_S = 1.0


def broken_invariants(states: dict[str, JobState | None], results: dict[str, int]) -> list[str]:
    """What F3 forbids, job by job: not terminal (lost), not Completed, other than exactly one
    completed execution (Deal concurrency 1), other than exactly one result users can see."""
    problems: list[str] = []
    for job_id, state in states.items():
        if state is None:
            problems.append(f"{job_id}: acknowledged, but the requester does not know it")
            continue
        if not state.state.terminal:
            problems.append(f"{job_id}: lost, still {state.state.value} ({state.status})")
        elif state.state is not JobStateType.COMPLETED:
            problems.append(f"{job_id}: ended {state.state.value} ({state.status})")
        done = len(completed_executions(state))
        if done != 1:
            problems.append(f"{job_id}: {done} completed executions")
        shown = results.get(job_id, 0)
        if shown != 1:
            problems.append(f"{job_id}: {shown} results visible")
    return problems


def job_states(client: ShoalClient) -> dict[str, str] | None:
    """Every job's state in one list call; None while the requester cannot answer."""
    try:
        rows = client.list_jobs(limit=10 * JOBS)
    except ShoalClientError:
        return None
    return {row["State"]["JobID"]: row["State"]["State"] for row in rows}


def kill(cluster: FaultCluster, victim: str) -> None:
    if victim == "nats":
        assert cluster.nats is not None
        cluster.nats.kill()
    else:
        cluster.services[victim].kill()


def restart(cluster: FaultCluster, victim: str) -> None:
    if victim == "nats":
        cluster.restart_nats()
    else:
        cluster.services[victim].start()


@pytest.mark.parametrize("victim", ["requester", "verifier", "publisher", "nats"])
def test_kill_9_with_jobs_in_flight_loses_and_duplicates_nothing(
    tmp_path: Path, victim: str
) -> None:
    # Nodes with room for every job at once: a burst that fills them can end a job in Error
    # instead of Queued (B18, docs/reliability.md), which is not what this test is about.
    env = {"SHOAL_COMPUTE_NOOP_DELAY_S": "0.1", "SHOAL_COMPUTE_CPU": "100"}
    cluster = FaultCluster(tmp_path / "cluster", compute_nodes=2, compute_env=env).start()
    try:
        client = cluster.client(tmp_path / "key")
        spec = noop_spec(PublisherType.LOCAL, VerifierType.DETERMINISTIC)
        # Submitted from many threads, so the cluster cannot keep up: most are in flight.
        with ThreadPoolExecutor(SUBMITTERS) as pool:
            job_ids = list(pool.map(lambda _: client.submit(spec).metadata.id, range(JOBS)))

        before = job_states(client) or {}
        in_flight = sum(1 for j in job_ids if not JobStateType(before[j]).terminal)
        kill(cluster, victim)
        killed = time.monotonic()
        time.sleep(DOWN_S)
        restart(cluster, victim)

        def all_terminal() -> dict[str, str] | None:
            now = job_states(client)
            if now is None or any(not JobStateType(now.get(j, "New")).terminal for j in job_ids):
                return None
            return now

        wait_until(all_terminal, timeout=90, what=f"{JOBS} jobs terminal after the {victim} kill")
        recovered = time.monotonic() - killed
        states: dict[str, JobState | None] = {j: client.state(j) for j in job_ids}
        results = {j: len(client.results(j)) for j in job_ids}
        print(
            f"{victim} kill with {in_flight} of {JOBS} jobs in flight -> all terminal in "
            f"{recovered:.1f} s"
        )
        assert in_flight > 0, "every job ended before the kill: the test proved nothing"
        problems = broken_invariants(states, results)
        assert not problems, f"{len(problems)} problems, e.g. {problems[:5]}"
    finally:
        cluster.stop()


def _state(job_id: str, state: str, executions: list[str]) -> JobState:
    now = datetime.now(UTC).isoformat()
    return JobState.model_validate(
        {
            "JobID": job_id,
            "State": state,
            "CreateTime": now,
            "UpdateTime": now,
            "Executions": [
                {
                    "JobID": job_id,
                    "NodeId": "compute-0",
                    "ComputeReference": f"{job_id}-e{i}",
                    "State": ex,
                    "CreateTime": now,
                    "UpdateTime": now,
                }
                for i, ex in enumerate(executions)
            ],
        }
    )


def test_the_check_catches_lost_failed_and_duplicated_jobs() -> None:
    """The invariants above can fail: each kind of breakage is reported, a good job is not."""
    states: dict[str, JobState | None] = {
        "good": _state("good", "Completed", ["Failed", "Completed"]),
        "stuck": _state("stuck", "InProgress", ["BidAccepted"]),
        "failed": _state("failed", "Error", ["Failed"]),
        "twice": _state("twice", "Completed", ["Completed", "Completed"]),
        "shown-twice": _state("shown-twice", "Completed", ["Completed"]),
        "unknown": None,
    }
    results = {"good": 1, "twice": 2, "shown-twice": 2}
    problems = broken_invariants(states, results)
    flagged = {p.split(":", 1)[0] for p in problems}
    assert flagged == {"stuck", "failed", "twice", "shown-twice", "unknown"}, problems
    assert any("lost, still InProgress" in p for p in problems)
    assert any(p.startswith("twice: 2 completed executions") for p in problems)
    assert any(p.startswith("shown-twice: 2 results visible") for p in problems)
