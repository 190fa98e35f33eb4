"""Pure domain rules: output truncation, transitions, out-of-order and duplicate events,
matching and ranking, the inventory's capacity accounting, submit validation."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal_common.errors import Conflict, InvalidInput
from shoal_common.events import (
    Envelope,
    Event,
    ExecutionFailed,
    PublishFailed,
    ResultAccepted,
    ResultProposed,
    ResultPublished,
)
from shoal_common.protocol import Capacity, Heartbeat
from shoal_common.spec import (
    ExecutionStateType,
    JobStateType,
    LabelSelector,
    RunOutput,
    StorageSpec,
    utcnow,
)
from shoal_common.testing import wait_for
from shoal_requester.domain import lifecycle
from shoal_requester.domain.inventory import LOST, PRESUMED, Inventory
from shoal_requester.domain.matching import misfit, rendezvous, requirements, split_selectors
from shoal_requester.domain.model import Changes, advance, history_for, new_execution_update
from shoal_requester.domain.orchestrator import Orchestrator
from shoal_requester.domain.validation import validate_submit
from shoal_requester.settings import RequesterSettings
from shoal_requester.store.memory import MemoryRequesterStore
from shoal_requester.testing import GiB, harness, make_execution, make_job, make_spec, node_info

ES = ExecutionStateType


# --- behaviour 12: truncation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "truncated"), [(2047, False), (2048, False), (2049, True), (0, False)]
)
def test_12_output_truncated_above_the_maximum(size: int, truncated: bool) -> None:
    out = lifecycle.truncate_output({"stdout": "a" * size, "stderr": "b" * size}, 2048)
    assert out is not None
    assert out["stdouttruncated"] is truncated
    assert out["stderrtruncated"] is truncated
    assert len(out["stdout"]) == min(size, 2048)


def test_truncation_never_splits_a_character_and_keeps_node_flags() -> None:
    out = lifecycle.truncate_output({"stdout": "é" * 3, "stdouttruncated": False}, 5)
    assert out is not None
    assert out["stdout"] == "éé"
    assert out["stdouttruncated"] is True
    kept = lifecycle.truncate_output({"stdout": "x", "stderrtruncated": True}, 5)
    assert kept is not None
    assert kept["stderrtruncated"] is True
    assert lifecycle.truncate_output(None, 5) is None


# --- transitions --------------------------------------------------------------------------------


def _running() -> Any:
    return make_execution(make_job(), state=ES.BID_ACCEPTED)


def test_out_of_order_events_fill_in_the_stages() -> None:
    ex = _running()
    now = utcnow()
    # The publisher's event arrives first: every stage up to Completed is recorded.
    published = lifecycle.on_result_published(ex, published={"CID": "Qm1"}, now=now)
    assert published is not None
    assert [s for s, _ in published.steps] == [
        ES.WAITING_VERIFICATION,
        ES.RESULT_ACCEPTED,
        ES.COMPLETED,
    ]
    assert published.after.version == ex.version + 3
    assert published.after.result_cid == "Qm1"
    # The proposal, late, only adds its run output; acceptance changes nothing.
    late = lifecycle.on_result_proposed(
        published.after,
        result_cid="Qm1",
        run_output={"stdout": "hi"},
        now=now,
        max_output_bytes=10,
    )
    assert late is not None
    assert late.steps == ()
    assert late.after.state is ES.COMPLETED
    assert late.after.run_output is not None
    assert late.after.run_output["stdout"] == "hi"
    assert lifecycle.on_result_accepted(late.after, result_cid="Qm1", now=now) is None
    rows = history_for(Changes(executions=[published]))
    assert [r.version for r in rows] == [2, 3, 4]


# --- ADR 0017: noop verification and publishing settled by the requester -------------------------


def _proposed(ex: Any, now: Any) -> Any:
    return lifecycle.on_result_proposed(
        ex, result_cid="Qm1", run_output={"stdout": "hi"}, now=now, max_output_bytes=10
    )


def _settled_proposal(ex: Any, now: Any, *, verify: bool, publish: bool, job: str = "j") -> Any:
    return lifecycle.settled_here(
        _proposed(ex, now), job_id=job, verify=verify, publish=publish, now=now
    )


def test_a_noop_result_is_accepted_and_published_in_the_update_of_its_proposal() -> None:
    ex = _running()
    now = utcnow()
    update = _settled_proposal(ex, now, verify=True, publish=True, job="job-9")
    assert update is not None
    assert update.before is ex
    assert [s for s, _ in update.steps] == [
        ES.WAITING_VERIFICATION,
        ES.RESULT_ACCEPTED,
        ES.COMPLETED,
    ]
    assert update.after.version == ex.version + 3
    assert update.after.verification == {"Complete": True, "Result": True}
    assert update.after.published == {
        "StorageSource": "IPFS",
        "Name": f"job-job-9-host-{ex.node_id}",
        "CID": "Qm1",
    }
    assert update.after.run_output is not None
    assert update.after.run_output["stdout"] == "hi"
    rows = history_for(Changes(executions=[update]))
    assert [r.version for r in rows] == [2, 3, 4]


def test_only_the_noop_stages_are_settled_here() -> None:
    ex = _running()
    now = utcnow()
    # Deterministic verification, noop publisher: the proposal waits for the verifier...
    waiting = _settled_proposal(ex, now, verify=False, publish=True)
    assert waiting is not None
    assert waiting.after.state is ES.WAITING_VERIFICATION
    # ... whose acceptance is then published here.
    accepted = lifecycle.on_result_accepted(waiting.after, result_cid="Qm1", now=now)
    done = lifecycle.settled_here(accepted, job_id="j", verify=False, publish=True, now=now)
    assert done is not None
    assert [s for s, _ in done.steps] == [ES.RESULT_ACCEPTED, ES.COMPLETED]
    # A real publisher: acceptance is as far as the requester goes.
    kept = _settled_proposal(ex, now, verify=True, publish=False)
    assert kept is not None
    assert kept.after.state is ES.RESULT_ACCEPTED
    # A late event that only fills in data settles nothing (it reached no stage).
    late = _proposed(waiting.after.evolve(run_output=None), now)
    assert late is not None
    assert late.steps == ()
    assert lifecycle.settled_here(late, job_id="j", verify=True, publish=True, now=now) is late


async def test_a_noop_job_completes_with_no_verifier_or_publisher_running() -> None:
    async with harness(verifier=False) as h:
        await h.node("n")
        noop_job = await h.submit()
        job = await h.wait_state(noop_job)
        assert job.state is JobStateType.COMPLETED
        [ex] = await h.executions(noop_job)
        assert ex.published is not None
        assert ex.published["CID"] == ex.result_cid
        news = [r.new for r in await h.history(noop_job) if r.execution_id]
        assert news[-3:] == ["WaitingVerification", "ResultAccepted", "Completed"]
        # A Local-published job is accepted here and waits for its publisher.
        local_job = await h.submit(make_spec(PublisherSpec={"Type": "Local"}))

        async def accepted() -> bool:
            execs = await h.executions(local_job)
            return bool(execs) and execs[0].state is ES.RESULT_ACCEPTED

        await wait_for(accepted)
        assert (await h.service.store.get_job(local_job)).state is JobStateType.IN_PROGRESS


@pytest.mark.parametrize("verifier", ["Noop", "Deterministic"])
async def test_an_unverified_publication_counts_only_for_a_noop_verified_job(
    verifier: str,
) -> None:
    """ADR 0017: the publisher publishes a result whose proposal claims noop verification; the
    job's own spec decides whether that publication completes the execution."""
    async with harness(verifier=False) as h:
        await h.node("n", run="hang")
        job_id = await h.submit(make_spec(Verifier=verifier, PublisherSpec={"Type": "Local"}))
        [ex] = await _wait_running(h, job_id)
        published = ResultPublished(
            job_id=job_id,
            execution_id=ex.id,
            node_id="n",
            result=StorageSpec(CID="Qm1"),
            unverified=True,
        )
        await h.service.orchestrator.handle_event(published, event_id=Envelope.wrap(published).id)
        [after] = await h.executions(job_id)
        if verifier == "Noop":
            assert after.state is ES.COMPLETED
            assert (await h.wait_state(job_id)).state is JobStateType.COMPLETED
        else:
            assert after.state is ES.BID_ACCEPTED  # the node's claim did not count


def test_28_decisions_on_unknown_or_finished_executions_change_nothing() -> None:
    ex = _running()
    now = utcnow()
    done = lifecycle.end_execution(ex, ES.CANCELLED, "cancelled", now=now)
    assert done is not None
    cancelled = done.after
    # Nothing moves a terminal execution: not a late result, a failure or a second cancel.
    assert (
        lifecycle.on_result_proposed(
            cancelled, result_cid="Qm", run_output=None, now=now, max_output_bytes=10
        )
        is None
    )
    assert lifecycle.on_result_accepted(cancelled, result_cid="Qm", now=now) is None
    assert lifecycle.on_result_rejected(cancelled, reason="x", now=now) is None
    assert lifecycle.on_result_published(cancelled, published={}, now=now) is None
    assert lifecycle.end_execution(cancelled, ES.FAILED, "x", now=now) is None
    with pytest.raises(ValueError, match="last step"):
        new_execution_update(ex, [(ES.ASK_FOR_BID, "")])


async def test_28_bid_decisions_for_unknown_or_moved_executions_are_refused() -> None:
    store = MemoryRequesterStore()
    job, _ = await store.create_job(make_job())
    ex = make_execution(job, state=ES.BID_ACCEPTED)
    # Accepting a bid of an execution the store does not have: an error, nothing written.
    accept = advance(ex, [(ES.BID_ACCEPTED, "bid accepted")], now=utcnow())
    with pytest.raises(Conflict):
        await store.apply(Changes(executions=[accept]))
    assert await store.find_execution(ex.id) is None
    # Rejecting one that has moved on since it was read: an error, no state change.
    await store.apply(Changes(executions=[new_execution_update(ex, [(ES.BID_ACCEPTED, "")])]))
    stored = await store.find_execution(ex.id)
    assert stored is not None
    moved = advance(stored, [(ES.WAITING_VERIFICATION, "")], now=utcnow())
    await store.apply(Changes(executions=[moved]))
    late_reject = advance(stored, [(ES.BID_REJECTED, "too late")], now=utcnow())
    with pytest.raises(Conflict):
        await store.apply(Changes(executions=[late_reject]))
    after = await store.find_execution(ex.id)
    assert after is not None
    assert after.state is ES.WAITING_VERIFICATION


async def test_28_events_for_unknown_executions_are_ignored() -> None:
    async with harness() as h:
        await h.node("n")
        job_id = await h.submit()
        await h.wait_state(job_id)
        before = list(h.store.history)
        for evt in (
            ResultProposed(
                job_id=job_id,
                execution_id="nope",
                node_id="n",
                result_cid="Qm",
                run_output=RunOutput(),
            ),
            ExecutionFailed(job_id="other", execution_id="nope", node_id="n", error="x"),
        ):
            await h.service.orchestrator.handle_event(evt, event_id=Envelope.wrap(evt).id)
        assert h.store.history == before


async def test_redelivered_events_change_nothing() -> None:
    async with harness(verifier=False) as h:
        await h.node("n", run="hang")
        job_id = await h.submit()
        [ex] = await _wait_running(h, job_id)
        accepted = ResultAccepted(job_id=job_id, execution_id=ex.id, node_id="n", result_cid="Q")
        env = Envelope.wrap(accepted)
        for _ in range(3):
            await h.service.orchestrator.handle_event(accepted, event_id=env.id)
        published = ResultPublished(
            job_id=job_id, execution_id=ex.id, node_id="n", result=StorageSpec(CID="Q")
        )
        pub_env = Envelope.wrap(published)
        for _ in range(2):
            await h.service.orchestrator.handle_event(published, event_id=pub_env.id)
        job = await h.wait_state(job_id)
        assert job.state is JobStateType.COMPLETED
        news = Counter(r.new for r in await h.history(job_id))
        assert news["ResultAccepted"] == 1
        assert news["Completed"] == 2  # the execution and the job, once each


async def _wait_running(h: Any, job_id: str) -> list[Any]:
    from shoal_common.testing import wait_for

    async def probe() -> list[Any] | None:
        execs = await h.executions(job_id)
        return execs if execs and execs[0].state is ES.BID_ACCEPTED else None

    return await wait_for(probe)


def test_job_outcome_rules() -> None:
    job = make_job(spec=make_spec(Deal={"Concurrency": 2}))
    completed = make_execution(job, state=ES.COMPLETED)
    failed = make_execution(job, state=ES.FAILED, status="boom")
    running = make_execution(job, state=ES.BID_ACCEPTED)
    t = lifecycle.tally
    assert lifecycle.outcome(job, t([completed, completed]), can_place_more=True) == (
        lifecycle.Outcome(JobStateType.COMPLETED, "")
    )
    assert lifecycle.outcome(job, t([completed, running]), can_place_more=False) is None
    assert lifecycle.outcome(job, t([completed, failed]), can_place_more=True) is None
    partial = lifecycle.outcome(job, t([completed, failed]), can_place_more=False)
    assert partial is not None
    assert partial.state is JobStateType.COMPLETED_PARTIALLY
    error = lifecycle.outcome(job, t([failed]), can_place_more=False)
    assert error is not None
    assert error.state is JobStateType.ERROR
    assert "boom" in error.status
    # A failure the node calls permanent is not replaced: it counts towards the deal.
    permanent = failed.evolve(retryable=False)
    assert lifecycle.tally([permanent, completed]).needed(job) == 0


# --- behaviour 11: a failed run's partial result ------------------------------------------------


def test_an_error_waits_for_the_partial_results_being_published() -> None:
    job = make_job()
    now = utcnow()
    failed = lifecycle.end_execution(
        _running(), ES.FAILED, "timed out", now=now, retryable=False, result_cid="QmPart"
    )
    assert failed is not None
    assert failed.after.result_cid == "QmPart"
    assert lifecycle.awaiting_partial(failed.after)
    assert lifecycle.outcome(job, lifecycle.tally([failed.after]), can_place_more=False) is None
    published = lifecycle.on_result_published(
        failed.after, published={"CID": "QmPart"}, now=now, partial=True
    )
    assert published is not None
    assert published.steps == ()
    assert published.after.state is ES.FAILED
    error = lifecycle.outcome(job, lifecycle.tally([published.after]), can_place_more=False)
    assert error is not None
    assert error.state is JobStateType.ERROR
    # Not published either: the job ends, and says why the partial results are missing.
    lost = lifecycle.on_partial_publish_failed(failed.after, error="store full", now=now)
    assert lost is not None
    assert lost.after.published == {}
    assert "partial results not published: store full" in lost.after.status
    assert lifecycle.outcome(job, lifecycle.tally([lost.after]), can_place_more=False) is not None


def test_a_partial_publication_never_completes_an_execution() -> None:
    now = utcnow()
    # It may arrive before the failure (another stream): kept, the state does not move.
    early = lifecycle.on_result_published(
        _running(), published={"CID": "QmPart"}, now=now, partial=True
    )
    assert early is not None
    assert early.after.state is ES.BID_ACCEPTED
    failed = lifecycle.end_execution(
        early.after, ES.FAILED, "timed out", now=now, result_cid="QmPart"
    )
    assert failed is not None
    assert not lifecycle.awaiting_partial(failed.after)
    cancelled = lifecycle.end_execution(_running(), ES.CANCELLED, "cancelled", now=now)
    assert cancelled is not None
    assert (
        lifecycle.on_result_published(
            cancelled.after, published={"CID": "Q"}, now=now, partial=True
        )
        is None
    )


@pytest.mark.parametrize("published", [True, False], ids=["published", "publish-failed"])
async def test_a_failed_job_ends_once_its_partial_result_is_settled(published: bool) -> None:
    async with harness(verifier=False) as h:
        await h.node("n", run="hang")
        job_id = await h.submit()
        [ex] = await _wait_running(h, job_id)

        async def handle(evt: Event) -> None:
            await h.service.orchestrator.handle_event(evt, event_id=Envelope.wrap(evt).id)

        await handle(
            ExecutionFailed(
                job_id=job_id,
                execution_id=ex.id,
                node_id="n",
                error="timed out after 2s",
                timed_out=True,
                retryable=False,
                result_cid="QmPart",
                result_url="http://n/content/QmPart",
            )
        )
        job = await h.service.store.find_job(job_id)
        assert job is not None
        assert not job.state.terminal, "the job ended before its partial results were published"
        assert await h.service.jobs.results(job_id) == []
        if published:
            await handle(
                ResultPublished(
                    job_id=job_id,
                    execution_id=ex.id,
                    node_id="n",
                    result=StorageSpec(CID="QmPart"),
                    partial=True,
                )
            )
        else:
            await handle(
                PublishFailed(
                    job_id=job_id, execution_id=ex.id, node_id="n", error="gone", partial=True
                )
            )
        job = await h.wait_state(job_id)
        assert job.state is JobStateType.ERROR
        assert "timed out" in job.status
        results = await h.service.jobs.results(job_id)
        assert [e.published for e in results] == ([{"CID": "QmPart"}] if published else [])
        [after] = await h.executions(job_id)
        assert after.state is ES.FAILED


def test_an_accepted_result_that_fails_to_publish_ends_the_job() -> None:
    # It carries the proposal's CID but is no partial result: nothing more will be published
    # for it, so the job must not wait (found by tests/faults/test_upload_cut.py).
    now = utcnow()
    job = make_job()
    proposed = lifecycle.on_result_proposed(
        make_execution(job, state=ES.BID_ACCEPTED),
        result_cid="QmFull",
        run_output=None,
        now=now,
        max_output_bytes=0,
    )
    assert proposed is not None
    failed = lifecycle.on_publish_failed(proposed.after, error="gone", now=now)
    assert failed is not None
    assert failed.after.state is ES.FAILED
    assert not failed.after.retryable
    assert failed.after.status == "publishing failed: gone"
    assert not lifecycle.awaiting_partial(failed.after)
    ended = lifecycle.outcome(job, lifecycle.tally([failed.after]), can_place_more=False)
    assert ended is not None
    assert ended.state is JobStateType.ERROR


# --- matching and ranking ------------------------------------------------------------------------


def _req(**spec: Any) -> Any:
    s = make_spec(**spec)
    return requirements(s, client_id="c", resources=Capacity(cpu=0.1, memory=100))


def test_misfit_reasons() -> None:
    info = node_info("n", labels={"env": "prod"}, timeout_max=100)
    assert misfit(info, _req()) is None
    assert misfit(info.model_copy(update={"engines": []}), _req()) == "engine Noop not available"
    no_ipfs = info.model_copy(update={"storage_sources": []})
    got = misfit(no_ipfs, _req(inputs=[{"CID": "Qm", "path": "/in"}]))
    assert got == "storage source IPFS not supported"
    assert "publisher" in (misfit(info.model_copy(update={"publishers": []}), _req()) or "")
    assert "verifier" in (misfit(info.model_copy(update={"verifiers": []}), _req()) or "")
    selector = [{"Key": "env", "Operator": "=", "Values": ["test"]}]
    assert misfit(info, _req(NodeSelectors=selector)) == "label selector env=test not matched"
    assert "above the node's maximum" in (misfit(info, _req(Timeout=101)) or "")
    bypass = info.model_copy(update={"bypass_clients": ["c"]})
    assert misfit(bypass, _req(Timeout=101)) is None
    arch = [{"Key": "arch", "Operator": "=", "Values": ["arm64"]}]
    assert misfit(info, _req(NodeSelectors=arch)) is not None
    assert misfit(info.model_copy(update={"arch": "arm64"}), _req(NodeSelectors=arch)) is None
    big = requirements(make_spec(), client_id="c", resources=Capacity(cpu=64, memory=1))
    assert "more resources" in (misfit(info, big) or "")


def test_favour_selectors_are_preferences() -> None:
    hard, soft = split_selectors(
        [
            LabelSelector.model_validate({"Key": "favour_env", "Operator": "=", "Values": ["a"]}),
            LabelSelector.model_validate({"Key": "zone", "Operator": "exists"}),
        ]
    )
    assert [s.key for s in hard] == ["zone"]
    assert [s.key for s in soft] == ["env"]


def test_rendezvous_spreads_jobs_and_follows_weight() -> None:
    nodes = [f"node-{i}" for i in range(4)]
    wins = Counter(max(nodes, key=lambda n: rendezvous(f"job-{j}", n, 1.0)) for j in range(4000))
    assert all(800 < wins[n] < 1200 for n in nodes)
    weights = {"node-0": 3.0, "node-1": 1.0, "node-2": 1.0, "node-3": 1.0}
    weighted = Counter(
        max(nodes, key=lambda n: rendezvous(f"job-{j}", n, weights[n])) for j in range(4000)
    )
    assert weighted["node-0"] > 1600
    # Stable: the same job ranks nodes the same way every time.
    assert rendezvous("job", "node-0", 1.0) == rendezvous("job", "node-0", 1.0)


def _cluster_orchestrator(nodes: int, tmp_path: Path, **settings: Any) -> Orchestrator:
    inventory = Inventory(lost_after=3600.0)
    for i in range(nodes):
        inventory.observe(Heartbeat(info=node_info(f"node-{i:04d}"), seq=1, sent_at=0.0))
    return Orchestrator(
        store=MemoryRequesterStore(),
        inventory=inventory,
        compute=cast(Any, None),  # never reached: only candidates are computed here
        settings=RequesterSettings(state_dir=tmp_path, node_id="requester", **settings),
    )


def test_large_clusters_rank_a_window_of_nodes_yet_spread_jobs_evenly(tmp_path: Path) -> None:
    """Placement in a big cluster looks at ``candidate_sample`` free nodes, not all of them,
    and over many jobs still uses every node about equally."""
    orchestrator = _cluster_orchestrator(200, tmp_path)  # the default window: 8 free nodes
    first: Counter[str] = Counter()
    for j in range(2000):
        job = make_job(job_id=f"job-{j}")
        free, busy, _ = orchestrator._candidates(job, orchestrator._requirements(job), [])
        assert len(free) == 8
        assert busy == []
        first[free[0].id] += 1
    assert len(first) == 200  # every node gets work
    assert max(first.values()) < 4 * 2000 / 200


def test_the_window_holds_enough_nodes_for_every_ask_round_of_a_job(tmp_path: Path) -> None:
    """A job that wants more executions than the window holds still gets enough candidates
    for all its ask rounds (want x (max_retries + 1))."""
    orchestrator = _cluster_orchestrator(200, tmp_path, candidate_sample=8, max_retries=3)
    job = make_job(job_id="wide-job")
    free, _, _ = orchestrator._candidates(job, orchestrator._requirements(job), [], want=5)
    assert len(free) == 20


def test_jobs_with_preferences_still_rank_every_node(tmp_path: Path) -> None:
    orchestrator = _cluster_orchestrator(100, tmp_path, candidate_sample=16)
    favour = [{"Key": "favour_zone", "Operator": "exists"}]
    job = make_job(spec=make_spec(NodeSelectors=favour))
    free, _, fitting = orchestrator._candidates(job, orchestrator._requirements(job), [])
    assert (len(free), fitting) == (100, 100)
    plain = make_job()
    free, _, _ = orchestrator._candidates(plain, orchestrator._requirements(plain), [])
    assert len(free) == 16
    unsampled = _cluster_orchestrator(100, tmp_path, candidate_sample=0)
    free, _, _ = unsampled._candidates(plain, unsampled._requirements(plain), [])
    assert len(free) == 100


# --- inventory -----------------------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _beat(node_id: str, *, cpu_free: float, seq: int = 1, stopping: bool = False) -> Heartbeat:
    info = node_info(node_id, cpu=4, available=Capacity(cpu=cpu_free, memory=8 * GiB))
    return Heartbeat(info=info, seq=seq, sent_at=0.0, stopping=stopping)


@settings(deadline=None, max_examples=300)
@given(
    available=st.tuples(st.floats(0, 8), st.integers(0, 16 * GiB), st.integers(0, 4)),
    held=st.lists(st.tuples(st.floats(0, 4), st.integers(0, 8 * GiB), st.integers(0, 2))),
    released_after_beat=st.integers(0, 3),
    need=st.tuples(st.floats(0, 4), st.integers(0, 8 * GiB), st.integers(0, 2)),
    total_cpu=st.sampled_from([0.0, 4.0]),
    full=st.booleans(),
)
def test_room_for_is_fits_in_and_free_fraction_of_free(
    available: tuple[float, int, int],
    held: list[tuple[float, int, int]],
    released_after_beat: int,
    need: tuple[float, int, int],
    total_cpu: float,
    full: bool,
) -> None:
    """Placement's shortcut gives what the free Capacity would (fits_in, free_fraction)."""
    total = Capacity(cpu=total_cpu, memory=8 * GiB, disk=100 * GiB, gpu=2)
    cpu, memory, gpu = available
    info = node_info("n").model_copy(
        update={
            "total": total,
            "available": Capacity(cpu=cpu, memory=memory, disk=50 * GiB, gpu=gpu),
        }
    )
    inv = Inventory(lost_after=3.5, clock=_Clock())
    inv.observe(Heartbeat(info=info, seq=1, sent_at=0.0))
    for i, (c, m, g) in enumerate(held):
        inv.hold("n", f"e{i}", Capacity(cpu=c, memory=m, gpu=g))
    inv.observe(Heartbeat(info=info, seq=2, sent_at=0.0))
    for i in range(min(released_after_beat, len(held))):
        inv.release(f"e{i}")
    for i, (c, m, g) in enumerate(held):
        inv.hold("n", f"f{i}", Capacity(cpu=c, memory=m, gpu=g))
    if full:
        inv.mark_full("n")
    node = inv.get("n")
    assert node is not None
    want = Capacity(cpu=need[0], memory=need[1], gpu=need[2])
    free = node.free
    expected = free.free_fraction(total) if want.fits_in(free) else None
    assert node.room_for(want) == expected


def test_remembered_misfit_follows_the_node_and_the_requirements() -> None:
    """Nodes remember misfit verdicts by requirements: a heartbeat that changes what the node
    can do, or requirements that differ in anything misfit reads, are judged afresh."""
    inv = Inventory(lost_after=3.5, clock=_Clock())
    info = node_info("n", timeout_max=100.0)
    inv.observe(Heartbeat(info=info, seq=1, sent_at=0.0))
    node = inv.get("n")
    assert node is not None
    short, long = _req(Timeout=50), _req(Timeout=101)
    assert short.fit_key == _req(Timeout=50).fit_key != long.fit_key
    assert node.misfit(short) is None
    assert "above the node's maximum" in (node.misfit(long) or "")
    bypass = requirements(make_spec(Timeout=101), client_id="vip", resources=long.resources)
    assert bypass.fit_key != long.fit_key
    assert node.misfit(bypass) is not None  # not a bypass client yet
    # Capacity reports alone keep the verdicts; a change of capabilities drops them.
    busy = info.model_copy(update={"available": Capacity(cpu=1, memory=GiB)})
    inv.observe(Heartbeat(info=busy, seq=2, sent_at=0.0))
    assert node.misfits
    inv.observe(Heartbeat(info=info.model_copy(update={"engines": []}), seq=3, sent_at=0.0))
    assert node.misfit(short) == "engine Noop not available"
    inv.observe(
        Heartbeat(info=info.model_copy(update={"bypass_clients": ["vip"]}), seq=4, sent_at=0.0)
    )
    assert node.misfit(short) is None
    assert node.misfit(bypass) is None


def test_inventory_capacity_accounting() -> None:
    inv = Inventory(lost_after=3.5, clock=_Clock())
    first = inv.observe(_beat("n", cpu_free=4))
    assert (first.new, first.changed) == (True, True)
    node = inv.get("n")
    assert node is not None
    need = Capacity(cpu=1, memory=GiB)
    inv.hold("n", "e1", need)
    inv.hold("n", "e1", need)  # idempotent
    inv.hold("n", "e2", need)
    assert node.free.cpu == 2
    # A release before the next heartbeat takes back what was placed since the last one.
    assert inv.release("e2")
    assert node.free.cpu == 3
    # The next heartbeat reports e1 as used; releasing it afterwards adds it back.
    seen = inv.observe(_beat("n", cpu_free=3, seq=2))
    assert not seen.changed
    assert node.free.cpu == 3
    inv.release("e1")
    assert node.free.cpu == 4
    assert not inv.release("e1")
    # The node now reports more than before: worth a wake-up of queued jobs even though this
    # process had counted the release already (a bid refused in between is retried then).
    assert inv.observe(_beat("n", cpu_free=4, seq=3)).more_free is True
    assert inv.observe(_beat("n", cpu_free=4, seq=4)).more_free is False


def test_inventory_loss_and_revival() -> None:
    clock = _Clock()
    inv = Inventory(lost_after=3.5, clock=clock)
    inv.observe(_beat("a", cpu_free=4))
    clock.now = 1.5
    inv.observe(_beat("b", cpu_free=4))
    clock.now = 3.0
    inv.observe(_beat("b", cpu_free=4, seq=2))
    assert [n.id for n in inv.schedulable()] == ["a", "b"]  # cached from here on
    clock.now = 4.0
    assert [n.id for n in inv.expire()] == ["a"]
    assert inv.expire() == []
    assert [n.id for n in inv.schedulable()] == ["b"]
    back = inv.observe(_beat("a", cpu_free=4, seq=9))
    assert back.new
    assert back.more_free
    stopping = inv.observe(_beat("b", cpu_free=4, seq=2, stopping=True))
    assert stopping.changed
    assert [n.id for n in inv.schedulable()] == ["a"]
    assert inv.live_count() == 1


def test_inventory_loads_persisted_nodes_as_presumed() -> None:
    clock = _Clock()
    inv = Inventory(lost_after=3.5, clock=clock)
    inv.observe(_beat("a", cpu_free=4))
    record = inv.get("a")
    assert record is not None
    fresh = Inventory(lost_after=3.5, clock=clock)
    gone = dataclasses.replace(record.record(), id="gone", state=LOST)
    fresh.load([record.record(), gone])
    loaded = fresh.get("a")
    assert loaded is not None
    assert loaded.state == PRESUMED
    assert fresh.get("gone") is None
    clock.now = 10
    fresh.observe(_beat("b", cpu_free=4))  # heartbeats reach the new process: a is silent
    assert [n.id for n in fresh.expire()] == ["a"]


def test_a_silence_of_every_node_is_not_taken_for_their_loss() -> None:
    """B21: NATS killed for 3 s with 1,000 jobs in flight: no heartbeat reached the requester
    for longer than ``lost_after``, it declared every node lost and failed their executions,
    which carried on; the verifier then accepted the first results and refused the re-runs as
    late, and 19 jobs stayed InProgress for good. Silence of everyone is the link, not the
    nodes: each node gets ``lost_after`` from when heartbeats flow again."""
    clock = _Clock()
    inv = Inventory(lost_after=3.5, clock=clock)
    for seq, t in enumerate((0.0, 1.0), start=1):
        clock.now = t
        inv.observe(_beat("a", cpu_free=4, seq=seq))
        inv.observe(_beat("b", cpu_free=4, seq=seq))
    clock.now = 5.0  # NATS down since about 1.0: nobody heard for 4 s
    assert inv.expire() == []
    clock.now = 5.5  # NATS back; a reconnects first
    inv.observe(_beat("a", cpu_free=4, seq=3))
    assert inv.expire() == []  # b has lost_after from now to come back
    clock.now = 6.2
    inv.observe(_beat("b", cpu_free=4, seq=3))
    assert inv.expire() == []
    assert inv.live_count() == 2
    # A node that really dies is still found while the others are heard: b stops beating.
    for seq, t in enumerate((7.0, 8.0, 9.0, 10.0), start=4):
        clock.now = t
        inv.observe(_beat("a", cpu_free=4, seq=seq))
    assert [n.id for n in inv.expire()] == ["b"]


def test_the_last_node_dying_is_still_found() -> None:
    clock = _Clock()
    inv = Inventory(lost_after=3.5, all_silent_after=30.0, clock=clock)
    inv.observe(_beat("a", cpu_free=4))
    clock.now = 10.0
    assert inv.expire() == []  # everyone silent: the link, most likely
    clock.now = 30.5
    assert [n.id for n in inv.expire()] == ["a"]


# --- validation ----------------------------------------------------------------------------------


def _payload(**spec: Any) -> dict[str, Any]:
    from shoal_common.spec import to_wire

    return {"APIVersion": "V1beta1", "ClientID": "c", "Spec": to_wire(make_spec(**spec))}


def test_normalisation_makes_defaults_explicit() -> None:
    payload = _payload(Timeout=0, Deal={"MinBids": 1}, PublisherSpec=None, Publisher="ipfs")
    payload["Spec"].pop("Verifier")
    _parsed, spec, resources = validate_submit(payload, default_timeout=1800)
    assert spec.timeout == 1800
    assert spec.deal is not None
    assert spec.deal.concurrency == 1
    assert spec.publisher_spec is not None
    assert spec.publisher_spec.type == spec.publisher
    assert spec.verifier is not None
    assert spec.verifier.value == "Noop"
    assert resources.cpu == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"NodeSelectors": [{"Key": "n", "Operator": "gt", "Values": ["x"]}]}, "integer"),
        ({"NodeSelectors": [{"Key": "n", "Operator": "exists", "Values": ["x"]}]}, "no values"),
        ({"NodeSelectors": [{"Key": "n", "Operator": "=", "Values": []}]}, "exactly one"),
        ({"NodeSelectors": [{"Key": "favour_", "Operator": "=", "Values": ["a"]}]}, "Key"),
        ({"Network": {"Type": "None", "Domains": ["a.com"]}}, "only be used with"),
        ({"Engine": "Wasm"}, "EntryModule is required"),
    ],
)
def test_validation_messages(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        validate_submit(_payload(**spec), default_timeout=60)


def test_a_record_made_of_a_job_keeps_the_model_parsing_its_wire_form_gives() -> None:
    """``JobRecord.of`` skips parsing the stored form again: only sound if both agree."""
    from shoal_common.spec import Job

    record = make_job(annotations=["a", "b"])
    assert "model" in record.__dict__  # kept, not parsed again
    assert Job.model_validate(record.job) == record.model
    assert record.evolve(state=JobStateType.QUEUED).__dict__["model"] is record.model
