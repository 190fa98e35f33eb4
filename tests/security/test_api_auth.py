"""Optional API auth (issue 8): open by default (Bacalhau-compatible), private on request, where
every read needs a bearer token or a signature by an allowed client."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from shoal_client.auth import RequestAuth
from shoal_common.request_auth import HEADER_SIGNATURE, HEADER_TIME, sign_request
from shoal_common.signing import ClientKey, sign_envelope
from shoal_requester.settings import RequesterSettings
from tests.security.support import Target, payload, running_requester, sqlite_url

TOKEN = "s3cret-token-for-tests-0123456789"
READS = [
    ("POST", "/requester/list", {"client_id": "x", "max_jobs": 10}),
    ("POST", "/api/v1/requester/list", {"client_id": "x", "max_jobs": 10}),
    ("GET", "/api/v1/nodes", None),
    ("GET", "/peers", None),
]


async def _private(
    tmp_path: Path, sqlite_template: Path, **settings: object
) -> AsyncIterator[Target]:
    db = tmp_path / "requester.sqlite"
    shutil.copyfile(sqlite_template, db)
    async with running_requester(sqlite_url(db), tmp_path, migrate=False, **settings) as t:
        yield t


@pytest.fixture
async def private(tmp_path: Path, sqlite_template: Path, alice: ClientKey) -> AsyncIterator[Target]:
    """api_auth=private with a token and Alice on the allow-list."""
    async for t in _private(
        tmp_path, sqlite_template, api_auth="private", api_tokens=TOKEN, api_clients=alice.client_id
    ):
        yield t


async def _request(
    t: Target, method: str, path: str, body: object | None, **headers: str
) -> httpx.Response:
    content = json.dumps(body).encode() if body is not None else b""
    return await t.http.request(method, path, content=content, headers=headers)


def _signed(
    key: ClientKey, method: str, path: str, body: object | None, **kw: float
) -> dict[str, str]:
    content = json.dumps(body).encode() if body is not None else b""
    return sign_request(key, method, path, "", content, **kw)


async def test_reads_are_open_by_default(target: Target, alice: ClientKey) -> None:
    job_id = await target.submit_ok(alice)
    for method, path, body in READS:
        resp = await _request(target, method, path, body)
        assert resp.status_code == 200, (path, resp.text)
    states = await target.post("/requester/states", {"client_id": "x", "job_id": job_id})
    assert states.status_code == 200


async def test_private_refuses_anonymous_reads_and_writes(
    private: Target, alice: ClientKey
) -> None:
    for method, path, body in READS:
        resp = await _request(private, method, path, body)
        assert resp.status_code == 401, (path, resp.text)
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert "private" in resp.json()["detail"]
    # A Bacalhau-signed submit alone (its envelope, no request auth) is refused too.
    before = await private.job_ids()
    assert (await private.submit(alice)).status_code == 401
    assert await private.job_ids() == before
    # Probes and discovery stay open.
    for path in ("/healthz", "/readyz", "/version", "/openapi.json"):
        assert (await private.http.get(path)).status_code == 200, path


async def test_private_lets_a_valid_token_in(private: Target, alice: ClientKey) -> None:
    for method, path, body in READS:
        ok = await _request(private, method, path, body, Authorization=f"Bearer {TOKEN}")
        assert ok.status_code == 200, (path, ok.text)
        bad = await _request(private, method, path, body, Authorization=f"Bearer {TOKEN}x")
        assert bad.status_code == 401, path
        assert "token is not valid" in bad.json()["detail"]


async def test_private_lets_an_allowed_signer_in(
    private: Target, alice: ClientKey, mallory: ClientKey
) -> None:
    for method, path, body in READS:
        ok = await _request(private, method, path, body, **_signed(alice, method, path, body))
        assert ok.status_code == 200, (path, ok.text)
        # A valid signature by a client not on the allow-list.
        other = await _request(private, method, path, body, **_signed(mallory, method, path, body))
        assert other.status_code == 403, path
        assert mallory.client_id in other.json()["detail"]


async def test_private_refuses_forged_replayed_or_stale_signatures(
    private: Target, alice: ClientKey
) -> None:
    body = {"client_id": "x", "max_jobs": 10}
    path = "/requester/list"
    headers = _signed(alice, "POST", path, body)
    # The same headers over another body, another path, another method.
    for method, to, sent in (
        ("POST", path, {"client_id": "x", "max_jobs": 11}),
        ("POST", "/api/v1/requester/list", body),
        ("GET", "/api/v1/nodes", None),
    ):
        resp = await _request(private, method, to, sent, **headers)
        assert resp.status_code == 401, (method, to)
        assert "does not verify" in resp.json()["detail"]
    stale = _signed(alice, "POST", path, body, now=time.time() - 3600)
    resp = await _request(private, "POST", path, body, **stale)
    assert resp.status_code == 401
    assert "timestamp" in resp.json()["detail"]
    forged = {**headers, HEADER_SIGNATURE: "AAAA" + headers[HEADER_SIGNATURE][4:]}
    assert (await _request(private, "POST", path, body, **forged)).status_code == 401
    junk = {**headers, HEADER_TIME: "soon"}
    assert (await _request(private, "POST", path, body, **junk)).status_code == 401


async def test_private_signed_submit_runs_once(private: Target, alice: ClientKey) -> None:
    """The client SDK's auth hook signs the whole request (the envelope inside stays signed)."""
    auth = RequestAuth(token=None, sign=True, key=lambda: alice)
    body = sign_envelope(alice, payload(alice))
    resp = await private.http.post(
        "/requester/submit", content=body, headers={"Content-Type": "application/json"}, auth=auth
    )
    assert resp.status_code == 200, resp.text
    job_id = resp.json()["job"]["Metadata"]["ID"]
    assert job_id in await private.job_ids()
    states = await private.http.post(
        "/requester/states",
        content=json.dumps({"client_id": alice.client_id, "job_id": job_id}).encode(),
        auth=auth,
    )
    assert states.status_code == 200
    assert states.json()["state"]["JobID"] == job_id
    by_token = RequestAuth(token=TOKEN, sign=False, key=lambda: alice)
    assert (await private.http.get("/api/v1/nodes", auth=by_token)).status_code == 200


def test_private_needs_credentials(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="needs api_tokens or api_clients"):
        RequesterSettings(state_dir=tmp_path, api_auth="private")
    with pytest.raises(ValidationError, match="at least 16 characters"):
        RequesterSettings(state_dir=tmp_path, api_auth="private", api_tokens="short")
    settings = RequesterSettings(
        state_dir=tmp_path, api_auth="private", api_tokens=f"{TOKEN},{TOKEN}2"
    )
    assert len(settings.api_tokens) == 2
    assert TOKEN not in repr(settings)
