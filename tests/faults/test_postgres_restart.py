"""F5: the requester's Postgres crashes mid-run (a private server, never the shared one) and
comes back: the API says 503 meanwhile, and no acknowledged job is lost."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from shoal_client.client import ShoalClientError
from shoal_common.db import DATABASE_UNAVAILABLE, create_engine
from shoal_common.testing import wait_for
from tests.faults.cluster import FaultCluster, completed_executions, noop_spec, wait_all_terminal
from tests.faults.postgres import PrivatePostgres, private_postgres

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.xdist_group("processes")]


@pytest.fixture
def postgres() -> Iterator[PrivatePostgres]:
    pg = private_postgres()
    try:
        yield pg
    finally:
        pg.destroy()


def test_postgres_crash_mid_run_is_503_and_loses_nothing(
    tmp_path: Path, postgres: PrivatePostgres
) -> None:
    cluster = FaultCluster(
        tmp_path / "cluster",
        compute_nodes=2,
        compute_env={"SHOAL_COMPUTE_NOOP_DELAY_S": "0.5"},
        database_url=postgres.url,
    ).start()
    try:
        client = cluster.client(tmp_path / "key")
        job_ids = [client.submit(noop_spec()).metadata.id for _ in range(20)]
        postgres.crash()
        crashed = time.monotonic()

        with pytest.raises(ShoalClientError) as refused:
            client.submit(noop_spec())
        assert refused.value.status == 503, refused.value
        read = httpx.get(f"{cluster.api_url}/api/v1/jobs/{job_ids[-1]}", timeout=10)
        assert read.status_code == 503, read.text
        assert read.headers["Retry-After"]
        assert "unavailable" in read.json()["detail"]
        ready = httpx.get(f"{cluster.api_url}/readyz", timeout=10)
        assert ready.status_code == 503, ready.text  # B12: was READY with the database down

        time.sleep(2)  # the outage itself
        postgres.start()
        # Placements that met the outage retry with backoff (B12): recovery takes seconds,
        # not the stuck-job sweep's 30 s (default settings here).
        states = wait_all_terminal(client.state, job_ids, timeout=25)
        recovered = time.monotonic() - crashed
        assert httpx.get(f"{cluster.api_url}/readyz", timeout=10).status_code == 200
        assert [s.state.value for s in states] == ["Completed"] * len(job_ids)
        for state in states:
            assert len(completed_executions(state)) == 1, state
        # The refused submit stored nothing; the acknowledged ones are all there.
        listed = {j["Job"]["Metadata"]["ID"] for j in client.list_jobs(limit=100)}
        assert listed == set(job_ids)
        after = client.submit(noop_spec()).metadata.id
        assert client.wait(after, timeout=20).state.value == "Completed"
        print(f"postgres crash -> all {len(job_ids)} terminal: {recovered:.1f} s")
    finally:
        cluster.stop()


def test_a_query_cut_by_a_crash_is_database_unavailable(postgres: PrivatePostgres) -> None:
    """asyncpg reports a connection dropped mid-query as a bare DBAPIError; callers that wait
    for the database to come back must see it as unavailable, or they give up (B12)."""

    async def cut_query() -> BaseException:
        engine = create_engine(postgres.url)
        try:
            async with engine.connect() as conn:
                query = asyncio.ensure_future(conn.execute(text("SELECT pg_sleep(30)")))

                async def running() -> bool:
                    async with engine.connect() as watcher:
                        active = await watcher.execute(
                            text(
                                "SELECT count(*) FROM pg_stat_activity "
                                "WHERE state = 'active' AND query = 'SELECT pg_sleep(30)'"
                            )
                        )
                        return bool(active.scalar())

                await wait_for(running)  # the query is on the server: the crash cuts it
                await asyncio.to_thread(postgres.crash)
                try:
                    await query
                except Exception as cut:  # the type is what the test looks at
                    return cut
                raise AssertionError("the query outlived the crash")
        finally:
            await engine.dispose()

    error = asyncio.run(cut_query())
    assert isinstance(error, DATABASE_UNAVAILABLE), repr(error)
