"""F8: a compute node cut off from NATS (a proxy the test controls) and coming back."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from shoal_common.spec import PublisherType
from tests.faults.cluster import FaultCluster, completed_executions, noop_spec, wait_all_terminal
from tests.support import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.xdist_group("processes")]


# On a slow link (0.3 s from NATS to compute-0) an acceptance the requester has recorded is
# often still in flight at the cut, so compute-0 never runs it: the test must expect late
# results only for what compute-0 ran (the cause of a CI flake; this case reproduced it).
@pytest.mark.parametrize("link_delay", [0.0, 0.3], ids=["fast-link", "slow-link"])
def test_partitioned_node_is_replaced_and_its_late_results_do_not_count(
    tmp_path: Path, link_delay: float
) -> None:
    cluster = FaultCluster(
        tmp_path / "cluster",
        compute_nodes=2,
        nats_proxied=("compute-0",),
        nats_delay=link_delay,
        env_of={
            "compute-0": {"SHOAL_COMPUTE_NOOP_DELAY_S": "3"},
            "compute-1": {"SHOAL_COMPUTE_NOOP_DELAY_S": "0.2"},
        },
    ).start()
    try:
        client = cluster.client(tmp_path / "key")
        # A Local publisher, so the late results have a publisher to reach (a noop-published
        # job's results are settled by the requester alone, ADR 0017).
        job_ids = [client.submit(noop_spec(PublisherType.LOCAL)).metadata.id for _ in range(8)]

        def accepted_on_victim() -> list[tuple[str, str]]:
            return [
                (j, e.compute_reference)
                for j in job_ids
                for e in client.state(j).executions
                if e.node_id == "compute-0" and e.state.value == "BidAccepted"
            ]

        # Running on the node is not enough: a taken bid (ADR 0029) runs before its answer
        # reaches the requester, and over the slow link a cut could lose that answer, leaving
        # the test nothing recorded as accepted (the cause of a CI failure). Cut only once the
        # requester has recorded compute-0 running something.
        def victim_running_accepted() -> bool:
            running = cluster.metric("compute-0", "shoal_compute_executions_running") >= 1
            return running and bool(accepted_on_victim())

        wait_until(
            victim_running_accepted, timeout=15, what="an accepted execution running on compute-0"
        )
        cluster.proxies["compute-0"].cut()
        cut_at = time.monotonic()
        # What the requester had accepted compute-0 for when the link went. Not all of it need
        # have reached the node: an acceptance is recorded before it is sent.
        accepted = accepted_on_victim()

        def victim_lost() -> bool:
            return cluster.nodes().get("compute-0", "").lower() not in ("live", "")

        wait_until(victim_lost, timeout=15, what="compute-0 seen as lost")
        detected = time.monotonic() - cut_at
        states = wait_all_terminal(client.state, job_ids, timeout=30)
        replaced = time.monotonic() - cut_at

        # Meanwhile compute-0 ran what it had to the end: its results wait in its outbox.
        def victim_idle() -> bool:
            return all(
                cluster.metric("compute-0", f"shoal_compute_executions_{gauge}") == 0
                for gauge in ("running", "queued")
            )

        wait_until(victim_idle, timeout=15, what="compute-0 finishing its executions")
        completed = {r["execution_id"] for r in cluster.logged("compute-0", "execution_completed")}
        stranded = [(job_id, ex) for job_id, ex in accepted if ex in completed]
        assert stranded, f"compute-0 completed none of {accepted} (it completed {completed})"
        cluster.proxies["compute-0"].restore()
        wait_until(lambda: cluster.nodes().get("compute-0") == "live", timeout=20, what="back")

        # Its late results reach the verifier and publisher...
        def late_published() -> bool:
            for job_id, ex in stranded:
                r = httpx.get(f"{cluster.publisher_url}/publisher/jobs/{job_id}", timeout=2)
                if r.status_code != 200 or ex not in {p["execution_id"] for p in r.json()}:
                    return False
            return True

        try:
            wait_until(late_published, timeout=20, what="late results relayed after the partition")
        except AssertionError as exc:  # say where they got stuck
            raise AssertionError(
                f"{exc}\ncompute-0 warnings: {cluster.logged('compute-0', level='warning')}"
                f"\npublisher warnings: {cluster.logged('publisher', level='warning')}"
            ) from None
        # ... and change nothing users see: one completed execution and one result per job.
        final = [client.state(j) for j in job_ids]
        assert [s.state.value for s in final] == ["Completed"] * len(job_ids)
        assert [s.version for s in final] == [s.version for s in states]
        for job_id, ex in stranded:
            state = client.state(job_id)
            assert completed_executions(state) != [ex]
            assert len(completed_executions(state)) == 1
            assert len(client.results(job_id)) == 1
            mine = next(e for e in state.executions if e.compute_reference == ex)
            assert mine.state.value == "Failed"
        print(f"partition: detect {detected:.1f} s, all terminal {replaced:.1f} s")
    finally:
        cluster.stop()
