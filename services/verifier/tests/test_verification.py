"""Verification behaviours (34-38 and more) through the service on the in-memory bus and store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from shoal_common.bus import MemoryBus, event_subjects, subject_matches
from shoal_common.commitments import fetch_verifier_key, seal_proposal
from shoal_common.events import (
    Envelope,
    Event,
    ExecutionsPlanned,
    ResultAccepted,
    ResultProposed,
    ResultRejected,
    VerificationEscalated,
    VerificationFailed,
)
from shoal_common.spec import (
    Deal,
    PublisherSpec,
    PublisherType,
    RunOutput,
    VerifierType,
)
from shoal_common.subjects import Producer
from shoal_common.testing import wait_for
from shoal_verifier.domain.models import ProposalStatus
from shoal_verifier.handlers.events import proposals_handler
from shoal_verifier.service import VerifierService
from shoal_verifier.settings import VerifierSettings
from shoal_verifier.store.memory import MemoryVerifierStore

GOOD = "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o"
BAD = "QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH"
BAD2 = "QmUNLLsPACCz1vLxQVkXqqLX5R1X345qqfHbsf67hvA3Nn"


@dataclass
class Harness:
    """A verifier on a MemoryBus; helpers to play the requester and the compute nodes."""

    bus: MemoryBus
    service: VerifierService
    job_id: str = "job-1"
    proposed: dict[str, ResultProposed] = field(default_factory=dict)
    emitted: int = 0

    async def plan(
        self,
        expected: int,
        *,
        verifier: VerifierType = VerifierType.DETERMINISTIC,
        confidence: int | None = None,
        concurrency: int | None = None,
        executions: dict[str, str] | None = None,
    ) -> None:
        deal = Deal(Concurrency=concurrency or expected, Confidence=confidence)
        await self.emit(
            ExecutionsPlanned(
                job_id=self.job_id,
                expected=expected,
                verifier=verifier,
                deal=deal,
                executions=executions or {},
            )
        )

    async def planned(self) -> None:
        """Until the verifier holds the plan: plans and proposals travel on different streams,
        and an open noop proposal of a job it has no plan for is not its to decide (ADR 0017)."""

        async def probe() -> bool:
            return await self.service.store.find_job(self.job_id) is not None

        await wait_for(probe, timeout=5)

    def proposal(
        self,
        execution_id: str,
        cid: str,
        *,
        node_id: str | None = None,
        verifier: VerifierType = VerifierType.DETERMINISTIC,
        concurrency: int = 3,
        confidence: int | None = None,
        publisher: PublisherType = PublisherType.LOCAL,
    ) -> ResultProposed:
        return ResultProposed(
            job_id=self.job_id,
            execution_id=execution_id,
            node_id=node_id or f"node-{execution_id}",
            result_cid=cid,
            run_output=RunOutput(stdout=f"output of {execution_id}", exitCode=0),
            verifier=verifier,
            deal=Deal(Concurrency=concurrency, Confidence=confidence),
            publisher=PublisherSpec(Type=publisher),
            result_url=f"http://{node_id or execution_id}.example/results/{execution_id}",
            size=12,
        )

    async def propose(self, execution_id: str, cid: str, *, seal: bool = True, **kw: Any) -> None:
        """What a well-behaved compute node does: seal (deterministic) and emit."""
        proposal = self.proposal(execution_id, cid, **kw)
        self.proposed[execution_id] = proposal
        if seal:
            proposal = seal_proposal(proposal, await fetch_verifier_key(self.bus))
        await self.emit(proposal)

    async def propose_unrouted(self, execution_id: str, cid: str, **kw: Any) -> None:
        """An open proposal as a node of a build before routes sent it (ADR 0027): on the
        bare subject, which the verifier still reads, so it gets the ones routed past it too."""
        proposal = self.proposal(execution_id, cid, **kw)
        self.proposed[execution_id] = proposal
        coordinator = self.service.coordinator
        assert coordinator is not None
        await proposals_handler(coordinator)(Envelope.wrap(proposal))

    async def emit(self, evt: Event) -> None:
        envelope = Envelope.wrap(evt)
        if evt.producer is not Producer.COMPUTE or _to_verifier(envelope):
            self.emitted += 1  # what settle() waits for
        await self.bus.publish_event(envelope)

    def events(self, kind: type[Event]) -> list[Any]:
        return [e.parse() for e in self.bus.published if e.type == kind.type]

    def decisions(self) -> dict[str, tuple[str, str]]:
        out: dict[str, tuple[str, str]] = {}
        for e in self.events(ResultAccepted):
            out[e.execution_id] = ("accepted", e.result_cid)
        for e in self.events(ResultRejected):
            out[e.execution_id] = ("rejected", e.reason)
        return out

    async def wait_decided(self, count: int) -> dict[str, tuple[str, str]]:
        async def probe() -> dict[str, tuple[str, str]] | None:
            found = self.decisions()
            return found if len(found) >= count else None

        return await wait_for(probe, timeout=5)

    async def wait_event(self, kind: type[Event], count: int = 1) -> list[Any]:
        async def probe() -> list[Any] | None:
            found = self.events(kind)
            return found if len(found) >= count else None

        return await wait_for(probe, timeout=5)

    async def settle(self) -> None:
        """Wait until every emitted event has been handled and every decision relayed."""
        store = self.service.store
        assert isinstance(store, MemoryVerifierStore)

        async def probe() -> bool:
            return store.processed_count() >= self.emitted and await store.outbox_size() == 0

        await wait_for(probe, timeout=5)


def _to_verifier(envelope: Envelope) -> bool:
    """Whether the verifier is sent this compute event at all (its subject's route)."""
    wanted = event_subjects(Producer.COMPUTE, [ResultProposed.FOR_VERIFIER])
    return any(subject_matches(p, envelope.subject) for p in wanted)


async def _harness(tmp_path: Path, **settings: Any) -> AsyncIterator[Harness]:
    bus = MemoryBus()
    service = VerifierService(
        VerifierSettings(state_dir=tmp_path, relay_poll_interval=0.05, **settings),
        bus=bus,
        store=MemoryVerifierStore(),
    )
    await service.start()
    try:
        yield Harness(bus, service)
    finally:
        await service.stop()
        await bus.close()


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    async for harness in _harness(tmp_path):
        yield harness


@pytest.fixture
async def h_no_escalation(tmp_path: Path) -> AsyncIterator[Harness]:
    async for harness in _harness(tmp_path, max_escalations=0):
        yield harness


def _accepted(decisions: dict[str, tuple[str, str]]) -> set[str]:
    return {k for k, (what, _) in decisions.items() if what == "accepted"}


def _rejected(decisions: dict[str, tuple[str, str]]) -> set[str]:
    return {k for k, (what, _) in decisions.items() if what == "rejected"}


# --- noop -----------------------------------------------------------------------------------------


async def test_noop_accepts_each_proposal_at_once(h: Harness) -> None:
    # Planned noop jobs come only from a requester before ADR 0017, and their proposals reach
    # the verifier only on the bare subject (ADR 0027).
    await h.plan(2, verifier=VerifierType.NOOP)
    await h.planned()
    await h.propose_unrouted("e1", GOOD, verifier=VerifierType.NOOP)
    (accepted,) = await h.wait_event(ResultAccepted)
    assert accepted.execution_id == "e1"
    assert accepted.result_cid == GOOD
    assert accepted.publisher.type is PublisherType.LOCAL
    assert accepted.result_url == "http://e1.example/results/e1"
    await h.propose_unrouted("e2", BAD, verifier=VerifierType.NOOP)
    decisions = await h.wait_decided(2)
    assert _accepted(decisions) == {"e1", "e2"}


async def test_noop_proposals_are_left_to_the_requester(h: Harness) -> None:
    """ADR 0017: the requester accepts noop-verified results itself and the publisher takes
    them from the node; a decision here would only race them. ADR 0027: so an open proposal
    claiming noop is routed past the verifier, even for a job it holds a plan of. One on the
    bare subject (an older node) is decided here only if the requester planned the job (which
    it does for stricter verifiers only; this test plans a noop one)."""
    await h.propose("e1", GOOD, seal=False, verifier=VerifierType.NOOP)
    await h.propose_unrouted("e2", GOOD, verifier=VerifierType.NOOP)
    h.job_id = "job-2"
    await h.plan(1, verifier=VerifierType.NOOP)
    await h.planned()
    await h.propose("e3", GOOD, seal=False, verifier=VerifierType.NOOP)
    h.job_id = "job-3"
    await h.propose("e4", GOOD, concurrency=2)  # sent after e3, to the verifier
    await h.settle()  # e4 is handled, so e3 would have been
    assert h.decisions() == {}
    assert await h.service.store.list_proposals("job-2") == []
    h.job_id = "job-2"
    await h.propose_unrouted("e5", GOOD, verifier=VerifierType.NOOP)
    assert set(await h.wait_decided(1)) == {"e5"}
    assert await h.service.store.list_proposals("job-1") == []
    assert await h.service.store.find_job("job-1") is None


async def test_first_proposal_of_an_unknown_job_is_stored_with_its_verdict(h: Harness) -> None:
    # Sealed: an open noop proposal of an unplanned job is the requester's (ADR 0017).
    await h.propose("e1", GOOD, verifier=VerifierType.NOOP)
    await h.wait_decided(1)
    (stored,) = await h.service.store.list_proposals(h.job_id)
    assert stored.status is ProposalStatus.ACCEPTED
    assert stored.reason == "accepted by the noop verifier"
    job = await h.service.store.find_job(h.job_id)
    assert job is not None
    assert job.round_started is not None

    # A deterministic job's first proposal waits for its peers: stored pending.
    h.job_id = "job-2"
    await h.propose("e2", GOOD, concurrency=3)
    await h.settle()
    (waiting,) = await h.service.store.list_proposals("job-2")
    assert waiting.status is ProposalStatus.PENDING
    assert waiting.result_cid == GOOD
    await h.propose("e3", GOOD, concurrency=3)
    await h.propose("e4", GOOD, concurrency=3)
    assert _accepted(await h.wait_decided(4)) == {"e1", "e2", "e3", "e4"}
    stored_later = await h.service.store.list_proposals("job-2")
    assert {p.status for p in stored_later} == {ProposalStatus.ACCEPTED}


async def test_noop_opens_a_sealed_proposal(h: Harness) -> None:
    await h.propose("e1", GOOD, verifier=VerifierType.NOOP)
    (accepted,) = await h.wait_event(ResultAccepted)
    assert accepted.result_cid == GOOD
    assert accepted.run_output.stdout == "output of e1"


# --- behaviours 34-38 -----------------------------------------------------------------------------


async def test_34_three_nodes_agree(h: Harness) -> None:
    await h.plan(3)
    for e in ("e1", "e2", "e3"):
        await h.propose(e, GOOD)
    decisions = await h.wait_decided(3)
    assert _accepted(decisions) == {"e1", "e2", "e3"}
    assert not _rejected(decisions)
    # The sealed result is revealed to the requester only with the decision.
    assert {e.result_cid for e in h.events(ResultAccepted)} == {GOOD}
    assert {e.run_output.stdout for e in h.events(ResultAccepted)} == {
        "output of e1",
        "output of e2",
        "output of e3",
    }


async def test_35_one_bad_of_three(h: Harness) -> None:
    await h.plan(3)
    await h.propose("e1", GOOD)
    await h.propose("e2", BAD)
    await h.propose("e3", GOOD)
    decisions = await h.wait_decided(3)
    assert _accepted(decisions) == {"e1", "e3"}
    assert _rejected(decisions) == {"e2"}
    assert f"disagrees with the accepted result {GOOD}" in decisions["e2"][1]
    # The rejection goes out first, so it lands before the acceptances can end the job.
    order = [
        e.type for e in h.bus.published if e.type in (ResultAccepted.type, ResultRejected.type)
    ]
    assert order == [ResultRejected.type, ResultAccepted.type, ResultAccepted.type]
    (rejected,) = h.events(ResultRejected)
    assert rejected.result_cid == BAD


async def test_no_decision_before_all_expected_proposals(h: Harness) -> None:
    await h.plan(3)
    await h.propose("e1", GOOD)
    await h.propose("e2", GOOD)
    await h.settle()
    assert h.decisions() == {}


async def test_36_draw_escalates_and_a_third_node_resolves_it(h: Harness) -> None:
    await h.plan(2, executions={"e1": "node-e1", "e2": "node-e2"})
    await h.propose("e1", GOOD)
    await h.propose("e2", BAD)
    (escalated,) = await h.wait_event(VerificationEscalated)
    assert escalated.additional == 1
    assert "draw" in escalated.reason
    await h.settle()
    assert h.decisions() == {}  # neither verified yet
    # The requester places one more execution on a fresh node.
    await h.plan(3, concurrency=2, executions={"e3": "node-e3"})
    await h.propose("e3", GOOD)
    decisions = await h.wait_decided(3)
    assert _accepted(decisions) == {"e1", "e3"}
    assert _rejected(decisions) == {"e2"}


async def test_36_draw_fails_when_escalation_is_off(h_no_escalation: Harness) -> None:
    h = h_no_escalation
    await h.plan(2)
    await h.propose("e1", GOOD)
    await h.propose("e2", BAD)
    (failed,) = await h.wait_event(VerificationFailed)
    assert "draw" in failed.reason
    decisions = await h.wait_decided(2)
    assert _rejected(decisions) == {"e1", "e2"}


async def test_37_five_nodes_two_bad_confidence_four_none_verified(
    h_no_escalation: Harness,
) -> None:
    h = h_no_escalation
    await h.plan(5, confidence=4)
    for e, cid in (("e1", GOOD), ("e2", BAD), ("e3", GOOD), ("e4", BAD2), ("e5", GOOD)):
        await h.propose(e, cid, confidence=4, concurrency=5)
    (failed,) = await h.wait_event(VerificationFailed)
    assert "confidence not reached: 3 of 5 proposals agree" in failed.reason
    assert "4 needed" in failed.reason
    decisions = await h.wait_decided(5)
    assert not _accepted(decisions)
    assert _rejected(decisions) == {"e1", "e2", "e3", "e4", "e5"}


async def test_37_with_escalation_asks_for_what_is_missing(h: Harness) -> None:
    await h.plan(5, confidence=4)
    for e, cid in (("e1", GOOD), ("e2", BAD), ("e3", GOOD), ("e4", BAD2), ("e5", GOOD)):
        await h.propose(e, cid)
    (escalated,) = await h.wait_event(VerificationEscalated)
    assert escalated.additional == 1
    await h.propose("e6", GOOD)
    decisions = await h.wait_decided(6)
    assert _accepted(decisions) == {"e1", "e3", "e5", "e6"}
    assert _rejected(decisions) == {"e2", "e4"}


async def test_38_bad_bad_good_good_concurrency_two(h: Harness) -> None:
    await h.plan(2)
    await h.propose("bad1", BAD)
    await h.propose("bad2", BAD2)
    await h.wait_event(VerificationEscalated, 1)
    await h.plan(3, concurrency=2)
    await h.propose("good1", GOOD)
    await h.wait_event(VerificationEscalated, 2)
    await h.plan(4, concurrency=2)
    await h.propose("good2", GOOD)
    decisions = await h.wait_decided(4)
    assert _accepted(decisions) == {"good1", "good2"}
    assert _rejected(decisions) == {"bad1", "bad2"}


async def test_38_bad_good_good_concurrency_three_confidence_two(h: Harness) -> None:
    await h.plan(3, confidence=2)
    await h.propose("bad", BAD, confidence=2)
    await h.propose("good1", GOOD, confidence=2)
    await h.propose("good2", GOOD, confidence=2)
    decisions = await h.wait_decided(3)
    assert _accepted(decisions) == {"good1", "good2"}
    assert _rejected(decisions) == {"bad"}


# --- copying and forging --------------------------------------------------------------------------


async def test_lazy_node_copying_a_peers_sealed_proposal_is_caught(h: Harness) -> None:
    await h.plan(3)
    key = await fetch_verifier_key(h.bus)
    honest = seal_proposal(h.proposal("e1", GOOD), key)
    await h.emit(honest)
    # The lazy node sees only the sealed commitment on the bus: it has no CID to echo. It
    # copies the commitment into its own proposal instead.
    assert honest.result_cid == ""
    assert honest.run_output.stdout == ""
    lazy = h.proposal("e2", "").model_copy(
        update={"commitment": honest.commitment, "run_output": RunOutput()}
    )
    await h.emit(lazy)
    await h.propose("e3", GOOD)
    decisions = await h.wait_decided(3)
    assert _accepted(decisions) == {"e1", "e3"}
    assert _rejected(decisions) == {"e2"}
    assert "copied from another proposal" in decisions["e2"][1]


async def test_lazy_node_echoing_a_cid_unsealed_is_refused(h: Harness) -> None:
    await h.plan(3)
    await h.propose("e1", GOOD)
    await h.propose("e2", GOOD, seal=False)  # whatever it claims, it proves nothing
    await h.propose("e3", GOOD)
    decisions = await h.wait_decided(3)
    assert _rejected(decisions) == {"e2"}
    assert "unsealed proposal" in decisions["e2"][1]
    assert _accepted(decisions) == {"e1", "e3"}


async def test_tampered_commitment_is_refused(h: Harness) -> None:
    await h.plan(1)
    sealed = seal_proposal(h.proposal("e1", GOOD), await fetch_verifier_key(h.bus))
    assert sealed.commitment is not None
    flipped = sealed.commitment[:-3] + ("A" if sealed.commitment[-3] != "A" else "B") + "AA"
    await h.emit(sealed.model_copy(update={"commitment": flipped}))
    decisions = await h.wait_decided(1)
    assert "commitment refused" in decisions["e1"][1]


async def test_proposal_from_another_node_than_planned_is_refused(h: Harness) -> None:
    await h.plan(3, executions={"e1": "node-e1", "e2": "node-e2", "e3": "node-e3"})
    await h.propose("e1", GOOD)
    await h.propose("e2", GOOD, node_id="impostor")
    await h.propose("e3", GOOD)
    decisions = await h.wait_decided(3)
    assert _accepted(decisions) == {"e1", "e3"}
    assert "was placed on node node-e2" in decisions["e2"][1]


async def test_unplanned_executions_do_not_vote(h: Harness) -> None:
    await h.plan(3, executions={"e1": "node-e1", "e2": "node-e2", "e3": "node-e3"})
    # Forged votes for executions the requester never placed.
    await h.propose("x1", BAD)
    await h.propose("x2", BAD)
    await h.propose("e1", GOOD)
    await h.propose("e2", BAD2)
    await h.settle()
    assert h.decisions() == {}
    await h.propose("e3", GOOD)
    decisions = await h.wait_decided(5)
    assert _accepted(decisions) == {"e1", "e3"}
    assert _rejected(decisions) == {"e2", "x1", "x2"}
    assert "was not planned" in decisions["x1"][1]


async def test_equivocating_execution_does_not_vote(h: Harness) -> None:
    await h.plan(3)
    await h.propose("e1", GOOD)
    await h.propose("e2", BAD)
    await h.propose("e2", GOOD)  # the same execution again, with another result
    await h.propose("e3", GOOD)
    decisions = await h.wait_decided(3)
    assert _accepted(decisions) == {"e1", "e3"}
    assert "equivocated" in decisions["e2"][1]


async def test_identical_resend_is_harmless(h: Harness) -> None:
    await h.plan(2)
    await h.propose("e1", GOOD)
    await h.propose("e1", GOOD)  # re-sealed after a restart: a new envelope, same result
    await h.propose("e2", GOOD)
    decisions = await h.wait_decided(2)
    assert _accepted(decisions) == {"e1", "e2"}
    await h.settle()
    assert len(h.events(ResultAccepted)) == 2


async def test_late_proposal_after_the_decision_is_rejected(h: Harness) -> None:
    await h.plan(2)
    await h.propose("e1", GOOD)
    await h.propose("e2", GOOD)
    await h.wait_decided(2)
    await h.propose("e3", GOOD)
    decisions = await h.wait_decided(3)
    assert decisions["e3"][0] == "rejected"
    assert "after verification ended" in decisions["e3"][1]


async def test_proposal_cannot_downgrade_a_planned_job_to_noop(h: Harness) -> None:
    await h.plan(2)
    await h.propose("e1", BAD, verifier=VerifierType.NOOP)
    await h.settle()
    assert h.decisions() == {}
    await h.propose("e2", GOOD)
    await h.wait_event(VerificationEscalated)


# --- ordering and idempotency ---------------------------------------------------------------------


async def test_without_a_plan_the_deal_in_the_proposals_sets_the_count(h: Harness) -> None:
    await h.propose("e1", GOOD, concurrency=2)
    await h.settle()
    assert h.decisions() == {}
    await h.propose("e2", GOOD, concurrency=2)
    assert _accepted(await h.wait_decided(2)) == {"e1", "e2"}


async def test_plan_arriving_after_proposals_triggers_the_decision(h: Harness) -> None:
    await h.propose("e1", GOOD, concurrency=3)
    await h.propose("e2", GOOD, concurrency=3)
    await h.settle()
    assert h.decisions() == {}
    await h.plan(2)  # the requester planned two: both are in
    assert _accepted(await h.wait_decided(2)) == {"e1", "e2"}


async def test_same_envelope_twice_makes_one_decision(h: Harness) -> None:
    await h.plan(1, verifier=VerifierType.NOOP)
    await h.planned()
    envelope = Envelope.wrap(h.proposal("e1", GOOD, verifier=VerifierType.NOOP))
    coordinator = h.service.coordinator
    assert coordinator is not None
    evt = envelope.parse()
    assert isinstance(evt, ResultProposed)
    await coordinator.on_proposed(envelope.id, evt)
    await coordinator.on_proposed(envelope.id, evt)
    await h.settle()
    assert len(h.events(ResultAccepted)) == 1


async def test_key_is_served_and_stable(h: Harness) -> None:
    first = await fetch_verifier_key(h.bus)
    second = await fetch_verifier_key(h.bus)
    assert first == second
    assert first == h.service.public_key.public


async def test_undecodable_event_is_dropped(h: Harness) -> None:
    bogus = Envelope(
        type=ResultProposed.type,
        producer="compute",
        data={"job_id": "j", "verifier": VerifierType.DETERMINISTIC.value},
    )
    assert _to_verifier(bogus)
    await h.bus.publish_event(bogus)
    await h.plan(1)
    await h.propose("e1", GOOD, concurrency=1)
    assert _accepted(await h.wait_decided(1)) == {"e1"}
