"""One contract suite for every RequesterStore: memory, SQLite and Postgres."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, timedelta
from pathlib import Path

import pytest

from shoal_common.db import run_migrations
from shoal_common.errors import Conflict, NotFound
from shoal_common.events import Envelope, ExecutionsPlanned
from shoal_common.spec import (
    Deal,
    ExecutionStateType,
    JobHistoryType,
    JobStateType,
    VerifierType,
    utcnow,
)
from shoal_common.testing import (
    create_postgres_database,
    drop_postgres_database,
    postgres_admin_url,
)
from shoal_requester.domain.model import (
    Changes,
    HistoryRecord,
    JobQuery,
    NodeRecord,
    NodeStanding,
    advance,
    job_transition,
    new_execution_update,
)
from shoal_requester.store.base import RequesterStore
from shoal_requester.store.memory import MemoryRequesterStore
from shoal_requester.store.sql import MIGRATIONS, SqlRequesterStore
from shoal_requester.testing import make_execution, make_job

ES = ExecutionStateType


@pytest.fixture(scope="session")
def migrated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Databases migrated once per session; each test gets a copy (much faster than
    migrating per test): a SQLite file to copy and a Postgres template database."""
    folder = tmp_path_factory.mktemp("template")
    sqlite_url = f"sqlite+aiosqlite:///{folder / 'template.sqlite'}"
    run_migrations(sqlite_url, MIGRATIONS)
    pg_url = asyncio.run(create_postgres_database())
    run_migrations(pg_url, MIGRATIONS)
    try:
        yield {"sqlite": str(folder / "template.sqlite"), "postgres": pg_url}
    finally:
        asyncio.run(drop_postgres_database(pg_url))


async def _copy_of_template(template_url: str) -> str:
    import asyncpg

    base, _, template = template_url.rpartition("/")
    name = "shoal_" + uuid.uuid4().hex[:12]
    conn = await asyncpg.connect(postgres_admin_url())
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    finally:
        await conn.close()
    return f"{base}/{name}"


@pytest.fixture(
    params=[
        "memory",
        pytest.param("sqlite", marks=pytest.mark.integration),
        pytest.param("postgres", marks=pytest.mark.integration),
    ]
)
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, migrated: dict[str, str]
) -> AsyncIterator[RequesterStore]:
    if request.param == "memory":
        mem = MemoryRequesterStore()
        yield mem
        await mem.close()
        return
    if request.param == "sqlite":
        shutil.copy(migrated["sqlite"], tmp_path / "requester.sqlite")
        url = f"sqlite+aiosqlite:///{tmp_path / 'requester.sqlite'}"
    else:
        url = await _copy_of_template(migrated["postgres"])
    sql = SqlRequesterStore(url, migrate=False)
    await sql.open()
    try:
        yield sql
    finally:
        await sql.close()
        if request.param == "postgres":
            await drop_postgres_database(url)


async def test_create_and_read_job(store: RequesterStore) -> None:
    job = make_job(annotations=["a", "b"])
    stored, created = await store.create_job(job)
    assert created
    got = await store.get_job(job.id)
    assert got == stored
    assert got.created.tzinfo is not None
    assert got.created == job.created
    assert got.job == job.job
    assert await store.find_job("nope") is None
    with pytest.raises(NotFound):
        await store.get_job("nope")
    history = await store.list_history(job.id)
    assert [(h.type, h.new, h.version, h.comment) for h in history] == [
        (JobHistoryType.JOB_LEVEL, "New", 1, "Job created")
    ]


async def test_replayed_submit_key_returns_the_original(store: RequesterStore) -> None:
    first = make_job(submit_key="k" * 64)
    await store.create_job(first)
    again, created = await store.create_job(make_job(submit_key="k" * 64))
    assert not created
    assert again.id == first.id
    assert len(await store.list_jobs(JobQuery())) == 1


async def test_replays_written_together_make_one_job(store: RequesterStore) -> None:
    # Submitted at once: the SQLite writer commits them in one group, where the replays meet
    # the original's row in the same transaction; on Postgres, concurrent transactions race
    # (any one may win). Another key among them is unaffected.
    replays = [make_job(submit_key="r" * 64) for _ in range(4)]
    other = make_job(submit_key="o" * 64)
    results = await asyncio.gather(*(store.create_job(j) for j in [*replays, other]))
    assert [created for _, created in results[:4]].count(True) == 1
    [winner] = {job.id for job, _ in results[:4]}
    assert winner in {j.id for j in replays}
    assert results[4][1]
    assert results[4][0].id == other.id
    assert len(await store.list_jobs(JobQuery())) == 2
    assert [h.new for h in await store.list_history(winner)] == ["New"]


async def test_job_compare_and_set(store: RequesterStore) -> None:
    job, _ = await store.create_job(make_job())
    now = utcnow()
    change = job_transition(job, JobStateType.IN_PROGRESS, now=now, comment="bids accepted")
    rows = await store.apply(Changes(jobs=[change]))
    assert rows is not None
    assert [(r.previous, r.new, r.version, r.comment) for r in rows] == [
        ("New", "InProgress", 2, "bids accepted")
    ]
    got = await store.get_job(job.id)
    assert (got.state, got.version) == (JobStateType.IN_PROGRESS, 2)
    # The same (stale) before-image again: conflict, nothing written.
    with pytest.raises(Conflict):
        await store.apply(Changes(jobs=[job_transition(job, JobStateType.ERROR, now=now)]))
    assert (await store.get_job(job.id)).state == JobStateType.IN_PROGRESS
    assert len(await store.list_history(job.id)) == 2


async def test_change_is_all_or_nothing(store: RequesterStore) -> None:
    job, _ = await store.create_job(make_job())
    stale = job_transition(job, JobStateType.IN_PROGRESS, now=utcnow())
    await store.apply(Changes(jobs=[stale]))
    execution = make_execution(job, state=ES.BID_ACCEPTED)
    insert = new_execution_update(execution, [(ES.ASK_FOR_BID, ""), (ES.BID_ACCEPTED, "")])
    with pytest.raises(Conflict):
        await store.apply(
            Changes(
                jobs=[job_transition(job, JobStateType.ERROR, now=utcnow())],
                executions=[insert],
                events=[_planned(job.id)],
            )
        )
    assert await store.find_execution(execution.id) is None
    assert (await store.list_executions([job.id]))[job.id] == []


async def test_execution_steps_write_history_with_versions(store: RequesterStore) -> None:
    job, _ = await store.create_job(make_job())
    execution = make_execution(job, "node-7", state=ES.BID_ACCEPTED, accepted_ask_for_bid=True)
    insert = new_execution_update(
        execution,
        [(ES.ASK_FOR_BID, "asked"), (ES.ASK_FOR_BID_ACCEPTED, "yes"), (ES.BID_ACCEPTED, "ok")],
    )
    rows = await store.apply(Changes(executions=[insert]))
    assert rows is not None
    assert [(r.previous, r.new, r.version, r.node_id) for r in rows] == [
        (None, "AskForBid", 1, "node-7"),
        ("AskForBid", "AskForBidAccepted", 2, "node-7"),
        ("AskForBidAccepted", "BidAccepted", 3, "node-7"),
    ]
    stored = await store.find_execution(execution.id)
    assert stored is not None
    assert stored.version == 3
    assert stored.accepted_ask_for_bid
    output = {"stdout": "hi", "exitCode": 0}
    update = advance(
        stored,
        [(ES.WAITING_VERIFICATION, "result proposed")],
        now=utcnow(),
        run_output=output,
        result_cid="QmX",
    )
    await store.apply(Changes(executions=[update]))
    again = await store.find_execution(execution.id)
    assert again is not None
    assert (again.state, again.version, again.run_output, again.result_cid) == (
        ES.WAITING_VERIFICATION,
        4,
        output,
        "QmX",
    )
    with pytest.raises(Conflict):
        await store.apply(Changes(executions=[update]))
    history = await store.list_history(job.id)
    assert [h.seq for h in history] == sorted(h.seq for h in history)
    assert len(history) == 5
    only_jobs = await store.list_history(job.id, types=[JobHistoryType.JOB_LEVEL])
    assert len(only_jobs) == 1


async def test_concurrent_changes_fail_alone(store: RequesterStore) -> None:
    jobs = [(await store.create_job(make_job()))[0] for _ in range(6)]
    now = utcnow()
    stale = jobs[0].evolve(version=99)
    changes = [
        Changes(jobs=[job_transition(j, JobStateType.QUEUED, now=now)], processed_event=j.id)
        for j in jobs[1:]
    ]
    results = await asyncio.gather(
        *(store.apply(c) for c in changes[:2]),
        store.apply(Changes(jobs=[job_transition(stale, JobStateType.ERROR, now=now)])),
        *(store.apply(c) for c in changes[2:]),
        store.apply(changes[0]),  # the same event again: applied once
        return_exceptions=True,
    )
    assert isinstance(results[2], Conflict)
    # The same event twice at once: one of the two applies it, the other finds it applied
    # (on Postgres either may commit first).
    assert sorted([results[0] is None, results[6] is None]) == [False, True]
    assert [r is None for r in results[1:6]] == [False] * 5
    for j in jobs[1:]:
        assert (await store.get_job(j.id)).state is JobStateType.QUEUED
    assert (await store.get_job(jobs[0].id)).state is JobStateType.NEW


async def test_history_rows_returned_carry_their_stored_seq(store: RequesterStore) -> None:
    """Transitions committed together (SQLite writes their history rows in one insert at the
    end of the group) each get back exactly the rows, with the seqs, that were stored; also
    when one of the group fails and the rest are redone one by one."""
    for fail_one in (False, True):
        jobs = [(await store.create_job(make_job()))[0] for _ in range(8)]
        now = utcnow()
        changes = []
        for i, j in enumerate(jobs):
            execution = make_execution(j, f"node-{i}", state=ES.BID_ACCEPTED)
            steps = [(ES.ASK_FOR_BID, "asked"), (ES.ASK_FOR_BID_ACCEPTED, "got")]
            steps.append((ES.BID_ACCEPTED, "accepted"))
            before = j.evolve(version=99) if fail_one and i == 3 else j
            changes.append(
                Changes(
                    jobs=[job_transition(before, JobStateType.IN_PROGRESS, now=now)],
                    executions=[new_execution_update(execution, steps)],
                )
            )
        results = await asyncio.gather(*(store.apply(c) for c in changes), return_exceptions=True)
        for i, (j, rows) in enumerate(zip(jobs, results, strict=True)):
            if fail_one and i == 3:
                assert isinstance(rows, Conflict)
                assert [h.new for h in await store.list_history(j.id)] == ["New"]
                continue
            assert isinstance(rows, list)
            stored = (await store.list_history(j.id))[1:]  # after "job created"
            assert rows == stored
            expected = ["AskForBid", "AskForBidAccepted", "BidAccepted", "InProgress"]
            assert [h.new for h in rows] == expected


async def test_concurrent_execution_updates_fail_alone(store: RequesterStore) -> None:
    """A lost compare-and-set of an execution fails only its own change, also when changes
    are committed together (SQLite runs a group's execution updates as one statement)."""
    executions = []
    for i in range(6):
        job, _ = await store.create_job(make_job())
        execution = make_execution(job, f"node-{i}", state=ES.ASK_FOR_BID)
        await store.apply(
            Changes(executions=[new_execution_update(execution, [(ES.ASK_FOR_BID, "asked")])])
        )
        stored = await store.find_execution(execution.id)
        assert stored is not None
        executions.append(stored)
    now = utcnow()
    updates = [advance(e, [(ES.BID_ACCEPTED, "accepted")], now=now) for e in executions]
    stale = advance(executions[2].evolve(version=9), [(ES.BID_ACCEPTED, "accepted")], now=now)
    results = await asyncio.gather(
        *(store.apply(Changes(executions=[u])) for u in updates[:2]),
        store.apply(Changes(executions=[stale])),
        *(store.apply(Changes(executions=[u])) for u in updates[3:]),
        return_exceptions=True,
    )
    assert isinstance(results[2], Conflict)
    for i, e in enumerate(executions):
        current = await store.find_execution(e.id)
        assert current is not None
        assert current.state is (ES.ASK_FOR_BID if i == 2 else ES.BID_ACCEPTED)
        if i != 2:
            rows = results[i]
            assert isinstance(rows, list)
            assert [h.new for h in rows] == ["BidAccepted"]


async def test_job_update_keeps_or_rewrites_the_wire_job(store: RequesterStore) -> None:
    job, _ = await store.create_job(make_job())
    queued = job_transition(job, JobStateType.QUEUED, now=utcnow())
    await store.apply(Changes(jobs=[queued]))
    assert dict((await store.get_job(job.id)).job) == dict(job.job)
    wire = {**dict(job.job), "Spec": {**dict(job.job)["Spec"], "Annotations": ["changed"]}}
    rewritten = job_transition(queued.after, JobStateType.QUEUED, now=utcnow(), job=wire)
    await store.apply(Changes(jobs=[rewritten]))
    stored = await store.get_job(job.id)
    assert dict(stored.job) == wire
    assert stored.version == 3


async def test_processed_event_applies_once(store: RequesterStore) -> None:
    job, _ = await store.create_job(make_job())
    change = Changes(
        jobs=[job_transition(job, JobStateType.QUEUED, now=utcnow())], processed_event="evt-1"
    )
    assert await store.apply(change) is not None
    # A redelivery of the same event: nothing happens, not even a conflict.
    assert await store.apply(change) is None
    assert (await store.get_job(job.id)).version == 2


async def test_list_jobs_filters_and_sorting(store: RequesterStore) -> None:
    base = utcnow()
    a = make_job(client_id="alice", created=base, annotations=["x", "y"])
    b = make_job(client_id="alice", created=base + timedelta(seconds=1), annotations=["y"])
    c = make_job(client_id="bob", created=base + timedelta(seconds=2))
    for j in (c, a, b):
        await store.create_job(j)

    def ids(jobs: list) -> list[str]:  # type: ignore[type-arg]
        return [j.id for j in jobs]

    assert ids(await store.list_jobs(JobQuery())) == [a.id, b.id, c.id]
    assert ids(await store.list_jobs(JobQuery(reverse=True))) == [c.id, b.id, a.id]
    assert ids(await store.list_jobs(JobQuery(client_id="alice"))) == [a.id, b.id]
    assert ids(await store.list_jobs(JobQuery(include_tags=("x",)))) == [a.id]
    assert ids(await store.list_jobs(JobQuery(include_tags=("x", "y")))) == [a.id, b.id]
    assert ids(await store.list_jobs(JobQuery(exclude_tags=("x",)))) == [b.id, c.id]
    assert ids(await store.list_jobs(JobQuery(limit=2, reverse=True))) == [c.id, b.id]
    by_id = await store.list_jobs(JobQuery(sort_by="id"))
    assert ids(by_id) == sorted(ids(by_id))
    assert ids(await store.list_jobs(JobQuery(states=(JobStateType.NEW,)))) == [a.id, b.id, c.id]
    assert ids(await store.list_jobs_in_states([JobStateType.QUEUED])) == []


async def test_find_job_ids_by_prefix(store: RequesterStore) -> None:
    a = make_job(job_id="abcdef01-0000-7000-8000-000000000001")
    b = make_job(job_id="abcdef01-0000-7000-8000-000000000002")
    c = make_job(job_id="abcdef99-0000-7000-8000-000000000003")
    for j in (a, b, c):
        await store.create_job(j)
    assert await store.find_job_ids("abcdef99") == [c.id]
    assert await store.find_job_ids("abcdef01", limit=5) == [a.id, b.id]
    assert await store.find_job_ids("abcdef0%") == []
    assert await store.find_job_ids("zz") == []
    assert await store.find_job_ids("00000003", suffix=True) == [c.id]
    assert await store.find_job_ids("abcdef99", suffix=True) == []


async def test_expired_jobs(store: RequesterStore) -> None:
    now = utcnow()
    running = make_job(state=JobStateType.IN_PROGRESS, timeout_at=now - timedelta(seconds=1))
    later = make_job(state=JobStateType.IN_PROGRESS, timeout_at=now + timedelta(hours=1))
    queued = make_job(state=JobStateType.QUEUED, queue_deadline=now - timedelta(seconds=1))
    done = make_job(state=JobStateType.COMPLETED, timeout_at=now - timedelta(seconds=1))
    for j in (running, later, queued, done):
        await store.create_job(j)
    expired = {j.id for j in await store.list_expired_jobs(now)}
    assert expired == {running.id, queued.id}


async def test_execution_queries(store: RequesterStore) -> None:
    j1, _ = await store.create_job(make_job())
    j2, _ = await store.create_job(make_job())
    e1 = make_execution(j1, "n1", state=ES.BID_ACCEPTED)
    e2 = make_execution(j1, "n2", state=ES.COMPLETED)
    e3 = make_execution(j2, "n1", state=ES.BID_ACCEPTED)
    await store.apply(
        Changes(executions=[new_execution_update(e, [(e.state, "")]) for e in (e1, e2, e3)])
    )
    grouped = await store.list_executions([j1.id, j2.id, "missing"])
    assert [e.id for e in grouped[j1.id]] == [e1.id, e2.id]
    assert [e.id for e in grouped[j2.id]] == [e3.id]
    assert grouped["missing"] == []
    running_n1 = await store.list_executions_in_states([ES.BID_ACCEPTED], node_ids=["n1"])
    assert {e.id for e in running_n1} == {e1.id, e3.id}
    assert await store.list_executions_in_states([ES.BID_ACCEPTED], node_ids=[]) == []
    old = await store.list_executions_in_states(
        [ES.BID_ACCEPTED], updated_before=utcnow() - timedelta(minutes=1)
    )
    assert old == []


async def test_history_since(store: RequesterStore) -> None:
    job, _ = await store.create_job(make_job(created=utcnow() - timedelta(minutes=5)))
    await store.apply(Changes(jobs=[job_transition(job, JobStateType.QUEUED, now=utcnow())]))
    recent = await store.list_history(job.id, since=utcnow() - timedelta(minutes=1))
    assert [h.new for h in recent] == ["Queued"]


async def test_nodes(store: RequesterStore) -> None:
    first = utcnow() - timedelta(minutes=1)
    node = NodeRecord(
        id="n1", info={"node_id": "n1"}, state="live", first_seen=first, last_seen=first
    )
    await store.upsert_node(node)
    later = utcnow()
    await store.upsert_node(
        NodeRecord(
            id="n1",
            info={"node_id": "n1", "arch": "arm64"},
            state="lost",
            first_seen=later,
            last_seen=later,
            # Ignored: only apply() changes a node's standing.
            standing=NodeStanding(failed=2),
        )
    )
    [got] = await store.list_nodes()
    assert got.first_seen == first
    assert (got.state, got.info["arch"], got.last_seen) == ("lost", "arm64", later)
    assert got.standing == NodeStanding()
    assert got.last_seen.tzinfo == UTC


async def _run_to(
    store: RequesterStore, node_id: str, steps: list[tuple[ES, str]], *, event: str | None = None
) -> list[HistoryRecord] | None:
    """Insert an execution on ``node_id`` and walk it through ``steps`` in one more change."""
    job, _ = await store.create_job(make_job())
    ex = make_execution(job, node_id)
    await store.apply(Changes(executions=[new_execution_update(ex, [(ES.BID_ACCEPTED, "")])]))
    [ex] = (await store.list_executions([job.id]))[job.id]
    return await store.apply(
        Changes(executions=[advance(ex, steps, now=utcnow())], processed_event=event)
    )


async def test_apply_counts_node_standing(store: RequesterStore) -> None:
    """Accepted, rejected and (retryable) failed executions count for their node, in the
    change that records them, once even if the event is delivered again."""
    now = utcnow()
    for node_id in ("good", "bad"):
        await store.upsert_node(
            NodeRecord(
                id=node_id, info={"node_id": node_id}, state="live", first_seen=now, last_seen=now
            )
        )
    verified = [(ES.WAITING_VERIFICATION, ""), (ES.RESULT_ACCEPTED, "")]
    published = [*verified, (ES.COMPLETED, "")]
    wrong = [(ES.WAITING_VERIFICATION, ""), (ES.RESULT_REJECTED, "wrong result")]
    await _run_to(store, "good", published)
    await _run_to(store, "good", verified)
    await _run_to(store, "good", [(ES.FAILED, "node lost")])
    assert await _run_to(store, "bad", wrong, event="ev-1") is not None
    assert await _run_to(store, "bad", wrong, event="ev-1") is None  # a redelivery
    await _run_to(store, "bad", wrong)
    # Heartbeats rewrite the node's row: its standing survives them.
    await store.upsert_node(
        NodeRecord(id="bad", info={"node_id": "bad"}, state="live", first_seen=now, last_seen=now)
    )
    got = {n.id: n.standing for n in await store.list_nodes()}
    assert (got["good"].completed, got["good"].failed, got["good"].rejected) == (2, 1, 0)
    assert got["good"].last_rejected is None
    assert (got["bad"].completed, got["bad"].failed, got["bad"].rejected) == (0, 0, 2)
    assert got["bad"].last_rejected is not None
    assert got["bad"].last_rejected >= now


async def test_non_retryable_failures_do_not_count(store: RequesterStore) -> None:
    """A job that fails everywhere (bad image, timeout) says nothing about the node."""
    now = utcnow()
    await store.upsert_node(
        NodeRecord(id="n1", info={"node_id": "n1"}, state="live", first_seen=now, last_seen=now)
    )
    job, _ = await store.create_job(make_job())
    ex = make_execution(job, "n1")
    await store.apply(Changes(executions=[new_execution_update(ex, [(ES.BID_ACCEPTED, "")])]))
    [ex] = (await store.list_executions([job.id]))[job.id]
    await store.apply(
        Changes(executions=[advance(ex, [(ES.FAILED, "bad")], now=utcnow(), retryable=False)])
    )
    [got] = await store.list_nodes()
    assert got.standing == NodeStanding()


async def test_outbox_relays_committed_events(store: RequesterStore) -> None:
    published: list[Envelope] = []

    async def publish(env: Envelope) -> None:
        published.append(env)

    job, _ = await store.create_job(make_job())
    await store.apply(
        Changes(
            jobs=[job_transition(job, JobStateType.IN_PROGRESS, now=utcnow())],
            events=[_planned(job.id)],
        )
    )
    await store.start_outbox(publish)
    try:
        for _ in range(200):
            if published:
                break
            await asyncio.sleep(0.01)
    finally:
        await store.stop_outbox()
    assert [e.type for e in published] == ["executions_planned"]
    assert published[0].data["job_id"] == job.id


async def test_history_listeners_see_committed_rows(store: RequesterStore) -> None:
    seen: list[HistoryRecord] = []
    unsubscribe = store.subscribe_history(seen.extend)
    job, _ = await store.create_job(make_job())
    await store.apply(Changes(jobs=[job_transition(job, JobStateType.QUEUED, now=utcnow())]))
    unsubscribe()
    await store.apply(
        Changes(
            jobs=[job_transition(await store.get_job(job.id), JobStateType.ERROR, now=utcnow())]
        )
    )
    assert [h.new for h in seen] == ["New", "Queued"]
    assert seen[0].seq < seen[1].seq


def _planned(job_id: str) -> ExecutionsPlanned:
    return ExecutionsPlanned(
        job_id=job_id, expected=1, verifier=VerifierType.NOOP, deal=Deal(Concurrency=1)
    )
