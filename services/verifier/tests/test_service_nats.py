"""The verifier as it runs: real NATS (JetStream), SQLite, a sealed proposal from another client."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal_common.bus import NatsBus
from shoal_common.commitments import fetch_verifier_key, seal_proposal
from shoal_common.events import (
    Envelope,
    ExecutionsPlanned,
    ResultAccepted,
    ResultProposed,
    ResultRejected,
)
from shoal_common.natsserver import NatsServer
from shoal_common.spec import Deal, RunOutput, VerifierType
from shoal_common.subjects import Producer
from shoal_common.testing import wait_for
from shoal_verifier.service import VerifierService
from shoal_verifier.settings import VerifierSettings

pytestmark = pytest.mark.integration

GOOD = "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o"
BAD = "QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH"


async def test_deterministic_job_over_nats(nats_server: NatsServer, tmp_path: Path) -> None:
    service = VerifierService(
        VerifierSettings(nats_url=nats_server.url, state_dir=tmp_path / "verifier")
    )
    await service.start()
    client = await NatsBus.connect(nats_server.url, name="test-compute")
    seen: dict[str, Envelope] = {}

    async def record(env: Envelope) -> None:
        seen[env.id] = env

    try:
        await client.consume_events(producer=Producer.VERIFIER, durable="test", handler=record)
        await client.publish_event(
            Envelope.wrap(
                ExecutionsPlanned(
                    job_id="job-n",
                    expected=3,
                    verifier=VerifierType.DETERMINISTIC,
                    deal=Deal(Concurrency=3),
                )
            )
        )
        key = await fetch_verifier_key(client)
        for execution_id, cid in (("e1", GOOD), ("e2", BAD), ("e3", GOOD)):
            proposal = ResultProposed(
                job_id="job-n",
                execution_id=execution_id,
                node_id=f"node-{execution_id}",
                result_cid=cid,
                run_output=RunOutput(stdout=execution_id),
                verifier=VerifierType.DETERMINISTIC,
                deal=Deal(Concurrency=3),
            )
            envelope = Envelope.wrap(seal_proposal(proposal, key))
            await client.publish_event(envelope)
            await client.publish_event(envelope)  # a duplicate delivery changes nothing

        async def decided() -> dict[str, str] | None:
            out = {}
            for env in seen.values():
                evt = env.parse()
                if isinstance(evt, ResultAccepted | ResultRejected):
                    out[evt.execution_id] = env.type
            return out if len(out) == 3 else None

        outcome = await wait_for(decided, timeout=15)
        assert outcome == {
            "e1": ResultAccepted.type,
            "e2": ResultRejected.type,
            "e3": ResultAccepted.type,
        }
        job = await service.store.find_job("job-n")
        assert job is not None
        assert job.accepted_cid == GOOD
    finally:
        await client.close()
        await service.stop()


async def test_key_survives_a_restart(nats_server: NatsServer, tmp_path: Path) -> None:
    settings = VerifierSettings(nats_url=nats_server.url, state_dir=tmp_path / "verifier")
    first = VerifierService(settings)
    await first.start()
    key = first.public_key.public
    await first.stop()
    second = VerifierService(settings)
    await second.start()
    try:
        assert second.public_key.public == key
    finally:
        await second.stop()
