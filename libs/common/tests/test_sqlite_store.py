"""The group-commit SQLite engine: transactions stay isolated, durable and batched."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, insert, select
from sqlalchemy.exc import IntegrityError

from shoal_common import sqlite_store
from shoal_common.sqlite_store import GroupCommitEngine
from shoal_common.testing import wait_for

metadata = MetaData()
items = Table("items", metadata, Column("id", Integer, primary_key=True), Column("name", String))


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[GroupCommitEngine]:
    engine = GroupCommitEngine(f"sqlite+aiosqlite:///{tmp_path / 'store.db'}")
    metadata.create_all(engine.sync_engine)
    yield engine
    await engine.dispose()


@dataclass
class CommitCounter:
    commits: int = 0


@pytest.fixture
def counter(monkeypatch: pytest.MonkeyPatch) -> CommitCounter:
    """Counts the engine's COMMITs (one per group)."""
    counted = CommitCounter()
    real_commit = sqlite_store._commit

    def counting_commit(conn: object) -> None:
        counted.commits += 1
        real_commit(conn)  # type: ignore[arg-type]

    monkeypatch.setattr(sqlite_store, "_commit", counting_commit)
    return counted


def committed_ids(path: Path) -> list[int]:
    """What another process would see: a fresh connection outside the engine."""
    with sqlite3.connect(path) as conn:
        return [row[0] for row in conn.execute("SELECT id FROM items ORDER BY id")]


async def add(engine: GroupCommitEngine, item_id: int) -> None:
    async with engine.begin() as conn:
        await conn.execute(insert(items).values(id=item_id, name=f"item {item_id}"))


async def test_a_transaction_is_on_disk_when_begin_exits(
    engine: GroupCommitEngine, tmp_path: Path
) -> None:
    await add(engine, 1)
    assert committed_ids(tmp_path / "store.db") == [1]
    async with engine.connect() as conn:
        assert (await conn.execute(select(items.c.name))).scalar_one() == "item 1"


async def test_concurrent_transactions_share_commits(
    engine: GroupCommitEngine, tmp_path: Path, counter: CommitCounter
) -> None:
    await asyncio.gather(*(add(engine, i) for i in range(50)))
    assert committed_ids(tmp_path / "store.db") == list(range(50))
    assert 1 <= counter.commits < 50


async def test_a_write_one_step_behind_joins_the_open_group(
    engine: GroupCommitEngine, tmp_path: Path, counter: CommitCounter
) -> None:
    """A compute node's quick run: its outcome is written one loop step after the accepted
    row (the run had one thing to await) and must share the row's commit, not wait for the
    next fsync."""

    async def quick_run() -> None:
        await asyncio.sleep(0)  # e.g. handing its output to the log sink
        await add(engine, 2)

    run = asyncio.create_task(quick_run())  # queued before the row is written, as a node does
    await add(engine, 1)
    await run
    assert committed_ids(tmp_path / "store.db") == [1, 2]
    assert counter.commits == 1


async def test_a_failed_transaction_does_not_take_its_group_down(
    engine: GroupCommitEngine, tmp_path: Path
) -> None:
    await add(engine, 7)

    async def duplicate() -> None:
        async with engine.begin() as conn:
            await conn.execute(insert(items).values(id=100, name="first half"))
            await conn.execute(insert(items).values(id=7, name="clash"))

    outcomes = await asyncio.gather(
        add(engine, 1), duplicate(), add(engine, 2), return_exceptions=True
    )
    assert outcomes[0] is None
    assert outcomes[2] is None
    assert isinstance(outcomes[1], IntegrityError)
    # The failed transaction's first insert went with it; the others are durable.
    assert committed_ids(tmp_path / "store.db") == [1, 2, 7]


async def test_a_failed_commit_fails_every_transaction_of_the_group(
    engine: GroupCommitEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_disk(conn: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(sqlite_store, "_commit", broken_disk)
    outcomes = await asyncio.gather(add(engine, 1), add(engine, 2), return_exceptions=True)
    assert all(isinstance(o, OSError) for o in outcomes), outcomes
    monkeypatch.undo()
    await add(engine, 3)  # the engine recovers once the disk does
    assert committed_ids(tmp_path / "store.db") == [3]


async def test_nested_transactions_are_refused_instead_of_deadlocking(
    engine: GroupCommitEngine,
) -> None:
    async with engine.begin():
        with pytest.raises(RuntimeError, match="nested"):
            async with engine.begin():
                pass


async def test_savepoints_inside_a_transaction(engine: GroupCommitEngine, tmp_path: Path) -> None:
    async with engine.begin() as conn:
        await conn.execute(insert(items).values(id=1, name="kept"))
        with pytest.raises(IntegrityError):
            async with conn.begin_nested():
                await conn.execute(insert(items).values(id=1, name="clash"))
        await conn.execute(insert(items).values(id=2, name="also kept"))
    assert committed_ids(tmp_path / "store.db") == [1, 2]


# --- deferred work (ADR 0026) ------------------------------------------------------------------


@dataclass
class Outcomes:
    told: list[BaseException | None]

    def done(self, error: BaseException | None) -> None:
        self.told.append(error)


def deferred_insert(item_id: int) -> sqlite_store.DeferredWork:
    async def work(conn: sqlite_store.LoopConnection) -> None:
        await conn.execute(insert(items).values(id=item_id, name=f"deferred {item_id}"))

    return work


async def test_deferred_work_rides_in_the_next_transaction_without_a_commit_of_its_own(
    engine: GroupCommitEngine, tmp_path: Path, counter: CommitCounter
) -> None:
    outcomes = Outcomes([])
    engine.defer(deferred_insert(1), outcomes.done)
    engine.defer(deferred_insert(2), outcomes.done)
    assert committed_ids(tmp_path / "store.db") == []  # nothing begun for it yet
    await add(engine, 3)
    assert committed_ids(tmp_path / "store.db") == [1, 2, 3]
    assert counter.commits == 1
    assert outcomes.told == [None, None]


async def test_deferred_work_alone_gets_a_transaction_of_its_own_soon(
    engine: GroupCommitEngine, tmp_path: Path
) -> None:
    outcomes = Outcomes([])
    engine.defer(deferred_insert(1), outcomes.done)

    async def told() -> bool:
        return bool(outcomes.told)

    await wait_for(told, timeout=sqlite_store.DEFER_MAX_S + 2)
    assert outcomes.told == [None]
    assert committed_ids(tmp_path / "store.db") == [1]


async def test_failed_deferred_work_is_reported_and_spares_the_transaction_it_rode_in(
    engine: GroupCommitEngine, tmp_path: Path
) -> None:
    await add(engine, 7)
    outcomes = Outcomes([])
    engine.defer(deferred_insert(7), outcomes.done)  # a duplicate key
    await add(engine, 8)
    assert committed_ids(tmp_path / "store.db") == [7, 8]
    [error] = outcomes.told
    assert isinstance(error, IntegrityError)


async def test_deferred_work_lost_with_its_group_is_reported_and_committed_at_close(
    engine: GroupCommitEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_disk(conn: object) -> None:
        raise OSError("disk full")

    outcomes = Outcomes([])
    monkeypatch.setattr(sqlite_store, "_commit", broken_disk)
    engine.defer(deferred_insert(1), outcomes.done)
    with pytest.raises(OSError, match="disk full"):
        await add(engine, 2)
    monkeypatch.undo()
    [error] = outcomes.told
    assert isinstance(error, OSError)
    engine.defer(deferred_insert(3), outcomes.done)
    await engine.dispose()  # commits what waits, rather than losing it
    assert outcomes.told[1] is None
    assert committed_ids(tmp_path / "store.db") == [3]
    engine.defer(deferred_insert(4), outcomes.done)  # too late: closed
    assert isinstance(outcomes.told[2], RuntimeError)
