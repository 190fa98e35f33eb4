"""Submit validation: parse a signed payload leniently, check it as the Go requester did, and
normalise it (defaults made explicit) before it is stored.

Every refusal is an :class:`~shoal_common.errors.InvalidInput` whose message says what is wrong;
parse errors start with the reference system's ``error unmarshalling payload``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath
from typing import Any

from pydantic import Field, ValidationError

from shoal_common.errors import InvalidInput
from shoal_common.protocol import Capacity, job_resources
from shoal_common.spec import (
    Deal,
    Engine,
    NetworkType,
    PublisherSpec,
    SelectionOperator,
    Spec,
    StorageSpec,
    VerifierType,
    WireModel,
)
from shoal_requester.domain.matching import FAVOUR_PREFIX, storage_source

MSG_BAD_PAYLOAD = "error unmarshalling payload"

_DOMAIN = re.compile(
    r"^(\*\.|\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
    r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(:\d{1,5})?$"
)


# Nesting beyond this is refused before anything is stored: the JSON encoder behind the store
# and the API stops at 255 levels, and no real spec comes near it.
MAX_PAYLOAD_DEPTH = 64
# A job whose end cannot be written as a date can never time out; ten years is far past any
# node's own limit and well inside what a datetime holds.
MAX_TIMEOUT_SECONDS = 10 * 365 * 24 * 3600.0
# Annotations are stored as tags in a VARCHAR(256) column (store/tables.py).
MAX_ANNOTATION_LENGTH = 256
MAX_REASON_LENGTH = 1024
# Folders the results already use for the run's own output (the compute node refuses them too).
RESERVED_OUTPUT_NAMES = frozenset({"stdout", "stderr", "exitCode"})
_SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


class JobCreatePayload(WireModel):
    """The signed payload of a submit (keys matched case-insensitively, like Go)."""

    api_version: str | None = Field(None, alias="APIVersion")
    client_id: str | None = Field(None, alias="ClientID")
    spec: Spec | None = Field(None, alias="Spec")


class JobCancelPayload(WireModel):
    client_id: str | None = Field(None, alias="ClientID")
    job_id: str | None = Field(None, alias="JobID")
    reason: str | None = Field(None, alias="Reason")


class ApprovePayload(WireModel):
    client_id: str | None = Field(None, alias="ClientID")
    job_id: str | None = Field(None, alias="JobID")
    execution_id: str | None = Field(None, alias="ExecutionID")
    approve: bool | None = Field(None, alias="Approve")
    reason: str | None = Field(None, alias="Reason")


class LogsPayload(WireModel):
    client_id: str | None = Field(None, alias="ClientID")
    job_id: str | None = Field(None, alias="JobID")
    execution_id: str | None = Field(None, alias="ExecutionID")
    with_history: bool | None = Field(None, alias="WithHistory")
    follow: bool | None = Field(None, alias="Follow")


def describe_validation_error(exc: ValidationError, *, limit: int = 5) -> str:
    """``Spec.Deal.Concurrency: Input should be a valid integer (got 'x')`` style text."""
    parts = []
    for err in exc.errors()[:limit]:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        text = err.get("msg", "invalid")
        if "input" in err and err.get("type") not in ("missing",):
            shown = repr(err["input"])
            text += f" (got {shown if len(shown) <= 80 else shown[:77] + '...'})"
        parts.append(f"{loc}: {text}" if loc else text)
    more = len(exc.errors()) - limit
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


# Members that only another signed request carries: a payload signed for one action must not be
# accepted by another (a captured logs request replayed to /cancel would otherwise cancel).
_FOREIGN_MEMBERS: dict[str, frozenset[str]] = {
    "JobCancelPayload": frozenset({"executionid", "withhistory", "follow", "approve", "spec"}),
    "LogsPayload": frozenset({"reason", "approve", "spec"}),
    "ApprovePayload": frozenset({"withhistory", "follow", "spec"}),
}
_ACTIONS = {"JobCancelPayload": "cancel", "LogsPayload": "logs", "ApprovePayload": "approve"}


def parse_payload(model: type[WireModel], payload: Mapping[str, Any]) -> Any:
    foreign = _FOREIGN_MEMBERS.get(model.__name__, frozenset())
    for key in payload:
        if isinstance(key, str) and key.replace("_", "").lower() in foreign:
            raise InvalidInput(
                f"{MSG_BAD_PAYLOAD}: member {key!r} does not belong in a "
                f"{_ACTIONS[model.__name__]} request: this signature was made for another "
                "action; sign a payload made for this one"
            )
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise InvalidInput(f"{MSG_BAD_PAYLOAD}: {describe_validation_error(exc)}") from exc


def validate_submit(
    payload: Mapping[str, Any], *, default_timeout: float
) -> tuple[JobCreatePayload, Spec, Capacity]:
    """Parse and check a submit payload; returns it with its normalised spec and resources."""
    check_payload_text(payload)
    parsed: JobCreatePayload = parse_payload(JobCreatePayload, payload)
    if not parsed.api_version:
        raise InvalidInput("APIVersion is empty: send APIVersion (e.g. V1beta1)")
    if not parsed.client_id:
        raise InvalidInput("ClientID is empty")
    if parsed.spec is None or not parsed.spec.model_fields_set:
        raise InvalidInput("the job spec is empty: send Spec with at least Engine and Deal")
    spec = normalise(parsed.spec, default_timeout=default_timeout)
    check_spec(spec)
    try:
        resources = job_resources(spec)
    except ValueError as exc:
        raise InvalidInput(f"Spec.Resources: {exc}") from exc
    _check_resources(resources)
    return parsed, spec, resources


def check_payload_text(payload: Mapping[str, Any]) -> None:
    """Refuse what the store and the API could not write back: nesting deeper than
    :data:`MAX_PAYLOAD_DEPTH` and strings with lone UTF-16 surrogates (JSON escapes such as
    ``\\ud800`` decode to code points no UTF-8 encoder accepts)."""
    if not _plain_json(payload, 1):
        _refuse_payload_text(payload)


# The JSON encoder in front of the store and API writes 64-bit integers only.
_INT_RANGE = range(-(2**63), 2**64)


def _plain_json(value: Any, depth: int) -> bool:
    """True when nothing in ``value`` can be refused: the check of every submit, without the
    paths that only an error message needs. False sends the payload to the full walk, which
    finds the problem (or, for types this does not know, finds none)."""
    if depth > MAX_PAYLOAD_DEPTH:
        return False
    kind = type(value)
    if kind is str:
        return _SURROGATE.search(value) is None
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str or _SURROGATE.search(key) or not _plain_json(item, depth + 1):
                return False
        return True
    if kind is list:
        return all(_plain_json(item, depth + 1) for item in value)
    if kind is int:
        return value in _INT_RANGE
    return value is None or kind is bool or kind is float


def _refuse_payload_text(payload: Mapping[str, Any]) -> None:
    """The full walk: raises InvalidInput naming where the problem is."""
    stack: list[tuple[Any, str, int]] = [(payload, "", 1)]
    while stack:
        value, where, depth = stack.pop()
        if depth > MAX_PAYLOAD_DEPTH:
            raise InvalidInput(
                f"{MSG_BAD_PAYLOAD}: {where or 'the payload'} is nested more than "
                f"{MAX_PAYLOAD_DEPTH} levels deep: flatten it"
            )
        if isinstance(value, Mapping):
            for key, item in value.items():
                path = f"{where}.{key}" if where else str(key)
                if isinstance(key, str) and _SURROGATE.search(key):
                    raise InvalidInput(f"{MSG_BAD_PAYLOAD}: {_surrogate_message(path)}")
                stack.append((item, path, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value))
        elif isinstance(value, str) and _SURROGATE.search(value):
            raise InvalidInput(f"{MSG_BAD_PAYLOAD}: {_surrogate_message(where)}")
        elif isinstance(value, int) and value not in _INT_RANGE:
            raise InvalidInput(
                f"{MSG_BAD_PAYLOAD}: {where or 'the payload'} holds an integer beyond 64 bits"
            )


def _surrogate_message(where: str) -> str:
    return (
        f"{where or 'the payload'} contains a lone UTF-16 surrogate (an escape from "
        "\\ud800 to \\udfff that is not part of a pair): send valid Unicode text"
    )


def storable_text(text: str) -> bool:
    """Whether every store can hold ``text`` (Postgres text refuses NUL; UTF-8 refuses lone
    surrogates)."""
    return "\0" not in text and not _SURROGATE.search(text)


def check_reason(reason: str | None) -> str | None:
    """A cancel or approve reason lands in the job's status and history."""
    if reason is None:
        return None
    if not storable_text(reason):
        raise InvalidInput("Reason contains a NUL character or a lone surrogate: send plain text")
    if len(reason) > MAX_REASON_LENGTH:
        raise InvalidInput(
            f"Reason is {len(reason)} characters long: keep it to {MAX_REASON_LENGTH}"
        )
    return reason


def check_job_id(job_id: str) -> bool:
    """Whether ``job_id`` could name a stored job at all (ids are plain text, no NUL)."""
    return storable_text(job_id)


def _check_resources(resources: Capacity) -> None:
    for name, value in (
        ("CPU", resources.cpu),
        ("Memory", resources.memory),
        ("Disk", resources.disk),
        ("GPU", resources.gpu),
    ):
        if not math.isfinite(value) or value < 0:
            raise InvalidInput(
                f"Spec.Resources.{name} must be a finite amount >= 0 (got {value!r}): "
                "send e.g. CPU 500m or 0.5, Memory 1GB"
            )


def normalise(spec: Spec, *, default_timeout: float) -> Spec:
    """Make the defaults the system applies explicit, so every reader sees the same job."""
    updates: dict[str, Any] = {}
    # Recommended leniency (reference notes): PublisherSpec.Type falls back to the legacy
    # Publisher field, and the two are kept in sync; a missing verifier means Noop.
    publisher = spec.effective_publisher
    params = spec.publisher_spec.params if spec.publisher_spec else None
    updates["publisher"] = publisher
    updates["publisher_spec"] = PublisherSpec(Type=publisher, Params=params)
    updates["verifier"] = spec.verifier or VerifierType.NOOP
    if spec.timeout is not None and not (
        math.isfinite(spec.timeout) and spec.timeout <= MAX_TIMEOUT_SECONDS
    ):
        raise InvalidInput(
            f"Spec.Timeout of {spec.timeout:g} seconds is too long: send at most "
            f"{MAX_TIMEOUT_SECONDS:.0f} seconds (ten years), or 0 for the default"
        )
    # A timeout at or below zero (or none) becomes the default, as Go did.
    if spec.timeout is None or spec.timeout <= 0:
        if spec.timeout is not None and spec.timeout < 0:
            raise InvalidInput(f"Spec.Timeout must be >= 0 seconds (got {spec.timeout:g})")
        updates["timeout"] = default_timeout
    deal = spec.deal or Deal()
    if deal.concurrency is None:
        deal = deal.model_copy(update={"concurrency": 1})
    updates["deal"] = deal
    return spec.model_copy(update=updates)


def check_spec(spec: Spec) -> None:
    """The reference system's VerifyJobCreatePayload checks, with Shoal's own messages."""
    deal = spec.deal or Deal()
    concurrency = deal.concurrency if deal.concurrency is not None else 1
    if concurrency < 1:
        raise InvalidInput("concurrency must be >= 1")
    if deal.confidence is not None and deal.confidence < 0:
        raise InvalidInput("confidence must be >= 0")
    if (deal.confidence or 0) > concurrency:
        raise InvalidInput(
            f"confidence must be <= concurrency (confidence {deal.confidence}, "
            f"concurrency {concurrency})"
        )
    if deal.min_bids is not None and deal.min_bids < 0:
        raise InvalidInput(f"min bids must be >= 0 (got {deal.min_bids})")
    if spec.engine is None:
        raise InvalidInput(f"Spec.Engine is required: one of {', '.join(Engine.names())}")
    if spec.engine is Engine.DOCKER and not (spec.docker and spec.docker.image.strip()):
        raise InvalidInput("Spec.Docker.Image is required for the Docker engine")
    if spec.engine is Engine.WASM and not (
        spec.wasm
        and spec.wasm.entry_module
        and (spec.wasm.entry_module.cid or spec.wasm.entry_module.storage_source)
    ):
        raise InvalidInput("Spec.Wasm.EntryModule is required for the Wasm engine")
    if spec.network is not None:
        _check_network(spec)
    for i, storage in enumerate(spec.inputs or []):
        if storage_source(storage) is None:
            raise InvalidInput(f"inputs[{i}]: StorageSource is required")
        _check_mount_path(storage, f"inputs[{i}]")
    for i, storage in enumerate(spec.outputs or []):
        _check_output_name(storage.name, f"outputs[{i}]")
        _check_mount_path(storage, f"outputs[{i}]")
    _check_annotations(spec.annotations or [])
    _check_selectors(spec)


def _check_mount_path(storage: StorageSpec, where: str) -> None:
    """Where a volume is mounted in the sandbox: absolute, no '..', not the root."""
    target = storage.path
    if target is None:
        return  # the node picks its default (/inputs, /outputs)
    if "\0" in target:
        raise InvalidInput(f"{where}: mount path {target!r} contains a NUL character")
    if not target.startswith("/"):
        raise InvalidInput(
            f"{where}: mount path {target!r} must be absolute: use e.g. /inputs/data"
        )
    parts = PurePosixPath(target).parts
    if ".." in parts:
        raise InvalidInput(
            f"{where}: mount path {target!r} must not contain '..': it must stay in the sandbox"
        )
    if str(PurePosixPath(*parts)) == "/":
        raise InvalidInput(
            f"{where}: mount path {target!r} would cover the sandbox root: use e.g. /outputs"
        )


def _check_output_name(name: str | None, where: str) -> None:
    """An output volume's name becomes one folder of the results."""
    if not name:
        raise InvalidInput(f"{where}: Name is required (e.g. outputs)")
    if name in (".", "..") or not _SAFE_NAME.match(name):
        raise InvalidInput(
            f"{where}: output volume name {name!r} is not allowed: use letters, digits, "
            "'.', '_' or "
            "'-' (no '/', no '..': it must stay inside the results folder)"
        )
    if name in RESERVED_OUTPUT_NAMES:
        raise InvalidInput(
            f"{where}: output volume name {name!r} is reserved for the run's own output: "
            "pick another"
        )


def _check_annotations(annotations: Sequence[str]) -> None:
    for i, text in enumerate(annotations):
        if "\0" in text:
            raise InvalidInput(f"Annotations[{i}] contains a NUL character: send plain text")
        if len(text) > MAX_ANNOTATION_LENGTH:
            raise InvalidInput(
                f"Annotations[{i}] is {len(text)} characters long: keep each annotation to "
                f"{MAX_ANNOTATION_LENGTH}"
            )


def _check_network(spec: Spec) -> None:
    assert spec.network is not None
    domains = spec.network.domains or []
    if domains and spec.network.type is not NetworkType.HTTP:
        raise InvalidInput("Spec.Network.Domains can only be used with Network.Type HTTP")
    for domain in domains:
        if not _DOMAIN.match(domain.strip()):
            raise InvalidInput(f"Spec.Network.Domains: {domain!r} is not a valid domain name")


def _check_selectors(spec: Spec) -> None:
    for i, s in enumerate(spec.node_selectors or []):
        where = f"NodeSelectors[{i}] ({s.key})"
        key = s.key[len(FAVOUR_PREFIX) :] if s.key.startswith(FAVOUR_PREFIX) else s.key
        if not key.strip():
            raise InvalidInput(f"{where}: Key is empty")
        values: Sequence[str] = s.values or []
        op = s.operator
        if op in (SelectionOperator.IN, SelectionOperator.NOT_IN) and not values:
            raise InvalidInput(f"{where}: operator {op.value} needs at least one value")
        if op in (SelectionOperator.EXISTS, SelectionOperator.DOES_NOT_EXIST) and values:
            raise InvalidInput(f"{where}: operator {op.value} takes no values")
        if (
            op
            in (
                SelectionOperator.EQUALS,
                SelectionOperator.DOUBLE_EQUALS,
                SelectionOperator.NOT_EQUALS,
                SelectionOperator.GT,
                SelectionOperator.LT,
            )
            and len(values) != 1
        ):
            raise InvalidInput(f"{where}: operator {op.value} needs exactly one value")
        if op in (SelectionOperator.GT, SelectionOperator.LT):
            try:
                int(values[0])
            except ValueError:
                raise InvalidInput(
                    f"{where}: operator {op.value} needs an integer value (got {values[0]!r})"
                ) from None
