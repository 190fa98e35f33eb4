"""Prebuilt INSERT/UPDATE/DELETE run on the driver by the group-commit engine write exactly what
SQLAlchemy writes, report the same row counts and raise the same exceptions."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    bindparam,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError

from shoal_common import sqlite_store, tracing
from shoal_common.sqlite_store import GroupCommitEngine

metadata = MetaData()
things = Table(
    "things",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String, nullable=False),
    Column("when", DateTime(timezone=True), nullable=True),
    Column("flag", Boolean, nullable=False),
    Column("doc", JSON, nullable=True),
    Column("kind", String, nullable=False, default="plain"),  # a Python-side default
)

INSERT = insert(things)
INSERT_IF_NEW = sqlite_insert(things).on_conflict_do_nothing()
UPDATE_NAME = (
    update(things)
    .where(things.c.id == bindparam("b_id"))
    .values({things.c.name: bindparam("name")})
)
DELETE = delete(things).where(things.c.id == bindparam("b_id"))
MOMENT = datetime(2026, 12, 3, 8, 43, 53, 123456, tzinfo=UTC)


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[GroupCommitEngine]:
    engine = GroupCommitEngine(f"sqlite:///{tmp_path / 'store.db'}")
    metadata.create_all(engine.sync_engine)
    yield engine
    await engine.dispose()


@pytest.fixture
def compiled(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The statements the engine compiled for the driver path."""
    seen: list[Any] = []
    real = sqlite_store._compile_dml
    sqlite_store._DML_CACHE.clear()  # each test sees first and second uses afresh

    def spy(statement: Any, keys: tuple[str, ...], dialect: Any) -> Any:
        found = real(statement, keys, dialect)
        if found is not None:
            seen.append(statement)
        return found

    monkeypatch.setattr(sqlite_store, "_compile_dml", spy)
    return seen


def row(i: int, **extra: Any) -> dict[str, Any]:
    return {
        "id": i,
        "name": f"n{i}",
        "when": MOMENT,
        "flag": i % 2 == 0,
        "doc": {"i": i},
        "kind": "k",
        **extra,
    }


def stored(path: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as conn:
        return list(conn.execute("SELECT * FROM things ORDER BY id"))


async def test_driver_path_writes_what_sqlalchemy_writes(
    engine: GroupCommitEngine, tmp_path: Path, compiled: list[Any]
) -> None:
    for i in range(1, 5):  # 1: through SQLAlchemy (first use), 2-4: on the driver
        async with engine.begin() as conn:
            await conn.execute(INSERT, row(i))
    async with engine.begin() as conn:
        await conn.execute(INSERT, [row(5), row(6, doc=None, when=None)])
    assert INSERT in compiled
    rows = stored(tmp_path / "store.db")
    # Same text for the date, same 0/1 for the boolean, same JSON as SQLAlchemy's own row 1.
    assert rows[0][2:5] == ("2026-12-03 08:43:53.123456", 0, '{"i": 1}')
    assert rows[1][2:5] == ("2026-12-03 08:43:53.123456", 1, '{"i": 2}')
    assert rows[5][2:5] == (None, 1, "null")  # JSON's None is JSON null, as SQLAlchemy binds it
    async with engine.connect() as conn:
        back = (await conn.execute(select(things).order_by(things.c.id))).all()
    assert [r.when for r in back[:5]] == [MOMENT.replace(tzinfo=None)] * 5
    assert [r.doc for r in back] == [{"i": i} for i in range(1, 6)] + [None]


async def test_row_counts(engine: GroupCommitEngine, compiled: list[Any]) -> None:
    counts = []
    for _ in range(3):
        async with engine.begin() as conn:
            counts.append((await conn.execute(INSERT_IF_NEW, row(1))).rowcount)
    assert counts == [1, 0, 0]
    for name in ("a", "b"):
        async with engine.begin() as conn:
            assert (await conn.execute(UPDATE_NAME, {"b_id": 1, "name": name})).rowcount == 1
            assert (await conn.execute(UPDATE_NAME, {"b_id": 9, "name": name})).rowcount == 0
    for _ in range(2):
        async with engine.begin() as conn:
            await conn.execute(DELETE, {"b_id": 1})
    assert {INSERT_IF_NEW, UPDATE_NAME, DELETE} <= set(compiled)


async def test_errors_are_sqlalchemy_errors_and_roll_back_only_their_transaction(
    engine: GroupCommitEngine, tmp_path: Path, compiled: list[Any]
) -> None:
    for i in (1, 2):
        async with engine.begin() as conn:
            await conn.execute(INSERT, row(i))

    async def clash() -> None:
        async with engine.begin() as conn:
            await conn.execute(INSERT, row(3))
            await conn.execute(INSERT, row(1))  # duplicate key, on the driver path

    with pytest.raises(IntegrityError):
        await clash()
    assert INSERT in compiled
    assert [r[0] for r in stored(tmp_path / "store.db")] == [1, 2]


async def test_other_statements_go_through_sqlalchemy(
    engine: GroupCommitEngine, tmp_path: Path, compiled: list[Any]
) -> None:
    returning = insert(things).returning(things.c.id)
    no_kind = {k: v for k, v in row(0).items() if k != "kind"}
    for i in (1, 2):
        async with engine.begin() as conn:
            # Built per call, with its own values: never compiled for the driver.
            await conn.execute(insert(things).values(row(10 + i)))
            assert (await conn.execute(returning, row(20 + i))).scalar_one() == 20 + i
            await conn.execute(INSERT, {**no_kind, "id": 30 + i})  # needs the Python default
            await conn.execute(
                delete(things).where(things.c.id.in_(bindparam("ids", expanding=True))),
                {"ids": [11]},
            )
    assert compiled == []
    rows = stored(tmp_path / "store.db")
    assert [r[0] for r in rows] == [12, 21, 22, 31, 32]
    assert rows[-1][5] == "plain"


async def test_tracing_keeps_statements_in_sqlalchemy(
    engine: GroupCommitEngine, compiled: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tracing, "enabled", lambda: True)
    for i in (1, 2, 3):
        async with engine.begin() as conn:
            await conn.execute(INSERT, row(i))
    assert compiled == []
