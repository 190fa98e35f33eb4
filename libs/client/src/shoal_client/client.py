"""A typed HTTP client for a Shoal requester (what the ``shoal`` CLI uses).

It speaks the same legacy endpoints as Bacalhau's SDK (signed submit/cancel/logs), plus Shoal's
own endpoints for job details, nodes, content upload/download and the event stream.

The job methods come in two forms: typed (``submit``, ``state``, ``wait``: pydantic models from
shoal_common.spec) and wire (``submit_wire``, ``state_wire``, ``wait_wire``: the JSON dicts as
sent and received). The CLI's job verbs use the wire form, so they never import pydantic.
"""

from __future__ import annotations

import io
import os
import ssl
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import orjson

from shoal_client.auth import RequestAuth, sign_from_env, token_from_env
from shoal_client.base import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    ShoalClientError,
    api_base_url,
    shoal_dir,
    short_id,
)
from shoal_common.cid import cid_of_path
from shoal_common.signing import ClientKey, sign_envelope
from shoal_common.wire_enums import API_VERSION, JobStateType

if TYPE_CHECKING:
    from shoal_common.spec import Job, JobHistory, JobState, Spec, StorageSpec

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "JobDetails",
    "Progress",
    "ShoalClient",
    "ShoalClientError",
    "api_base_url",
    "is_terminal",
    "shoal_dir",
    "short_id",
    "storage_for_results",
]

Progress = Callable[[int, int | None], None]  # (bytes so far, total or None)


@dataclass
class JobDetails:
    job: Job
    state: JobState
    history: list[JobHistory]


class ShoalClient:
    """Synchronous client; one instance per requester. Thread-safe like ``httpx.Client``."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        key: ClientKey | None = None,
        timeout: float = 30.0,
        token: str | None = None,
        sign_requests: bool | None = None,
    ) -> None:
        """``token`` / ``sign_requests``: credentials for a private cluster (default: from
        $SHOAL_API_TOKEN and $SHOAL_API_SIGN_REQUESTS); an open cluster needs neither."""
        self.base_url = (base_url or api_base_url()).rstrip("/")
        self._key = key
        auth = RequestAuth(
            token=token if token is not None else token_from_env(),
            sign=sign_requests if sign_requests is not None else sign_from_env(),
            key=lambda: self.key,
        )
        self._http = httpx.Client(
            base_url=self.base_url, timeout=timeout, auth=auth, verify=_tls_for(self.base_url)
        )

    @property
    def key(self) -> ClientKey:
        if self._key is None:
            self._key = ClientKey.load_or_create(shoal_dir())
        return self._key

    @property
    def client_id(self) -> str:
        return self.key.client_id

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ShoalClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- plumbing --------------------------------------------------------------------------------

    def _unreachable(self, exc: Exception) -> ShoalClientError:
        return ShoalClientError(0, f"cannot reach the requester at {self.base_url}: {exc}")

    def _check(self, resp: httpx.Response) -> httpx.Response:
        if resp.is_success:
            return resp
        raise ShoalClientError(resp.status_code, _error_text(resp))

    def _send(self, method: str, path: str, **request: Any) -> Any:
        """One JSON call. A dropped connection (most often a kept-alive one the server closed
        just as the request went out) is tried once more: every call made here is a read, or
        a signed submit, whose resend the requester answers with the same job."""
        try:
            try:
                resp = self._http.request(method, path, **request)
            except (httpx.TimeoutException, httpx.UnsupportedProtocol):
                raise
            except httpx.TransportError:
                resp = self._http.request(method, path, **request)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc
        return self._check(resp).json()

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        return self._send("POST", path, content=orjson.dumps(body), headers=_JSON)

    def _post_signed(self, path: str, payload: dict[str, Any]) -> Any:
        return self._send("POST", path, content=sign_envelope(self.key, payload), headers=_JSON)

    def _get(self, path: str, **params: Any) -> Any:
        query = {k: v for k, v in params.items() if v is not None}
        return self._send("GET", path, params=query)

    # --- jobs ------------------------------------------------------------------------------------

    def submit(self, spec: Spec) -> Job:
        """Submit a job; returns it with its id. The request is signed with the client key."""
        from shoal_common.spec import Job, to_wire

        return Job.model_validate(self.submit_wire(to_wire(spec)))

    def submit_wire(self, spec: dict[str, Any]) -> dict[str, Any]:
        """``submit`` for a Spec already in wire form; returns the Job in wire form."""
        payload = {
            "APIVersion": API_VERSION,
            "ClientID": self.client_id,
            # A replayed signed submit returns the original job (replay protection), and RSA
            # PKCS#1 v1.5 signatures are deterministic: a fresh nonce makes each call a new job.
            "Nonce": uuid.uuid4().hex,
            "Spec": spec,
        }
        job: dict[str, Any] = self._post_signed("/requester/submit", payload)["job"]
        return job

    def state(self, job_id: str) -> JobState:
        from shoal_common.spec import JobState

        return JobState.model_validate(self.state_wire(job_id))

    def state_wire(self, job_id: str) -> dict[str, Any]:
        """A job's JobState in wire form (``State``, ``Version``, ``Executions``, ...)."""
        answer = self._post("/requester/states", {"client_id": self.client_id, "job_id": job_id})
        state: dict[str, Any] = answer["state"]
        return state

    def events(self, job_id: str) -> list[JobHistory]:
        from shoal_common.spec import JobHistory

        answer = self._post("/requester/events", {"client_id": self.client_id, "job_id": job_id})
        return [JobHistory.model_validate(e) for e in answer.get("events") or []]

    def results(self, job_id: str) -> list[dict[str, Any]]:
        answer = self._post("/requester/results", {"client_id": self.client_id, "job_id": job_id})
        results: list[dict[str, Any]] = answer.get("results") or []
        return results

    def list_jobs(
        self,
        *,
        limit: int = 10,
        return_all: bool = False,
        include_tags: list[str] | None = None,
        exclude_tags: list[str] | None = None,
        newest_first: bool = True,
        job_id: str | None = None,
    ) -> list[dict[str, Any]]:
        body: dict[str, Any] = {
            "client_id": self.client_id,
            "include_tags": include_tags or [],
            "exclude_tags": exclude_tags or [],
            "max_jobs": limit,
            "return_all": return_all,
            "sort_by": "created_at",
            "sort_reverse": newest_first,
        }
        if job_id:
            body["id"] = job_id
        jobs: list[dict[str, Any]] = self._post("/requester/list", body).get("jobs") or []
        return jobs

    def describe(self, job_id: str) -> JobDetails:
        from shoal_common.spec import Job, JobHistory, JobState

        answer = self._get(f"/api/v1/jobs/{job_id}")
        return JobDetails(
            job=Job.model_validate(answer["Job"]),
            state=JobState.model_validate(answer["State"]),
            history=[JobHistory.model_validate(h) for h in answer.get("History") or []],
        )

    def cancel(self, job_id: str, reason: str = "cancelled by the user") -> JobState:
        from shoal_common.spec import JobState

        payload = {"ClientID": self.client_id, "JobID": job_id, "Reason": reason}
        return JobState.model_validate(self._post_signed("/requester/cancel", payload)["state"])

    def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        on_change: Callable[[JobState], None] | None = None,
    ) -> JobState:
        """Poll until the job is terminal (short intervals first: most jobs are quick)."""
        from shoal_common.spec import JobState

        def changed(state: dict[str, Any]) -> None:
            if on_change is not None:
                on_change(JobState.model_validate(state))

        return JobState.model_validate(self.wait_wire(job_id, timeout=timeout, on_change=changed))

    def wait_wire(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        on_change: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """``wait`` with the JobState in wire form."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay, last_version = 0.005, None
        while True:
            state = self.state_wire(job_id)
            version = state.get("Version", 0)
            if on_change and version != last_version:
                on_change(state)
            last_version = version
            status = JobStateType(state["State"])
            if status.terminal:
                return state
            if deadline is not None and time.monotonic() > deadline:
                raise ShoalClientError(0, f"job {job_id} still {status} after {timeout}s")
            time.sleep(delay)
            # 1.5, not 2: a job ending between two polls is seen at most ~1/3 of its run time
            # late rather than ~1/2 (a 100 ms job: one more poll, ~40 ms sooner on average).
            delay = min(delay * 1.5, 0.5)

    def logs(self, job_id: str, execution_id: str = "", *, follow: bool = False) -> Iterator[str]:
        """stdout/stderr of a job's execution (the first if none given), optionally live."""
        payload = {
            "ClientID": self.client_id,
            "ExecutionID": execution_id,
            "Follow": follow,
            "JobID": job_id,
            "WithHistory": True,
        }
        body = sign_envelope(self.key, payload)
        timeout = httpx.Timeout(30.0, read=None) if follow else None
        with self._http.stream(
            "POST", "/requester/logs", content=body, headers=_JSON, timeout=timeout
        ) as resp:
            if not resp.is_success:
                resp.read()
                raise ShoalClientError(resp.status_code, _error_text(resp))
            yield from resp.iter_text()

    # --- nodes -----------------------------------------------------------------------------------

    def nodes(self) -> list[dict[str, Any]]:
        nodes: list[dict[str, Any]] = self._get("/api/v1/nodes")
        return nodes

    def node(self, node_id: str) -> dict[str, Any]:
        node: dict[str, Any] = self._get(f"/api/v1/nodes/{node_id}")
        return node

    def version(self) -> dict[str, Any]:
        info: dict[str, Any] = self._get("/version")
        return info

    # --- content ---------------------------------------------------------------------------------

    def put(self, path: Path, *, progress: Progress | None = None) -> str:
        """Upload a file or directory to the content store; returns its CID (checked locally)."""
        path = Path(path)
        expected = cid_of_path(path)
        with tempfile.TemporaryFile() as spool:
            if path.is_dir():
                with tarfile.open(fileobj=spool, mode="w") as tar:
                    for child in sorted(path.iterdir()):
                        tar.add(child, arcname=child.name)
                params = {"kind": "directory"}
            else:
                with path.open("rb") as src:
                    while chunk := src.read(1 << 20):
                        spool.write(chunk)
                params = {"kind": "file", "filename": path.name}
            total = spool.tell()
            spool.seek(0)
            resp = self._http.post(
                "/api/v1/content",
                params=params,
                content=_read_with_progress(spool, total, progress),
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(total)},
                timeout=httpx.Timeout(30.0, write=None, read=None),
            )
        cid: str = self._check(resp).json()["cid"]
        if cid != expected:
            raise ShoalClientError(0, f"the store answered CID {cid}, but the data is {expected}")
        return cid

    def download(self, cid: str, dest: Path, *, progress: Progress | None = None) -> Path:
        """Fetch content by CID into ``dest`` (a file, or a folder for a directory), CID-checked.

        One pass: the bytes are written and hashed as they arrive (a directory's tar is
        extracted on the way), and ``dest`` appears only once the CID matches.
        """
        with self._http.stream(
            "GET", f"/api/v1/content/{cid}", timeout=httpx.Timeout(30.0, read=None)
        ) as resp:
            if not resp.is_success:
                resp.read()
                raise ShoalClientError(resp.status_code, _error_text(resp))
            total = (
                int(resp.headers["Content-Length"]) if "Content-Length" in resp.headers else None
            )
            directory = resp.headers.get("X-Shoal-Kind", "file") == "directory"
            # Raw network reads unless the body is encoded (a proxy compressing it).
            chunks = resp.iter_bytes() if "Content-Encoding" in resp.headers else resp.iter_raw()
            from shoal_client import download  # its tar checks are for downloads only

            try:
                return download.fetch(
                    chunks, dest, cid=cid, directory=directory, total=total, progress=progress
                )
            except download.DownloadError as exc:
                raise ShoalClientError(0, str(exc)) from exc


_JSON = {"Content-Type": "application/json", "Accept": "application/json"}
_PROXY_ENV = ("http_proxy", "https_proxy", "all_proxy")


def _tls_for(base_url: str) -> ssl.SSLContext | bool:
    """httpx's default (True: the system's CA certificates) unless nothing can use TLS: a plain
    http requester and no proxy. Then a context that trusts no certificate at all, because
    loading the CA bundle costs ~50 ms of every command and would never be used (requests go
    to the base URL only, redirects are not followed); were it used, it would refuse."""
    proxied = any(os.environ.get(name) or os.environ.get(name.upper()) for name in _PROXY_ENV)
    if base_url.startswith("http://") and not proxied:
        return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    return True


def _read_with_progress(
    src: io.BufferedIOBase | Any, total: int, progress: Progress | None
) -> Iterator[bytes]:
    done = 0
    while chunk := src.read(1 << 20):
        done += len(chunk)
        if progress:
            progress(done, total)
        yield chunk


def _error_text(resp: httpx.Response) -> str:
    """The server's own words: problem+json detail, legacy {"error"}, or the body text."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text.strip() or resp.reason_phrase
    if isinstance(body, dict):
        for key in ("detail", "error", "message"):
            if body.get(key):
                return str(body[key])
    return resp.text.strip()


def is_terminal(state: JobStateType) -> bool:
    return state.terminal


def storage_for_results(results: list[dict[str, Any]]) -> list[StorageSpec]:
    from shoal_common.spec import StorageSpec

    return [StorageSpec.model_validate(r.get("Data") or {}) for r in results]
