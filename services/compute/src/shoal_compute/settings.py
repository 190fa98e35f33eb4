"""Compute node settings (env prefix ``SHOAL_COMPUTE_``).

Everything a compute node can be told: who it is, what it has, what it accepts, how it fetches
inputs, and the misbehaviour knobs tests use to make a node fail in controlled ways.
"""

from __future__ import annotations

import os
import platform
import shutil
import uuid
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from shoal_common.protocol import Capacity
from shoal_common.settings import ServiceSettings
from shoal_common.spec import (
    Engine,
    PublisherType,
    StorageSourceType,
    VerifierType,
    parse_bytes,
    parse_cpu,
)
from shoal_common.subjects import check_token

_GO_ARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "arm",
    "armv6l": "arm",
    "i386": "386",
    "i686": "386",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}


def go_arch(machine: str | None = None) -> str:
    """The Go/OCI architecture name (amd64, arm64, ...) of ``platform.machine()``."""
    raw = (machine or platform.machine()).lower()
    return _GO_ARCH.get(raw, raw)


def parse_labels(value: Any) -> dict[str, str]:
    """``"k=v,k2=v2"`` (flags, env) or a mapping, into a label dict."""
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        value = ",".join(str(v) for v in value)
    labels: dict[str, str] = {}
    for part in str(value).split(","):
        if not part.strip():
            continue
        key, sep, val = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"invalid label {part!r}: use key=value")
        labels[key.strip()] = val.strip()
    return labels


def _parse_list(value: Any) -> list[Any]:
    """Comma-separated env/flag values, or a real list."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value)


CsvList = Annotated[list[str], NoDecode]


class ApprovalPolicy(StrEnum):
    AUTO = "auto"  # bid as soon as the strategies say yes
    WAIT = "wait"  # hold the execution until an APPROVE call decides


class Locality(StrEnum):
    ANYWHERE = "anywhere"  # fetch CID inputs from wherever they are
    LOCAL = "local"  # bid only when every CID input is already in the local cache


def _machine_memory() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 4 * 1024**3


class ComputeSettings(ServiceSettings):
    """Settings of one compute node. Unset resource totals default to what the machine has."""

    model_config = SettingsConfigDict(env_prefix="SHOAL_COMPUTE_", extra="ignore")

    labels: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    arch: str = Field(default_factory=go_arch)

    # --- resources (None = the machine's) ---
    cpu: float | None = None
    memory: int | None = None
    disk: int | None = None
    gpu_ids: CsvList = Field(default_factory=list)
    gpus: int | None = None  # a count; ids "0".."n-1" unless gpu_ids names them
    max_job_cpu: float | None = None
    max_job_memory: int | None = None
    max_job_disk: int | None = None
    max_job_gpu: int | None = None
    # Bids are accepted while committed work fits in total x (1 + this); the surplus waits
    # in the node's queue (behaviour 25). 0 = only bid on what can start at once.
    queue_factor: float = 1.0

    # --- timeouts (seconds) ---
    timeout_min: float = 0.0
    timeout_max: float = 24 * 3600.0
    default_timeout: float = 1800.0
    timeout_bypass_clients: CsvList = Field(default_factory=list)

    # --- capabilities ---
    allow_networking: bool = False
    engines: Annotated[list[Engine] | None, NoDecode] = None  # None = every available one
    noop_all_engines: bool = False  # devstack --noop: every engine runs on the noop executor
    storage_sources: Annotated[list[StorageSourceType] | None, NoDecode] = None
    publishers: Annotated[list[PublisherType], NoDecode] = Field(
        default_factory=lambda: [
            PublisherType.NOOP,
            PublisherType.LOCAL,
            PublisherType.IPFS,
        ]
    )
    verifiers: Annotated[list[VerifierType], NoDecode] = Field(
        default_factory=lambda: [VerifierType.NOOP, VerifierType.DETERMINISTIC]
    )

    # --- policy ---
    approval: ApprovalPolicy = ApprovalPolicy.AUTO
    locality: Locality = Locality.ANYWHERE
    reject_stateless: bool = False  # refuse jobs without inputs (behaviour 30)
    bid_reservation_timeout_s: float = 30.0

    # --- HTTP content endpoint (results served to the publisher) ---
    # With ``port`` set, the host process (shoal serve, devstack) serves ``service.app`` there.
    # With port 0 the node serves it itself on a free port: a node always has its endpoint.
    # It keeps that port in the state dir and binds it again after a restart (the results it
    # proposed carry URLs with it: http_port_path).
    serve_http: bool | None = None  # None = auto (own server iff port == 0)
    public_url: str | None = None  # advertised base URL; default http://host:port

    # --- inputs ---
    local_dirs_allowed: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    max_inline_bytes: int = 1024**2
    url_max_bytes: int = 1024**3
    url_retries: int = 3
    url_backoff_s: float = 0.2
    url_timeout_s: float = 60.0
    url_parallel: int = 8
    kubo_rpc_url: str | None = None
    python_wasm_artifacts_dir: Path | None = None  # None: where fetch-python-wasm.py puts it
    # The image non-deterministic Python jobs run in when they name none (built locally by
    # scripts/build-python-image.sh; = executors.python_wasm.DEFAULT_PYTHON_IMAGE).
    python_image: str = "shoal/python:3.11"
    content_store_url: str | None = None  # the publisher's content store, to fetch CIDs from

    # --- results ---
    max_run_output_bytes: int = 8192  # stdout/stderr kept in RunOutput (full text in results)
    # Local CIDs listed in every heartbeat (newest first): locality hints, ~50 bytes each.
    advertised_cids: int = 100
    results_index_size: int = 10_000  # recent results found by CID without a database read
    verifier_key_wait_s: float = 60.0  # deterministic results: how long to wait for a verifier

    # --- noop executor and misbehaviour knobs (tests, stress) ---
    noop_delay_s: float = 0.0
    noop_exit_code: int = 0
    noop_stdout: str | None = None  # None = echo the job's entrypoint/parameters
    noop_stderr: str = ""
    bad_bids: bool = False  # the bid strategy raises
    reject_bids: bool = False  # always answer no
    fail_executions: bool = False  # every run fails
    bad_results: bool = False  # runs return different output (for the verifier)

    heartbeat_interval_s: float | None = None  # None = protocol.HEARTBEAT_INTERVAL_S
    # Also publish each run's output as it comes, on core NATS (shoal.logs.<execution>), for
    # outside subscribers. Off by default: `shoal logs -f` reads through the node's LOGS call,
    # and an unheard chunk is still a NATS message per job (ADR 0013).
    live_log_chunks: bool = False

    @field_validator("labels", mode="before")
    @classmethod
    def _labels(cls, value: Any) -> dict[str, str]:
        return parse_labels(value)

    @field_validator(
        "gpu_ids", "timeout_bypass_clients", "local_dirs_allowed", "publishers", "verifiers",
        mode="before",
    )  # fmt: skip
    @classmethod
    def _csv(cls, value: Any) -> list[Any]:
        return _parse_list(value)

    @field_validator("engines", "storage_sources", mode="before")
    @classmethod
    def _csv_or_none(cls, value: Any) -> list[Any] | None:
        return None if value is None else _parse_list(value)

    @field_validator("cpu", "max_job_cpu", mode="before")
    @classmethod
    def _cpu(cls, value: Any) -> Any:
        return parse_cpu(value) if isinstance(value, str) else value

    @field_validator("memory", "disk", "max_job_memory", "max_job_disk", mode="before")
    @classmethod
    def _bytes(cls, value: Any) -> Any:
        return parse_bytes(value) if isinstance(value, str) else value

    # --- derived values ---

    def resolved_node_id(self) -> str:
        """The configured node id, else one made once and kept in the state dir (stable
        across restarts, so the node can report its interrupted executions as its own)."""
        if self.node_id:
            return self.node_id
        path = self.state_dir / "compute_node_id"
        if path.exists():
            return check_token(path.read_text().strip())
        self.state_dir.mkdir(parents=True, exist_ok=True)
        node_id = f"compute-{uuid.uuid4().hex[:8]}"
        path.write_text(node_id)
        return node_id

    def http_port_path(self, node_id: str) -> Path:
        """Where a node that chose its own content port (``port`` 0) keeps it: results it
        proposed before a restart carry URLs with that port, so it binds it again (B19).
        Named after the node, like its database (nodes may share a state dir)."""
        return self.state_dir / f"compute-{node_id}.http_port"

    def remembered_http_port(self, node_id: str) -> int | None:
        """The port this node chose before, if it kept a valid one."""
        try:
            port = int(self.http_port_path(node_id).read_text().strip())
        except (OSError, ValueError):
            return None
        return port if 0 < port < 65536 else None

    def remember_http_port(self, node_id: str, port: int) -> None:
        """Keep the port this node chose (written whole: a crash leaves the old or the new)."""
        if self.remembered_http_port(node_id) == port:
            return
        path = self.http_port_path(node_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(f"{port}\n")
        tmp.replace(path)

    def resolved_gpu_ids(self) -> tuple[str, ...]:
        if self.gpu_ids:
            return tuple(self.gpu_ids)
        if self.gpus:
            return tuple(str(i) for i in range(self.gpus))
        return ()

    def total_capacity(self, detected_gpus: tuple[str, ...] = ()) -> Capacity:
        """Node totals: configured values, else the machine's."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        gpus = self.resolved_gpu_ids() or detected_gpus
        return Capacity(
            cpu=self.cpu if self.cpu is not None else float(os.cpu_count() or 1),
            memory=self.memory if self.memory is not None else _machine_memory(),
            disk=self.disk if self.disk is not None else shutil.disk_usage(self.state_dir).free,
            gpu=len(gpus),
        )

    def per_job_max(self, total: Capacity) -> Capacity:
        """The biggest single job this node takes (defaults: the whole node)."""
        return Capacity(
            cpu=min(self.max_job_cpu, total.cpu) if self.max_job_cpu is not None else total.cpu,
            memory=min(self.max_job_memory, total.memory)
            if self.max_job_memory is not None
            else total.memory,
            disk=min(self.max_job_disk, total.disk)
            if self.max_job_disk is not None
            else total.disk,
            gpu=min(self.max_job_gpu, total.gpu) if self.max_job_gpu is not None else total.gpu,
        )

    def node_db_url(self, node_id: str) -> str:
        """The configured database, else SQLite under the state dir named after the node (so
        nodes that share a state dir in a devstack never share a database)."""
        return self.db_url(f"compute-{node_id}")

    @property
    def executions_dir(self) -> Path:
        return self.state_dir / "executions"

    @property
    def content_dir(self) -> Path:
        return self.state_dir / "content"
