"""Node reputation: what a node's record does to its ranking weight, and the requester keeping
that record from the verifier's decisions (issue 4)."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

import httpx

from shoal_common.bus import Bus
from shoal_common.events import (
    Envelope,
    ResultAccepted,
    ResultProposed,
    ResultPublished,
    ResultRejected,
    new_id,
)
from shoal_common.spec import (
    ExecutionStateType,
    JobStateType,
    StorageSourceType,
    StorageSpec,
    utcnow,
)
from shoal_common.subjects import Producer
from shoal_requester.domain.matching import (
    MIN_REPUTATION,
    REJECTION_HALF_LIFE,
    rendezvous,
    reputation_weight,
)
from shoal_requester.domain.model import NodeStanding
from shoal_requester.testing import harness, make_spec

ES = ExecutionStateType
NOW = utcnow()


def weight(**counts: int) -> float:
    return reputation_weight(NodeStanding(last_rejected=NOW, **counts), NOW)


# --- the weight ----------------------------------------------------------------------------------


def test_a_clean_record_is_full_weight() -> None:
    assert weight() == 1.0
    assert weight(completed=500) == 1.0


def test_rejections_lower_the_weight_more_than_failures() -> None:
    one_rejection, one_failure = weight(rejected=1), weight(failed=1)
    assert one_rejection < 0.5
    assert one_failure > 0.8
    assert weight(rejected=3) < one_rejection
    # The same wrong result counts for less on a long, otherwise good record.
    assert weight(completed=100, rejected=1) > one_rejection


def test_a_flagged_node_is_never_banned() -> None:
    worst = weight(rejected=10_000, failed=10_000)
    assert worst == MIN_REPUTATION
    assert worst > 0


def test_accepted_results_earn_the_weight_back() -> None:
    path = [weight(completed=c, rejected=2) for c in (0, 10, 50, 200, 1000)]
    assert path == sorted(path)
    assert path[-1] > 0.95


def test_rejections_fade_with_time() -> None:
    def aged(seconds: float) -> float:
        standing = NodeStanding(rejected=2, last_rejected=NOW - timedelta(seconds=seconds))
        return reputation_weight(standing, NOW)

    assert aged(0) < aged(REJECTION_HALF_LIFE) < aged(4 * REJECTION_HALF_LIFE)
    # After a quiet day the node ranks like a clean one again.
    assert aged(24 * REJECTION_HALF_LIFE) > 0.99
    # Halving: one half-life in, two rejections weigh as much as one fresh one.
    fresh_one = reputation_weight(NodeStanding(rejected=1, last_rejected=NOW), NOW)
    assert aged(REJECTION_HALF_LIFE) == fresh_one


def test_the_weight_tilts_rendezvous_ranking() -> None:
    """How often a node is among the top 3 of 10 for 2,000 jobs, clean vs flagged."""

    def top3_share(bad_weight: float) -> float:
        hits = 0
        for j in range(2000):
            scores = {f"n{i}": rendezvous(f"job-{j}", f"n{i}", 1.0) for i in range(1, 10)}
            scores["n0"] = rendezvous(f"job-{j}", "n0", bad_weight)
            top = sorted(scores, key=scores.__getitem__, reverse=True)[:3]
            hits += "n0" in top
        return hits / 2000

    clean = top3_share(1.0)
    once, often = top3_share(weight(rejected=1)), top3_share(weight(rejected=20))
    assert 0.25 < clean < 0.35  # a fair share: 3 of 10
    assert once < clean / 2
    assert often < 0.05
    assert often > 0  # still asked now and then: it can earn its way back


# --- the requester keeping the record ------------------------------------------------------------


class WrongResultVerifier:
    """Rejects every proposal from ``bad`` nodes, accepts (and publishes) the others."""

    def __init__(self, bus: Bus, bad: set[str]) -> None:
        self.bus = bus
        self.bad = bad

    async def start(self) -> None:
        await self.bus.consume_events(
            producer=Producer.COMPUTE,
            durable="test-verifier",
            handler=self._on_proposal,
            event_types=[ResultProposed.type],
        )

    async def _on_proposal(self, env: Envelope) -> None:
        evt = env.parse()
        assert isinstance(evt, ResultProposed)
        ids = {"job_id": evt.job_id, "execution_id": evt.execution_id, "node_id": evt.node_id}
        if evt.node_id in self.bad:
            decision: ResultRejected | ResultAccepted = ResultRejected(
                **ids, result_cid=evt.result_cid, reason="wrong result"
            )
            await self.bus.publish_event(Envelope.wrap(decision))
            return
        accepted = ResultAccepted(**ids, result_cid=evt.result_cid)
        await self.bus.publish_event(Envelope.wrap(accepted))
        published = StorageSpec(StorageSource=StorageSourceType.IPFS, CID=evt.result_cid)
        await self.bus.publish_event(Envelope.wrap(ResultPublished(**ids, result=published)))


REPUTATION_JOBS = 90


async def test_rejected_results_flag_the_node_and_it_is_chosen_less() -> None:
    async with harness(verifier=False, max_retries=3) as h:
        await WrongResultVerifier(h.bus, bad={"bad"}).start()
        for node_id in ("bad", "good-1", "good-2"):
            await h.node(node_id)
        chosen: Counter[str] = Counter()
        for _ in range(REPUTATION_JOBS):
            # A deterministic verifier: the requester accepts noop-verified results itself
            # (ADR 0017); this job waits for the (fake) verifier's decision.
            job_id = await h.submit(make_spec(Verifier="Deterministic"))
            job = await h.wait_state(job_id)
            [execution] = await h.executions(job_id)  # the node ranked first for this job
            chosen[execution.node_id] += 1
            # Under the noop verifier a rejected result ends the job (nothing to outvote it).
            wanted = JobStateType.ERROR if execution.node_id == "bad" else JobStateType.COMPLETED
            assert job.state is wanted
        await h.service.orchestrator.idle()

        # Without reputation "bad" would rank first for about a third of the jobs (30 of 90,
        # 14 or fewer in 2 of 10,000 runs); each wrong result it returns pushes it further
        # down. (45 jobs with a bound of 6 failed 2 runs in 16: too close to the tail.)
        assert chosen["bad"] >= 1
        assert chosen["bad"] <= 14

        transport = httpx.ASGITransport(app=h.service.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://requester") as http:
            nodes = {n["id"]: n for n in (await http.get("/api/v1/nodes")).json()}
            bad = (await http.get("/api/v1/nodes/bad")).json()
        assert bad["reputation"] == nodes["bad"]["reputation"]
        assert bad["reputation"]["rejected"] == chosen["bad"]
        assert bad["reputation"]["completed"] == 0
        assert bad["reputation"]["flagged"] is True
        assert bad["reputation"]["last_rejected"] is not None
        assert bad["reputation"]["weight"] < 0.5
        good = [nodes["good-1"]["reputation"], nodes["good-2"]["reputation"]]
        assert sum(r["completed"] for r in good) == REPUTATION_JOBS - chosen["bad"]
        assert all(r["flagged"] is False and r["weight"] == 1.0 for r in good)
        # The store holds the same record (what a restarted requester starts from).
        stored = {n.id: n.standing for n in await h.store.list_nodes()}
        assert stored["bad"].rejected == chosen["bad"]
        good_runs = stored["good-1"].completed + stored["good-2"].completed
        assert good_runs == REPUTATION_JOBS - chosen["bad"]


async def test_a_restarted_requester_remembers_reputations() -> None:
    async with harness() as h:
        await h.node("n1")
        job_id = await h.submit(make_spec())
        assert (await h.wait_state(job_id)).state is JobStateType.COMPLETED
        await h.service.orchestrator.idle()
        store = h.store
    async with harness(store=store) as h2:
        assert h2.service.inventory.standing("n1").completed == 1
        assert h2.service.inventory.standing(new_id()) == NodeStanding()


async def test_ranking_without_reputation_can_be_chosen() -> None:
    """``rank_by_reputation=False`` (for comparisons): records are kept, ranking ignores them."""
    async with harness(rank_by_reputation=False) as h:
        h.service.inventory.add_standing({"bad": NodeStanding(rejected=50, last_rejected=NOW)})
        assert h.service.orchestrator.reputation("bad") == 1.0
    async with harness() as h:
        h.service.inventory.add_standing({"bad": NodeStanding(rejected=50, last_rejected=NOW)})
        assert h.service.orchestrator.reputation("bad") == MIN_REPUTATION
