"""What the client needs before it speaks HTTP: its error, where the requester and the client key
are, and short job ids. No third-party imports, so the ``shoal`` CLI can load this for
``--help`` and error handling without loading httpx or pydantic."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 1234


class ShoalClientError(Exception):
    """The requester refused a request; ``status`` is the HTTP status, ``message`` says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{message} (HTTP {status})" if status else message)
        self.status = status
        self.message = message


def shoal_dir() -> Path:
    return Path(os.environ.get("SHOAL_DIR") or Path.home() / ".shoal")


def api_base_url(host: str | None = None, port: int | None = None) -> str:
    host = host or os.environ.get("SHOAL_API_HOST") or DEFAULT_HOST
    port = port or int(os.environ.get("SHOAL_API_PORT") or DEFAULT_PORT)
    scheme = "https" if os.environ.get("SHOAL_HTTPS") else "http"
    return f"{scheme}://{host}:{port}"


def short_id(job_id: str) -> str:
    """Eight characters that tell jobs apart: the random end of the time-ordered id (its start
    is a timestamp, shared by every job of the same minute)."""
    return job_id.replace("-", "")[-8:]
