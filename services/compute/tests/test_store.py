"""Store contract (memory, SQLite, Postgres), migrations, and restart behaviour."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from shoal_common.bus import MemoryBus
from shoal_common.errors import Conflict, InvalidTransition, NotFound
from shoal_common.events import Envelope, ExecutionCancelled, ExecutionFailed, new_id
from shoal_common.migration_checks import assert_up_down_up_without_drift, migration_heads
from shoal_common.protocol import Capacity
from shoal_common.spec import RunOutput
from shoal_common.testing import wait_for
from shoal_compute.domain.execution import ExecutionRecord, LocalState
from shoal_compute.service import ComputeService
from shoal_compute.settings import ComputeSettings
from shoal_compute.store.base import ExecutionStore
from shoal_compute.store.memory import MemoryExecutionStore
from shoal_compute.store.sql import MIGRATIONS, SqlExecutionStore
from shoal_compute.store.tables import metadata
from shoal_compute.testing import noop_job


@pytest.fixture(params=["memory", "sql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ExecutionStore]:
    if request.param == "memory":
        s: ExecutionStore = MemoryExecutionStore()
    else:
        s = SqlExecutionStore(f"sqlite+aiosqlite:///{tmp_path / 'c.sqlite'}")
    await s.start()
    yield s
    await s.close()


def record(**fields: Any) -> ExecutionRecord:
    values: dict[str, Any] = {
        "id": new_id(),
        "job_id": new_id(),
        "job": {"Spec": {"Engine": "Noop"}},
        "resources": Capacity(cpu=0.5, memory=10),
    }
    values.update(fields)
    return ExecutionRecord(**values)


async def relayed(store: ExecutionStore) -> list[Envelope]:
    out: list[Envelope] = []

    async def publish(envelope: Envelope) -> None:
        out.append(envelope)

    relay = store.relay(publish, service="test")
    while await relay.relay_once():
        pass
    return out


async def contract(store: ExecutionStore) -> None:
    rec = record()
    await store.create(rec)
    with pytest.raises(Conflict):
        await store.create(rec)
    found = await store.get(rec.id)
    assert (found.state, found.version, found.resources) == (LocalState.ACCEPTED, 1, rec.resources)
    assert found.job == rec.job
    assert await store.find(new_id()) is None
    with pytest.raises(NotFound):
        await store.get(new_id())

    failed = ExecutionFailed(
        job_id=rec.job_id, execution_id=rec.id, node_id="n", error="boom", retryable=True
    )
    output = RunOutput(stdout="out", exit_code=2)
    await store.transition(
        rec.id,
        expected=[LocalState.ACCEPTED],
        new=LocalState.COMPLETED,
        events=[failed],
        result_cid="QmX",
        run_output=output,
    )
    moved = await store.get(rec.id)
    assert (moved.state, moved.version, moved.result_cid) == (LocalState.COMPLETED, 2, "QmX")
    assert moved.run_output == output
    with pytest.raises(InvalidTransition):
        await store.transition(rec.id, expected=[LocalState.ACCEPTED], new=LocalState.FAILED)
    with pytest.raises(NotFound):
        await store.transition(new_id(), expected=[LocalState.ACCEPTED], new=LocalState.FAILED)
    assert (await store.get(rec.id)).version == 2  # the failed CAS changed nothing
    assert (await store.find_by_result("QmX")) == moved
    assert await store.find_by_result("QmOther") is None

    other = record()
    await store.create(other)
    listed = await store.list_executions(states=[LocalState.ACCEPTED])
    assert [r.id for r in listed] == [other.id]
    newest = await store.list_executions(newest_first=True, limit=1)
    assert [r.id for r in newest] == [other.id]

    await store.stage_events(
        ExecutionCancelled(job_id=other.job_id, execution_id=other.id, node_id="n")
    )
    events = await relayed(store)
    assert [e.type for e in events] == ["execution_failed", "execution_cancelled"]
    assert await relayed(store) == []  # relayed once, then gone


async def test_store_contract(store: ExecutionStore) -> None:
    await contract(store)


@pytest.mark.integration
async def test_store_contract_on_sqlite_and_postgres(database_url: str) -> None:
    store = SqlExecutionStore(database_url)
    await store.start()
    try:
        await contract(store)
    finally:
        await store.close()


# --- migrations --------------------------------------------------------------------------------


def test_one_migration_head() -> None:
    assert len(migration_heads(MIGRATIONS)) == 1


@pytest.mark.integration
async def test_upgrade_downgrade_upgrade_without_drift(database_url: str) -> None:
    await assert_up_down_up_without_drift(database_url, MIGRATIONS, metadata)


# --- restart -----------------------------------------------------------------------------------


def node_settings(tmp_path: Path, **values: Any) -> ComputeSettings:
    return ComputeSettings(
        node_id="n1", state_dir=tmp_path, engines=["Noop"], serve_http=False, gpus=0, **values
    )


async def test_interrupted_executions_are_reported_failed_on_restart(tmp_path: Path) -> None:
    """What a node had accepted when it died is reported failed (retryable) when it is back."""
    settings = node_settings(tmp_path)
    # The state a kill -9 leaves: accepted rows, nothing recorded about how they ended.
    crashed = SqlExecutionStore(settings.node_db_url("n1"))
    await crashed.start()
    interrupted = [record(), record()]
    for rec in interrupted:
        await crashed.create(rec)
    finished = record()
    await crashed.create(finished)
    await crashed.transition(finished.id, expected=[LocalState.ACCEPTED], new=LocalState.COMPLETED)
    await crashed.close()

    bus = MemoryBus()
    node = ComputeService(settings, bus=bus)
    await node.start()
    try:

        async def reported() -> list[Any]:
            found = [e.parse() for e in bus.published if e.type == "execution_failed"]
            return found if len(found) == len(interrupted) else []

        failed = await wait_for(reported)
        assert sorted(e.execution_id for e in failed) == sorted(r.id for r in interrupted)
        assert all(isinstance(e, ExecutionFailed) and e.retryable for e in failed)
        assert all(isinstance(e, ExecutionFailed) and e.error == "node restarted" for e in failed)
        for rec in interrupted:
            assert (await node.store.get(rec.id)).state is LocalState.FAILED
        assert (await node.store.get(finished.id)).state is LocalState.COMPLETED
    finally:
        await node.stop()
        await bus.close()


async def test_clean_stop_reports_running_work_failed(tmp_path: Path) -> None:
    """A clean stop does not leave the requester waiting for a heartbeat timeout."""
    from shoal_compute.testing import NodeHarness

    bus = MemoryBus()
    node = ComputeService(node_settings(tmp_path, noop_delay_s=60), bus=bus)
    await node.start()
    beats: list[bytes] = []

    async def collect(subject: str, data: bytes) -> None:
        beats.append(data)

    await bus.subscribe("shoal.node.heartbeat.n1", collect)
    eid = await NodeHarness(node, bus).run(noop_job())
    await node.stop()
    failed = [e.parse() for e in bus.published if e.type == "execution_failed"]
    assert len(failed) == 1
    assert isinstance(failed[0], ExecutionFailed)
    assert failed[0].execution_id == eid
    assert failed[0].error == "node stopped"
    assert failed[0].retryable
    from shoal_common.protocol import Heartbeat

    assert Heartbeat.from_bytes(beats[-1]).stopping
    await bus.close()


async def cancel_with_event(store: SqlExecutionStore) -> None:
    """An execution written, then cancelled with its event staged in the outbox."""
    rec = record()
    await store.create(rec)
    cancelled = ExecutionCancelled(job_id=rec.job_id, execution_id=rec.id, node_id="n")
    await store.transition(
        rec.id, expected=[LocalState.ACCEPTED], new=LocalState.CANCELLED, events=[cancelled]
    )


async def test_fast_relay_publishes_at_commit_and_retries_failures(tmp_path: Path) -> None:
    store = SqlExecutionStore(f"sqlite+aiosqlite:///{tmp_path / 'r.sqlite'}")
    await store.start()
    published: list[str] = []
    failing = True

    async def publish(envelope: Envelope) -> None:
        if failing:
            raise ConnectionError("NATS is down")
        published.append(envelope.id)

    relay = store.relay(publish, service="test")
    relay._poll_interval = 0.05  # type: ignore[attr-defined]
    relay._grace = 0.0  # type: ignore[attr-defined]
    relay.start()
    try:
        await cancel_with_event(store)
        await asyncio.sleep(0.1)
        assert published == []  # failed, but kept
        failing = False

        async def sent() -> list[str]:
            return published

        assert len(await wait_for(sent)) == 1
        await asyncio.sleep(0.1)
        assert published == [published[0]]  # once, not again
        assert await relayed(store) == []  # and its row is gone
    finally:
        await relay.stop()
        await store.close()


async def test_a_published_event_is_not_relayed_again_while_its_delete_waits(
    tmp_path: Path,
) -> None:
    """ADR 0026: the fast path's delete rides in the store's next group, up to DEFER_MAX_S
    later; meanwhile the poll loop (here without grace) must not publish the row again."""
    from shoal_common.sqlite_store import DEFER_MAX_S

    store = SqlExecutionStore(f"sqlite+aiosqlite:///{tmp_path / 'd.sqlite'}")
    await store.start()
    published: list[str] = []

    async def publish(envelope: Envelope) -> None:
        published.append(envelope.id)

    relay = store.relay(publish, service="test")
    relay._poll_interval = 0.02  # type: ignore[attr-defined]
    relay._idle_poll_interval = 0.02  # type: ignore[attr-defined]
    relay._grace = 0.0  # type: ignore[attr-defined]
    relay.start()
    try:
        await cancel_with_event(store)

        def rows() -> int:  # read only: relayed() would publish and delete them itself
            with sqlite3.connect(tmp_path / "d.sqlite") as conn:
                return int(conn.execute("SELECT count(*) FROM outbox").fetchone()[0])

        async def gone() -> bool:
            return rows() == 0

        async def sent() -> bool:
            return bool(published)

        await wait_for(sent)
        assert rows() == 1  # published; its delete waits for a group to ride in
        await wait_for(gone, timeout=DEFER_MAX_S + 5)
        assert len(published) == 1  # once: the poll loop left the row to the fast path
    finally:
        await relay.stop()
        await store.close()


async def test_a_result_recorded_once_the_row_is_ordered_commits_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ADR 0018: a quick run's outcome need not wait for its row's fsync; it joins the row's
    group commit, so the two take one commit, and the creation is durable only with it."""
    from shoal_common import sqlite_store

    commits = 0
    real_commit = sqlite_store._commit

    def counting_commit(conn: Any) -> None:
        nonlocal commits
        commits += 1
        real_commit(conn)

    monkeypatch.setattr(sqlite_store, "_commit", counting_commit)
    store = SqlExecutionStore(f"sqlite:///{tmp_path / 'c.sqlite'}")
    await store.start()
    try:
        rec = record()
        ordered = asyncio.Event()
        creating = asyncio.create_task(store.create(rec, on_ordered=ordered.set))
        await ordered.wait()
        assert not creating.done()  # ordered, not yet durable
        await store.transition(
            rec.id,
            expected=[LocalState.ACCEPTED],
            new=LocalState.COMPLETED,
            events=[
                ExecutionFailed(job_id=rec.job_id, execution_id=rec.id, node_id="n", error="x")
            ],
        )
        done = await store.get(rec.id)
        await creating
        assert done.state is LocalState.COMPLETED
        assert commits == 1
        assert (await store.get(rec.id)).state is LocalState.COMPLETED
    finally:
        await store.close()


async def test_on_ordered_is_called_once_for_every_store(store: ExecutionStore) -> None:
    calls: list[str] = []
    rec = record()
    await store.create(rec, on_ordered=lambda: calls.append(rec.id))
    assert calls == [rec.id]
    with pytest.raises(Conflict):
        await store.create(rec, on_ordered=lambda: calls.append("again"))
    assert calls == [rec.id]  # a refused creation orders nothing


async def test_a_transition_on_sqlite_runs_on_the_driver(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every execution moves state a few times: through SQLAlchemy's execution, with the row
    (and its job) read back, that was ~10% of the compute process under load (ADR 0024)."""
    from sqlalchemy.engine import Connection

    store = SqlExecutionStore(f"sqlite+aiosqlite:///{tmp_path / 'c.sqlite'}")
    await store.start()
    try:
        records = [record() for _ in range(3)]
        for rec in records:
            await store.create(rec)
        through_sqlalchemy: list[str] = []
        real_execute = Connection.execute

        def execute(self: Connection, statement: Any, *args: Any, **kwargs: Any) -> Any:
            through_sqlalchemy.append(str(statement).split(None, 2)[0])
            return real_execute(self, statement, *args, **kwargs)

        for i, rec in enumerate(records):
            if i == 2:  # the first two prepared the statement (compiled on its second use)
                monkeypatch.setattr(Connection, "execute", execute)
            await store.transition(
                rec.id, expected=[LocalState.ACCEPTED], new=LocalState.COMPLETED, error=""
            )
        assert "UPDATE" not in through_sqlalchemy
        assert (await store.get(records[2].id)).state is LocalState.COMPLETED
    finally:
        await store.close()
