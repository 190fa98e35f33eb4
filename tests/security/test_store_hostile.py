"""Client strings that reach the database, on both stores: SQLite (embedded) and Postgres.

Postgres is stricter than SQLite: text cannot hold NUL, and VARCHAR(n) columns refuse longer
values. Whatever a client can send must be refused with a 400 or stored, never turned into a
500 by the database, and a refused write must leave nothing behind.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shoal_common.signing import ClientKey, sign_envelope
from shoal_common.spec import JobStateType
from tests.security.support import Target, noop_spec, running_requester

pytestmark = pytest.mark.integration


@pytest.fixture
async def stored(database_url: str, tmp_path: Path) -> AsyncIterator[Target]:
    async with running_requester(database_url, tmp_path) as t:
        yield t


STRINGS = {
    "nul": "a\u0000b",
    "long-tag": "t" * 300,
    "rtl": "\u202eexe.txt",
    "astral": "\U0001f600" * 10,
}


@pytest.mark.parametrize("text", STRINGS.values(), ids=STRINGS.keys())
async def test_annotations_reach_the_database_safely(
    stored: Target, alice: ClientKey, text: str
) -> None:
    before = await stored.job_ids()
    resp = await stored.submit(alice, noop_spec(Annotations=[text]))
    assert resp.status_code in (200, 400), f"{resp.status_code} {resp.text[:200]}"
    if resp.status_code == 400:
        assert await stored.job_ids() == before
        return
    listed = await stored.post(
        "/requester/list", {"client_id": alice.client_id, "include_tags": [text]}
    )
    assert listed.status_code == 200
    assert [j["Job"]["Spec"]["Annotations"] for j in listed.json()["jobs"]] == [[text]]


@pytest.mark.parametrize("job_id", ["\u0000", "x\u0000y", "j" * 5000])
async def test_lookups_by_hostile_ids_are_4xx(stored: Target, job_id: str) -> None:
    for path in ("/requester/states", "/requester/events", "/requester/results"):
        resp = await stored.post(path, {"job_id": job_id})
        assert 400 <= resp.status_code < 500, f"{path}: {resp.status_code} {resp.text[:200]}"
    listed = await stored.post("/requester/list", {"id": job_id})
    assert listed.status_code == 200
    assert listed.json()["jobs"] == []


async def test_cancel_reason_reaches_the_database_safely(stored: Target, alice: ClientKey) -> None:
    """``Reason`` of a cancel is free text that lands in the job's status and history."""
    stored.hang()
    job_id = await stored.submit_ok(alice)
    await stored.service.orchestrator.idle()
    before = await stored.footprint(job_id)
    body = {"ClientID": alice.client_id, "JobID": job_id, "Reason": "bye\u0000" + "r" * 5000}
    resp = await stored.post("/requester/cancel", sign_envelope(alice, body))
    assert resp.status_code in (200, 400), f"{resp.status_code} {resp.text[:200]}"
    if resp.status_code == 400:
        assert await stored.footprint(job_id) == before
    else:
        await stored.wait_state(job_id, JobStateType.CANCELLED)
