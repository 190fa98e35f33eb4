"""The HTTP API: every legacy endpoint (root and /api/v1), bad inputs, Shoal's own endpoints."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from bacalhau_apiclient.api_client import ApiClient

from shoal_common.natsserver import free_port
from shoal_common.signing import ClientKey, sign_envelope
from shoal_common.spec import ExecutionStateType, JobStateType, to_wire, utcnow
from shoal_common.testing import wait_for
from shoal_requester.testing import Harness, harness, make_job, make_spec, submit_payload

RECORDED = Path("/work/shared/reference/recorded_requests.json")
JS = JobStateType


@dataclass
class Api:
    h: Harness
    http: httpx.AsyncClient

    async def post(self, path: str, body: Any, **kwargs: Any) -> httpx.Response:
        content = body if isinstance(body, bytes) else orjson.dumps(body)
        headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
        return await self.http.post(path, content=content, headers=headers, **kwargs)

    async def submit(self, key: ClientKey, spec: Any = None, **kwargs: Any) -> httpx.Response:
        payload = submit_payload(spec or make_spec(), key.client_id)
        return await self.post("/requester/submit", sign_envelope(key, payload), **kwargs)

    async def wait_done(self, job_id: str) -> None:
        await self.h.wait_state(job_id)


@pytest.fixture(scope="module")
def key() -> ClientKey:
    return ClientKey.generate()


@pytest.fixture(scope="module")
def other_key() -> ClientKey:
    return ClientKey.generate()


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    async with harness(max_body_bytes=64 * 1024) as h:
        for i in range(3):
            node = await h.node(f"compute-{i}", labels={"env": "prod" if i < 2 else "test"})
            node.start_heartbeats(0.5)
        transport = httpx.ASGITransport(app=h.service.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://requester") as http:
            yield Api(h, http)


@pytest.fixture
async def served(api: Api) -> AsyncIterator[Api]:
    """The same app behind a real HTTP server: ASGITransport buffers whole responses, so
    streaming (logs -f, the event stream) needs a socket."""
    port = free_port()
    config = uvicorn.Config(
        api.h.service.app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    await wait_for(lambda: _started(server))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            yield Api(api.h, http)
    finally:
        server.should_exit = True
        await task


def _recorded() -> list[dict[str, Any]]:
    data = json.loads(RECORDED.read_text())
    return [dict(x, session=s["bacalhau-sdk"]) for s in data["sessions"] for x in s["exchanges"]]


def _vectors(check_prefix: str) -> list[dict[str, Any]]:
    return [x for x in _recorded() if x["check"].startswith(check_prefix)]


def _ids(vectors: list[dict[str, Any]]) -> list[str]:
    return [f"{v['session']}-{v['check'][:30]}" for v in vectors]


def deserialize(body: str, kind: str) -> Any:
    """Read a response the way bacalhau-apiclient 1.0.0 does (raises if a field is unreadable)."""

    class Raw:
        data = body

    return ApiClient().deserialize(Raw(), kind)


# --- submit ------------------------------------------------------------------------------------

OK_SUBMITS = [
    *_vectors("submit_docker_job"),
    *_vectors("airflow_style_submit"),
    *_vectors("submit_long_job"),
]


@pytest.mark.parametrize("vector", OK_SUBMITS, ids=_ids(OK_SUBMITS))
async def test_recorded_submits_are_accepted_byte_for_byte(
    api: Api, vector: dict[str, Any]
) -> None:
    raw = vector["request_body_raw"].encode()
    resp = await api.post("/requester/submit", raw)
    assert resp.status_code == 200, resp.text
    job = resp.json()["job"]
    sent = json.loads(raw)["payload"]
    client_id = sent.get("ClientID") or sent.get("clientid")
    assert job["Metadata"]["ClientID"] == client_id
    assert job["Metadata"]["ID"]
    assert job["Metadata"]["CreatedAt"].endswith("Z")
    assert job["APIVersion"] == "V1beta1"
    assert job["Spec"]["Engine"] == "Docker"
    assert job["Spec"]["PublisherSpec"]["Type"] == job["Spec"]["Publisher"] == "Ipfs"
    assert job["Spec"]["Verifier"] == "Noop"
    assert job["Spec"]["Deal"]["Concurrency"] == 1
    assert resp.headers["X-Bacalhau-Job-ID"] == job["Metadata"]["ID"]
    sdk_view = deserialize(resp.text, "SubmitResponse")
    assert sdk_view.job.metadata.id == job["Metadata"]["ID"]
    # A replay of the same signed request answers the same job, and stores nothing new.
    again = await api.post("/requester/submit", raw)
    assert again.status_code == 200
    assert again.json()["job"]["Metadata"]["ID"] == job["Metadata"]["ID"]
    assert len(api.h.store.jobs) == 1
    # Never an empty event list right after submit (airflow busy-loops on one).
    events = await api.post(
        "/requester/events", {"client_id": client_id, "job_id": job["Metadata"]["ID"]}
    )
    first = events.json()["events"][0]
    assert (first["Type"], first["JobState"]["New"], first["Comment"]) == (
        "JobLevel",
        "New",
        "Job created",
    )


BAD_SUBMITS = [
    (v, expected)
    for prefix, expected in (
        ("submit_bad_engine_rejected", "error unmarshalling payload"),
        ("submit_bad_concurrency_rejected", "concurrency must be >= 1"),
        ("submit_bad_signature_rejected", "client's signature is invalid"),
        ("submit_client_id_mismatch", "client's public key does not match client ID"),
    )
    for v in _vectors(prefix)
]


@pytest.mark.parametrize(("vector", "message"), BAD_SUBMITS, ids=_ids([v for v, _ in BAD_SUBMITS]))
async def test_recorded_bad_submits_are_refused(
    api: Api, vector: dict[str, Any], message: str
) -> None:
    resp = await api.post("/requester/submit", vector["request_body_raw"].encode())
    assert resp.status_code == 400
    assert message in resp.json()["Message"]
    assert api.h.store.jobs == {}


def _spec_with(**changes: Any) -> dict[str, Any]:
    spec = to_wire(make_spec())
    spec.update(changes)
    return spec


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (_spec_with(Engine="Dockker"), "error unmarshalling payload: Spec.Engine"),
        (_spec_with(Deal={"Concurrency": 0}), "concurrency must be >= 1"),
        (_spec_with(Deal={"Concurrency": "lots"}), "Spec.Deal.Concurrency"),
        (_spec_with(Deal={"Concurrency": 1, "Confidence": 2}), "confidence must be <="),
        (_spec_with(Deal={"Concurrency": 1, "Confidence": -1}), "confidence must be >= 0"),
        (_spec_with(Deal={"Concurrency": 1, "MinBids": -2}), "min bids must be >= 0"),
        (_spec_with(Deal={"Concurrency": 1, "MinBids": 9}), "not enough nodes"),
        (_spec_with(Deal={"Concurrency": 4}), "not enough nodes"),
        (_spec_with(Timeout=-5), "Timeout must be >= 0"),
        (_spec_with(Timeout="soon"), "Spec.Timeout"),
        (_spec_with(Resources={"CPU": "lots"}), "invalid CPU"),
        (_spec_with(Resources={"Memory": "12 parsecs"}), "invalid size"),
        (_spec_with(Engine="Docker"), "Docker.Image is required"),
        (_spec_with(Engine=None), "Engine is required"),
        (_spec_with(inputs=[{"path": "/in"}]), "StorageSource is required"),
        (_spec_with(inputs="not-a-list"), "error unmarshalling payload: Spec.inputs"),
        (_spec_with(Network={"Type": "HTTP", "Domains": ["bad domain!"]}), "valid domain"),
        (
            _spec_with(NodeSelectors=[{"Key": "env", "Operator": "in", "Values": []}]),
            "needs at least one value",
        ),
        (
            _spec_with(NodeSelectors=[{"Key": "env", "Operator": "~=", "Values": ["x"]}]),
            "Spec.NodeSelectors.0.Operator",
        ),
    ],
)
async def test_bad_specs_are_refused_with_a_reason(
    api: Api, key: ClientKey, spec: dict[str, Any], message: str
) -> None:
    payload = {"APIVersion": "V1beta1", "ClientID": key.client_id, "Spec": spec}
    resp = await api.post("/requester/submit", sign_envelope(key, payload))
    assert resp.status_code == 400, resp.text
    assert message in resp.json()["Message"]
    assert api.h.store.jobs == {}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"payload": ', "error unmarshalling envelope"),
        (b"[1, 2]", "error unmarshalling envelope"),
        (b'{"client_public_key": "x", "signature": "y"}', "no payload contained"),
        (b'{"client_public_key": "x", "payload": {}, "signature": "y"}', "signature is invalid"),
    ],
)
async def test_malformed_envelopes(api: Api, body: bytes, message: str) -> None:
    resp = await api.post("/requester/submit", body)
    assert resp.status_code == 400
    assert message in resp.json()["Message"]


async def test_payload_problems_after_the_signature(api: Api, key: ClientKey) -> None:
    for payload, message in (
        ({"ClientID": key.client_id, "Spec": to_wire(make_spec())}, "APIVersion is empty"),
        ({"APIVersion": "V1beta1", "ClientID": key.client_id}, "spec is empty"),
        ({"APIVersion": "V1beta1", "ClientID": key.client_id, "Spec": 3}, "unmarshalling"),
        ({"APIVersion": "V1beta1", "Spec": {}}, "payload must contain a client ID"),
    ):
        resp = await api.post("/requester/submit", sign_envelope(key, payload))
        assert resp.status_code == 400
        assert message in resp.json()["Message"], payload
    assert api.h.store.jobs == {}


async def test_submit_with_job_id_header_is_refused(api: Api, key: ClientKey) -> None:
    resp = await api.submit(key, headers={"X-Bacalhau-Job-ID": "mine"})
    assert resp.status_code == 400
    assert "X-Bacalhau-Job-ID" in resp.json()["Message"]
    assert api.h.store.jobs == {}


async def test_oversized_body_is_refused(api: Api, key: ClientKey) -> None:
    spec = make_spec(Annotations=["x" * 100_000])
    resp = await api.submit(key, spec)
    assert resp.status_code == 413
    assert "over the limit" in resp.json()["Message"]
    chunked = await api.http.post(
        "/requester/list",
        content=_chunks(b" " * 70_000 + b"{}"),
        headers={"Content-Type": "application/json"},
    )
    assert chunked.status_code == 413
    assert api.h.store.jobs == {}


async def _started(server: uvicorn.Server) -> bool:
    return server.started


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(data), 8192):
        yield data[i : i + 8192]


async def test_lowercase_airflow_payload_and_case_insensitive_enums(
    api: Api, key: ClientKey
) -> None:
    payload = {
        "apiversion": "V1beta1",
        "clientid": key.client_id,
        "spec": {
            "engine": " noop ",
            "publisher": "ipfs",
            "verifier": "NOOP",
            "deal": {"concurrency": 1},
            "annotations": ["airflow"],
        },
    }
    resp = await api.post("/requester/submit", sign_envelope(key, payload))
    assert resp.status_code == 200, resp.text
    job = resp.json()["job"]
    assert (job["Spec"]["Engine"], job["Spec"]["Publisher"]) == ("Noop", "Ipfs")
    await api.wait_done(job["Metadata"]["ID"])


# --- the rest of the lifecycle ------------------------------------------------------------------


async def test_states_events_results_of_a_completed_job(api: Api, key: ClientKey) -> None:
    api.h.nodes["compute-0"].stdout = "x" * 3000
    resp = await api.submit(
        key,
        make_spec(
            Deal={"Concurrency": 2},
            NodeSelectors=[{"Key": "name", "Operator": "in", "Values": ["compute-0", "compute-1"]}],
        ),
    )
    job_id = resp.json()["job"]["Metadata"]["ID"]
    await api.wait_done(job_id)
    for prefix in ("", "/api/v1"):
        body = {"client_id": key.client_id, "job_id": job_id}
        state = await api.post(f"{prefix}/requester/states", body)
        assert state.status_code == 200
        js = state.json()["state"]
        assert js["State"] == "Completed"
        assert isinstance(js["Version"], int)
        assert js["CreateTime"].endswith("Z")
        assert len(js["Executions"]) == 2
        for ex in js["Executions"]:
            assert "VerificationProposal" not in ex
            assert ex["State"] == "Completed"
            assert ex["PublishedResults"]["CID"] == "QmResult"
            assert ex["UpdateTime"].endswith("Z")
        outputs = {ex["NodeId"]: ex["RunOutput"] for ex in js["Executions"]}
        assert outputs["compute-0"]["stdouttruncated"] is True
        assert len(outputs["compute-0"]["stdout"]) == 2048
        assert outputs["compute-1"]["stdouttruncated"] is False
        deserialize(state.text, "StateResponse")

        events = await api.post(f"{prefix}/requester/events", body)
        rows = events.json()["events"]
        assert rows[0]["Comment"] == "Job created"
        assert rows[-1]["Type"] == "JobLevel"
        assert rows[-1]["JobState"] == {"Previous": "InProgress", "New": "Completed"}
        execution_rows = [r for r in rows if r["Type"] == "ExecutionLevel"]
        assert {r["ExecutionState"]["New"] for r in execution_rows} >= {
            "AskForBid",
            "BidAccepted",
            "WaitingVerification",
            "ResultAccepted",
            "Completed",
        }
        times = [r["Time"] for r in rows]
        assert times == sorted(times)
        deserialize(events.text, "EventsResponse")
        only_jobs = await api.post(
            f"{prefix}/requester/events",
            {**body, "filters": {"exclude_execution_level": True}},
        )
        assert {r["Type"] for r in only_jobs.json()["events"]} == {"JobLevel"}

        metrics = (await api.http.get("/metrics")).text
        for stage in ("bidding", "running", "verifying", "publishing"):
            assert f'shoal_requester_job_stage_seconds_count{{stage="{stage}"}}' in metrics

        results = await api.post(f"{prefix}/requester/results", body)
        entries = results.json()["results"]
        assert sorted(e["NodeID"] for e in entries) == ["compute-0", "compute-1"]
        assert all(isinstance(e["Data"], dict) and e["Data"]["CID"] for e in entries)
        deserialize(results.text, "ResultsResponse")


async def test_unknown_jobs_are_404(api: Api, key: ClientKey) -> None:
    for path in ("/requester/states", "/requester/events", "/requester/results"):
        resp = await api.post(path, {"client_id": key.client_id, "job_id": "nope"})
        assert resp.status_code == 404
        assert "not found" in resp.json()["Message"]


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/requester/states", b"{not json", "malformed JSON"),
        ("/requester/states", b"", "body is empty"),
        ("/requester/states", b'"job"', "must be a JSON object"),
        ("/requester/states", {"client_id": "c"}, "job_id: Field required"),
        ("/requester/events", {"job_id": "x", "filters": {"since": "yesterday"}}, "since"),
        ("/requester/list", {"max_jobs": "many"}, "max_jobs"),
        ("/requester/list", {"max_jobs": -1}, "max_jobs must be >= 0"),
        ("/requester/list", {"sort_by": "colour"}, "sort_by must be"),
        ("/requester/list", {"include_tags": "a"}, "include_tags"),
    ],
)
async def test_bad_unsigned_requests(api: Api, path: str, body: Any, message: str) -> None:
    resp = await api.post(path, body)
    assert resp.status_code == 400, resp.text
    assert message in resp.json()["Message"]


async def test_list_semantics(api: Api, key: ClientKey, other_key: ClientKey) -> None:
    mine = []
    for tags in (["a"], ["a", "b"], ["c"]):
        resp = await api.submit(key, make_spec(Annotations=tags))
        mine.append(resp.json()["job"]["Metadata"]["ID"])
    theirs = (await api.submit(other_key)).json()["job"]["Metadata"]["ID"]

    async def listed(**body: Any) -> list[str]:
        resp = await api.post("/requester/list", {"client_id": key.client_id, **body})
        assert resp.status_code == 200, resp.text
        deserialize(resp.text, "ListResponse")
        return [j["Job"]["Metadata"]["ID"] for j in resp.json()["jobs"]]

    sdk_default = {
        "exclude_tags": [],
        "include_tags": [],
        "max_jobs": 5,
        "return_all": False,
        "sort_by": "created_at",
        "sort_reverse": False,
    }
    assert await listed(**sdk_default) == mine
    assert await listed(sort_reverse=True) == mine[::-1]
    assert await listed(max_jobs=2, sort_reverse=True) == mine[:0:-1]
    assert await listed(max_jobs=0) == mine
    assert await listed(include_tags=["a"]) == mine[:2]
    assert await listed(exclude_tags=["b"]) == [mine[0], mine[2]]
    assert set(await listed(return_all=True)) == {*mine, theirs}
    assert await listed(sort_by="id") == sorted(mine)
    assert await listed(id=mine[1]) == [mine[1]]
    assert await listed(id="does-not-exist") == []
    # The 8-character short id finds the job when it is unique.
    unique = [m for m in mine if sum(x.startswith(m[:8]) for x in [*mine, theirs]) == 1]
    for job_id in unique:
        assert await listed(id=job_id[:8]) == [job_id]
    # Time-ordered ids share their beginning; the random end works as a short id too.
    for job_id in mine:
        assert await listed(id=job_id[-8:]) == [job_id]
    first = (await api.post("/requester/list", {"client_id": key.client_id})).json()["jobs"][0]
    assert set(first) == {"Job", "State"}
    assert first["State"]["JobID"] == first["Job"]["Metadata"]["ID"]


async def test_ambiguous_short_id_is_a_clear_error(api: Api) -> None:
    for suffix in ("1", "2"):
        await api.h.store.create_job(
            make_job(job_id=f"abcdef12-0000-7000-8000-00000000000{suffix}")
        )
    resp = await api.post("/requester/states", {"job_id": "abcdef12"})
    assert resp.status_code == 400
    assert "matches several jobs" in resp.json()["Message"]
    resp = await api.post("/requester/states", {"job_id": "abcdef12-0000-7000-8000-000000000002"})
    assert resp.status_code == 200


# --- cancel ------------------------------------------------------------------------------------


CANCELS = _vectors("cancel_job") + _vectors("cancel_other_client")


@pytest.mark.parametrize("vector", CANCELS, ids=_ids(CANCELS))
async def test_recorded_cancels(api: Api, vector: dict[str, Any]) -> None:
    session = [x for x in _recorded() if x["session"] == vector["session"]]
    submitted = next(x for x in session if x["check"] == "submit_long_job")
    owner = json.loads(submitted["request_body_raw"])["payload"]["ClientID"]
    job_id = json.loads(vector["request_body_raw"])["payload"]["JobID"]
    await api.h.store.create_job(
        make_job(job_id=job_id, client_id=owner, spec=make_spec(Engine="Docker"))
    )
    resp = await api.post("/requester/cancel", vector["request_body_raw"].encode())
    if vector["check"].startswith("cancel_other_client"):
        assert resp.status_code == 401
        assert "mismatched ClientIDs" in resp.json()["Message"]
        assert (await api.h.store.get_job(job_id)).state is JS.NEW
    else:
        assert resp.status_code == 200, resp.text
        assert resp.json()["state"]["State"] == "Cancelled"
        deserialize(resp.text, "CancelResponse")
        again = await api.post("/requester/cancel", vector["request_body_raw"].encode())
        assert again.status_code == 409
        assert "already Cancelled" in again.json()["Message"]


async def test_cancel_running_job_and_errors(
    api: Api, key: ClientKey, other_key: ClientKey
) -> None:
    for node in api.h.nodes.values():
        node.run = "hang"
    job_id = (await api.submit(key)).json()["job"]["Metadata"]["ID"]

    async def running() -> bool:
        execs = await api.h.executions(job_id)
        return any(e.state is ExecutionStateType.BID_ACCEPTED for e in execs)

    await wait_for(running)
    body = {"ClientID": other_key.client_id, "JobID": job_id}
    resp = await api.post("/api/v1/requester/cancel", sign_envelope(other_key, body))
    assert resp.status_code == 401
    unknown = {"ClientID": key.client_id, "JobID": "no-such-job"}
    resp = await api.post("/requester/cancel", sign_envelope(key, unknown))
    assert resp.status_code == 404
    resp = await api.post(
        "/requester/cancel", sign_envelope(key, {"ClientID": key.client_id, "JobID": job_id})
    )
    assert resp.status_code == 200
    state = resp.json()["state"]
    assert state["State"] == "Cancelled"
    assert [e["State"] for e in state["Executions"]] == ["Cancelled"]
    await api.h.service.orchestrator.idle()
    assert sum(len(n.cancelled) for n in api.h.nodes.values()) == 1


async def test_approve_endpoint(api: Api, key: ClientKey, other_key: ClientKey) -> None:
    for node in api.h.nodes.values():
        node.bid = "wait"
    job_id = (await api.submit(key)).json()["job"]["Metadata"]["ID"]
    await api.h.wait_state(job_id, JS.QUEUED)
    stranger = {"ClientID": other_key.client_id, "JobID": job_id}
    resp = await api.post("/requester/approve", sign_envelope(other_key, stranger))
    assert resp.status_code == 401
    owner = {"ClientID": key.client_id, "JobID": job_id, "Approve": True}
    resp = await api.post("/api/v1/requester/approve", sign_envelope(key, owner))
    assert resp.status_code == 200, resp.text
    await api.wait_done(job_id)
    assert (await api.h.store.get_job(job_id)).state is JS.COMPLETED
    again = await api.post("/requester/approve", sign_envelope(key, owner))
    assert again.status_code == 404


# --- logs --------------------------------------------------------------------------------------


async def test_logs(api: Api, key: ClientKey, other_key: ClientKey) -> None:
    for node in api.h.nodes.values():
        node.logs = ["line 1\n", "line 2\n"]
    job_id = (await api.submit(key)).json()["job"]["Metadata"]["ID"]
    await api.wait_done(job_id)
    payload = {
        "ClientID": key.client_id,
        "ExecutionID": "",
        "Follow": False,
        "JobID": job_id,
        "WithHistory": True,
    }
    resp = await api.post("/requester/logs", sign_envelope(key, payload))
    assert resp.status_code == 200, resp.text
    assert resp.text == "line 1\nline 2\n"
    followed = await api.post("/requester/logs", sign_envelope(key, {**payload, "Follow": True}))
    assert followed.text == "line 1\nline 2\n"
    stranger = {**payload, "ClientID": other_key.client_id}
    resp = await api.post("/requester/logs", sign_envelope(other_key, stranger))
    assert resp.status_code == 401
    missing = {**payload, "ExecutionID": "nope"}
    resp = await api.post("/requester/logs", sign_envelope(key, missing))
    assert resp.status_code == 404


@pytest.mark.integration
async def test_logs_follow_streams_until_the_execution_ends(served: Api, key: ClientKey) -> None:
    api = served
    for node in api.h.nodes.values():
        node.run = "hang"
        node.logs = ["first\n"]
    job_id = (await api.submit(key)).json()["job"]["Metadata"]["ID"]
    execution = await wait_for(lambda: _running_execution(api, job_id))
    node = api.h.nodes[execution.node_id]
    payload = {"ClientID": key.client_id, "ExecutionID": execution.id, "Follow": True}
    payload["JobID"] = job_id
    received: list[str] = []

    async def read() -> None:
        async with api.http.stream(
            "POST", "/requester/logs", content=sign_envelope(key, payload)
        ) as resp:
            assert resp.status_code == 200
            async for text in resp.aiter_text():
                received.append(text)

    reader = asyncio.create_task(read())
    await wait_for(lambda: _has(received, "first\n"))
    node.logs.append("second\n")
    await wait_for(lambda: _has(received, "second\n"))
    node.run = "succeed"  # the node now reports the execution finished
    await asyncio.wait_for(reader, 5)
    assert "".join(received) == "first\nsecond\n"


async def _running_execution(api: Api, job_id: str) -> Any:
    for e in await api.h.executions(job_id):
        if e.state is ExecutionStateType.BID_ACCEPTED:
            return e
    return None


async def _has(parts: list[str], text: str) -> bool:
    return text in "".join(parts)


# --- node endpoints, health, version, OpenAPI ----------------------------------------------------


async def test_health_and_node_endpoints(api: Api) -> None:
    http = api.http
    assert (await http.get("/healthz")).json()["FreeSpace"]["root"]["All"] > 0
    assert (await http.get("/livez")).text == "OK"
    assert (await http.get("/readyz")).status_code == 200
    metrics = await http.get("/metrics")
    assert "shoal_requester_live_nodes" in metrics.text
    assert (await http.get("/id")).text == "requester"
    for resp in (await http.get("/version"), await http.post("/version", json={"client_id": "c"})):
        info = resp.json()["build_version_info"]
        assert set(info) == {
            "major",
            "minor",
            "gitversion",
            "gitcommit",
            "builddate",
            "goos",
            "goarch",
        }
        deserialize(resp.text, "VersionResponse")
    assert (await http.get("/node_info")).json()["NodeType"] == "Requester"
    peers = (await http.get("/peers")).json()
    assert sorted(p["id"] for p in peers) == ["compute-0", "compute-1", "compute-2"]
    spec = (await http.get("/openapi.json")).json()
    for path in ("/requester/submit", "/api/v1/requester/submit", "/api/v1/jobs/{job_id}"):
        assert path in spec["paths"]
    assert "SignedSubmit" in spec["components"]["schemas"]
    assert "Spec" in spec["components"]["schemas"]


async def test_nodes_inventory(api: Api, key: ClientKey) -> None:
    for node in api.h.nodes.values():
        node.run = "hang"
    await api.submit(
        key, make_spec(NodeSelectors=[{"Key": "name", "Operator": "=", "Values": ["compute-1"]}])
    )
    await wait_for(lambda: _holds(api, "compute-1"))
    nodes = (await api.http.get("/api/v1/nodes")).json()
    assert [n["id"] for n in nodes] == ["compute-0", "compute-1", "compute-2"]
    one = (await api.http.get("/api/v1/nodes/compute-1")).json()
    assert one["state"] == "live"
    assert one["labels"] == {"env": "prod"}
    assert one["running_executions"] == 1
    assert one["capacity"]["available"]["cpu"] == pytest.approx(3.9)
    assert "Noop" in one["engines"]
    assert one["last_heartbeat"].endswith("Z")
    missing = await api.http.get("/api/v1/nodes/nope")
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith("application/problem+json")


async def _holds(api: Api, node_id: str) -> bool:
    return api.h.service.inventory.holds_on(node_id) == 1


async def test_job_details_endpoint(api: Api, key: ClientKey) -> None:
    job_id = (await api.submit(key)).json()["job"]["Metadata"]["ID"]
    await api.wait_done(job_id)
    resp = await api.http.get(f"/api/v1/jobs/{job_id}")
    body = resp.json()
    assert body["Job"]["Metadata"]["ID"] == job_id
    assert body["State"]["State"] == "Completed"
    assert body["History"][0]["Comment"] == "Job created"
    missing = await api.http.get("/api/v1/jobs/nope")
    assert missing.status_code == 404
    assert missing.json()["status"] == 404


# --- event stream (behaviour 40) ---------------------------------------------------------------


async def _sse_events(http: httpx.AsyncClient, url: str, *, until: int) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    async with http.stream("GET", url) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                if len(events) >= until:
                    break
    return events


async def test_event_stream_for_one_job(api: Api, key: ClientKey) -> None:
    for node in api.h.nodes.values():
        node.run_delay = 0.1
    job_id = (await api.submit(key)).json()["job"]["Metadata"]["ID"]
    events = await asyncio.wait_for(
        _sse_events(api.http, f"/api/v1/events/stream?job_id={job_id}", until=10_000), 5
    )
    assert events[0]["Comment"] == "Job created"
    assert events[-1]["JobState"]["New"] == "Completed"
    stored = await api.h.history(job_id)
    assert len(events) == len(stored)
    assert all(e["JobID"] == job_id for e in events)


async def test_event_stream_of_one_level(api: Api, key: ClientKey) -> None:
    job_id = (await api.submit(key)).json()["job"]["Metadata"]["ID"]
    await api.wait_done(job_id)
    stored = await api.h.history(job_id)
    for level, kind in (("job", "JobLevel"), ("execution", "ExecutionLevel")):
        url = f"/api/v1/events/stream?job_id={job_id}&level={level}"
        wanted = [r for r in stored if r.type.value == kind]
        events = await asyncio.wait_for(_sse_events(api.http, url, until=len(wanted)), 5)
        assert [(e["Type"], e["NewVersion"]) for e in events] == [(kind, r.version) for r in wanted]
    bad = await api.http.get("/api/v1/events/stream?level=everything")
    assert 400 <= bad.status_code < 500
    assert bad.headers["content-type"] == "application/problem+json"


@pytest.mark.integration
async def test_event_stream_of_job_level_rows_for_all_jobs(served: Api, key: ClientKey) -> None:
    api = served
    url = "/api/v1/events/stream?level=job"
    reader = asyncio.create_task(_sse_events(api.http, url, until=6))
    await wait_for(lambda: _subscribed(api))
    ids = [(await api.submit(key)).json()["job"]["Metadata"]["ID"] for _ in range(2)]
    events = await asyncio.wait_for(reader, 5)
    assert {e["Type"] for e in events} == {"JobLevel"}
    assert {e["JobID"] for e in events} == set(ids)
    ended = [e["JobID"] for e in events if e["JobState"]["New"] == "Completed"]
    assert sorted(ended) == sorted(ids)


@pytest.mark.integration
async def test_event_stream_for_all_jobs(served: Api, key: ClientKey) -> None:
    api = served
    reader = asyncio.create_task(_sse_events(api.http, "/api/v1/events/stream", until=4))
    await wait_for(lambda: _subscribed(api))
    ids = [(await api.submit(key)).json()["job"]["Metadata"]["ID"] for _ in range(2)]
    events = await asyncio.wait_for(reader, 5)
    assert {e["JobID"] for e in events} <= set(ids)
    assert events[0]["Comment"] == "Job created"


async def _subscribed(api: Api) -> bool:
    return api.h.service.hub.subscribers > 0


# --- content proxy -------------------------------------------------------------------------------


async def test_content_proxy_streams_both_ways(api: Api) -> None:
    seen: list[httpx.Request] = []

    async def publisher(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.method == "GET":
            return httpx.Response(
                200,
                content=b"hello world",
                headers={"X-Shoal-Kind": "file", "Content-Type": "application/octet-stream"},
            )
        body = await request.aread()
        return httpx.Response(200, json={"cid": "QmUp", "size": len(body)})

    service = api.h.service
    service.settings.publisher_url = "http://publisher:5000"
    await service.http_client.aclose()
    service.http_client = httpx.AsyncClient(transport=httpx.MockTransport(publisher))
    got = await api.http.get("/api/v1/content/QmHello")
    assert got.status_code == 200
    assert got.content == b"hello world"
    assert got.headers["X-Shoal-Kind"] == "file"
    assert str(seen[0].url) == "http://publisher:5000/content/QmHello"
    put = await api.http.post(
        "/api/v1/content?kind=file&filename=a.txt",
        content=_chunks(b"z" * 20_000),
        headers={"Content-Type": "application/octet-stream"},
    )
    assert put.json() == {"cid": "QmUp", "size": 20_000}
    assert seen[1].url.params["filename"] == "a.txt"


async def test_content_proxy_without_a_publisher(api: Api) -> None:
    resp = await api.http.get("/api/v1/content/QmHello")
    assert resp.status_code == 503
    assert "SHOAL_REQUESTER_PUBLISHER_URL" in resp.json()["hint"]


async def test_timestamps_are_rfc3339(api: Api) -> None:
    job = make_job(created=utcnow())
    await api.h.store.create_job(job)
    resp = await api.post("/requester/states", {"job_id": job.id})
    created = resp.json()["state"]["CreateTime"]
    assert created.endswith("Z")
    assert "T" in created


async def test_fastapi_own_telemetry_stays_off_even_with_global_providers(
    api: Api, key: ClientKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shoal's spans and metrics are its own (ADR 0007): FastAPI's native OpenTelemetry would
    trace every request a second time as soon as anything set a global provider, and asks the
    providers on every request whether to (ADR 0024)."""
    from fastapi.telemetry import _asgi

    wrapped: list[str] = []

    async def recorded(self: Any, *, app: Any, scope: Any, **kwargs: Any) -> None:
        wrapped.append(scope["path"])
        await app(scope, kwargs["receive"], kwargs["send"])

    monkeypatch.setattr(_asgi, "_unconfigured", lambda provider: False)  # "configured"
    monkeypatch.setattr(_asgi.NativeTelemetry, "__call__", recorded)
    assert (await api.submit(key)).status_code == 200
    assert (await api.http.get("/api/v1/nodes")).status_code == 200
    assert wrapped == []
