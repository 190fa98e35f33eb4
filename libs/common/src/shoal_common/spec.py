"""The job contract: the reference system's v1beta1 wire models.

Parsing is lenient the way Go's decoder was (keys and enum names case-insensitive, whitespace
around enum names ignored); emitting uses the exact Go key names (``model_dump(by_alias=True)``,
see :func:`to_wire`), because Bacalhau's own clients read them.
"""

from __future__ import annotations

import enum
import re
from datetime import UTC, datetime
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

API_VERSION = "V1beta1"


class WireEnum(enum.StrEnum):
    """An enum that travels by name and parses case-insensitively, like the Go reference."""

    @classmethod
    def _missing_(cls, value: object) -> Self | None:
        if isinstance(value, str):
            wanted = value.strip().lower()
            for member in cls:
                if member.value.lower() == wanted or member.name.lower() == wanted:
                    return member
            alias = _ENUM_ALIASES.get(cls.__name__, {}).get(wanted)
            if alias is not None:
                return cls(alias)
        return None

    @classmethod
    def names(cls) -> list[str]:
        return [m.value for m in cls]


# Other spellings clients send: the reference system's own names for the same thing.
_ENUM_ALIASES: dict[str, dict[str, str]] = {
    "StorageSourceType": {
        "url": "URLDownload",
        "urldownload": "URLDownload",
        "local": "LocalDirectory",
    },
    "ExecutionStateType": {"resultproposed": "WaitingVerification"},
}


class Engine(WireEnum):
    NOOP = "Noop"
    DOCKER = "Docker"
    WASM = "Wasm"
    LANGUAGE = "Language"
    PYTHON_WASM = "PythonWasm"


class VerifierType(WireEnum):
    NOOP = "Noop"
    DETERMINISTIC = "Deterministic"
    EXTERNAL = "External"


class PublisherType(WireEnum):
    NOOP = "Noop"
    IPFS = "Ipfs"
    FILECOIN = "Filecoin"
    ESTUARY = "Estuary"
    S3 = "S3"
    # Shoal's own content store; the default publisher (results come back over HTTP).
    LOCAL = "Local"


class StorageSourceType(WireEnum):
    IPFS = "IPFS"
    REPO_CLONE = "RepoClone"
    REPO_CLONE_LFS = "RepoCloneLFS"
    URL_DOWNLOAD = "URLDownload"
    FILECOIN_UNSEALED = "FilecoinUnsealed"
    FILECOIN = "Filecoin"
    ESTUARY = "Estuary"
    INLINE = "Inline"
    LOCAL_DIRECTORY = "LocalDirectory"
    S3 = "S3"


class NetworkType(WireEnum):
    NONE = "None"
    FULL = "Full"
    HTTP = "HTTP"


class JobStateType(WireEnum):
    NEW = "New"
    IN_PROGRESS = "InProgress"
    CANCELLED = "Cancelled"
    ERROR = "Error"
    COMPLETED = "Completed"
    COMPLETED_PARTIALLY = "CompletedPartially"
    QUEUED = "Queued"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL_JOB_STATES


_TERMINAL_JOB_STATES = frozenset(
    {
        JobStateType.COMPLETED,
        JobStateType.ERROR,
        JobStateType.CANCELLED,
        JobStateType.COMPLETED_PARTIALLY,
    }
)


class ExecutionStateType(WireEnum):
    NEW = "New"
    ASK_FOR_BID = "AskForBid"
    ASK_FOR_BID_ACCEPTED = "AskForBidAccepted"
    ASK_FOR_BID_REJECTED = "AskForBidRejected"
    BID_ACCEPTED = "BidAccepted"
    BID_REJECTED = "BidRejected"
    WAITING_VERIFICATION = "WaitingVerification"
    RESULT_ACCEPTED = "ResultAccepted"
    RESULT_REJECTED = "ResultRejected"
    COMPLETED = "Completed"
    FAILED = "Failed"
    CANCELLED = "Cancelled"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL_EXECUTION_STATES

    @property
    def active(self) -> bool:
        """Holds (or may soon hold) capacity on a node and may still produce a result."""
        return self in _ACTIVE_EXECUTION_STATES


_TERMINAL_EXECUTION_STATES = frozenset(
    {
        ExecutionStateType.ASK_FOR_BID_REJECTED,
        ExecutionStateType.BID_REJECTED,
        ExecutionStateType.RESULT_REJECTED,
        ExecutionStateType.COMPLETED,
        ExecutionStateType.FAILED,
        ExecutionStateType.CANCELLED,
    }
)
_ACTIVE_EXECUTION_STATES = frozenset(
    {
        ExecutionStateType.NEW,
        ExecutionStateType.ASK_FOR_BID,
        ExecutionStateType.ASK_FOR_BID_ACCEPTED,
        ExecutionStateType.BID_ACCEPTED,
        ExecutionStateType.WAITING_VERIFICATION,
        ExecutionStateType.RESULT_ACCEPTED,
    }
)


class JobHistoryType(WireEnum):
    JOB_LEVEL = "JobLevel"
    EXECUTION_LEVEL = "ExecutionLevel"


class SelectionOperator(WireEnum):
    IN = "in"
    NOT_IN = "notin"
    EXISTS = "exists"
    GT = "gt"
    LT = "lt"
    EQUALS = "="
    DOUBLE_EQUALS = "=="
    NOT_EQUALS = "!="
    DOES_NOT_EXIST = "!"


class WireModel(BaseModel):
    """Base for wire models: keys matched case-insensitively on input, exact aliases on output."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=False)

    @model_validator(mode="before")
    @classmethod
    def _case_insensitive_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        lookup = _key_lookup(cls)
        return {lookup.get(_fold(k), k) if isinstance(k, str) else k: v for k, v in data.items()}


def _fold(key: str) -> str:
    return key.replace("_", "").lower()


_LOOKUPS: dict[type[BaseModel], dict[str, str]] = {}


def _key_lookup(model: type[BaseModel]) -> dict[str, str]:
    """Folded key -> alias, so ``minbids``, ``min_bids`` and ``MinBids`` all land on MinBids."""
    lookup = _LOOKUPS.get(model)
    if lookup is None:
        lookup = {}
        for name, field in model.model_fields.items():
            alias = field.alias or name
            lookup[_fold(name)] = alias
            lookup[_fold(alias)] = alias
        _LOOKUPS[model] = lookup
    return lookup


class S3StorageSpec(WireModel):
    bucket: str | None = Field(None, alias="Bucket")
    key: str | None = Field(None, alias="Key")
    checksum: str | None = Field(None, alias="Checksum")
    version_id: str | None = Field(None, alias="VersionID")
    endpoint: str | None = Field(None, alias="Endpoint")
    region: str | None = Field(None, alias="Region")


class StorageSpec(WireModel):
    """One input or output volume, or a published result."""

    storage_source: StorageSourceType | None = Field(None, alias="StorageSource")
    name: str | None = Field(None, alias="Name")
    cid: str | None = Field(None, alias="CID")
    url: str | None = Field(None, alias="URL")
    s3: S3StorageSpec | None = Field(None, alias="S3")
    repo: str | None = Field(None, alias="Repo")
    source_path: str | None = Field(None, alias="SourcePath")
    read_write: bool | None = Field(None, alias="ReadWrite")
    path: str | None = Field(None, alias="path")
    metadata: dict[str, str] | None = Field(None, alias="Metadata")


class PublisherSpec(WireModel):
    type: PublisherType | None = Field(None, alias="Type")
    params: dict[str, Any] | None = Field(None, alias="Params")


class DockerSpec(WireModel):
    image: str = Field("", alias="Image")
    entrypoint: list[str] | None = Field(None, alias="Entrypoint")
    environment_variables: list[str] | None = Field(None, alias="EnvironmentVariables")
    working_directory: str | None = Field(None, alias="WorkingDirectory")


class LanguageSpec(WireModel):
    language: str | None = Field(None, alias="Language")
    language_version: str | None = Field(None, alias="LanguageVersion")
    deterministic_execution: bool | None = Field(None, alias="DeterministicExecution")
    job_context: StorageSpec | None = Field(None, alias="JobContext")
    command: str | None = Field(None, alias="Command")
    program_path: str | None = Field(None, alias="ProgramPath")
    requirements_path: str | None = Field(None, alias="RequirementsPath")


class WasmSpec(WireModel):
    entry_module: StorageSpec | None = Field(None, alias="EntryModule")
    entry_point: str | None = Field(None, alias="EntryPoint")
    parameters: list[str] | None = Field(None, alias="Parameters")
    environment_variables: dict[str, str] | None = Field(None, alias="EnvironmentVariables")
    import_modules: list[StorageSpec] | None = Field(None, alias="ImportModules")


class ResourcesSpec(WireModel):
    """Resource requests as the reference system sends them: strings ("500m", "1Gb")."""

    cpu: str | None = Field(None, alias="CPU")
    memory: str | None = Field(None, alias="Memory")
    disk: str | None = Field(None, alias="Disk")
    gpu: str | None = Field(None, alias="GPU")


class NetworkSpec(WireModel):
    type: NetworkType | None = Field(None, alias="Type")
    domains: list[str] | None = Field(None, alias="Domains")


class LabelSelector(WireModel):
    key: str = Field(alias="Key")
    operator: SelectionOperator = Field(alias="Operator")
    values: list[str] | None = Field(None, alias="Values")


class Deal(WireModel):
    concurrency: int | None = Field(None, alias="Concurrency")
    confidence: int | None = Field(None, alias="Confidence")
    min_bids: int | None = Field(None, alias="MinBids")


class Spec(WireModel):
    engine: Engine | None = Field(None, alias="Engine")
    verifier: VerifierType | None = Field(None, alias="Verifier")
    publisher: PublisherType | None = Field(None, alias="Publisher")
    publisher_spec: PublisherSpec | None = Field(None, alias="PublisherSpec")
    docker: DockerSpec | None = Field(None, alias="Docker")
    language: LanguageSpec | None = Field(None, alias="Language")
    wasm: WasmSpec | None = Field(None, alias="Wasm")
    resources: ResourcesSpec | None = Field(None, alias="Resources")
    network: NetworkSpec | None = Field(None, alias="Network")
    timeout: float | None = Field(None, alias="Timeout")
    inputs: list[StorageSpec] | None = Field(None, alias="inputs")
    outputs: list[StorageSpec] | None = Field(None, alias="outputs")
    annotations: list[str] | None = Field(None, alias="Annotations")
    node_selectors: list[LabelSelector] | None = Field(None, alias="NodeSelectors")
    do_not_track: bool | None = Field(None, alias="DoNotTrack")
    deal: Deal | None = Field(None, alias="Deal")

    # Convenience accessors with the defaults the system applies.
    @property
    def concurrency(self) -> int:
        return (self.deal.concurrency if self.deal else None) or 1

    @property
    def confidence(self) -> int:
        return (self.deal.confidence if self.deal else None) or 0

    @property
    def min_bids(self) -> int:
        return (self.deal.min_bids if self.deal else None) or 0

    @property
    def effective_publisher(self) -> PublisherType:
        if self.publisher_spec and self.publisher_spec.type:
            return self.publisher_spec.type
        return self.publisher or PublisherType.LOCAL

    @property
    def effective_verifier(self) -> VerifierType:
        return self.verifier or VerifierType.NOOP


class JobRequester(WireModel):
    requester_node_id: str | None = Field(None, alias="RequesterNodeID")
    requester_public_key: str | None = Field(None, alias="RequesterPublicKey")


class Metadata(WireModel):
    id: str = Field("", alias="ID")
    created_at: datetime | None = Field(None, alias="CreatedAt")
    client_id: str = Field("", alias="ClientID")
    requester: JobRequester | None = Field(None, alias="Requester")


class Job(WireModel):
    api_version: str = Field(API_VERSION, alias="APIVersion")
    metadata: Metadata = Field(default_factory=Metadata, alias="Metadata")
    spec: Spec = Field(default_factory=Spec, alias="Spec")


class RunOutput(WireModel):
    """What a run printed and returned (RunCommandResult on the wire)."""

    stdout: str = Field("", alias="stdout")
    stdout_truncated: bool = Field(False, alias="stdouttruncated")
    stderr: str = Field("", alias="stderr")
    stderr_truncated: bool = Field(False, alias="stderrtruncated")
    exit_code: int = Field(0, alias="exitCode")
    runner_error: str = Field("", alias="runnerError")


class VerificationResult(WireModel):
    complete: bool = Field(False, alias="Complete")
    result: bool = Field(False, alias="Result")


class ExecutionState(WireModel):
    job_id: str = Field(alias="JobID")
    node_id: str = Field(alias="NodeId")
    compute_reference: str = Field(alias="ComputeReference")
    state: ExecutionStateType = Field(alias="State")
    accepted_ask_for_bid: bool = Field(False, alias="AcceptedAskForBid")
    status: str = Field("", alias="Status")
    verification_result: VerificationResult | None = Field(None, alias="VerificationResult")
    published_results: StorageSpec | None = Field(None, alias="PublishedResults")
    run_output: RunOutput | None = Field(None, alias="RunOutput")
    version: int = Field(0, alias="Version")
    create_time: datetime = Field(alias="CreateTime")
    update_time: datetime = Field(alias="UpdateTime")


class JobState(WireModel):
    job_id: str = Field(alias="JobID")
    executions: list[ExecutionState] = Field(default_factory=list, alias="Executions")
    state: JobStateType = Field(alias="State")
    version: int = Field(0, alias="Version")
    create_time: datetime = Field(alias="CreateTime")
    update_time: datetime = Field(alias="UpdateTime")
    timeout_at: datetime | None = Field(None, alias="TimeoutAt")
    # Shoal's addition: why the job is where it is, in plain words (e.g. why it is Queued).
    status: str | None = Field(None, alias="Status")


class StateChange(WireModel):
    previous: str | None = Field(None, alias="Previous")
    new: str | None = Field(None, alias="New")


class JobHistory(WireModel):
    type: JobHistoryType = Field(alias="Type")
    job_id: str = Field(alias="JobID")
    node_id: str | None = Field(None, alias="NodeID")
    compute_reference: str | None = Field(None, alias="ComputeReference")
    job_state: StateChange | None = Field(None, alias="JobState")
    execution_state: StateChange | None = Field(None, alias="ExecutionState")
    new_version: int = Field(0, alias="NewVersion")
    comment: str = Field("", alias="Comment")
    time: datetime = Field(alias="Time")


def to_wire(model: BaseModel) -> dict[str, Any]:
    """The JSON-ready dict with exact Go key names, nulls dropped (Go used omitempty widely)."""
    return model.model_dump(by_alias=True, mode="json", exclude_none=True)


def utcnow() -> datetime:
    return datetime.now(UTC)


# --- resource strings -------------------------------------------------------------------------

_BYTE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "ki": 1024,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mi": 1024**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gi": 1024**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ti": 1024**4,
    "tib": 1024**4,
}
_QUANTITY = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str | None) -> int | None:
    """``"1Gb"``, ``"500MiB"``, ``"100m"`` style sizes in bytes; None for empty input."""
    if text is None or not str(text).strip():
        return None
    match = _QUANTITY.match(str(text))
    if not match or match.group(2).lower() not in _BYTE_UNITS:
        raise ValueError(f"invalid size {text!r}: use a number with an optional unit like 500MB")
    return int(float(match.group(1)) * _BYTE_UNITS[match.group(2).lower()])


def parse_cpu(text: str | None) -> float | None:
    """CPU cores from ``"0.5"``, ``"2"`` or Kubernetes millicores ``"500m"``."""
    if text is None or not str(text).strip():
        return None
    raw = str(text).strip()
    try:
        if raw.endswith("m"):
            return float(raw[:-1]) / 1000
        return float(raw)
    except ValueError:
        raise ValueError(
            f"invalid CPU {text!r}: use cores like 0.5 or millicores like 500m"
        ) from None


def parse_gpu(text: str | None) -> int | None:
    if text is None or not str(text).strip():
        return None
    try:
        value = int(str(text).strip())
    except ValueError:
        raise ValueError(f"invalid GPU count {text!r}: use a whole number") from None
    if value < 0:
        raise ValueError("GPU count cannot be negative")
    return value
