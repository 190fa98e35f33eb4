"""Checks every service's migration tests make: one head, up/down/up, no drift from the tables.

Each service owns its Alembic scripts and table definitions; what "the migrations are sound"
means is the same for all of them, so it is written once here.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData, inspect
from sqlalchemy.engine import Connection

from shoal_common.db import create_engine, is_sqlite, normalise_url


def alembic_config(url: str, script_location: Path) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location))
    cfg.set_main_option("sqlalchemy.url", normalise_url(url).replace("%", "%%"))
    return cfg


def migration_heads(script_location: Path) -> list[str]:
    config = alembic_config("sqlite:///unused", script_location)
    return list(ScriptDirectory.from_config(config).get_heads())


async def table_names(url: str) -> set[str]:
    """The tables in the database, Alembic's bookkeeping left out."""
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            names: list[str] = await conn.run_sync(lambda c: inspect(c).get_table_names())
    finally:
        await engine.dispose()
    return set(names) - {"alembic_version"}


async def drift(url: str, metadata: MetaData) -> list[Any]:
    """Differences between the migrated database and the table definitions (empty: none)."""

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


async def assert_up_down_up_without_drift(
    url: str, script_location: Path, metadata: MetaData
) -> None:
    """Upgrade creates exactly the defined tables, downgrade removes them all, upgrade again."""
    cfg = alembic_config(url, script_location)
    await asyncio.to_thread(command.upgrade, cfg, "head")
    assert await table_names(url) == set(metadata.tables)
    assert await drift(url, metadata) == []
    await asyncio.to_thread(command.downgrade, cfg, "base")
    assert await table_names(url) == set()
    await asyncio.to_thread(command.upgrade, cfg, "head")
    assert await drift(url, metadata) == []
