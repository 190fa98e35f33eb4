"""Fetching a result from the compute node that produced it (``result_url``), streaming.

A directory comes as a tar stream (members relative to the folder), a file as raw bytes;
``X-Shoal-Kind: file|directory`` says which, else the content type (``application/x-tar``).
The tar is extracted by :func:`shoal_common.content_store.safe_extract_tar` while it
downloads, so a result of any size passes through a few MiB of memory.
"""

from __future__ import annotations

import shutil
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO

import httpx

from shoal_common.content_store import UnsafeArchiveError, safe_extract_tar
from shoal_publisher import metrics
from shoal_publisher.domain.models import (
    NodeUnreachableError,
    PublishError,
    TransientPublishError,
)
from shoal_publisher.streams import consume_in_thread

_CHUNK = 1 << 20


def _is_directory(response: httpx.Response) -> bool:
    kind = str(response.headers.get("X-Shoal-Kind", "")).lower()
    if kind:
        return kind in ("directory", "dir")
    media = str(response.headers.get("Content-Type", "")).split(";")[0].strip()
    return media == "application/x-tar"


def _write_capped(source: IO[bytes], target: Path, limit: int) -> None:
    written = 0
    with target.open("xb") as out:
        while chunk := source.read(_CHUNK):
            written += len(chunk)
            if written > limit:
                raise UnsafeArchiveError(f"the result is larger than the {limit}-byte limit")
            out.write(chunk)


async def _counted(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        metrics.RESULT_BYTES.inc(len(chunk))
        yield chunk


class HttpResultFetcher:
    """:class:`~shoal_publisher.domain.ports.ResultFetcher` over httpx."""

    def __init__(
        self,
        *,
        max_bytes: int,
        timeout: float = 60.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self._max = max_bytes
        self._client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(timeout), follow_redirects=True
        )

    async def close(self) -> None:
        await self._client.aclose()

    async def fetch(self, url: str, workdir: Path) -> Path:
        target = workdir / "content"
        try:
            async with self._client.stream("GET", url) as response:
                if response.status_code >= 500 or response.status_code == 429:
                    raise TransientPublishError(
                        f"fetching {url} failed: HTTP {response.status_code}"
                    )
                if response.status_code != 200:
                    raise PublishError(f"fetching {url} failed: HTTP {response.status_code}")
                length = response.headers.get("Content-Length")
                if length and length.isdigit() and int(length) > self._max + (1 << 20):
                    raise PublishError(
                        f"the result at {url} is {length} bytes, over the {self._max} limit"
                    )
                chunks = _counted(response.aiter_raw(_CHUNK))
                if _is_directory(response):
                    await consume_in_thread(
                        chunks, lambda r: safe_extract_tar(r, target, max_bytes=self._max)
                    )
                else:
                    await consume_in_thread(chunks, lambda r: _write_capped(r, target, self._max))
        except (UnsafeArchiveError, tarfile.TarError) as exc:
            shutil.rmtree(target, ignore_errors=True)
            raise PublishError(f"refused the result from {url}: {exc}") from exc
        except (httpx.ConnectError, ConnectionRefusedError) as exc:
            # Nothing listens there (yet): the node is down or restarting.
            raise NodeUnreachableError(f"fetching {url} failed: {exc!r}") from exc
        except httpx.HTTPError as exc:
            raise TransientPublishError(f"fetching {url} failed: {exc!r}") from exc
        except (ConnectionError, OSError) as exc:
            raise TransientPublishError(f"fetching {url} failed: {exc!r}") from exc
        return target


class StaticResultFetcher:
    """Fake fetcher: results are local paths keyed by URL (unit tests)."""

    def __init__(self, sources: dict[str, Path] | None = None) -> None:
        self.sources = dict(sources or {})
        self.fetched: list[str] = []

    async def fetch(self, url: str, workdir: Path) -> Path:
        self.fetched.append(url)
        source = self.sources.get(url)
        if source is None:
            raise PublishError(f"fetching {url} failed: HTTP 404")
        target = workdir / "content"
        if source.is_dir():
            shutil.copytree(source, target, symlinks=True)
        else:
            shutil.copyfile(source, target)
        return target
