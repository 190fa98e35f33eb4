"""One contract for every VerifierStore: the in-memory fake, SQLite and Postgres."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from shoal_common.errors import Conflict
from shoal_common.events import Envelope, VerificationFailed
from shoal_common.spec import VerifierType
from shoal_verifier.domain.models import JobRecord, JobStatus, ProposalRecord, ProposalStatus
from shoal_verifier.store.base import VerifierStore
from shoal_verifier.store.memory import MemoryVerifierStore
from shoal_verifier.store.sql import SqlVerifierStore


def _job(job_id: str = "job-1", **kw: object) -> JobRecord:
    job = JobRecord(job_id=job_id, created=1.0, updated=1.0)
    for k, v in kw.items():
        setattr(job, k, v)
    return job


def _proposal(execution_id: str, job_id: str = "job-1", received: float = 1.0) -> ProposalRecord:
    return ProposalRecord(
        execution_id=execution_id,
        job_id=job_id,
        node_id=f"node-{execution_id}",
        result_cid="QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o",
        received=received,
        sealed=True,
        publisher={"Type": "Local", "Params": {"x": 1}},
        result_url="http://n/r",
        run_output={"stdout": "hi", "exitCode": 0},
        event_id="env-" + execution_id,
    )


class StoreContract:
    """Tests every store must pass; subclasses provide the ``store`` fixture."""

    async def test_job_round_trip_and_compare_and_set(self, store: VerifierStore) -> None:
        job = _job(
            verifier=VerifierType.DETERMINISTIC,
            planned={"e1": "n1"},
            plan_expected=3,
            plan_time=12.5,
            round_started=2.0,
        )
        async with store.transaction() as tx:
            await tx.insert_job(job)
        found = await store.find_job("job-1")
        assert found == job
        assert found.version == 0
        found.status = JobStatus.ACCEPTED
        found.accepted_cid = "QmX"
        async with store.transaction() as tx:
            await tx.update_job(found, expected_version=0)
        assert found.version == 1
        again = await store.find_job("job-1")
        assert again is not None
        assert again.status is JobStatus.ACCEPTED
        assert again.version == 1
        with pytest.raises(Conflict):
            async with store.transaction() as tx:
                await tx.update_job(again, expected_version=0)
        with pytest.raises(Conflict):
            async with store.transaction() as tx:
                await tx.insert_job(_job())

    async def test_missing_job_is_none(self, store: VerifierStore) -> None:
        assert await store.find_job("nope") is None
        async with store.transaction() as tx:
            assert await tx.find_job("nope") is None
            assert await tx.find_proposal("nope") is None

    async def test_proposals_round_trip_in_arrival_order(self, store: VerifierStore) -> None:
        async with store.transaction() as tx:
            await tx.insert_proposal(_proposal("e2", received=2.0))
            await tx.insert_proposal(_proposal("e1", received=1.0))
            await tx.insert_proposal(_proposal("other", job_id="job-2"))
        listed = await store.list_proposals("job-1")
        assert [p.execution_id for p in listed] == ["e1", "e2"]
        assert listed[0] == _proposal("e1", received=1.0)
        p = listed[0]
        p.status = ProposalStatus.REJECTED
        p.reason = "because"
        p.invalid_reason = "copied"
        async with store.transaction() as tx:
            await tx.update_proposal(p)
            assert await tx.find_proposal("e1") == p
        with pytest.raises(Conflict):
            async with store.transaction() as tx:
                await tx.insert_proposal(_proposal("e1"))

    async def test_processed_events_are_remembered(self, store: VerifierStore) -> None:
        async with store.transaction() as tx:
            assert await tx.mark_processed("evt-1")
            assert not await tx.mark_processed("evt-1")
        async with store.transaction() as tx:
            assert not await tx.mark_processed("evt-1")
            assert await tx.mark_processed("evt-2")

    async def test_rollback_undoes_everything(self, store: VerifierStore) -> None:
        async def fail_midway() -> None:
            async with store.transaction() as tx:
                await tx.mark_processed("evt-1")
                await tx.insert_job(_job())
                await tx.insert_proposal(_proposal("e1"))
                await tx.add_events(VerificationFailed(job_id="job-1", reason="x"))
                raise RuntimeError("boom")

        with pytest.raises(RuntimeError):
            await fail_midway()
        assert await store.find_job("job-1") is None
        assert await store.list_proposals("job-1") == []
        assert await store.outbox_size() == 0
        async with store.transaction() as tx:
            assert await tx.mark_processed("evt-1")

    async def test_outbox_relay_publishes_then_forgets(self, store: VerifierStore) -> None:
        async with store.transaction() as tx:
            staged = await tx.add_events(
                VerificationFailed(job_id="job-1", reason="a"),
                VerificationFailed(job_id="job-2", reason="b"),
            )
        assert await store.outbox_size() == 2
        sent: list[Envelope] = []

        async def publish(env: Envelope) -> None:
            sent.append(env)

        relay = store.relay(publish, poll_interval=0.01)
        relay.start()
        try:
            relay.notify()
            for _ in range(500):
                if await store.outbox_size() == 0 and len(sent) == 2:
                    break
                await asyncio.sleep(0.01)
        finally:
            await relay.stop()
        assert [e.id for e in sent] == [e.id for e in staged]
        assert await store.outbox_size() == 0

    async def test_due_jobs_are_open_deterministic_and_old(self, store: VerifierStore) -> None:
        async with store.transaction() as tx:
            await tx.insert_job(
                _job("old", verifier=VerifierType.DETERMINISTIC, round_started=10.0)
            )
            await tx.insert_job(
                _job("older", verifier=VerifierType.DETERMINISTIC, round_started=5.0)
            )
            await tx.insert_job(
                _job("young", verifier=VerifierType.DETERMINISTIC, round_started=100.0)
            )
            await tx.insert_job(_job("noop", verifier=VerifierType.NOOP, round_started=1.0))
            await tx.insert_job(
                _job(
                    "done",
                    verifier=VerifierType.DETERMINISTIC,
                    round_started=1.0,
                    status=JobStatus.ACCEPTED,
                )
            )
            await tx.insert_job(_job("idle", verifier=VerifierType.DETERMINISTIC))
        assert await store.list_due_jobs(started_before=50.0) == ["older", "old"]
        assert await store.list_due_jobs(started_before=50.0, limit=1) == ["older"]
        # The sweep's next wake-up: the oldest round among the same jobs.
        assert await store.first_round_start() == 5.0

    async def test_no_round_start_without_open_deterministic_rounds(
        self, store: VerifierStore
    ) -> None:
        assert await store.first_round_start() is None
        async with store.transaction() as tx:
            await tx.insert_job(_job("noop", verifier=VerifierType.NOOP, round_started=1.0))
            await tx.insert_job(_job("idle", verifier=VerifierType.DETERMINISTIC))
        assert await store.first_round_start() is None

    async def test_sealing_key_is_created_once(self, store: VerifierStore) -> None:
        first = await store.load_or_create_key(b"k" * 32)
        assert first == b"k" * 32
        assert await store.load_or_create_key(b"z" * 32) == first


class TestMemoryStore(StoreContract):
    @pytest.fixture
    def store(self) -> VerifierStore:
        return MemoryVerifierStore()


@pytest.mark.integration
class TestSqlStore(StoreContract):
    @pytest.fixture
    async def store(self, database_url: str) -> AsyncIterator[VerifierStore]:
        store = SqlVerifierStore(database_url)
        await store.migrate()
        try:
            yield store
        finally:
            await store.close()
