"""Publishers: where an accepted result goes. One interface, a no-op and two real ones.

Every publisher answers with the same CID for the same result (the proposed one, checked
against the fetched bytes), so a result's address does not depend on where it was published.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Protocol

from shoal_common.events import noop_publication
from shoal_common.result_folder import cid_of_files, folder_from_run_output
from shoal_common.spec import PublisherType, StorageSourceType, StorageSpec
from shoal_publisher.domain.models import PublishError, PublishRequest
from shoal_publisher.domain.ports import KuboClient, LocalContent, ResultFetcher


class Publisher(Protocol):
    """Publishes one accepted result and says where it is."""

    kind: PublisherType

    async def publish(self, request: PublishRequest) -> StorageSpec:
        """Publish, or raise :class:`PublishError` (``TransientPublishError`` to retry)."""
        ...


def _spec(request: PublishRequest, kind: PublisherType, **extra: str) -> StorageSpec:
    return StorageSpec(
        StorageSource=StorageSourceType.IPFS,
        Name=request.name,
        CID=request.result_cid,
        Metadata={"publisher": kind.value, **extra},
    )


class NoopPublisher:
    """Records the CID and says it is published (partial results of failed runs; an accepted
    result for ``Publisher: Noop`` is recorded by the requester itself, ADR 0017)."""

    kind = PublisherType.NOOP

    async def publish(self, request: PublishRequest) -> StorageSpec:
        return noop_publication(request.job_id, request.node_id, request.result_cid)


def _new_workdir(staging: Path) -> Path:
    staging.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="publish-", dir=staging))


@asynccontextmanager
async def _workdir(staging: Path) -> AsyncIterator[Path]:
    path = await asyncio.to_thread(_new_workdir, staging)
    try:
        yield path
    finally:
        await asyncio.to_thread(shutil.rmtree, path, True)


def _mismatch(request: PublishRequest, got: str) -> PublishError:
    return PublishError(
        f"result CID mismatch: node {request.node_id} proposed {request.result_cid}, but the "
        f"results it serves have CID {got}"
    )


class LocalPublisher:
    """Copies the results folder from the node into Shoal's content store (the default)."""

    kind = PublisherType.LOCAL

    def __init__(
        self, content: LocalContent, fetcher: ResultFetcher, *, staging: Path, content_url: str
    ) -> None:
        self._content = content
        self._fetcher = fetcher
        self._staging = staging
        self._content_url = content_url.rstrip("/")

    async def publish(self, request: PublishRequest) -> StorageSpec:
        # Content addressing makes this idempotent: a result already stored (a redelivery,
        # or several executions agreeing on one CID) is not fetched again. The rebuild from the
        # run output goes first: it needs no lookup of its own (put_files skips stored content).
        if not await self._from_run_output(request) and not await self._content.has(
            request.result_cid
        ):
            if not request.result_url:
                raise PublishError(
                    f"node {request.node_id} gave no URL to fetch result {request.result_cid}"
                )
            async with _workdir(self._staging) as work:
                fetched = await self._fetcher.fetch(request.result_url, work)
                try:
                    stored = await self._content.put_path(fetched)
                except ValueError as exc:
                    raise PublishError(f"refused to store the result: {exc}") from exc
            if stored != request.result_cid:
                raise _mismatch(request, stored)
        url = f"{self._content_url}/content/{request.result_cid}" if self._content_url else ""
        spec = _spec(request, self.kind)
        if url:
            spec.url = url
        return spec

    async def _from_run_output(self, request: PublishRequest) -> bool:
        """Store the result rebuilt from the run output the event carried, if that is all of
        it (its CID is the proposed one); no download from the node then."""
        files = folder_from_run_output(request.run_output)
        if files is None or cid_of_files(files) != request.result_cid:
            return False
        # Results repeat (a canary, the same print on every node): one stored already needs
        # no write, and no trip to a worker thread.
        if await self._content.has(request.result_cid):
            return True
        return await self._content.put_files(files) == request.result_cid


class IpfsPublisher:
    """Adds and pins the results folder on a kubo RPC API."""

    kind = PublisherType.IPFS

    def __init__(
        self,
        kubo: KuboClient,
        fetcher: ResultFetcher,
        *,
        staging: Path,
        content: LocalContent | None = None,
        kubo_url: str = "",
    ) -> None:
        self._kubo = kubo
        self._fetcher = fetcher
        self._staging = staging
        self._content = content
        self._kubo_url = kubo_url

    async def publish(self, request: PublishRequest) -> StorageSpec:
        async with _workdir(self._staging) as work:
            if self._content is not None and await self._content.has(request.result_cid):
                # Already in our store (e.g. published locally before): no second download.
                source = await self._content.path_of(request.result_cid)
            else:
                if not request.result_url:
                    raise PublishError(
                        f"node {request.node_id} gave no URL to fetch result {request.result_cid}"
                    )
                source = await self._fetcher.fetch(request.result_url, work)
            cid = await self._kubo.add_path(source)
            if cid != request.result_cid:
                raise _mismatch(request, cid)
            await self._kubo.pin(cid)
        extra = {"kubo": self._kubo_url} if self._kubo_url else {}
        return _spec(request, self.kind, **extra)


class FailingPublisher:
    """Wraps a publisher to fail on purpose (tests and demos of behaviour 38).

    Fails every request when ``always``, else only results from the ``nodes`` listed: a
    failing publisher beside a good one.
    """

    def __init__(
        self, inner: Publisher, *, always: bool, nodes: frozenset[str], message: str
    ) -> None:
        self.kind = inner.kind
        self._inner = inner
        self._always = always
        self._nodes = nodes
        self._message = message

    async def publish(self, request: PublishRequest) -> StorageSpec:
        if self._always or request.node_id in self._nodes:
            raise PublishError(f"{self.kind.value} publisher failed: {self._message}")
        return await self._inner.publish(request)
