"""The job contract's enums and resource strings, without pydantic.

Split from :mod:`shoal_common.spec` (which re-exports everything here) so that a process that
only needs these (the ``shoal`` CLI building a job) does not pay for importing pydantic and
building the wire models.
"""

from __future__ import annotations

import enum
import re
from typing import Self

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
