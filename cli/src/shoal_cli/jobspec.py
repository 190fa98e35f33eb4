"""Turning command-line flags into a job Spec (and reading spec files)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from shoal_common.cid import is_valid_cid
from shoal_common.protocol import job_resources
from shoal_common.selectors import parse_selector
from shoal_common.spec import (
    Deal,
    Job,
    LabelSelector,
    NetworkSpec,
    NetworkType,
    PublisherSpec,
    PublisherType,
    ResourcesSpec,
    Spec,
    StorageSourceType,
    StorageSpec,
    VerifierType,
)

DEFAULT_INPUT_PATH = "/inputs"


class SpecError(ValueError):
    """A flag or spec file that cannot become a valid job; the message says which and why."""


def split_target(text: str, default: str | None) -> tuple[str, str | None]:
    """``SOURCE:/target`` -> (SOURCE, /target); the ``:`` of a URL scheme or port is not a split."""
    scheme_end = text.find("://")
    idx = text.rfind(":/")
    if idx > 0 and idx != scheme_end:
        return text[:idx], text[idx + 1 :]
    return text, default


def parse_input(text: str) -> StorageSpec:
    """``-i`` values: ``ipfs://CID[:/path]``, ``CID[:/path]``, ``https://URL[:/path]``,
    ``file:///abs/dir[:/path]`` (an allow-listed local dir), ``inline:TEXT[:/path]``."""
    if text.startswith("inline:"):
        data, inline_target = split_target(text[len("inline:") :], "/inputs/inline")
        return StorageSpec(
            StorageSource=StorageSourceType.INLINE, URL=_data_url(data), path=inline_target
        )
    source, target = split_target(text, None)
    if source.startswith("ipfs://"):
        cid = source[len("ipfs://") :]
        _check_cid(cid, text)
        return StorageSpec(
            StorageSource=StorageSourceType.IPFS, CID=cid, path=target or DEFAULT_INPUT_PATH
        )
    if source.startswith(("http://", "https://")):
        name = source.rstrip("/").rsplit("/", 1)[-1] or "download"
        return StorageSpec(
            StorageSource=StorageSourceType.URL_DOWNLOAD,
            URL=source,
            path=target or f"{DEFAULT_INPUT_PATH}/{name}",
        )
    if source.startswith("file://"):
        local = source[len("file://") :]
        if not local.startswith("/"):
            raise SpecError(f"input {text!r}: a local path must be absolute (file:///data/dir)")
        return StorageSpec(
            StorageSource=StorageSourceType.LOCAL_DIRECTORY,
            SourcePath=local,
            path=target or DEFAULT_INPUT_PATH,
        )
    _check_cid(source, text)
    return StorageSpec(
        StorageSource=StorageSourceType.IPFS, CID=source, path=target or DEFAULT_INPUT_PATH
    )


def _data_url(data: str) -> str:
    import base64

    return "data:application/octet-stream;base64," + base64.b64encode(data.encode()).decode()


def _check_cid(cid: str, text: str) -> None:
    if not is_valid_cid(cid):
        raise SpecError(f"input {text!r}: {cid!r} is not a CID (expected Qm... or b...)")


def parse_output(text: str) -> StorageSpec:
    """``-o name:/path``: a folder the job writes, returned as ``<name>/`` in its results."""
    name, _, path = text.partition(":")
    if not name or not path.startswith("/"):
        raise SpecError(f"output {text!r}: use NAME:/absolute/path, e.g. outputs:/outputs")
    if "/" in name or name in (".", "..") or name in ("stdout", "stderr", "exitCode"):
        raise SpecError(f"output {text!r}: the name must be a plain folder name")
    return StorageSpec(StorageSource=StorageSourceType.IPFS, Name=name, path=path)


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
    """The engine-independent part of a Spec, as keyword arguments for ``Spec``."""
    try:
        selectors: list[LabelSelector] = parse_selector(selector) if selector else []
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
    resources = ResourcesSpec(CPU=cpu, Memory=memory, Disk=disk, GPU=gpu)
    spec_kwargs: dict[str, Any] = {
        "inputs": [parse_input(i) for i in inputs],
        "outputs": outs,
        "Deal": Deal(
            Concurrency=concurrency, Confidence=confidence or None, MinBids=min_bids or None
        ),
        "NodeSelectors": selectors or None,
        "Resources": resources,
        "Timeout": timeout,
        "Network": NetworkSpec(Type=net, Domains=list(domains) or None),
        "Publisher": pub,
        "PublisherSpec": PublisherSpec(Type=pub),
        "Verifier": ver,
        "Annotations": list(labels) or None,
    }
    return spec_kwargs


def check_spec(spec: Spec) -> Spec:
    """Client-side checks that catch mistakes before a round trip (the server checks again)."""
    if spec.engine is None:
        raise SpecError("the spec has no Engine (Docker, Wasm, Noop, ...)")
    if spec.concurrency < 1:
        raise SpecError("concurrency must be at least 1")
    if spec.confidence > spec.concurrency:
        raise SpecError(
            f"confidence {spec.confidence} is above concurrency {spec.concurrency}: "
            "it could never be reached"
        )
    try:
        job_resources(spec)
    except ValueError as exc:
        raise SpecError(str(exc)) from None
    return spec


def load_spec_file(path: Path) -> Spec:
    """A YAML or JSON file holding a Job (``{APIVersion, Spec}``) or a bare Spec."""
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
