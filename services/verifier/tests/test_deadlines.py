"""Decision deadline and escalation bound, through the coordinator on a fake clock."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shoal_common.commitments import VerifierKey, seal_proposal
from shoal_common.direct_relay import DirectOutboxRelay
from shoal_common.events import (
    Envelope,
    ExecutionsPlanned,
    ResultAccepted,
    ResultProposed,
    ResultRejected,
    VerificationEscalated,
    VerificationFailed,
)
from shoal_common.spec import Deal, RunOutput, VerifierType
from shoal_verifier.coordinator import Coordinator
from shoal_verifier.domain.decide import Policy
from shoal_verifier.store.base import VerifierStore
from shoal_verifier.store.memory import MemoryVerifierStore
from shoal_verifier.store.sql import SqlVerifierStore

GOOD = "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o"
BAD = "QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH"
TIMEOUT = 60.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Rig:
    store: VerifierStore
    coordinator: Coordinator
    clock: Clock
    key: VerifierKey
    sent: list[Envelope]

    async def plan(self, expected: int, concurrency: int | None = None) -> None:
        evt = ExecutionsPlanned(
            job_id="job",
            expected=expected,
            verifier=VerifierType.DETERMINISTIC,
            deal=Deal(Concurrency=concurrency or expected),
        )
        env = Envelope.wrap(evt)
        await self.coordinator.on_planned(env.id, evt, sent_at=self.clock.now)

    async def propose(self, execution_id: str, cid: str) -> None:
        evt = seal_proposal(
            ResultProposed(
                job_id="job",
                execution_id=execution_id,
                node_id=f"n-{execution_id}",
                result_cid=cid,
                run_output=RunOutput(),
                verifier=VerifierType.DETERMINISTIC,
            ),
            self.key.public,
        )
        await self.coordinator.on_proposed(Envelope.wrap(evt).id, evt)

    async def drain(self) -> list[str]:
        async def publish(env: Envelope) -> None:
            self.sent.append(env)

        if isinstance(self.store, MemoryVerifierStore):
            await self.store.relay_once(publish)
        else:
            relay = self.store.relay(publish)
            assert isinstance(relay, DirectOutboxRelay)
            await relay.relay_once()
        return [e.type for e in self.sent]

    def of(self, kind: str) -> list[Envelope]:
        return [e for e in self.sent if e.type == kind]


@pytest.fixture(params=["memory", "sqlite"])
async def rig(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Rig]:
    store: VerifierStore
    if request.param == "memory":
        store = MemoryVerifierStore()
    else:
        store = SqlVerifierStore(f"sqlite+aiosqlite:///{tmp_path / 'v.sqlite'}")
        await store.migrate()
    clock = Clock()
    key = VerifierKey.generate()
    coordinator = Coordinator(
        store,
        key,
        policy=Policy(max_escalations=1, max_extra_executions=2),
        decision_timeout=TIMEOUT,
        clock=clock,
    )
    try:
        yield Rig(store, coordinator, clock, key, [])
    finally:
        await store.close()


async def test_deadline_decides_with_the_proposals_that_came(rig: Rig) -> None:
    await rig.plan(3)
    await rig.propose("e1", GOOD)
    await rig.propose("e2", GOOD)
    assert await rig.coordinator.sweep() == 0
    rig.clock.now += TIMEOUT - 1
    assert await rig.coordinator.sweep() == 0
    assert await rig.drain() == []
    rig.clock.now += 2
    assert await rig.coordinator.sweep() == 1
    assert await rig.drain() == [ResultAccepted.type, ResultAccepted.type]
    assert await rig.coordinator.sweep() == 0


async def test_deadline_with_too_few_agreeing_escalates_then_fails(rig: Rig) -> None:
    await rig.plan(3)
    await rig.propose("e1", GOOD)
    rig.clock.now += TIMEOUT + 1
    await rig.coordinator.sweep()
    assert await rig.drain() == [VerificationEscalated.type]
    escalated = rig.of(VerificationEscalated.type)[0].data
    assert escalated["additional"] == 1
    # Nobody came: the new round's deadline passes too, and the bound (1) is reached.
    rig.clock.now += TIMEOUT + 1
    await rig.coordinator.sweep()
    types = await rig.drain()
    assert types[-2:] == [ResultRejected.type, VerificationFailed.type]
    reason = rig.of(VerificationFailed.type)[0].data["reason"]
    assert "after 1 escalation(s)" in reason
    assert "1 of 1 proposals agree" in reason


async def test_escalation_resets_the_round_deadline(rig: Rig) -> None:
    await rig.plan(2)
    await rig.propose("e1", GOOD)
    await rig.propose("e2", BAD)
    assert await rig.drain() == [VerificationEscalated.type]
    rig.clock.now += TIMEOUT / 2
    assert await rig.coordinator.sweep() == 0
    await rig.propose("e3", GOOD)
    types = await rig.drain()
    assert types.count(ResultAccepted.type) == 2
    assert types.count(ResultRejected.type) == 1


async def test_stale_plan_cannot_shrink_the_wait_after_escalation(rig: Rig) -> None:
    await rig.plan(2)
    await rig.propose("e1", GOOD)
    await rig.propose("e2", BAD)
    assert await rig.drain() == [VerificationEscalated.type]
    # A plan the requester sent before it saw the escalation (same count) must not make the
    # verifier decide on the two proposals again.
    await rig.plan(2)
    assert await rig.drain() == [VerificationEscalated.type]
    job = await rig.store.find_job("job")
    assert job is not None
    assert job.expected == 3
