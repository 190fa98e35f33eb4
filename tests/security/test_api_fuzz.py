"""Schema-driven fuzzing of the requester API from its own OpenAPI document.

Every operation of ``/openapi.json`` (new endpoints are picked up by themselves) gets requests
generated from its schema, and two properties must hold for each:

- no 5xx, whatever the input;
- nothing stored from a refused request: the set of jobs is the same before and after, and a
  successful submit adds at most the one job it answers with.

Requests come from the Hypothesis strategies in ``strategies.py`` derived from the document
and, when schemathesis is installed, also from schemathesis (positive and negative generation
from the same document). Signed endpoints are also fed genuinely signed payloads built from
their schema, so fuzzing reaches past the signature check into validation and the store.

Left out: ``GET /api/v1/events/stream`` (an endless stream for all jobs; tested explicitly)
and ``/api/v1/content`` (a proxy to the publisher, whose upload checks are attacked in
test_content_upload.py).
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal_common.bus import MemoryBus
from shoal_common.signing import ClientKey, sign_envelope
from shoal_common.spec import Spec
from shoal_requester.service import RequesterService
from shoal_requester.settings import RequesterSettings
from shoal_requester.store.memory import MemoryRequesterStore
from tests.security.strategies import HOSTILE_STRINGS, SchemaStrategies, submit_payloads
from tests.security.support import Target

EXCLUDED = {("GET", "/api/v1/events/stream")}
EXCLUDED_PREFIXES = ("/api/v1/content",)

# One fuzzing client whose signatures are genuine: what it sends reaches the deeper checks.
KEY = ClientKey.generate()


def _schemathesis() -> Any:
    try:
        return importlib.import_module("schemathesis")
    except ImportError:
        return None


SCHEMATHESIS = _schemathesis()


def _document() -> dict[str, Any]:
    # Only for the document: the routes of an unstarted service are enough to describe them.
    service = RequesterService(RequesterSettings(), bus=MemoryBus(), store=MemoryRequesterStore())
    return service.app.openapi()


DOCUMENT = _document()
COMPONENTS: dict[str, Any] = DOCUMENT.get("components", {}).get("schemas", {})


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    spec: Mapping[str, Any] = field(repr=False, compare=False)

    @property
    def id(self) -> str:
        return f"{self.method} {self.path}"

    @property
    def body_schema(self) -> Mapping[str, Any] | None:
        body = self.spec.get("requestBody", {}).get("content", {}).get("application/json")
        return None if body is None else body.get("schema", {})

    @property
    def signed(self) -> bool:
        schema = self.body_schema or {}
        name = schema.get("$ref", "").rsplit("/", 1)[-1]
        return "signature" in COMPONENTS.get(name, {}).get("properties", {})

    @property
    def submits(self) -> bool:
        return self.path.endswith("/requester/submit")


def operations() -> list[Operation]:
    found = []
    for path, methods in sorted(DOCUMENT["paths"].items()):
        for method, spec in sorted(methods.items()):
            if (method.upper(), path) in EXCLUDED or path.startswith(EXCLUDED_PREFIXES):
                continue
            found.append(Operation(method.upper(), path, spec))
    return found


OPERATIONS = operations()


@dataclass(frozen=True)
class Request:
    method: str
    url: str
    body: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


# --- requests from the project's own strategies -------------------------------------------------


def _path(op: Operation, params: Mapping[str, str]) -> str:
    path = op.path
    for name, value in params.items():
        path = path.replace("{" + name + "}", urllib.parse.quote(value, safe="") or "x")
    return path


def _body_bytes(value: Any) -> bytes:
    return json.dumps(value).encode()


GARBAGE = st.binary(max_size=64) | st.sampled_from([b"", b"{", b"null", b"[]", b'"x"', b"{}"])


def own_requests(op: Operation) -> st.SearchStrategy[Request]:
    strategies = SchemaStrategies(COMPONENTS)
    names = [p["name"] for p in op.spec.get("parameters", ()) if p.get("in") == "path"]
    params = st.fixed_dictionaries(
        {n: st.text(max_size=40) | st.sampled_from(HOSTILE_STRINGS) for n in names}
    )
    schema = op.body_schema
    body: st.SearchStrategy[bytes | None]
    body = st.none() if schema is None else strategies.for_schema(schema).map(_body_bytes) | GARBAGE
    return st.builds(
        lambda p, b: Request(op.method, _path(op, p), b, {"Content-Type": "application/json"}),
        params,
        body,
    )


# --- requests from schemathesis -----------------------------------------------------------------


def _from_case(case: Any) -> Request:
    kwargs = case.as_transport_kwargs(base_url="http://requester")
    headers = {
        k: v for k, v in kwargs.get("headers", {}).items() if k.lower() not in ("connection",)
    }
    url = str(kwargs["url"]).removeprefix("http://requester")
    if kwargs.get("params"):
        url += "?" + urllib.parse.urlencode(kwargs["params"], doseq=True)
    body: bytes | None = None
    if "json" in kwargs:
        body = json.dumps(kwargs["json"]).encode()
    elif isinstance(kwargs.get("data"), bytes | str):
        data = kwargs["data"]
        body = data if isinstance(data, bytes) else data.encode()
    return Request(kwargs["method"], url, body, headers)


def schemathesis_requests(op: Operation) -> st.SearchStrategy[Request]:
    schema = SCHEMATHESIS.openapi.from_dict(DOCUMENT)
    operation = schema[op.path][op.method]
    mode = SCHEMATHESIS.GenerationMode
    cases = st.one_of(
        operation.as_strategy(generation_mode=mode.POSITIVE),
        operation.as_strategy(generation_mode=mode.NEGATIVE),
    )
    return cases.map(_from_case)


# --- genuinely signed payloads --------------------------------------------------------------------


def _signed(op: Operation, payload: Any) -> Request:
    body = sign_envelope(KEY, payload) if isinstance(payload, dict) else b""
    return Request("POST", op.path, body, {"Content-Type": "application/json"})


def signed_requests(op: Operation) -> st.SearchStrategy[Request]:
    """Payloads from the schema of the envelope's ``payload``, signed by KEY."""
    client_ids = st.sampled_from([KEY.client_id] * 6 + ["", "someone-else"])
    if op.submits:
        payloads: st.SearchStrategy[Any] = submit_payloads(
            Spec.model_json_schema(by_alias=True), client_ids
        )
    else:
        name = (op.body_schema or {}).get("$ref", "").rsplit("/", 1)[-1]
        payload_schema = COMPONENTS[name]["properties"]["payload"]
        strategies = SchemaStrategies(COMPONENTS, wrong_type_one_in=20)
        payloads = st.builds(
            lambda p, cid: {**p, "ClientID": cid} if isinstance(p, dict) else p,
            strategies.for_schema(payload_schema),
            client_ids,
        )
    return payloads.filter(_json_safe).map(lambda p: _signed(op, p))


def _json_safe(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (ValueError, TypeError):
        return False
    return True


@functools.cache
def requests_for(op: Operation) -> st.SearchStrategy[Request]:
    unsigned = own_requests(op)
    if SCHEMATHESIS is not None:
        # Both: schemathesis explores the document generically, ours knows the edges (integer
        # bounds of the databases, hostile strings) where bugs were found.
        unsigned = st.one_of(schemathesis_requests(op), unsigned)
    if not op.signed:
        return unsigned
    return st.one_of(unsigned, signed_requests(op))


# --- the property -------------------------------------------------------------------------------


# Examples per operation; SHOAL_FUZZ_EXAMPLES=2000 for a deeper run.
EXAMPLES = int(os.environ.get("SHOAL_FUZZ_EXAMPLES", "100"))

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,  # one requester per operation, on purpose
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
    ],
)


async def _check(target: Target, op: Operation, request: Request) -> None:
    before = await target.job_ids()
    resp = await target.http.request(
        request.method, request.url, content=request.body, headers=dict(request.headers)
    )
    assert resp.status_code < 500, f"{request} -> {resp.status_code} {resp.text[:300]}"
    after = await target.job_ids()
    if op.submits and resp.status_code == 200:
        job_id = resp.json()["job"]["Metadata"]["ID"]
        assert job_id in after
        assert after - before <= {job_id}
    else:
        assert after == before, f"{request} -> {resp.status_code} stored {after - before}"


# Examples go where the risk is: operations that write (signed ones, and submit) get the full
# count; reads get half; the /api/v1 copies of legacy routes run the same handlers as the
# originals and only check that the prefix behaves.
COPIES = [op for op in OPERATIONS if op.path.startswith("/api/v1/requester/")]
WRITES = [op for op in OPERATIONS if op not in COPIES and op.signed]
READS = [op for op in OPERATIONS if op not in COPIES and not op.signed]


@pytest.mark.parametrize("op", WRITES, ids=[op.id for op in WRITES])
@FUZZ
@given(data=st.data())
async def test_no_5xx_and_nothing_stored_from_refusals(
    target: Target, op: Operation, data: st.DataObject
) -> None:
    await _check(target, op, data.draw(requests_for(op), label="request"))


@pytest.mark.parametrize("op", READS, ids=[op.id for op in READS])
@settings(FUZZ, max_examples=max(1, EXAMPLES // 2))
@given(data=st.data())
async def test_reads_no_5xx_and_nothing_stored(
    target: Target, op: Operation, data: st.DataObject
) -> None:
    await _check(target, op, data.draw(requests_for(op), label="request"))


@pytest.mark.parametrize("op", COPIES, ids=[op.id for op in COPIES])
@settings(FUZZ, max_examples=max(1, EXAMPLES // 10))
@given(data=st.data())
async def test_api_v1_copies_too(target: Target, op: Operation, data: st.DataObject) -> None:
    await _check(target, op, data.draw(requests_for(op), label="request"))


def test_every_operation_is_fuzzed_or_knowingly_left_out() -> None:
    """A new endpoint is fuzzed by default; leaving one out is a decision made here."""
    documented = {(m.upper(), p) for p, ms in DOCUMENT["paths"].items() for m in ms}
    fuzzed = {(op.method, op.path) for op in OPERATIONS}
    left_out = documented - fuzzed
    assert left_out == EXCLUDED | {(m, p) for m, p in documented if p.startswith(EXCLUDED_PREFIXES)}
    assert ("POST", "/requester/submit") in fuzzed
