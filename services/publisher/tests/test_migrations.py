"""Migrations: one head, upgrade/downgrade/upgrade, and no drift from the table definitions."""

from __future__ import annotations

import pytest

from shoal_common.migration_checks import assert_up_down_up_without_drift, migration_heads
from shoal_publisher.store.sql import MIGRATIONS
from shoal_publisher.store.tables import metadata

pytestmark = pytest.mark.integration


def test_one_head() -> None:
    assert len(migration_heads(MIGRATIONS)) == 1


async def test_upgrade_downgrade_upgrade_without_drift(database_url: str) -> None:
    await assert_up_down_up_without_drift(database_url, MIGRATIONS, metadata)
