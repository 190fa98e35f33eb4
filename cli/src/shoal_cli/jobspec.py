"""Turning command-line flags into a job Spec (and reading spec files).

Flags become the Spec in wire form (the JSON dict ``to_wire`` would give, same keys, same order,
nulls dropped) without going through the pydantic models: the job verbs never import pydantic,
which is most of the CLI's start-up time. Spec files are parsed with the models (lenient keys).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from shoal_common.cid import is_valid_cid
from shoal_common.wire_enums import (
    NetworkType,
    PublisherType,
    StorageSourceType,
    VerifierType,
    parse_bytes,
    parse_cpu,
    parse_gpu,
)

if TYPE_CHECKING:
    from shoal_common.spec import Spec

DEFAULT_INPUT_PATH = "/inputs"


# Spec's fields in the order ``to_wire`` emits them (the order they are declared in).
SPEC_KEYS = (
    "Engine",
    "Verifier",
    "Publisher",
    "PublisherSpec",
    "Docker",
    "Language",
    "Wasm",
    "Resources",
    "Network",
    "Timeout",
    "inputs",
    "outputs",
    "Annotations",
    "NodeSelectors",
    "DoNotTrack",
    "Deal",
)


class SpecError(ValueError):
    """A flag or spec file that cannot become a valid job; the message says which and why."""


def compact(value: Any) -> Any:
    """``value`` with every None dropped from its dicts, as ``to_wire`` (exclude_none) does."""
    if isinstance(value, dict):
        return {k: compact(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [compact(v) for v in value]
    return value


def wire_spec(**fields: Any) -> dict[str, Any]:
    """A Spec in wire form from its fields by wire name (e.g. ``Engine=``, ``**common_spec()``)."""
    unknown = set(fields) - set(SPEC_KEYS)
    if unknown:
        raise TypeError(f"not Spec fields: {sorted(unknown)}")
    spec: dict[str, Any] = compact({key: fields.get(key) for key in SPEC_KEYS})
    return spec


def storage(
    source: StorageSourceType,
    *,
    name: str | None = None,
    cid: str | None = None,
    url: str | None = None,
    source_path: str | None = None,
    path: str | None = None,
) -> dict[str, Any]:
    """A StorageSpec in wire form (its fields in declaration order)."""
    wire: dict[str, Any] = compact(
        {
            "StorageSource": source.value,
            "Name": name,
            "CID": cid,
            "URL": url,
            "SourcePath": source_path,
            "path": path,
        }
    )
    return wire


def split_target(text: str, default: str | None) -> tuple[str, str | None]:
    """``SOURCE:/target`` -> (SOURCE, /target); the ``:`` of a URL scheme or port is not a split."""
    scheme_end = text.find("://")
    idx = text.rfind(":/")
    if idx > 0 and idx != scheme_end:
        return text[:idx], text[idx + 1 :]
    return text, default


def parse_input(text: str) -> dict[str, Any]:
    """``-i`` values: ``ipfs://CID[:/path]``, ``CID[:/path]``, ``https://URL[:/path]``,
    ``file:///abs/dir[:/path]`` (an allow-listed local dir), ``inline:TEXT[:/path]``."""
    if text.startswith("inline:"):
        data, inline_target = split_target(text[len("inline:") :], "/inputs/inline")
        return storage(StorageSourceType.INLINE, url=_data_url(data), path=inline_target)
    source, target = split_target(text, None)
    if source.startswith("ipfs://"):
        cid = source[len("ipfs://") :]
        _check_cid(cid, text)
        return storage(StorageSourceType.IPFS, cid=cid, path=target or DEFAULT_INPUT_PATH)
    if source.startswith(("http://", "https://")):
        name = source.rstrip("/").rsplit("/", 1)[-1] or "download"
        return storage(
            StorageSourceType.URL_DOWNLOAD,
            url=source,
            path=target or f"{DEFAULT_INPUT_PATH}/{name}",
        )
    if source.startswith("file://"):
        local = source[len("file://") :]
        if not local.startswith("/"):
            raise SpecError(f"input {text!r}: a local path must be absolute (file:///data/dir)")
        return storage(
            StorageSourceType.LOCAL_DIRECTORY, source_path=local, path=target or DEFAULT_INPUT_PATH
        )
    _check_cid(source, text)
    return storage(StorageSourceType.IPFS, cid=source, path=target or DEFAULT_INPUT_PATH)


def _data_url(data: str) -> str:
    import base64

    return "data:application/octet-stream;base64," + base64.b64encode(data.encode()).decode()


def _check_cid(cid: str, text: str) -> None:
    if not is_valid_cid(cid):
        raise SpecError(f"input {text!r}: {cid!r} is not a CID (expected Qm... or b...)")


def parse_output(text: str) -> dict[str, Any]:
    """``-o name:/path``: a folder the job writes, returned as ``<name>/`` in its results."""
    name, _, path = text.partition(":")
    if not name or not path.startswith("/"):
        raise SpecError(f"output {text!r}: use NAME:/absolute/path, e.g. outputs:/outputs")
    if "/" in name or name in (".", "..") or name in ("stdout", "stderr", "exitCode"):
        raise SpecError(f"output {text!r}: the name must be a plain folder name")
    return storage(StorageSourceType.IPFS, name=name, path=path)


def parse_env(items: tuple[str, ...]) -> list[str]:
    for item in items:
        if "=" not in item or item.startswith("="):
            raise SpecError(f"environment variable {item!r}: use KEY=VALUE")
    return list(items)


def common_spec(
    *,
    inputs: tuple[str, ...] = (),
    outputs: tuple[str, ...] = (),
    concurrency: int = 1,
    confidence: int = 0,
    min_bids: int = 0,
    selector: str | None = None,
    cpu: str | None = None,
    memory: str | None = None,
    disk: str | None = None,
    gpu: str | None = None,
    timeout: float | None = None,
    network: str | None = None,
    domains: tuple[str, ...] = (),
    publisher: str | None = None,
    verifier: str | None = None,
    labels: tuple[str, ...] = (),
    default_output: bool = True,
) -> dict[str, Any]:
    """The engine-independent part of a Spec in wire form, as keyword arguments for
    :func:`wire_spec` (or for the ``Spec`` model, which accepts the same)."""
    selectors: list[dict[str, Any]] = []
    if selector:
        from shoal_common.selectors import parse_selector
        from shoal_common.spec import to_wire

        try:
            selectors = [to_wire(s) for s in parse_selector(selector)]
        except ValueError as exc:
            raise SpecError(str(exc)) from None
    outs = [parse_output(o) for o in outputs]
    if not outs and default_output:
        outs = [parse_output("outputs:/outputs")]
    try:
        pub = PublisherType(publisher) if publisher else PublisherType.LOCAL
        ver = VerifierType(verifier) if verifier else VerifierType.NOOP
        net = NetworkType(network) if network else NetworkType.NONE
    except ValueError as exc:
        raise SpecError(str(exc)) from None
    spec_kwargs: dict[str, Any] = {
        "inputs": [parse_input(i) for i in inputs],
        "outputs": outs,
        "Deal": compact(
            {
                "Concurrency": concurrency,
                "Confidence": confidence or None,
                "MinBids": min_bids or None,
            }
        ),
        "NodeSelectors": selectors or None,
        "Resources": compact({"CPU": cpu, "Memory": memory, "Disk": disk, "GPU": gpu}),
        "Timeout": timeout,
        "Network": compact({"Type": net.value, "Domains": list(domains) or None}),
        "Publisher": pub.value,
        "PublisherSpec": {"Type": pub.value},
        "Verifier": ver.value,
        "Annotations": list(labels) or None,
    }
    return spec_kwargs


SpecT = TypeVar("SpecT", "Spec", dict[str, Any])


def check_spec(spec: SpecT) -> SpecT:
    """Client-side checks that catch mistakes before a round trip (the server checks again).

    ``spec``: the model or its wire form; returned as given."""
    if isinstance(spec, dict):
        wire = spec
    else:
        from shoal_common.spec import to_wire

        wire = to_wire(spec)
    if not wire.get("Engine"):
        raise SpecError("the spec has no Engine (Docker, Wasm, Noop, ...)")
    deal = wire.get("Deal") or {}
    # The defaults the system applies (Spec.concurrency / Spec.confidence).
    concurrency = deal.get("Concurrency") or 1
    confidence = deal.get("Confidence") or 0
    if concurrency < 1:
        raise SpecError("concurrency must be at least 1")
    if confidence > concurrency:
        raise SpecError(
            f"confidence {confidence} is above concurrency {concurrency}: it could never be reached"
        )
    # The resource strings must parse (what shoal_common.protocol.job_resources does).
    resources = wire.get("Resources") or {}
    try:
        parse_cpu(resources.get("CPU"))
        parse_bytes(resources.get("Memory"))
        parse_bytes(resources.get("Disk"))
        parse_gpu(resources.get("GPU"))
    except ValueError as exc:
        raise SpecError(str(exc)) from None
    return spec


def load_spec_file(path: Path) -> Spec:
    """A YAML or JSON file holding a Job (``{APIVersion, Spec}``) or a bare Spec."""
    import yaml
    from pydantic import ValidationError

    from shoal_common.spec import Job, Spec

    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise SpecError(f"{path} is not valid {kind}: {exc}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path} must hold a mapping (a Job or a Spec)")
    try:
        if any(k.lower() == "spec" for k in data):
            return check_spec(Job.model_validate(data).spec)
        return check_spec(Spec.model_validate(data))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise SpecError(f"{path}: {problems}") from None
