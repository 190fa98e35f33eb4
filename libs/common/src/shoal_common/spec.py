"""The job contract: the reference system's v1beta1 wire models.

Parsing is lenient the way Go's decoder was (keys and enum names case-insensitive, whitespace
around enum names ignored); emitting uses the exact Go key names (``model_dump(by_alias=True)``,
see :func:`to_wire`), because Bacalhau's own clients read them. The enums and resource-string
parsers live in :mod:`shoal_common.wire_enums` (no pydantic) and are re-exported here.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shoal_common.wire_enums import (
    API_VERSION,
    Engine,
    ExecutionStateType,
    JobHistoryType,
    JobStateType,
    NetworkType,
    PublisherType,
    SelectionOperator,
    StorageSourceType,
    VerifierType,
    WireEnum,
    parse_bytes,
    parse_cpu,
    parse_gpu,
)

# Explicit, so that the names from wire_enums count as re-exported (mypy strict).
__all__ = [
    "API_VERSION",
    "Deal",
    "DockerSpec",
    "Engine",
    "ExecutionState",
    "ExecutionStateType",
    "Job",
    "JobHistory",
    "JobHistoryType",
    "JobRequester",
    "JobState",
    "JobStateType",
    "LabelSelector",
    "LanguageSpec",
    "Metadata",
    "NetworkSpec",
    "NetworkType",
    "PublisherSpec",
    "PublisherType",
    "ResourcesSpec",
    "RunOutput",
    "S3StorageSpec",
    "SelectionOperator",
    "Spec",
    "StateChange",
    "StorageSourceType",
    "StorageSpec",
    "VerificationResult",
    "VerifierType",
    "WasmSpec",
    "WireEnum",
    "WireModel",
    "parse_bytes",
    "parse_cpu",
    "parse_gpu",
    "to_wire",
    "utcnow",
]


# Go's ``int``: the reference decoder refused a number outside 64 bits (a 400), and one let
# through here could be neither stored nor sent (orjson, SQLite: 64-bit integers only).
GoInt = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


class WireModel(BaseModel):
    """Base for wire models: keys matched case-insensitively on input, exact aliases on output."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=False)

    @model_validator(mode="before")
    @classmethod
    def _case_insensitive_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        aliases, lookup = _key_lookup(cls)
        # Our own clients and stored rows spell every key as its alias: nothing to rename
        # (one C-level pass, where folding each key cost a submit 1-2 us per model).
        if aliases.issuperset(data):
            return data
        return {lookup.get(_fold(k), k) if isinstance(k, str) else k: v for k, v in data.items()}


def _fold(key: str) -> str:
    return key.replace("_", "").lower()


_LOOKUPS: dict[type[BaseModel], tuple[frozenset[str], dict[str, str]]] = {}


def _key_lookup(model: type[BaseModel]) -> tuple[frozenset[str], dict[str, str]]:
    """The model's aliases, and folded key -> alias, so ``minbids``, ``min_bids`` and
    ``MinBids`` all land on MinBids."""
    found = _LOOKUPS.get(model)
    if found is None:
        lookup: dict[str, str] = {}
        for name, field in model.model_fields.items():
            alias = field.alias or name
            lookup[_fold(name)] = alias
            lookup[_fold(alias)] = alias
        # Only keys that fold back to themselves: an alias another field's folding claims
        # (none today) would still be renamed by the slow path.
        aliases = frozenset(alias for alias in lookup.values() if lookup[_fold(alias)] == alias)
        found = _LOOKUPS[model] = (aliases, lookup)
    return found


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
    concurrency: GoInt | None = Field(None, alias="Concurrency")
    confidence: GoInt | None = Field(None, alias="Confidence")
    min_bids: GoInt | None = Field(None, alias="MinBids")


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
    exit_code: GoInt = Field(0, alias="exitCode")
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
    version: GoInt = Field(0, alias="Version")
    create_time: datetime = Field(alias="CreateTime")
    update_time: datetime = Field(alias="UpdateTime")


class JobState(WireModel):
    job_id: str = Field(alias="JobID")
    executions: list[ExecutionState] = Field(default_factory=list, alias="Executions")
    state: JobStateType = Field(alias="State")
    version: GoInt = Field(0, alias="Version")
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
    new_version: GoInt = Field(0, alias="NewVersion")
    comment: str = Field("", alias="Comment")
    time: datetime = Field(alias="Time")


def to_wire(model: BaseModel) -> dict[str, Any]:
    """The JSON-ready dict with exact Go key names, nulls dropped (Go used omitempty widely)."""
    return model.model_dump(by_alias=True, mode="json", exclude_none=True)


def utcnow() -> datetime:
    return datetime.now(UTC)
