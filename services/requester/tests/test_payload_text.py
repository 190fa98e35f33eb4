"""check_payload_text: a quick pass over every submit, the full walk (which names the place)
only when the quick pass finds something. Both must refuse exactly the same payloads."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal_common.errors import InvalidInput
from shoal_requester.domain import validation
from shoal_requester.domain.validation import MAX_PAYLOAD_DEPTH, check_payload_text

# Text with the occasional lone surrogate, as a JSON escape like \ud800 decodes to.
TEXT = st.text(alphabet=st.sampled_from(["a", "Z", " ", "\u00e9", "\ud800", "\udfff"]), max_size=4)
NUMBERS = st.one_of(
    st.integers(min_value=-(2**64), max_value=2**65),
    st.sampled_from([-(2**63), -(2**63) - 1, 2**64 - 1, 2**64]),
    st.floats(allow_nan=False),
    st.booleans(),
    st.none(),
)
JSON = st.recursive(
    st.one_of(TEXT, NUMBERS),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)),
    max_leaves=12,
)


def full_walk_error(payload: Any) -> str | None:
    try:
        validation._refuse_payload_text(payload)
    except InvalidInput as exc:
        return str(exc)
    return None


def quick_error(payload: Any) -> str | None:
    try:
        check_payload_text(payload)
    except InvalidInput as exc:
        return str(exc)
    return None


@given(JSON)
def test_refuses_what_the_full_walk_refuses_with_its_message(value: Any) -> None:
    payload = {"Spec": value}
    assert quick_error(payload) == full_walk_error(payload)


def nested(depth: int) -> dict[str, Any]:
    payload: dict[str, Any] = {}
    inner = payload
    for _ in range(depth - 1):
        inner["x"] = {}
        inner = inner["x"]
    return payload


@pytest.mark.parametrize("depth", [MAX_PAYLOAD_DEPTH, MAX_PAYLOAD_DEPTH + 1])
def test_nesting_at_and_past_the_limit(depth: int) -> None:
    error = quick_error(nested(depth))
    if depth <= MAX_PAYLOAD_DEPTH:
        assert error is None
    else:
        assert error is not None
        assert "nested more than" in error


@pytest.mark.parametrize(
    ("payload", "where"),
    [
        ({"Spec": {"Docker": {"Entrypoint": ["ok", "x\ud800"]}}}, "Spec.Docker.Entrypoint[1]"),
        ({"Spec": {"Annotations\udfff": []}}, "Spec.Annotations\udfff"),
        ({"Spec": {"Deal": {"Concurrency": 2**64}}}, "Spec.Deal.Concurrency"),
    ],
)
def test_the_message_names_the_place(payload: dict[str, Any], where: str) -> None:
    error = quick_error(payload)
    assert error is not None
    assert where in error


def test_types_json_does_not_make_go_to_the_full_walk() -> None:
    """A tuple is not JSON: the quick pass does not judge it, the full walk lets it through as
    it always did."""
    assert not validation._plain_json({"Spec": (1, 2)}, 1)
    assert quick_error({"Spec": (1, 2)}) is None
    assert validation._plain_json({"Spec": [1, 2.5, True, None, "a", {"b": -(2**63)}]}, 1)
