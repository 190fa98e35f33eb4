"""Wire models match keys case-insensitively; payloads already spelled as aliases skip the
renaming (a fast path), and must come out exactly as the renaming would have made them."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from shoal_common import spec
from shoal_common.spec import Deal, DockerSpec, Job, Spec, WireModel

MODELS: list[type[WireModel]] = [Spec, Deal, DockerSpec, Job]


def renamed(model: type[BaseModel], data: dict[Any, Any]) -> dict[Any, Any]:
    """The renaming on its own, as the slow path does it: folded key -> the field's alias."""
    lookup: dict[str, str] = {}
    for name, field in model.model_fields.items():
        alias = field.alias or name
        lookup[name.replace("_", "").lower()] = alias
        lookup[alias.replace("_", "").lower()] = alias
    return {
        lookup.get(k.replace("_", "").lower(), k) if isinstance(k, str) else k: v
        for k, v in data.items()
    }


def spellings(model: type[BaseModel]) -> st.SearchStrategy[str]:
    """Every way a client might spell one of the model's keys, and keys it does not have."""
    names: list[str] = []
    for name, field in model.model_fields.items():
        alias = field.alias or name
        names += [alias, alias.lower(), alias.upper(), name, name.upper()]
    return st.one_of(st.sampled_from(names), st.text(max_size=8))


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
@given(data=st.data())
def test_keys_come_out_as_the_renaming_makes_them(model: type[WireModel], data: Any) -> None:
    payload = data.draw(st.dictionaries(spellings(model), st.integers(), max_size=8))
    assert model._case_insensitive_keys(payload) == renamed(model, payload)


def test_a_payload_spelled_as_aliases_is_passed_on_as_it_is() -> None:
    payload = {"Engine": "Noop", "Deal": {"Concurrency": 1}}
    assert Spec._case_insensitive_keys(payload) is payload


def test_one_key_in_another_spelling_renames_the_payload() -> None:
    payload = {"Engine": "Noop", "deal": {"concurrency": 2}}
    out = Spec._case_insensitive_keys(payload)
    assert out == {"Engine": "Noop", "Deal": {"concurrency": 2}}
    assert Spec.model_validate(payload).deal.concurrency == 2  # nested models rename theirs


def test_non_string_keys_are_left_alone() -> None:
    assert Deal._case_insensitive_keys({1: "x", "concurrency": 3}) == {1: "x", "Concurrency": 3}


def test_every_alias_renames_to_itself() -> None:
    for model in MODELS:
        aliases, _lookup = spec._key_lookup(model)
        assert aliases == {f.alias or n for n, f in model.model_fields.items()}
        assert renamed(model, dict.fromkeys(aliases, 0)) == dict.fromkeys(aliases, 0)
