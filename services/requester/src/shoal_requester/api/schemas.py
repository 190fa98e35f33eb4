"""Request bodies of the legacy API (keys as the official apiclient sends them)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from shoal_common.spec import WireModel
from shoal_requester.domain.validation import (
    ApprovePayload,
    JobCancelPayload,
    JobCreatePayload,
    LogsPayload,
)


class ListRequest(WireModel):
    client_id: str | None = Field(None, alias="client_id")
    id: str | None = Field(None, alias="id", description="Full job id or its short id prefix")
    include_tags: list[str] | None = Field(None, alias="include_tags")
    exclude_tags: list[str] | None = Field(None, alias="exclude_tags")
    max_jobs: int | None = Field(None, alias="max_jobs", description="0 = no limit")
    return_all: bool | None = Field(None, alias="return_all")
    sort_by: str | None = Field(None, alias="sort_by", description="created_at or id")
    sort_reverse: bool | None = Field(None, alias="sort_reverse")


class StateRequest(WireModel):
    client_id: str | None = Field(None, alias="client_id")
    job_id: str = Field(alias="job_id")


class EventFilterOptions(WireModel):
    since: int | None = Field(None, alias="since", description="Unix seconds")
    exclude_execution_level: bool | None = Field(None, alias="exclude_execution_level")
    exclude_job_level: bool | None = Field(None, alias="exclude_job_level")


class EventsRequest(WireModel):
    client_id: str | None = Field(None, alias="client_id")
    job_id: str = Field(alias="job_id")
    filters: EventFilterOptions | None = Field(None, alias="filters")


class VersionRequest(WireModel):
    client_id: str | None = Field(None, alias="client_id")


class SignedSubmit(BaseModel):
    """A signed request: ``signature`` is over the exact bytes of ``payload`` as sent."""

    client_public_key: str = Field(description="base64 PKCS#1 RSAPublicKey DER")
    payload: JobCreatePayload
    signature: str = Field(description="base64 RSASSA-PKCS1-v1_5 SHA-256 over the payload")


class SignedCancel(BaseModel):
    client_public_key: str
    payload: JobCancelPayload
    signature: str


class SignedLogs(BaseModel):
    client_public_key: str
    payload: LogsPayload
    signature: str


class SignedApprove(BaseModel):
    client_public_key: str
    payload: ApprovePayload
    signature: str


BODY_MODELS: tuple[type[BaseModel], ...] = (
    SignedApprove,
    ListRequest,
    StateRequest,
    EventsRequest,
    VersionRequest,
    SignedSubmit,
    SignedCancel,
    SignedLogs,
)
