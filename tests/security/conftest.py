"""Fixtures of the security suite (helpers in support.py)."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shoal_common.signing import ClientKey
from tests.security.support import Target, migrated_sqlite, running_requester, sqlite_url


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return migrated_sqlite(tmp_path_factory.mktemp("template") / "requester.sqlite")


@pytest.fixture
async def target(tmp_path: Path, sqlite_template: Path) -> AsyncIterator[Target]:
    """The requester on a real SQLite file (the embedded default), production body limit."""
    db = tmp_path / "requester.sqlite"
    shutil.copyfile(sqlite_template, db)
    async with running_requester(sqlite_url(db), tmp_path, migrate=False) as t:
        yield t


@pytest.fixture(scope="session")
def alice() -> ClientKey:
    """The victim: owns the jobs under attack."""
    return ClientKey.generate()


@pytest.fixture(scope="session")
def mallory() -> ClientKey:
    """The attacker: a legitimate client of the same cluster, with her own key."""
    return ClientKey.generate()
