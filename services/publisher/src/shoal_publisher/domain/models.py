"""The publisher's records and the request every publisher handles."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from shoal_common.errors import ShoalError
from shoal_common.events import published_name
from shoal_common.spec import RunOutput


class PublicationStatus(StrEnum):
    PUBLISHED = "published"
    FAILED = "failed"


@dataclass(frozen=True)
class PublishRequest:
    """One accepted result to publish."""

    job_id: str
    execution_id: str
    node_id: str
    result_cid: str
    result_url: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    # What the run printed, as the events carry it: small results need no download (see
    # shoal_common.result_folder).
    run_output: RunOutput | None = None

    @property
    def name(self) -> str:
        """The reference system's name for a published result."""
        return published_name(self.job_id, self.node_id)


@dataclass
class Publication:
    """What happened to one execution's result."""

    execution_id: str
    job_id: str
    node_id: str
    result_cid: str
    publisher: str
    status: PublicationStatus
    result: dict[str, Any] | None = None  # StorageSpec in wire form, when published
    error: str = ""
    attempts: int = 0
    created: float = 0.0
    updated: float = 0.0


class PublishError(ShoalError):
    """Publishing failed for good (wrong CID, unsafe archive, unsupported target, ...)."""

    code = "publish_failed"
    http_status = 502


class TransientPublishError(PublishError):
    """Publishing failed in a way another attempt may fix (network, 5xx, timeouts)."""

    code = "publish_unavailable"
    http_status = 503
    retryable = True


class NodeUnreachableError(TransientPublishError):
    """The node holding the result does not answer at all (connection refused, no route):
    it may be restarting, and its results survive a restart, so it is waited for a while
    (``Publishing``'s ``unreachable_wait``) instead of counting attempts."""

    code = "node_unreachable"
