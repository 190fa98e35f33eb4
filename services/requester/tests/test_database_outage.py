"""A database outage on the requester (B12): placements wait for the database instead of for the
stuck-job sweep, and /readyz says NOT READY while the database cannot be reached."""

from __future__ import annotations

import time

import httpx
from sqlalchemy import exc as sa_exc

from shoal_common.spec import JobStateType
from shoal_common.testing import wait_for
from shoal_requester.domain.model import Changes
from shoal_requester.store.memory import MemoryRequesterStore
from shoal_requester.testing import harness

JS = JobStateType


class FlakyStore(MemoryRequesterStore):
    """A memory store whose database is "down" while ``down`` is set: every call to
    ``apply`` and ``ping`` fails as a dropped Postgres connection does."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.refused = 0

    def _check(self) -> None:
        if self.down:
            self.refused += 1
            raise sa_exc.OperationalError("UPDATE jobs ...", {}, ConnectionRefusedError(111))

    async def apply(self, changes: Changes) -> list:  # type: ignore[type-arg]
        self._check()
        return await super().apply(changes)  # type: ignore[return-value]

    async def ping(self) -> None:
        self._check()


async def test_a_placement_that_met_a_database_outage_runs_once_the_database_is_back() -> None:
    store = FlakyStore()
    # The stuck-job sweep would re-drive the job only after an hour: it cannot be what saves it.
    async with harness(store=store, stuck_after=3600.0) as h:
        await h.node("n1")
        job_id = await h.submit()  # stored (create_job), then placed in the background
        await h.wait_state(job_id, JS.COMPLETED)

        # The outage begins between storing a job and placing it (create_job still works).
        store.down = True
        job_id = await h.submit()

        async def retried() -> bool:
            return store.refused >= 2  # tried, and tried again

        await wait_for(retried, timeout=5.0)
        started = time.monotonic()
        store.down = False
        job = await h.wait_state(job_id, JS.COMPLETED, timeout=5.0)
        assert job.state is JS.COMPLETED
        assert time.monotonic() - started < 3.0  # backoff starts at 0.5 s, not stuck_after


async def test_readyz_says_not_ready_while_the_database_is_down() -> None:
    store = FlakyStore()
    async with harness(store=store) as h:
        transport = httpx.ASGITransport(app=h.service.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://requester") as api:
            assert (await api.get("/readyz")).status_code == 200
            store.down = True
            resp = await api.get("/readyz")
            assert resp.status_code == 503
            assert resp.text == "NOT READY"
            store.down = False
            assert (await api.get("/readyz")).status_code == 200
