"""Helpers for tests of every package: real NATS and real databases, made and torn down per test.

Used as a pytest plugin (``pytest_plugins = ["shoal_common.testing"]`` in a conftest). Postgres
comes from ``SHOAL_TEST_DATABASE_URL`` (default: the local server on 127.0.0.1:5432); each test
that asks for one gets a fresh database, dropped afterwards.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import pytest

from shoal_common.natsserver import NatsServer, start_nats_server

if TYPE_CHECKING:
    from shoal_common.bus import Bus
    from shoal_common.events import Envelope

T = TypeVar("T")

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/test"


def postgres_admin_url() -> str:
    return os.environ.get("SHOAL_TEST_DATABASE_URL", DEFAULT_PG)


async def _pg_exec(admin_url: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def create_postgres_database() -> str:
    """A new empty database on the test server; returns its URL."""
    admin = postgres_admin_url()
    name = "shoal_" + uuid.uuid4().hex[:12]
    try:
        await _pg_exec(admin, f'CREATE DATABASE "{name}"')
    except OSError as exc:
        raise RuntimeError(
            f"Postgres is not reachable at {admin}: start one (make postgres) or set "
            "SHOAL_TEST_DATABASE_URL"
        ) from exc
    base, _, _ = admin.rpartition("/")
    return f"{base}/{name}"


async def drop_postgres_database(url: str) -> None:
    name = url.rpartition("/")[2]
    await _pg_exec(postgres_admin_url(), f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A private nats-server with JetStream on a free port, for one test."""
    server = start_nats_server(tmp_path / "nats", log_file=tmp_path / "nats.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    url = await create_postgres_database()
    try:
        yield url
    finally:
        await drop_postgres_database(url)


@pytest.fixture(params=["sqlite", "postgres"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """Run a test once on SQLite and once on Postgres (store contract tests)."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'test.sqlite'}"
        return
    url = await create_postgres_database()
    try:
        yield url
    finally:
        await drop_postgres_database(url)


async def wait_for(
    probe: Callable[[], Awaitable[T | None]], *, timeout: float = 10.0, interval: float = 0.02
) -> T:
    """Poll ``probe`` until it returns something truthy; fail with the last value after timeout.

    Tests wait on observable state with a deadline instead of sleeping a fixed time.
    """
    deadline = asyncio.get_running_loop().time() + timeout
    last: T | None = None
    while True:
        last = await probe()
        if last:
            return last
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value: {last!r})")
        await asyncio.sleep(interval)


async def publish_until_accepted(
    bus: Bus, envelope: Envelope, *, timeout: float = 30.0, interval: float = 0.02
) -> None:
    """Publish ``envelope``, trying again while the bus refuses it (NATS restarting, the client
    reconnecting, a stream just created on a cluster with no leader yet) until ``timeout``."""

    async def published() -> bool:
        try:
            await bus.publish_event(envelope)
        except Exception:
            return False
        return True

    await wait_for(published, timeout=timeout, interval=interval)
