"""CID inputs: from the local cache, else the Shoal content store over HTTP, else IPFS.

Whatever arrives is stored in the local cache, which re-hashes it: content that does not hash
to the CID asked for is refused, so a wrong or tampered source can never feed a job.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import httpx
import structlog

from shoal_common.cid import is_valid_cid
from shoal_common.content_store import UnsafeArchiveError, safe_extract_tar
from shoal_compute.adapters.content import ContentCache
from shoal_compute.adapters.kubo import CidFetcher
from shoal_compute.inputs.errors import InputError, InputUnavailable
from shoal_compute.inputs.url import DownloadPolicy, download

log = structlog.get_logger(__name__)

TAR_TYPES = frozenset({"application/x-tar", "application/tar"})


class CidResolver:
    """Makes a CID available on local disk (in the content cache) and says where."""

    def __init__(
        self,
        cache: ContentCache,
        client: httpx.AsyncClient,
        policy: DownloadPolicy,
        *,
        content_store_url: str | None = None,
        kubo: CidFetcher | None = None,
        scratch: Path,
    ) -> None:
        self._cache = cache
        self._client = client
        self._policy = policy
        self._content_url = content_store_url.rstrip("/") if content_store_url else None
        self._kubo = kubo
        self._scratch = scratch
        # One fetch per CID at a time, however many executions want it.
        self._inflight: dict[str, asyncio.Future[Path]] = {}

    async def resolve(self, cid: str | None) -> Path:
        """Local path of the CID's content (read-only); raises InputError / InputUnavailable."""
        if not cid or not is_valid_cid(cid):
            raise InputError(f"{cid!r} is not a valid CID")
        found = await self._cache.locate(cid)  # a cached input or one of our own results
        if found is not None:
            return found.path
        pending = self._inflight.get(cid)
        if pending is None:
            pending = asyncio.ensure_future(self._fetch(cid))
            self._inflight[cid] = pending
            pending.add_done_callback(lambda _: self._inflight.pop(cid, None))
        # shield: one waiter being cancelled must not abort the fetch for the others.
        return await asyncio.shield(pending)

    async def _fetch(self, cid: str) -> Path:
        errors: list[str] = []
        sources = [
            name for name, on in (("content store", self._content_url), ("IPFS", self._kubo)) if on
        ]
        if not sources:
            raise InputUnavailable(
                f"{cid} is not stored on this node and no content source is configured",
                hint="set SHOAL_COMPUTE_CONTENT_STORE_URL or SHOAL_COMPUTE_KUBO_RPC_URL",
            )
        retryable = False
        for name in sources:
            self._scratch.mkdir(parents=True, exist_ok=True)
            scratch = Path(tempfile.mkdtemp(prefix="cid-", dir=self._scratch))
            try:
                if name == "IPFS":
                    assert self._kubo is not None
                    content = await self._kubo.fetch(cid, scratch, max_bytes=self._policy.max_bytes)
                else:
                    content = await self._from_content_store(cid, scratch)
                return await self._store(cid, content, name)
            except InputUnavailable as exc:
                retryable = True
                errors.append(f"{name}: {exc.detail}")
            except InputError as exc:
                errors.append(f"{name}: {exc.detail}")
            finally:
                await asyncio.to_thread(shutil.rmtree, scratch, True)
        detail = f"cannot fetch {cid} ({'; '.join(errors)})"
        raise InputUnavailable(detail) if retryable else InputError(detail)

    async def _from_content_store(self, cid: str, scratch: Path) -> Path:
        blob = scratch / "blob"
        headers = await download(
            self._client, f"{self._content_url}/content/{cid}", blob, self._policy
        )
        kind = headers.get("x-shoal-kind", "").lower()
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "file" or (not kind and media not in TAR_TYPES):
            return blob
        tree = scratch / "tree"
        try:
            await asyncio.to_thread(_extract, blob, tree, self._policy.max_bytes)
        except UnsafeArchiveError as exc:
            raise InputError(f"content store sent an unsafe archive for {cid}: {exc}") from exc
        blob.unlink()
        return tree

    async def _store(self, cid: str, content: Path, source: str) -> Path:
        try:
            got = await self._cache.put_path(content)
        except ValueError as exc:  # symlinks or special files in what arrived
            raise InputError(f"{source} sent content that cannot be stored: {exc}") from exc
        if not self._cache.has(cid):
            raise InputError(f"{source} sent content with CID {got}, not {cid}")
        log.info("input_cached", cid=cid, source=source)
        return await self._cache.path_of(cid)


def _extract(archive: Path, dest: Path, max_bytes: int) -> None:
    with archive.open("rb") as handle:
        safe_extract_tar(handle, dest, max_bytes=max_bytes)
