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
