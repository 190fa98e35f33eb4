"""Hypothesis strategies for the security suite, derived from the API's own schemas.

:func:`from_schema` turns the JSON Schema of a request body (the requester's OpenAPI document,
or a pydantic model's ``model_json_schema()``) into values that mostly conform to it, with
what real clients and attackers do mixed in: keys in other cases (the legacy API matches keys
case-insensitively), enum names in odd spellings, hostile strings, and now and then a value of
the wrong type anywhere in the tree. Conforming values get past the first checks and reach the
deeper code; the rest probes the checks themselves.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hypothesis import strategies as st

# Strings that mean something to paths, parsers, shells, databases or terminals.
HOSTILE_STRINGS = [
    "",
    " ",
    "..",
    "../../etc/passwd",
    "/",
    "/etc/passwd",
    "a/../../b",
    "\u0000",
    "x\u0000y",
    "\u202e",
    "\u001b[2J",
    "%00",
    "%2e%2e%2f",
    "*",
    "'; DROP TABLE jobs; --",
    "${HOME}",
    "$(id)",
    "data:,x",
    "-1",
    "1e309",
    "NaN",
    "x" * 300,
    "\U0001f600",
]

JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.sampled_from(HOSTILE_STRINGS)
)

# Any JSON value (what json.loads can return).
JSON: st.SearchStrategy[Any] = st.recursive(
    JSON_LEAVES,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)

STRINGS = st.text(max_size=30) | st.sampled_from(HOSTILE_STRINGS)


def _enum_spellings(value: Any) -> st.SearchStrategy[Any]:
    if not isinstance(value, str):
        return st.just(value)
    return st.sampled_from([value, value.lower(), value.upper(), f" {value} "])


def _key_spellings(key: str) -> st.SearchStrategy[str]:
    return st.sampled_from([key, key, key, key.lower(), key.upper()])


class SchemaStrategies:
    """Strategies for the schemas of one document (``$ref``s resolved against ``definitions``)."""

    def __init__(self, definitions: Mapping[str, Any], *, wrong_type_one_in: int = 12) -> None:
        self._definitions = definitions
        self._wrong = wrong_type_one_in
        self._refs: dict[str, st.SearchStrategy[Any]] = {}

    def for_schema(self, schema: Mapping[str, Any], depth: int = 0) -> st.SearchStrategy[Any]:
        conforming = self._conforming(schema, depth)
        if self._wrong <= 0:
            return conforming
        # Mostly conforming; now and then anything at all in this place.
        # (The odd one out is the largest draw: Hypothesis favours small ones.)
        last = self._wrong - 1
        return st.integers(0, last).flatmap(lambda i: JSON if i == last else conforming)

    def _ref(self, ref: str, depth: int) -> st.SearchStrategy[Any]:
        name = ref.rsplit("/", 1)[-1]
        if name not in self._refs:
            # Deferred: a schema may (indirectly) refer to itself.
            self._refs[name] = st.deferred(
                lambda: self._conforming(self._definitions[name], depth + 1)
            )
        return self._refs[name]

    def _conforming(self, schema: Mapping[str, Any], depth: int) -> st.SearchStrategy[Any]:
        if depth > 8:
            return JSON_LEAVES
        if "$ref" in schema:
            return self._ref(schema["$ref"], depth)
        for combinator in ("anyOf", "oneOf"):
            if combinator in schema:
                return st.one_of([self.for_schema(s, depth + 1) for s in schema[combinator]])
        if "allOf" in schema and len(schema["allOf"]) == 1:
            return self._conforming(schema["allOf"][0], depth)
        if "enum" in schema:
            return st.sampled_from(list(schema["enum"])).flatmap(_enum_spellings)
        if "const" in schema:
            return st.just(schema["const"])
        kind = schema.get("type")
        if isinstance(kind, list):
            return st.one_of([self._conforming({**schema, "type": k}, depth) for k in kind])
        if kind == "string":
            return STRINGS
        if kind == "integer":
            # Boundaries of the integer types of SQLite, Postgres and C.
            edges = [0, 1, -1, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1]
            return st.integers(-(2**40), 2**40) | st.sampled_from(edges)
        if kind == "number":
            return st.integers(-(2**40), 2**40) | st.floats(allow_nan=False, allow_infinity=False)
        if kind == "boolean":
            return st.booleans()
        if kind == "null":
            return st.none()
        if kind == "array":
            items = schema.get("items", {})
            return st.lists(self.for_schema(items, depth + 1), max_size=3)
        if kind == "object" or "properties" in schema:
            return self._object(schema, depth)
        return JSON  # no constraint: any JSON

    def _object(self, schema: Mapping[str, Any], depth: int) -> st.SearchStrategy[Any]:
        properties: Mapping[str, Any] = schema.get("properties", {})
        required = set(schema.get("required", ()))
        extra = schema.get("additionalProperties", False)
        fields = {name: self.for_schema(sub, depth + 1) for name, sub in sorted(properties.items())}

        @st.composite
        def build(draw: st.DrawFn) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for name, values in fields.items():
                if name in required or draw(st.booleans()):
                    out[draw(_key_spellings(name))] = draw(values)
            if extra is True:
                out.update(draw(st.dictionaries(STRINGS, JSON, max_size=3)))
            elif isinstance(extra, Mapping):
                out.update(
                    draw(st.dictionaries(STRINGS, self.for_schema(extra, depth + 1), max_size=3))
                )
            return out

        return build()


def model_values(schema: Mapping[str, Any], **kwargs: Any) -> st.SearchStrategy[Any]:
    """Values for a pydantic ``model_json_schema()`` (its own ``$defs``)."""
    return SchemaStrategies(schema.get("$defs", {}), **kwargs).for_schema(schema)


def _merge(spec: Any, core: dict[str, Any], use_core: bool) -> Any:
    if not use_core or not isinstance(spec, dict):
        return spec
    return {**{k: v for k, v in spec.items() if k.lower() not in {"engine", "deal"}}, **core}


def submit_payloads(
    spec_schema: Mapping[str, Any], client_ids: st.SearchStrategy[str]
) -> st.SearchStrategy[dict[str, Any]]:
    """JobCreatePayloads that often get through validation (and so reach the store).

    Pure schema fuzzing almost never produces an acceptable job (a random engine needs its own
    section, a random deal asks for more nodes than exist), so most specs here get a runnable
    core (Noop engine, concurrency 1) and keep everything else the schema allows.
    """
    specs = SchemaStrategies(spec_schema.get("$defs", {}), wrong_type_one_in=60).for_schema(
        spec_schema
    )
    core = st.fixed_dictionaries(
        {
            "Engine": st.sampled_from(["Noop", "noop", " NOOP "]),
            "Deal": st.fixed_dictionaries({"Concurrency": st.sampled_from([1, 1, 2, 0, -1])}),
        }
    )
    spec = st.builds(_merge, specs, core, st.integers(0, 7).map(lambda i: i < 7))
    return st.fixed_dictionaries(
        {
            "APIVersion": st.sampled_from(["V1beta1", "V1beta1", "v1beta2", ""]),
            "ClientID": client_ids,
            "Spec": spec,
        }
    )
