"""Hostile requests against the requester API, one attack per test, on a real SQLite store.

Each attack must be refused with a clear 4xx (never a 5xx) and leave nothing behind: no job
stored from a refused submit, and no change (state, version, executions, history) to a job
someone else owns. Threat model: docs/threat-model.md.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from shoal_common.signing import (
    MSG_BAD_ENVELOPE,
    MSG_BAD_SIGNATURE,
    MSG_CLIENT_ID_MISMATCH,
    ClientKey,
    sign_envelope,
)
from shoal_common.spec import ExecutionStateType, JobStateType
from shoal_common.testing import wait_for
from tests.security.support import Target, noop_spec, payload

MiB = 1024**2
TERMINAL = tuple(s for s in JobStateType if s.terminal)


def envelope(public_key: str, payload_text: str, signature: str) -> bytes:
    """A signed-request body assembled by hand (the attacker controls every member)."""
    return (
        f'{{"client_public_key": {json.dumps(public_key)}, "payload": {payload_text}, '
        f'"signature": {json.dumps(signature)}}}'
    ).encode()


def signed_raw(key: ClientKey, payload_text: str) -> bytes:
    """An honestly signed body around payload text that json.dumps could not produce."""
    return envelope(key.public_key_b64, payload_text, key.sign(payload_text.encode()))


def message(resp: httpx.Response) -> str:
    """The error text of a legacy (Go-shaped) or problem+json answer."""
    body = resp.json()
    return str(body.get("Message") or body.get("detail") or body)


async def refused(target: Target, resp: httpx.Response, before: set[str], *, status: int) -> None:
    assert resp.status_code == status, resp.text
    assert message(resp), "a refusal must say why"
    assert await target.job_ids() == before, "a refused request stored a job"


async def running_job(target: Target, owner: ClientKey) -> str:
    """A job of ``owner`` held InProgress on a node, so its footprint only moves if attacked."""
    target.hang()
    job_id = await target.submit_ok(owner)

    async def placed() -> bool:
        execs = (await target.service.store.list_executions([job_id]))[job_id]
        return any(e.state is ExecutionStateType.BID_ACCEPTED for e in execs)

    await wait_for(placed, timeout=10)
    await target.service.orchestrator.idle()
    return job_id


# --- size and shape of bodies --------------------------------------------------------------------


SIZE_LIMITED = [
    "/requester/submit",
    "/requester/cancel",
    "/requester/logs",
    "/requester/list",
    "/requester/states",
    "/api/v1/requester/submit",
]


async def _chunked(data: bytes, size: int = 1 * MiB) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


@pytest.mark.parametrize("path", SIZE_LIMITED)
async def test_oversized_bodies_are_413(target: Target, path: str) -> None:
    limit = target.service.settings.max_body_bytes
    before = await target.job_ids()
    big = b"{" + b" " * limit + b"}"
    declared = await target.post(path, big)
    await refused(target, declared, before, status=413)
    # Without Content-Length the limit is enforced while reading, not after buffering.
    streamed = await target.http.post(
        path, content=_chunked(big), headers={"Content-Type": "application/json"}
    )
    await refused(target, streamed, before, status=413)


async def test_huge_inline_data_is_refused_whole(target: Target, alice: ClientKey) -> None:
    limit = target.service.settings.max_body_bytes
    inline = {"StorageSource": "Inline", "URL": "data:," + "A" * limit, "path": "/inputs"}
    before = await target.job_ids()
    resp = await target.submit(alice, noop_spec(inputs=[inline]))
    await refused(target, resp, before, status=413)


async def test_large_inline_data_under_the_limit_stays_readable(
    target: Target, alice: ClientKey
) -> None:
    """Just under the body limit: accepted or refused, but never a 5xx, and a stored job can
    still be read back through the API (list, states) without blowing its own limits."""
    size = target.service.settings.max_body_bytes - 64 * 1024
    inline = {"StorageSource": "Inline", "URL": "data:," + "A" * size, "path": "/inputs"}
    before = await target.job_ids()
    resp = await target.submit(alice, noop_spec(inputs=[inline]))
    assert resp.status_code < 500, resp.text
    if resp.status_code != 200:
        await refused(target, resp, before, status=resp.status_code)
        return
    job_id = resp.json()["job"]["Metadata"]["ID"]
    state = await target.post("/requester/states", {"job_id": job_id})
    assert state.status_code == 200
    listed = await target.post("/requester/list", {"client_id": alice.client_id, "max_jobs": 1})
    assert listed.status_code == 200


NESTED = 100_000


@pytest.mark.parametrize(
    "path", ["/requester/submit", "/requester/cancel", "/requester/list", "/requester/states"]
)
async def test_deeply_nested_bodies_are_400(target: Target, path: str) -> None:
    before = await target.job_ids()
    lists = b"[" * NESTED + b"]" * NESTED
    for body in (lists, b'{"payload": ' + lists + b', "job_id": ' + lists + b"}"):
        resp = await target.post(path, body)
        await refused(target, resp, before, status=400)


@pytest.mark.parametrize("depth", [32, 250, 300, 900, NESTED])
async def test_deep_nesting_inside_a_signed_payload(
    target: Target, alice: ClientKey, depth: int
) -> None:
    """``PublisherSpec.Params`` takes any JSON: nesting there must be accepted and readable
    back, or refused with a 400; a job the store or the API cannot serialise must not exist."""
    params = '{"x": ' * depth + "1" + "}" * depth
    base = noop_spec()
    del base["PublisherSpec"]
    spec = json.dumps(base)[:-1] + f', "PublisherSpec": {{"Type": "Noop", "Params": {params}}}}}'
    text = f'{{"APIVersion": "V1beta1", "ClientID": "{alice.client_id}", "Spec": {spec}}}'
    before = await target.job_ids()
    resp = await target.post("/requester/submit", signed_raw(alice, text))
    assert resp.status_code in (200, 400), f"depth {depth}: {resp.status_code} {resp.text[:200]}"
    if depth <= 32:
        assert resp.status_code == 200, resp.text  # ordinary nesting is fine
    if resp.status_code == 400:
        await refused(target, resp, before, status=400)
        return
    job_id = resp.json()["job"]["Metadata"]["ID"]
    for path in ("/requester/states", "/requester/events"):
        assert (await target.post(path, {"job_id": job_id})).status_code == 200
    got = await target.http.get(f"/api/v1/jobs/{job_id}")
    assert got.status_code == 200


# --- numbers out of range ------------------------------------------------------------------------


def _raw_spec(key: ClientKey, member: str) -> str:
    """Payload text with one Spec member written raw (numbers json.dumps cannot write)."""
    name = member.split('"')[1]
    base = noop_spec()
    base.pop(name, None)
    spec = json.dumps(base)[:-1] + f", {member}}}"
    return f'{{"APIVersion": "V1beta1", "ClientID": "{key.client_id}", "Spec": {spec}}}'


@pytest.mark.parametrize("timeout", ["1e12", "1e400"])
async def test_absurd_timeouts_are_refused_or_still_end(
    target: Target, alice: ClientKey, timeout: str
) -> None:
    """A timeout beyond what a date can hold must not leave an acknowledged job unplaceable
    (and the requester's placement loops failing on it) forever."""
    before = await target.job_ids()
    body = signed_raw(alice, _raw_spec(alice, f'"Timeout": {timeout}'))
    resp = await target.post("/requester/submit", body)
    assert resp.status_code in (200, 400), f"{resp.status_code} {resp.text[:200]}"
    # The cluster still places ordinary work.
    other = await target.submit_ok(alice)
    await target.wait_state(other, JobStateType.COMPLETED)
    if resp.status_code == 400:
        await refused(target, resp, before | {other}, status=400)
    else:
        job_id = resp.json()["job"]["Metadata"]["ID"]
        # Noop jobs end in well under a second here.
        await target.wait_state(job_id, *TERMINAL, timeout=3)


@pytest.mark.parametrize("number", ["18446744073709551616", "-9223372036854775809", "1e400"])
async def test_numbers_json_encoders_cannot_write_in_free_form_params(
    target: Target, alice: ClientKey, number: str
) -> None:
    """Found by test_parsers.py: ``PublisherSpec.Params`` takes any JSON, and the store and
    the API write JSON with orjson, which stops at 64-bit integers."""
    params = f'"PublisherSpec": {{"Type": "Noop", "Params": {{"n": {number}}}}}'
    before = await target.job_ids()
    resp = await target.post("/requester/submit", signed_raw(alice, _raw_spec(alice, params)))
    assert resp.status_code in (200, 400), f"{resp.status_code} {resp.text[:200]}"
    if resp.status_code == 400:
        await refused(target, resp, before, status=400)
    else:
        job_id = resp.json()["job"]["Metadata"]["ID"]
        assert (await target.post("/requester/states", {"job_id": job_id})).status_code == 200


@pytest.mark.parametrize("cpu", ["-5", "-500m", "nan", "inf", "-inf"])
async def test_negative_or_non_finite_resources_are_refused(
    target: Target, alice: ClientKey, cpu: str
) -> None:
    """A negative request would be subtracted from what a node has committed, letting it take
    more work than it can do (services/compute/.../domain/capacity.py)."""
    before = await target.job_ids()
    resp = await target.submit(alice, noop_spec(Resources={"CPU": cpu}))
    await refused(target, resp, before, status=400)


@pytest.mark.parametrize("max_jobs", [2**31, 2**63 - 1, 2**63, 2**64])
async def test_list_with_a_huge_max_jobs(target: Target, alice: ClientKey, max_jobs: int) -> None:
    """Found by the schema fuzzer: a limit past the database's integer range."""
    await target.submit_ok(alice)
    resp = await target.post(
        "/requester/list", {"client_id": alice.client_id, "max_jobs": max_jobs}
    )
    assert resp.status_code in (200, 400), f"{resp.status_code} {resp.text[:200]}"
    if resp.status_code == 200:
        assert len(resp.json()["jobs"]) == 1


# --- unicode tricks ------------------------------------------------------------------------------

# Each is sent as JSON escapes, so the body itself is plain ASCII and valid JSON.
UNICODE_TRICKS = {
    "rtl-override": "invoice\u202egpj.exe",
    "nul": "before\u0000after",
    "zero-width": "adm\u200bin",
    "homoglyph": "\u0430dmin",  # Cyrillic a
    "ansi-escape": "\u001b[2J\u001b[31mred",
    "lone-high-surrogate": "\ud800",
    "lone-low-surrogate": "x\udfffy",
    "reversed-pair": "\udc00\ud800",
    "noncharacter": "\uffff\ufffe",
}


def _spec_with_names(text: str) -> dict[str, Any]:
    return noop_spec(
        Annotations=[text],
        Docker={"Image": text, "Entrypoint": [text], "EnvironmentVariables": [f"V={text}"]},
        Resources={"CPU": "0.1"},
    )


@pytest.mark.parametrize("text", UNICODE_TRICKS.values(), ids=UNICODE_TRICKS.keys())
async def test_unicode_tricks_in_names_and_annotations(
    target: Target, alice: ClientKey, text: str
) -> None:
    """Accepted and returned exactly as sent (no normalisation that could merge two names), or
    refused with a 400; never a 5xx, and a refused job is not stored."""
    body = sign_envelope(alice, payload(alice, _spec_with_names(text)))
    assert body.isascii()
    before = await target.job_ids()
    resp = await target.post("/requester/submit", body)
    assert resp.status_code in (200, 400), f"{resp.status_code} {resp.text[:200]}"
    if resp.status_code == 400:
        await refused(target, resp, before, status=400)
        return
    job_id = resp.json()["job"]["Metadata"]["ID"]
    listed = await target.post(
        "/requester/list", {"client_id": alice.client_id, "include_tags": [text]}
    )
    assert listed.status_code == 200
    jobs = listed.json()["jobs"]
    assert [j["Job"]["Metadata"]["ID"] for j in jobs] == [job_id]
    stored = jobs[0]["Job"]["Spec"]
    assert stored["Annotations"] == [text]
    assert stored["Docker"]["Entrypoint"] == [text]


async def test_body_that_is_not_utf8_is_400(target: Target, alice: ClientKey) -> None:
    before = await target.job_ids()
    good = sign_envelope(alice, payload(alice))
    for body in (b"\xff\xfe" + good, good.replace(b'"V1beta1"', b'"V1\xc0\xafbeta1"')):
        for path in ("/requester/submit", "/requester/list"):
            resp = await target.post(path, body)
            await refused(target, resp, before, status=400)


# --- signatures ----------------------------------------------------------------------------------


async def test_forged_signature_is_refused(target: Target, alice: ClientKey) -> None:
    text = json.dumps(payload(alice))
    forged = base64.b64encode(os.urandom(256)).decode()
    before = await target.job_ids()
    resp = await target.post("/requester/submit", envelope(alice.public_key_b64, text, forged))
    await refused(target, resp, before, status=400)
    assert message(resp).startswith(MSG_BAD_SIGNATURE)


async def test_signature_replayed_over_a_different_payload(
    target: Target, alice: ClientKey
) -> None:
    """A captured request's signature does not sign anything else, not even the same JSON
    written with other whitespace (the signature covers the bytes as sent)."""
    original = payload(alice)
    text = json.dumps(original)
    signature = alice.sign(text.encode())
    first = await target.post("/requester/submit", envelope(alice.public_key_b64, text, signature))
    assert first.status_code == 200
    before = await target.job_ids()
    other = json.dumps({**original, "Spec": noop_spec(Annotations=["mallory-was-here"])})
    for replayed in (other, json.dumps(original, separators=(",", ":")), text + " "):
        resp = await target.post(
            "/requester/submit", envelope(alice.public_key_b64, replayed, signature)
        )
        if replayed == text + " ":
            # Trailing whitespace is outside the payload value: the same bytes were signed.
            assert resp.status_code == 200
            assert resp.json()["job"]["Metadata"]["ID"] == first.json()["job"]["Metadata"]["ID"]
            continue
        await refused(target, resp, before, status=400)
        assert message(resp).startswith(MSG_BAD_SIGNATURE)


async def test_replayed_submit_does_not_run_twice(target: Target, alice: ClientKey) -> None:
    body = sign_envelope(alice, payload(alice))
    answers = [await target.post("/requester/submit", body) for _ in range(3)]
    ids = {a.json()["job"]["Metadata"]["ID"] for a in answers}
    assert len(ids) == 1
    assert ids <= await target.job_ids()
    assert len(await target.job_ids()) == 1


async def test_valid_signature_with_another_clients_key(
    target: Target, alice: ClientKey, mallory: ClientKey
) -> None:
    """Mallory signs correctly with her own key but claims Alice's ClientID; or presents Alice's
    public key with her own signature. Both are refused, and nothing is stored as Alice."""
    as_alice = json.dumps(payload(alice))
    before = await target.job_ids()
    own_key = envelope(mallory.public_key_b64, as_alice, mallory.sign(as_alice.encode()))
    resp = await target.post("/requester/submit", own_key)
    await refused(target, resp, before, status=400)
    assert message(resp).startswith(MSG_CLIENT_ID_MISMATCH)
    alices_key = envelope(alice.public_key_b64, as_alice, mallory.sign(as_alice.encode()))
    resp = await target.post("/requester/submit", alices_key)
    await refused(target, resp, before, status=400)
    assert message(resp).startswith(MSG_BAD_SIGNATURE)


async def test_public_key_in_another_encoding_is_refused(target: Target, alice: ClientKey) -> None:
    """Only PKCS#1 DER (as Go parsed it): a SubjectPublicKeyInfo of the same key is refused."""
    spki = alice.private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    text = json.dumps(payload(alice))
    body = envelope(base64.b64encode(spki).decode(), text, alice.sign(text.encode()))
    before = await target.job_ids()
    resp = await target.post("/requester/submit", body)
    await refused(target, resp, before, status=400)


async def test_duplicate_or_case_variant_members_are_refused(
    target: Target, alice: ClientKey
) -> None:
    """Parser differentials: two ``payload`` members (which one was signed?) are refused."""
    text = json.dumps(payload(alice))
    evil = json.dumps(payload(alice, noop_spec(Annotations=["evil"])))
    sig = alice.sign(text.encode())
    before = await target.job_ids()
    for body in (
        envelope(alice.public_key_b64, text, sig)[:-1] + f', "payload": {evil}}}'.encode(),
        envelope(alice.public_key_b64, text, sig)[:-1] + f', "Payload": {evil}}}'.encode(),
    ):
        resp = await target.post("/requester/submit", body)
        await refused(target, resp, before, status=400)
        assert message(resp).startswith(MSG_BAD_ENVELOPE)


# --- other clients' jobs -------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "/api/v1"])
async def test_cancel_of_another_clients_job(
    target: Target, alice: ClientKey, mallory: ClientKey, prefix: str
) -> None:
    job_id = await running_job(target, alice)
    before = await target.footprint(job_id)
    for job_ref in (job_id, job_id[:8], f" {job_id} "):
        body = sign_envelope(mallory, {"ClientID": mallory.client_id, "JobID": job_ref})
        resp = await target.post(f"{prefix}/requester/cancel", body)
        assert resp.status_code in (401, 403), resp.text
        assert "ClientID" in message(resp)
    # Claiming to be Alice with Mallory's key fails on the signature check instead.
    body = sign_envelope(mallory, {"ClientID": alice.client_id, "JobID": job_id})
    resp = await target.post(f"{prefix}/requester/cancel", body)
    assert resp.status_code == 400
    await target.service.orchestrator.idle()
    assert await target.footprint(job_id) == before
    assert not any(node.cancelled for node in target.nodes)


async def test_approve_of_another_clients_job(
    target: Target, alice: ClientKey, mallory: ClientKey
) -> None:
    job_id = await running_job(target, alice)
    before = await target.footprint(job_id)
    body = sign_envelope(mallory, {"ClientID": mallory.client_id, "JobID": job_id})
    resp = await target.post("/requester/approve", body)
    assert resp.status_code in (401, 403), resp.text
    assert await target.footprint(job_id) == before


@pytest.mark.parametrize("follow", [False, True])
async def test_logs_of_another_clients_job(
    target: Target, alice: ClientKey, mallory: ClientKey, follow: bool
) -> None:
    job_id = await running_job(target, alice)
    for node in target.nodes:
        node.logs = ["alice's secret\n"]
    before = await target.footprint(job_id)
    query = {"ClientID": mallory.client_id, "JobID": job_id, "Follow": follow}
    resp = await target.post("/requester/logs", sign_envelope(mallory, query))
    assert resp.status_code in (401, 403), resp.text
    assert "secret" not in resp.text
    assert await target.footprint(job_id) == before
    # The owner can read them (the refusal above is about who asks, not a broken endpoint).
    own = {"ClientID": alice.client_id, "JobID": job_id, "Follow": False}
    mine = await target.post("/requester/logs", sign_envelope(alice, own))
    assert mine.status_code == 200
    assert "secret" in mine.text


async def test_signed_logs_request_replayed_as_cancel(target: Target, alice: ClientKey) -> None:
    """A signature must only authorise what it was made for. Anyone who saw Alice's signed
    logs request (a proxy log, a shared terminal) must not be able to replay it to /cancel."""
    job_id = await running_job(target, alice)
    before = await target.footprint(job_id)
    logs_request = {
        "ClientID": alice.client_id,
        "ExecutionID": "",
        "Follow": False,
        "JobID": job_id,
        "WithHistory": True,
    }
    captured = sign_envelope(alice, logs_request)
    assert (await target.post("/requester/logs", captured)).status_code == 200
    replayed = await target.post("/requester/cancel", captured)
    assert replayed.status_code == 400, replayed.text
    await target.service.orchestrator.idle()
    assert await target.footprint(job_id) == before


async def test_cancel_of_a_finished_job_changes_nothing(target: Target, alice: ClientKey) -> None:
    job_id = await target.submit_ok(alice)
    await target.wait_state(job_id, JobStateType.COMPLETED)
    await target.service.orchestrator.idle()
    before = await target.footprint(job_id)
    resp = await target.post(
        "/requester/cancel", sign_envelope(alice, {"ClientID": alice.client_id, "JobID": job_id})
    )
    assert resp.status_code == 409
    assert await target.footprint(job_id) == before


# --- paths named by jobs -------------------------------------------------------------------------

BAD_OUTPUT_NAMES = ["../escape", "..", "/etc", "a/b", "out\u0000put", "stdout", ""]
BAD_MOUNT_PATHS = ["../../etc", "relative/dir", "/", "/outputs/../../etc", "/in\u0000puts"]


@pytest.mark.parametrize("name", BAD_OUTPUT_NAMES)
async def test_output_volume_names_that_escape_are_refused_at_submit(
    target: Target, alice: ClientKey, name: str
) -> None:
    """An output name becomes a folder of the results; the compute node refuses these when it
    runs the job (services/compute/tests/test_inputs.py), but the client deserves a 400 now,
    not a job that fails later on every node."""
    outputs = [{"Name": name, "StorageSource": "IPFS", "path": "/outputs"}]
    before = await target.job_ids()
    resp = await target.submit(alice, noop_spec(outputs=outputs))
    await refused(target, resp, before, status=400)


@pytest.mark.parametrize("path", BAD_MOUNT_PATHS)
async def test_mount_paths_that_escape_are_refused_at_submit(
    target: Target, alice: ClientKey, path: str
) -> None:
    before = await target.job_ids()
    as_input = [{"StorageSource": "Inline", "URL": "data:,x", "path": path}]
    resp = await target.submit(alice, noop_spec(inputs=as_input))
    await refused(target, resp, before, status=400)
    as_output = [{"Name": "outputs", "StorageSource": "IPFS", "path": path}]
    resp = await target.submit(alice, noop_spec(outputs=as_output))
    await refused(target, resp, before, status=400)


async def test_clean_paths_are_accepted(target: Target, alice: ClientKey) -> None:
    """The control case for the two tests above."""
    spec = noop_spec(
        inputs=[{"StorageSource": "Inline", "URL": "data:,x", "path": "/inputs/data"}],
        outputs=[{"Name": "my-out_1.v2", "StorageSource": "IPFS", "path": "/outputs"}],
    )
    assert (await target.submit(alice, spec)).status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/jobs/..%2F..%2Fetc%2Fpasswd",
        "/api/v1/jobs/%00",
        "/api/v1/jobs/" + "a" * 10_000,
        "/api/v1/nodes/..%2F..",
        "/api/v1/nodes/%00",
        "/api/v1/content/..",
        "/api/v1/content/.%2e",
        "/api/v1/events/stream?job_id=%00",
        "/api/v1/events/stream?job_id=..%2F..",
    ],
)
async def test_hostile_ids_in_urls_are_4xx(target: Target, path: str) -> None:
    resp = await target.http.get(path)
    assert 400 <= resp.status_code < 500, f"{resp.status_code} {resp.text[:200]}"
