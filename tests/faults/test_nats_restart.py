"""F4: the NATS server killed with SIGKILL mid-run and started again on the same store."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.faults.cluster import FaultCluster, completed_executions, noop_spec, wait_all_terminal
from tests.support import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.xdist_group("processes")]


def test_nats_kill_9_mid_run_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    cluster = FaultCluster(
        tmp_path / "cluster", compute_nodes=2, compute_env={"SHOAL_COMPUTE_NOOP_DELAY_S": "0.5"}
    ).start()
    try:
        client = cluster.client(tmp_path / "key")
        job_ids = [client.submit(noop_spec()).metadata.id for _ in range(30)]

        # Kill as soon as the first job is done: the others are queued or running.
        wait_until(lambda: client.state(job_ids[0]).state.terminal, timeout=30, what="a job done")
        assert cluster.nats is not None
        cluster.nats.kill()
        killed = time.monotonic()
        # While NATS is down the API still acknowledges work (outbox in the requester's store).
        during = [client.submit(noop_spec()).metadata.id for _ in range(5)]
        time.sleep(2)  # the outage itself
        cluster.restart_nats()
        everything = job_ids + during

        states = wait_all_terminal(client.state, everything, timeout=45)
        recovered = time.monotonic() - killed
        print(f"nats kill -> all {len(everything)} terminal: {recovered:.1f} s")
        before, while_down = states[: len(job_ids)], states[len(job_ids) :]
        assert [s.state.value for s in before] == ["Completed"] * len(before), [
            (s.state.value, s.status) for s in before if s.state.value != "Completed"
        ]
        for state in states:
            assert len(completed_executions(state)) <= 1, state
            if state.state.value == "Completed":
                assert len(completed_executions(state)) == 1, state
                assert len(client.results(state.job_id)) == 1, state.job_id
        # Jobs submitted while NATS was down complete too: their asks that found no node yet
        # are retried, not taken for refusals (B16, docs/reliability.md).
        assert [s.state.value for s in while_down] == ["Completed"] * len(while_down), [
            (s.state.value, s.status) for s in while_down if s.state.value != "Completed"
        ]
    finally:
        cluster.stop()
