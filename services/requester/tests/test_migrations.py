"""Migrations: one head, upgrade/downgrade/upgrade, and no drift from the table definitions."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from shoal_common.db import create_engine, is_sqlite, normalise_url
from shoal_requester.store.sql import MIGRATIONS
from shoal_requester.store.tables import metadata

pytestmark = pytest.mark.integration


def _config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", normalise_url(url).replace("%", "%%"))
    return cfg


def test_one_head() -> None:
    heads = ScriptDirectory.from_config(_config("sqlite:///unused")).get_heads()
    assert len(heads) == 1


async def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            names: list[str] = await conn.run_sync(lambda c: inspect(c).get_table_names())
    finally:
        await engine.dispose()
    return set(names) - {"alembic_version"}


async def _drift(url: str) -> list[Any]:
    def compare(conn: Connection) -> list[Any]:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "render_as_batch": is_sqlite(url)}
        )
        return list(compare_metadata(context, metadata))

    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(compare)
    finally:
        await engine.dispose()


async def test_upgrade_downgrade_upgrade_without_drift(database_url: str) -> None:
    cfg = _config(database_url)
    await asyncio.to_thread(command.upgrade, cfg, "head")
    assert await _tables(database_url) == set(metadata.tables)
    assert await _drift(database_url) == []
    await asyncio.to_thread(command.downgrade, cfg, "base")
    assert await _tables(database_url) == set()
    await asyncio.to_thread(command.upgrade, cfg, "head")
    assert await _drift(database_url) == []
