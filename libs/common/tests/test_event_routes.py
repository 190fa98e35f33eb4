"""Routed proposals (ADR 0027): each service is sent exactly the proposals it acts on."""

from __future__ import annotations

import itertools

import pytest

from shoal_common.bus import MemoryBus, event_subjects, subject_matches
from shoal_common.commitments import SEAL_PREFIX
from shoal_common.events import (
    Envelope,
    ExecutionCancelled,
    ResultProposed,
    publisher_takes_proposal,
    requester_verifies,
)
from shoal_common.spec import PublisherSpec, PublisherType, RunOutput, VerifierType
from shoal_common.subjects import Producer
from shoal_common.testing import wait_for


def proposal(verifier: VerifierType, publisher: PublisherType | None, sealed: bool) -> Envelope:
    return Envelope.wrap(
        ResultProposed(
            job_id="j",
            execution_id="e",
            node_id="n",
            result_cid="" if sealed else "bafy",
            run_output=RunOutput(),
            verifier=verifier,
            publisher=PublisherSpec(Type=publisher),
            commitment=f"{SEAL_PREFIX}opaque" if sealed else None,
        )
    )


def reads(selector: str, envelope: Envelope) -> bool:
    return any(
        subject_matches(p, envelope.subject) for p in event_subjects(Producer.COMPUTE, [selector])
    )


CLAIMS = list(
    itertools.product(VerifierType, [None, *PublisherType], [False, True]),
)


@pytest.mark.parametrize(("verifier", "publisher", "sealed"), CLAIMS)
def test_a_proposal_goes_where_the_claims_say_it_is_needed(
    verifier: VerifierType, publisher: PublisherType | None, sealed: bool
) -> None:
    envelope = proposal(verifier, publisher, sealed)
    # The verifier ignores only open proposals claiming noop (ADR 0017); a sealed one it opens.
    assert reads(ResultProposed.FOR_VERIFIER, envelope) == (
        sealed or not requester_verifies(verifier)
    )
    # The publisher publishes an open noop-verified result with a real publisher.
    assert reads(ResultProposed.FOR_PUBLISHER, envelope) == (
        not sealed and publisher_takes_proposal(verifier, publisher)
    )
    assert reads(ResultProposed.type, envelope)  # the requester reads every one


@pytest.mark.parametrize(
    ("data", "route"),
    [
        ({"job_id": "j"}, "noop.publish"),  # defaults: noop verifier, Local publisher
        ({"job_id": "j", "verifier": "Quantum"}, "verify.publish"),  # unknown: the verifier's
        ({"job_id": "j", "publisher": "Noop"}, "noop.publish"),  # malformed: not noop
        ({"job_id": "j", "publisher": {"type": "Noop"}}, "noop.noop"),
    ],
)
def test_a_proposal_of_unexpected_shape_is_routed_to_whoever_checks_it(
    data: dict[str, object], route: str
) -> None:
    assert ResultProposed.route(data) == route


def test_events_without_routes_keep_their_subject() -> None:
    envelope = Envelope.wrap(ExecutionCancelled(job_id="j", execution_id="e", node_id="n"))
    assert envelope.subject == "shoal.evt.compute.execution_cancelled"
    assert event_subjects(Producer.COMPUTE, [ExecutionCancelled.type]) == [envelope.subject]


async def test_the_memory_bus_routes_as_nats_does() -> None:
    bus = MemoryBus()
    got: dict[str, list[str]] = {"requester": [], "verifier": [], "publisher": []}
    selectors = {
        "requester": ResultProposed.type,
        "verifier": ResultProposed.FOR_VERIFIER,
        "publisher": ResultProposed.FOR_PUBLISHER,
    }
    for durable, selector in selectors.items():

        async def handle(env: Envelope, seen: list[str] = got[durable]) -> None:
            seen.append(env.subject.removeprefix("shoal.evt.compute."))

        await bus.consume_events(
            producer=Producer.COMPUTE, durable=durable, handler=handle, event_types=[selector]
        )
    for verifier, publisher in [
        (VerifierType.NOOP, PublisherType.NOOP),
        (VerifierType.NOOP, PublisherType.LOCAL),
        (VerifierType.DETERMINISTIC, PublisherType.NOOP),
    ]:
        await bus.publish_event(proposal(verifier, publisher, sealed=False))

    async def delivered() -> bool:
        return [len(v) for v in got.values()] == [3, 1, 1]

    await wait_for(delivered, timeout=5)
    await bus.close()
    assert got == {
        "requester": [
            "result_proposed.noop.noop",
            "result_proposed.noop.publish",
            "result_proposed.verify.noop",
        ],
        "verifier": ["result_proposed.verify.noop"],
        "publisher": ["result_proposed.noop.publish"],
    }
