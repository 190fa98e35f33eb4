"""The deadline sweep runs when a round is due, not on a poll (ADR 0014), also after a restart.

Every service here polls only every 60 s (``sweep_interval``), so a decision within seconds
can only come from the deadline timer.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from shoal_common.bus import MemoryBus
from shoal_common.commitments import fetch_verifier_key, seal_proposal
from shoal_common.events import Envelope, ExecutionsPlanned, ResultAccepted, ResultProposed
from shoal_common.spec import Deal, RunOutput, VerifierType
from shoal_common.testing import wait_for
from shoal_verifier.service import VerifierService
from shoal_verifier.settings import VerifierSettings
from shoal_verifier.store.sql import SqlVerifierStore

GOOD = "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o"
NO_POLL = 60.0


def verifier(tmp_path: Path, bus: MemoryBus, timeout: float) -> VerifierService:
    return VerifierService(
        VerifierSettings(
            state_dir=tmp_path,
            relay_poll_interval=0.05,
            decision_timeout=timeout,
            sweep_interval=NO_POLL,
        ),
        bus=bus,
        store=SqlVerifierStore(f"sqlite+aiosqlite:///{tmp_path / 'verifier.sqlite'}"),
    )


async def open_round(bus: MemoryBus, service: VerifierService, job_id: str) -> float:
    """Two of three planned proposals: the job waits for its deadline. Returns when it opened."""
    plan = ExecutionsPlanned(
        job_id=job_id, expected=3, verifier=VerifierType.DETERMINISTIC, deal=Deal(Concurrency=3)
    )
    await bus.publish_event(Envelope.wrap(plan))
    key = await fetch_verifier_key(bus)
    opened = time.time()
    for execution_id in ("e1", "e2"):
        proposal = ResultProposed(
            job_id=job_id,
            execution_id=f"{job_id}-{execution_id}",
            node_id=f"node-{execution_id}",
            result_cid=GOOD,
            run_output=RunOutput(),
            verifier=VerifierType.DETERMINISTIC,
        )
        await bus.publish_event(Envelope.wrap(seal_proposal(proposal, key)))

    async def stored() -> bool:
        return len(await service.store.list_proposals(job_id)) == 2

    await wait_for(stored)
    return opened


def accepted(bus: MemoryBus, job_id: str) -> int:
    return sum(
        1 for e in bus.published if e.type == ResultAccepted.type and e.data["job_id"] == job_id
    )


async def decided_at(bus: MemoryBus, job_id: str, timeout: float = 10.0) -> float:
    """When both proposals of the job were accepted (looked at every 10 ms)."""

    async def decided() -> float | None:
        return time.time() if accepted(bus, job_id) == 2 else None

    return await wait_for(decided, timeout=timeout, interval=0.01)


async def test_a_round_is_decided_at_its_deadline(tmp_path: Path) -> None:
    bus = MemoryBus()
    service = verifier(tmp_path, bus, timeout=0.5)
    await service.start()
    try:
        opened = await open_round(bus, service, "job")
        decided = await decided_at(bus, "job")
        assert opened + 0.5 <= decided < opened + 0.5 + 5
    finally:
        await service.stop()
        await bus.close()


async def test_after_a_restart_overdue_rounds_at_once_later_ones_at_their_deadline(
    tmp_path: Path,
) -> None:
    timeout = 2.0
    bus = MemoryBus()
    first = verifier(tmp_path, bus, timeout)
    await first.start()
    try:
        early_opened = await open_round(bus, first, "early")
        await asyncio.sleep(1.0)  # the two rounds' deadlines are a second apart
        late_opened = await open_round(bus, first, "late")
    finally:
        await first.stop()
    # Down past the early round's deadline, not the late one's.
    await asyncio.sleep(max(0.0, early_opened + timeout + 0.1 - time.time()))
    assert time.time() < late_opened + timeout
    assert accepted(bus, "early") == 0

    second = verifier(tmp_path, bus, timeout)
    started = time.time()
    await second.start()
    try:
        early_decided = await decided_at(bus, "early")
        assert early_decided < late_opened + timeout  # at once, not at the next poll
        late_decided = await decided_at(bus, "late")
        assert late_opened + timeout <= late_decided < started + 5
    finally:
        await second.stop()
        await bus.close()
