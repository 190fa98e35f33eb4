"""One contract for every PublisherStore: the in-memory fake, SQLite and Postgres."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from shoal_common.events import Envelope, PublishFailed
from shoal_common.testing import wait_for
from shoal_publisher.domain.models import Publication, PublicationStatus
from shoal_publisher.store.base import PublisherStore
from shoal_publisher.store.memory import MemoryPublisherStore
from shoal_publisher.store.sql import SqlPublisherStore


def _publication(execution_id: str, job_id: str = "job-1", created: float = 1.0) -> Publication:
    return Publication(
        execution_id=execution_id,
        job_id=job_id,
        node_id="node-" + execution_id,
        result_cid="QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o",
        publisher="Local",
        status=PublicationStatus.PUBLISHED,
        result={"StorageSource": "IPFS", "CID": "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o"},
        attempts=1,
        created=created,
        updated=created,
    )


class StoreContract:
    """Tests every store must pass; subclasses provide the ``store`` fixture."""

    async def test_publication_round_trip_and_replace(self, store: PublisherStore) -> None:
        async with store.transaction() as tx:
            await tx.save_publication(_publication("e2", created=2.0))
            await tx.save_publication(_publication("e1", created=1.0))
            await tx.save_publication(_publication("x", job_id="job-2"))
        assert await store.find_publication("e1") == _publication("e1", created=1.0)
        assert [p.execution_id for p in await store.list_publications("job-1")] == ["e1", "e2"]
        failed = _publication("e1")
        failed.status = PublicationStatus.FAILED
        failed.result = None
        failed.error = "kubo down"
        async with store.transaction() as tx:
            await tx.save_publication(failed)
            assert await tx.find_publication("e1") == failed
        assert await store.find_publication("e1") == failed
        assert await store.find_publication("nope") is None
        assert await store.list_publications("nope") == []

    async def test_processed_events(self, store: PublisherStore) -> None:
        assert not await store.is_processed("evt")
        async with store.transaction() as tx:
            assert await tx.mark_processed("evt")
            assert not await tx.mark_processed("evt")
        assert await store.is_processed("evt")

    async def test_rollback_undoes_everything(self, store: PublisherStore) -> None:
        async def fail_midway() -> None:
            async with store.transaction() as tx:
                await tx.mark_processed("evt")
                await tx.save_publication(_publication("e1"))
                await tx.add_events(
                    PublishFailed(job_id="j", execution_id="e1", node_id="n", error="x")
                )
                raise RuntimeError("boom")

        with pytest.raises(RuntimeError):
            await fail_midway()
        assert not await store.is_processed("evt")
        assert await store.find_publication("e1") is None
        assert await store.outbox_size() == 0

    async def test_outbox_relay(self, store: PublisherStore) -> None:
        async with store.transaction() as tx:
            staged = await tx.add_events(
                PublishFailed(job_id="j", execution_id="e1", node_id="n", error="x")
            )
        sent: list[Envelope] = []

        async def publish(env: Envelope) -> None:
            sent.append(env)

        relay = store.relay(publish, poll_interval=0.01)
        relay.start()
        try:
            relay.notify()
            for _ in range(500):
                if sent and await store.outbox_size() == 0:
                    break
                await asyncio.sleep(0.01)
        finally:
            await relay.stop()
        assert [e.id for e in sent] == [e.id for e in staged]
        assert await store.outbox_size() == 0


class TestMemoryStore(StoreContract):
    @pytest.fixture
    def store(self) -> PublisherStore:
        return MemoryPublisherStore()


@pytest.mark.integration
class TestSqlStore(StoreContract):
    @pytest.fixture
    async def store(self, database_url: str) -> AsyncIterator[PublisherStore]:
        store = SqlPublisherStore(database_url)
        await store.migrate()
        try:
            yield store
        finally:
            await store.close()

    async def test_relay_deletes_the_rows_it_published_and_no_other(
        self, store: PublisherStore
    ) -> None:
        refused = {"e2"}  # its first publish fails: the row stays for the poll loop
        sent: list[str] = []

        async def publish(env: Envelope) -> None:
            execution_id = env.parse().execution_id  # type: ignore[attr-defined]
            if execution_id in refused:
                refused.discard(execution_id)
                raise ConnectionError("NATS down")
            sent.append(execution_id)

        relay = store.relay(publish, poll_interval=0.01)
        relay.start()
        try:
            for pair in (("e0", "e1"), ("e2", "e3"), ("e4", "e5")):  # the delete reused
                async with store.transaction() as tx:
                    await tx.add_events(
                        *(
                            PublishFailed(job_id="j", execution_id=e, node_id="n", error="x")
                            for e in pair
                        )
                    )

            async def fast_path_done() -> bool:
                return len(sent) == 5 and await store.outbox_size() == 1

            await wait_for(fast_path_done)
            assert sorted(sent) == ["e0", "e1", "e3", "e4", "e5"]

            async def relayed() -> bool:
                return await store.outbox_size() == 0

            await wait_for(relayed)  # after the poll loop's grace period
        finally:
            await relay.stop()
        assert sorted(sent) == ["e0", "e1", "e2", "e3", "e4", "e5"]
