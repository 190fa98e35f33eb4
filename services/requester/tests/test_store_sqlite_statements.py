"""The requester store's bare-driver SQLite path writes what SQLAlchemy would have written."""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import sqlite as sqlite_dialect

from shoal_common.db import DATABASE_UNAVAILABLE
from shoal_common.events import Envelope, ExecutionsPlanned
from shoal_common.spec import Deal, ExecutionStateType, JobStateType, VerifierType
from shoal_common.testing import wait_for
from shoal_requester.domain.model import Changes, JobUpdate, new_execution_update
from shoal_requester.store.sql import (
    _HISTORY_COLUMNS,
    _INSERT_HISTORY,
    _INSERT_HISTORY_ONE,
    _INSERT_OUTBOX,
    _UPDATE_JOB,
    SqlRequesterStore,
    _expired_jobs,
    _find_job,
    _list_executions,
    _run,
    _sqlite_datetime,
    _sqlite_params,
    _sqlite_statement,
)
from shoal_requester.store.tables import UTCDateTime
from shoal_requester.testing import make_execution, make_job

_DIALECT = sqlite_dialect.dialect()
_DATETIME = UTCDateTime().dialect_impl(_DIALECT)


def sqlalchemy_stores(value: datetime) -> str:
    """The text SQLAlchemy's UTCDateTime on SQLite's DATETIME binds for ``value``."""
    bound = UTCDateTime().process_bind_param(value, _DIALECT)
    processor = _DATETIME.bind_processor(_DIALECT)
    assert processor is not None
    stored = processor(bound)
    assert isinstance(stored, str)
    return stored


zones = st.sampled_from(
    [None, UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8))]
)


@settings(deadline=None)  # a loaded machine must not fail it
@given(
    moment=st.datetimes(min_value=datetime(1000, 1, 2), max_value=datetime(9999, 12, 30)),
    zone=zones,
)
def test_datetimes_are_stored_as_sqlalchemy_stores_them(
    moment: datetime, zone: timezone | None
) -> None:
    value = moment.replace(tzinfo=zone)
    assert _sqlite_datetime(value) == sqlalchemy_stores(value)


def test_params_follow_the_compiled_bind_order_and_convert_only_datetimes() -> None:
    now = datetime(2026, 12, 3, 8, 0, 0, tzinfo=UTC)
    row = {
        "job": '{"x": 1}',
        "state": "InProgress",
        "version": 3,
        "updated": now,
        "timeout_at": None,
        "queue_deadline": now + timedelta(seconds=1),
        "retries_used": 0,
        "extra_executions": 0,
        "status": "2021-01-01 00:00:00",  # text that looks like a date stays text
        "b_id": "j1",
        "b_state": "Queued",
        "b_version": 2,
    }
    statement = _sqlite_statement(_UPDATE_JOB, tuple(row))
    assert statement.text.startswith("UPDATE jobs SET job=?")
    params = list(_sqlite_params(statement, row))
    assert params == [
        '{"x": 1}',
        "InProgress",
        3,
        "2026-12-03 08:00:00.000000",
        None,
        "2026-12-03 08:00:01.000000",
        0,
        0,
        "2021-01-01 00:00:00",
        "j1",
        "Queued",
        2,
    ]
    assert _sqlite_statement(_UPDATE_JOB, tuple(row)) is statement  # compiled once


@pytest.mark.parametrize("keys", [("job_id",), ("job_id", "type", "time")])
def test_single_and_several_binds(keys: tuple[str, ...]) -> None:
    now = datetime(2026, 12, 3, tzinfo=UTC)
    row = {"job_id": "j", "type": "JobLevel", "time": now}
    statement = _sqlite_statement(_INSERT_HISTORY_ONE, keys)
    expected = ["j", "JobLevel", "2026-12-03 00:00:00.000000"][: len(keys)]
    assert list(_sqlite_params(statement, {k: row[k] for k in keys})) == expected


def test_group_history_insert_binds_in_the_order_it_builds_values() -> None:
    """_flush_history builds each row's values in _HISTORY_COLUMNS order: the compiled
    statement must bind in that order (else it falls back to the slower general path)."""
    statement = _sqlite_statement(_INSERT_HISTORY, _HISTORY_COLUMNS)
    assert statement.order == _HISTORY_COLUMNS
    assert statement.text.startswith("INSERT INTO history (job_id, type, execution_id")


async def test_driver_errors_surface_as_sqlalchemy_errors(tmp_path: Path) -> None:
    """The bare-driver path raises what SQLAlchemy would: callers catch IntegrityError and
    shoal_common.db.DATABASE_UNAVAILABLE (OperationalError), not sqlite3's own classes."""
    store = SqlRequesterStore(f"sqlite:///{tmp_path / 'requester.db'}")
    await store.open()
    try:
        conn = store._sync.connect()  # type: ignore[union-attr]
        try:
            with conn.begin():
                row = {"event_id": "e1", "envelope": b"{}", "created": 0.0}
                _run(conn, _INSERT_OUTBOX, row)
                with pytest.raises(sa_exc.IntegrityError):
                    _run(conn, _INSERT_OUTBOX, row)
                conn.exec_driver_sql("PRAGMA query_only=ON")
                with pytest.raises(DATABASE_UNAVAILABLE):
                    _run(conn, _INSERT_OUTBOX, {**row, "event_id": "e2"})
                conn.exec_driver_sql("PRAGMA query_only=OFF")
        finally:
            conn.close()
    finally:
        await store.close()


async def test_a_write_meeting_another_connections_lock_does_not_stop_the_event_loop(
    tmp_path: Path,
) -> None:
    """ADR 0018: the outbox relay writes the file on another connection and gives the write
    lock back only after an await on this loop. Statements that waited for it on the loop
    stalled both for the 30 s busy timeout ("database is locked"); in the writer thread they
    wait without stopping the loop."""
    path = tmp_path / "requester.db"
    store = SqlRequesterStore(f"sqlite:///{path}")
    await store.open()
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # the write lock, until this loop lets it go
        loop = asyncio.get_running_loop()
        loop.call_later(0.3, holder.execute, "COMMIT")
        started = loop.time()
        job, created = await store.create_job(make_job())
        assert created
        assert loop.time() - started < 5  # not the 30 s busy timeout with the loop stopped
        assert (await store.get_job(job.id)).id == job.id
        again, _ = await asyncio.wait_for(store.create_job(make_job()), 5)
        assert (await store.get_job(again.id)).id == again.id
    finally:
        holder.close()
        await store.close()


async def test_relayed_rows_are_deleted_by_the_writer_once_and_never_relayed_twice(
    tmp_path: Path,
) -> None:
    """ADR 0018: the relay hands relayed rows to the store's writer, which deletes them in its
    next group (or one of their own when idle); meanwhile they are not published again."""
    store = SqlRequesterStore(f"sqlite:///{tmp_path / 'requester.db'}")
    await store.open()
    published: list[str] = []

    async def publish(envelope: Envelope) -> None:
        published.append(envelope.id)

    try:
        await store.start_outbox(publish)
        jobs = [(await store.create_job(make_job()))[0] for _ in range(5)]
        for job in jobs:  # each commit wakes the relay while earlier deletes may be pending
            planned = ExecutionsPlanned(
                job_id=job.id, expected=1, verifier=VerifierType.NOOP, deal=Deal(Concurrency=1)
            )
            await store.apply(Changes(events=[planned]))
        await wait_for(lambda: _async_true(len(published) >= 5))
        await wait_for(lambda: _outbox_rows_left(store, 0))  # deleted while idle, too
        assert len(published) == len(set(published)) == 5
    finally:
        await store.stop_outbox()
        await store.close()


async def _async_true(value: object) -> bool:
    return bool(value)


async def _outbox_rows_left(store: SqlRequesterStore, expected: int) -> bool:
    def count(conn: Any) -> int:
        return int(conn.exec_driver_sql("SELECT count(*) FROM outbox").scalar())

    return await store._read(count) == expected


async def test_deleting_relayed_rows_that_fails_waits_for_the_next_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failing deletes-only group (disk trouble) is not retried in a tight loop: the rows
    wait for the next write."""
    store = SqlRequesterStore(f"sqlite:///{tmp_path / 'requester.db'}")
    await store.open()
    attempts = 0

    async def failing_group(ops: list[Any]) -> list[Any]:
        nonlocal attempts
        attempts += 1
        raise OSError("disk I/O error")

    try:
        monkeypatch.setattr(store, "_commit_group", failing_group)
        await store._delete_relayed([1, 2])
        await asyncio.sleep(0.2)  # a window in which a tight retry loop would show (no event)
        assert attempts == 1
        assert store._relayed == [1, 2]  # kept for the next write's group
        monkeypatch.undo()
        job, _ = await asyncio.wait_for(store.create_job(make_job()), 5)  # the writer lives on
        assert store._relayed == []
        assert (await store.get_job(job.id)).id == job.id
    finally:
        monkeypatch.undo()
        await store.close()


async def test_a_new_row_that_reuses_a_deleted_rows_seq_is_relayed(tmp_path: Path) -> None:
    """SQLite gives a new row the largest rowid plus one: once the relayed row with the largest
    seq is deleted, the next event gets its seq again, and must still be relayed."""
    store = SqlRequesterStore(f"sqlite:///{tmp_path / 'requester.db'}")
    await store.open()
    published: list[str] = []

    async def publish(envelope: Envelope) -> None:
        published.append(envelope.data["job_id"])

    def planned(job_id: str) -> ExecutionsPlanned:
        return ExecutionsPlanned(
            job_id=job_id, expected=1, verifier=VerifierType.NOOP, deal=Deal(Concurrency=1)
        )

    try:
        await store.start_outbox(publish)
        await store.apply(Changes(events=[planned("first")]))
        await wait_for(lambda: _async_true(published))
        await wait_for(lambda: _outbox_rows_left(store, 0))  # deleted: seq 1 is free again
        await store.apply(Changes(events=[planned("second")]))  # gets seq 1
        await wait_for(lambda: _async_true(len(published) == 2))
        assert published == ["first", "second"]
    finally:
        await store.stop_outbox()
        await store.close()


async def test_keyed_reads_on_the_driver_equal_sqlalchemys_reads(tmp_path: Path) -> None:
    """find_job and small list_executions read on the bare driver (ADR 0031): the records are
    the ones SQLAlchemy's reads of the same rows build, field for field."""
    store = SqlRequesterStore(f"sqlite:///{tmp_path / 'requester.db'}")
    await store.open()
    try:
        moment = datetime(2026, 12, 5, 1, 2, 3, 456789, tzinfo=timezone(timedelta(hours=2)))
        full = make_job(created=moment)
        full = replace(
            full,
            timeout_at=moment + timedelta(minutes=5),
            queue_deadline=moment + timedelta(seconds=30),
            retries_used=2,
            extra_executions=1,
            status="waiting for a node",
            submit_key="k" * 64,
        )
        bare = make_job()  # no deadlines, no submit key
        for job in (full, bare):
            await store.create_job(job)
        ran = make_execution(
            full,
            "node-1",
            state=ExecutionStateType.COMPLETED,
            accepted_ask_for_bid=True,
            run_output={"stdout": "hi\n", "exitCode": 0},
            result_cid="bafy-result",
            published={"StorageSource": "IPFS", "CID": "bafy-result"},
            verification={"Complete": True, "Result": True},
            retryable=False,
        )
        asked = make_execution(full, "node-2", state=ExecutionStateType.ASK_FOR_BID)
        await store.apply(
            Changes(executions=[new_execution_update(e, [(e.state, "")]) for e in (ran, asked)])
        )

        sync = store._sync
        assert sync is not None
        with sync.connect() as conn:
            for job in (full, bare):
                assert await store.find_job(job.id) == _find_job(conn, job.id)
            assert await store.find_job("no-such-job") is None
            for ids in ([full.id], [full.id, bare.id, full.id], [bare.id, "no-such-job"]):
                assert await store.list_executions(ids) == _list_executions(conn, ids)
        read = await store.find_job(full.id)
        assert read is not None
        assert read.timeout_at == moment + timedelta(minutes=5)
        assert read.created.tzinfo is UTC
        executions = (await store.list_executions([full.id]))[full.id]
        assert [e.id for e in executions] == [ran.id, asked.id]
        assert executions[0].verification == {"Complete": True, "Result": True}
    finally:
        await store.close()


async def test_a_read_job_keeps_its_parsed_model_until_its_text_changes(tmp_path: Path) -> None:
    """Keyed reads reuse the parsed Job of the record written or read last for that id (ADR
    0031), and only while the stored JSON is the one it was parsed from."""
    store = SqlRequesterStore(f"sqlite:///{tmp_path / 'requester.db'}")
    await store.open()
    try:
        created, _ = await store.create_job(make_job())
        model = created.model  # parsed once, on the record the submit wrote
        read = await store.find_job(created.id)
        assert read is not None
        assert read.__dict__.get("model") is model  # not parsed again
        assert read.spec == created.spec

        changed_job = {**created.job, "APIVersion": "V1beta2"}
        changed = replace(created, job=changed_job, version=created.version + 1)
        await store.apply(Changes(jobs=[JobUpdate(before=created, after=changed)]))
        again = await store.find_job(created.id)
        assert again is not None
        assert "model" not in again.__dict__  # new text: parsed anew, when asked
        assert again.job == changed_job
        assert again.model.api_version == "V1beta2"
        third = await store.find_job(created.id)
        assert third is not None
        assert third.__dict__.get("model") is again.model  # and kept from then on
    finally:
        await store.close()


async def test_jobs_without_a_deadline_stay_out_of_the_deadline_indexes(tmp_path: Path) -> None:
    """ADR 0033: the deadline indexes are partial. A job without a deadline has no entry (a
    NULL key cost a page moved on every commit that set one); a ``<= now`` term can still use
    them, and the expiry query scans no table."""
    store = SqlRequesterStore(f"sqlite:///{tmp_path / 'requester.db'}")
    await store.open()
    past = datetime(2026, 1, 1, tzinfo=UTC)
    now = past + timedelta(days=1)
    try:
        for _ in range(3):
            await store.create_job(make_job())
        timed_out, _ = await store.create_job(
            make_job(state=JobStateType.IN_PROGRESS, timeout_at=past)
        )
        queued_too_long, _ = await store.create_job(
            make_job(state=JobStateType.QUEUED, queue_deadline=past)
        )

        def entries(conn: Any, index: str) -> int:
            sql = "SELECT coalesce(sum(ncell), 0) FROM dbstat WHERE name = ? AND pagetype = 'leaf'"
            return int(conn.exec_driver_sql(sql, (index,)).scalar())

        def plan(conn: Any) -> str:
            compiled = _expired_jobs(now, 10).compile(
                dialect=_DIALECT, compile_kwargs={"render_postcompile": True}
            )
            unbound = (None,) * len(compiled.positiontup or ())  # a plan needs no values
            rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}", unbound).all()
            return " | ".join(str(row[-1]) for row in rows)

        def usable(conn: Any, index: str, column: str) -> int:
            # INDEXED BY fails ("no query solution") if the partial index cannot serve the term.
            sql = f"SELECT count(*) FROM jobs INDEXED BY {index} WHERE {column} <= ?"
            return int(conn.exec_driver_sql(sql, (_sqlite_datetime(now),)).scalar())

        assert await store._read(lambda conn: entries(conn, "ix_jobs_timeout_at")) == 1
        assert await store._read(lambda conn: entries(conn, "ix_jobs_queue_deadline")) == 1
        assert await store._read(lambda c: usable(c, "ix_jobs_timeout_at", "timeout_at")) == 1
        assert (
            await store._read(lambda c: usable(c, "ix_jobs_queue_deadline", "queue_deadline")) == 1
        )
        query_plan = await store._read(plan)
        assert "SCAN jobs" not in query_plan, query_plan  # an index serves each term
        expired = {job.id for job in await store.list_expired_jobs(now)}
        assert expired == {timed_out.id, queued_too_long.id}
    finally:
        await store.close()


async def _group_sizes(tmp_path: Path, spacing_s: float) -> list[int]:
    """Group sizes for a pair of writes, then eight more trickling in 20 ms apart."""
    store = SqlRequesterStore(
        f"sqlite:///{tmp_path / f'spaced-{spacing_s}.db'}", commit_spacing_s=spacing_s
    )
    await store.open()
    sizes: list[int] = []
    commit_group = store._commit_group

    async def counted(ops: list[Any]) -> list[Any]:
        sizes.append(len(ops))
        return await commit_group(ops)

    store._commit_group = counted  # type: ignore[method-assign]
    try:
        writes = [asyncio.create_task(store.create_job(make_job())) for _ in range(2)]
        for _ in range(8):
            await asyncio.sleep(0.02)  # the arrivals' schedule (the input), not a wait on state
            writes.append(asyncio.create_task(store.create_job(make_job())))
        await asyncio.wait_for(asyncio.gather(*writes), 10)
    finally:
        await store.close()
    return sizes


async def test_under_load_a_group_commit_waits_for_more_writes(tmp_path: Path) -> None:
    """ADR 0033: after a group of two or more, the next commit starts no sooner than the
    spacing after it, so writes trickling in share one commit (one page per B-tree) instead
    of one each."""
    assert await _group_sizes(tmp_path, 0.5) == [2, 8]
    assert len(await _group_sizes(tmp_path, 0.0)) >= 3  # unspaced: they go one by one


async def test_one_write_at_a_time_never_waits_for_the_spacing(tmp_path: Path) -> None:
    """Groups of one are not load: one job at a time pays no spacing (target 1's latency)."""
    store = SqlRequesterStore(f"sqlite:///{tmp_path / 'requester.db'}", commit_spacing_s=1.0)
    await store.open()
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        for _ in range(5):
            await store.create_job(make_job())
        assert loop.time() - started < 1.0
    finally:
        await store.close()


def test_commit_spacing_is_off_unless_set_and_reaches_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ADR 0033: a closed loop pays for the spacing, so it is the operator's choice."""
    from shoal_requester.service import RequesterService
    from shoal_requester.settings import RequesterSettings

    default = RequesterService(RequesterSettings(state_dir=tmp_path / "a"))
    assert isinstance(default.store, SqlRequesterStore)
    assert default.store._commit_spacing_s == 0.0
    monkeypatch.setenv("SHOAL_REQUESTER_COMMIT_SPACING_MS", "4")
    spaced = RequesterService(RequesterSettings(state_dir=tmp_path / "b"))
    assert isinstance(spaced.store, SqlRequesterStore)
    assert spaced.store._commit_spacing_s == pytest.approx(0.004)
