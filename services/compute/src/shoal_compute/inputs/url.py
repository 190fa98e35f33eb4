"""URL downloads: streamed to disk, size-capped, retried with backoff on transient failures."""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx
import structlog

from shoal_compute.inputs.errors import InputError, InputUnavailable
from shoal_compute.inputs.paths import safe_file_name

log = structlog.get_logger(__name__)

_CHUNK = 1024 * 1024
# Worth another try: the server or the path to it may recover.
_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class DownloadPolicy:
    max_bytes: int
    retries: int = 3
    backoff_s: float = 0.2
    timeout_s: float = 60.0


def file_name_of(url: str) -> str:
    return safe_file_name(unquote(urlsplit(url).path), "download")


def check_url(url: str | None) -> str:
    if not url:
        raise InputError("a URL input needs a URL")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InputError(f"{url!r} is not an http(s) URL")
    return url


class _Retry(Exception):
    """One attempt failed in a way another attempt may fix."""


async def download(
    client: httpx.AsyncClient,
    url: str,
    destination: Path,
    policy: DownloadPolicy,
    *,
    method: str = "GET",
) -> httpx.Headers:
    """Stream ``url`` into ``destination``; returns the response headers.

    Raises :class:`InputError` for answers that will not change (404, too big) and
    :class:`InputUnavailable` once the retries are spent on transient failures.
    """
    check_url(url)
    attempts = 1 + max(0, policy.retries)
    last = ""
    for attempt in range(attempts):
        try:
            return await _attempt(client, url, destination, policy, method)
        except _Retry as exc:
            last = str(exc)
            _discard(destination)
            if attempt + 1 < attempts:
                # Exponential backoff with jitter, so parallel downloads do not retry in step.
                delay = policy.backoff_s * (2**attempt) * (0.5 + random.random())
                log.info("download_retry", url=url, attempt=attempt + 1, error=last)
                await asyncio.sleep(delay)
        except BaseException:
            _discard(destination)
            raise
    raise InputUnavailable(f"cannot download {url} after {attempts} attempts: {last}")


async def _attempt(
    client: httpx.AsyncClient, url: str, destination: Path, policy: DownloadPolicy, method: str
) -> httpx.Headers:
    try:
        async with client.stream(method, url, timeout=policy.timeout_s) as response:
            if response.status_code in _RETRY_STATUS:
                raise _Retry(f"HTTP {response.status_code}")
            if response.status_code >= 400:
                raise InputError(f"cannot download {url}: HTTP {response.status_code}")
            declared = response.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > policy.max_bytes:
                raise _too_big(url, policy.max_bytes)
            size = 0
            with destination.open("wb") as out:
                async for chunk in response.aiter_bytes(_CHUNK):
                    size += len(chunk)
                    if size > policy.max_bytes:
                        raise _too_big(url, policy.max_bytes)
                    # Small synchronous writes: the page cache absorbs them faster than a
                    # thread hop would cost.
                    out.write(chunk)
            return response.headers
    except httpx.TransportError as exc:  # connect, read, timeouts, protocol errors
        raise _Retry(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__) from exc


def _discard(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _too_big(url: str, cap: int) -> InputError:
    return InputError(
        f"{url} is larger than this node's download limit of {cap} bytes",
        hint="raise SHOAL_COMPUTE_URL_MAX_BYTES on the node, or use a smaller input",
    )
