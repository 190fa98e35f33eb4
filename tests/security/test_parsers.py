"""Property tests of the parsers every request goes through before anything is stored.

- The job spec models (``Job``/``Spec.model_validate``) on arbitrary JSON raise only
  ``ValidationError`` (a ``ValueError``): anything else would be a 500.
- Submit validation raises only ``InvalidInput`` (a 400), and what it accepts can be stored:
  the normalised spec serialises and reads back as the same spec.
- The signed-envelope parser (``verify_signed_envelope``) raises only ``SignatureError``, on
  any bytes; and no mutation of a genuine request verifies as anything but the bytes the
  client signed, as that client.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import orjson
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from shoal_common.errors import InvalidInput
from shoal_common.signing import (
    ClientKey,
    ClientKeyError,
    SignatureError,
    SignedEnvelopeError,
    client_id_of_public_key,
    raw_members,
    sign_envelope,
    verify_signed_envelope,
)
from shoal_common.spec import Job, Spec, to_wire
from shoal_requester.domain.validation import (
    ApprovePayload,
    JobCancelPayload,
    JobCreatePayload,
    LogsPayload,
    parse_payload,
    validate_submit,
)
from tests.security.strategies import JSON, STRINGS, model_values, submit_payloads

PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

KEY = ClientKey.generate()
PAYLOAD = {"APIVersion": "V1beta1", "ClientID": KEY.client_id, "Spec": {"Engine": "Noop"}}
GENUINE = sign_envelope(KEY, PAYLOAD)
GENUINE_PAYLOAD_TEXT = json.dumps(PAYLOAD)

SPECS = model_values(Spec.model_json_schema(by_alias=True))
JOBS = model_values(Job.model_json_schema(by_alias=True))
SUBMITS = model_values(JobCreatePayload.model_json_schema(by_alias=True)) | submit_payloads(
    Spec.model_json_schema(by_alias=True), STRINGS
)


# --- the job spec --------------------------------------------------------------------------------


@PROPERTY
@given(st.one_of(SPECS, JSON))
@example({"Deal": {"MinBids": 2**64}})  # beyond Go's int: once parsed, then unstorable
def test_spec_parser_raises_only_validation_errors(data: Any) -> None:
    try:
        spec = Spec.model_validate(data)
    except ValueError:  # pydantic's ValidationError is one
        return
    orjson.dumps(to_wire(spec))


@PROPERTY
@given(st.one_of(JOBS, JSON))
def test_job_parser_raises_only_validation_errors(data: Any) -> None:
    try:
        job = Job.model_validate(data)
    except ValueError:
        return
    orjson.dumps(to_wire(job))


@PROPERTY
@given(st.one_of(SUBMITS, st.dictionaries(STRINGS, JSON, max_size=4)))
def test_submit_validation_refuses_with_400_or_gives_a_storable_spec(data: Any) -> None:
    # Its contract is a JSON object (the envelope parser refuses any other payload).
    assume(isinstance(data, dict))
    try:
        parsed, spec, _resources = validate_submit(data, default_timeout=1800.0)
    except InvalidInput:
        return
    assert parsed.client_id
    wire = to_wire(spec)
    stored = orjson.loads(orjson.dumps(wire))
    # What is stored reads back as the same job (a reader sees what was validated).
    assert to_wire(Spec.model_validate(stored)) == wire


@PROPERTY
@given(st.dictionaries(STRINGS, JSON, max_size=6))
def test_other_signed_payloads_refuse_with_400(data: dict[str, Any]) -> None:
    for model in (JobCancelPayload, LogsPayload, ApprovePayload):
        with contextlib.suppress(InvalidInput):
            parse_payload(model, data)


# --- the signed envelope -------------------------------------------------------------------------


@PROPERTY
@given(st.binary(max_size=600))
def test_envelope_parser_on_arbitrary_bytes(body: bytes) -> None:
    try:
        verify_signed_envelope(body)
    except SignatureError:
        return
    raise AssertionError("random bytes verified")


ENVELOPE_KEYS = st.sampled_from(
    ["client_public_key", "payload", "signature", "job_create_payload", "Payload", "SIGNATURE"]
)


@PROPERTY
@given(
    st.dictionaries(ENVELOPE_KEYS, st.one_of(JSON, st.just(KEY.public_key_b64)), max_size=4),
    st.sampled_from([None, (",", ":"), (", ", ": ")]),
)
def test_envelope_parser_on_envelope_shaped_json(
    members: dict[str, Any], separators: tuple[str, str] | None
) -> None:
    body = json.dumps(members, separators=separators).encode()
    try:
        verify_signed_envelope(body)
    except SignatureError:
        return
    raise AssertionError(f"an unsigned envelope verified: {body!r}")


@st.composite
def mutations(draw: st.DrawFn) -> bytes:
    """The genuine request with bytes flipped, inserted, deleted or members shuffled."""
    body = bytearray(GENUINE)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "case", "duplicate"]))
        at = draw(st.integers(0, len(body) - 1))
        if kind == "flip":
            body[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            body[at:at] = draw(st.binary(min_size=1, max_size=4) | st.sampled_from([b" ", b"\n"]))
        elif kind == "delete":
            del body[at : at + draw(st.integers(1, 8))]
        elif kind == "case":
            body[at : at + 1] = bytes(body[at : at + 1]).swapcase()
        else:
            extra = draw(st.sampled_from([b'"payload": {}', b'"signature": ""', b'"x": 1']))
            body[-1:] = b", " + extra + b"}"
    return bytes(body)


@settings(max_examples=200, deadline=None)
@given(mutations())
def test_mutated_requests_verify_only_as_what_was_signed(body: bytes) -> None:
    try:
        envelope = verify_signed_envelope(body)
    except SignatureError:
        return
    # Some mutations keep the meaning (whitespace between members, a different case of a
    # member name, as Go accepted): they must still carry exactly the signed bytes.
    assert envelope.payload_raw == GENUINE_PAYLOAD_TEXT
    assert envelope.client_id == KEY.client_id
    assert envelope.payload == PAYLOAD


@PROPERTY
@given(st.dictionaries(STRINGS, JSON, max_size=5), st.sampled_from([None, 0, 2]))
def test_raw_members_give_back_each_member_exactly(obj: dict[str, Any], indent: int | None) -> None:
    text = json.dumps(obj, indent=indent)
    members = raw_members(text)
    assert list(members) == list(obj)
    assert {k: json.loads(v) for k, v in members.items()} == obj


@PROPERTY
@given(st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_raw_members_raise_only_their_error(text: str) -> None:
    with contextlib.suppress(SignedEnvelopeError):
        raw_members(text)


@PROPERTY
@given(st.text(max_size=400) | st.sampled_from([KEY.public_key_b64[:-4], "MIIBCgKCAQEA" * 30]))
def test_public_key_parser_raises_only_its_error(text: str) -> None:
    with contextlib.suppress(ClientKeyError):
        client_id_of_public_key(text)
