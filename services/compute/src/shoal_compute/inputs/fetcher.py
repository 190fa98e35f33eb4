"""Turns a job's input specs into read-only host paths (mounts) before its executor runs."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson

from shoal_common.spec import StorageSourceType, StorageSpec
from shoal_compute.adapters.content import ContentCache
from shoal_compute.adapters.kubo import CidFetcher, KuboFetcher
from shoal_compute.executors.base import Mount
from shoal_compute.inputs.cid import CidResolver
from shoal_compute.inputs.errors import InputError
from shoal_compute.inputs.inline import decode_inline, materialise_inline
from shoal_compute.inputs.local import LocalPaths
from shoal_compute.inputs.paths import check_target, safe_file_name
from shoal_compute.inputs.url import DownloadPolicy, check_url, download, file_name_of


@dataclass(frozen=True)
class InputConfig:
    """How this node fetches inputs (from :class:`ComputeSettings`)."""

    download: DownloadPolicy
    max_inline_bytes: int = 1024**2
    parallel: int = 8
    local_dirs_allowed: Sequence[Path] = field(default_factory=tuple)
    content_store_url: str | None = None
    kubo_rpc_url: str | None = None


def source_of(spec: StorageSpec) -> StorageSourceType:
    if spec.storage_source is not None:
        return spec.storage_source
    if spec.cid:
        return StorageSourceType.IPFS
    raise InputError(f"input {spec.name or spec.path or '?'} says nowhere to get it from")


class InputFetcher:
    """Fetches inputs of every supported source; one instance per node."""

    def __init__(
        self,
        config: InputConfig,
        cache: ContentCache,
        *,
        scratch: Path,
        modules_dir: Path,
        client: httpx.AsyncClient | None = None,
        kubo: CidFetcher | None = None,
    ) -> None:
        self._config = config
        self._cache = cache
        self._own_client = client is None
        self._client = client or httpx.AsyncClient(follow_redirects=True)
        if kubo is None and config.kubo_rpc_url:
            kubo = KuboFetcher(config.kubo_rpc_url)
        self._kubo = kubo
        self._local = LocalPaths(config.local_dirs_allowed)
        self._downloads = asyncio.Semaphore(max(1, config.parallel))
        self._modules_dir = modules_dir
        self._modules: dict[str, Path] = {}
        self.cids = CidResolver(
            cache,
            self._client,
            config.download,
            content_store_url=config.content_store_url,
            kubo=kubo,
            scratch=scratch,
        )

    def supported_sources(self) -> list[StorageSourceType]:
        sources = [StorageSourceType.IPFS, StorageSourceType.URL_DOWNLOAD, StorageSourceType.INLINE]
        if self._local.enabled:
            sources.append(StorageSourceType.LOCAL_DIRECTORY)
        return sources

    async def close(self) -> None:
        if self._own_client:
            await self._client.aclose()
        if self._kubo is not None:
            await self._kubo.close()

    # --- execution inputs ---

    async def fetch_inputs(self, specs: Sequence[StorageSpec], workdir: Path) -> list[Mount]:
        """Fetch every input in parallel; mounts in the order of ``specs``.

        Everything that can be checked without the network is checked first, so a job with
        one bad input fails at once instead of after its other downloads.
        """
        plans = [self._plan(spec, i) for i, spec in enumerate(specs)]
        targets = [target for _, target in plans]
        duplicate = next((t for t in targets if targets.count(t) > 1), None)
        if duplicate:
            raise InputError(f"two inputs are mounted at {duplicate}")
        if not specs:
            return []
        os.makedirs(workdir, exist_ok=True)
        sources = await asyncio.gather(
            *(self._fetch(spec, i, workdir) for i, (spec, _) in enumerate(plans))
        )
        return [
            Mount(source=source, target=target, read_only=True)
            for source, (_, target) in zip(sources, plans, strict=True)
        ]

    def _plan(self, spec: StorageSpec, index: int) -> tuple[StorageSpec, str]:
        source = source_of(spec)
        what = f"input {spec.name or index}"
        if source is StorageSourceType.IPFS:
            default = "/inputs"
        elif source is StorageSourceType.URL_DOWNLOAD:
            default = f"/inputs/{file_name_of(check_url(spec.url))}"
        elif source is StorageSourceType.INLINE:
            default = f"/inputs/{safe_file_name(spec.name or '', f'inline-{index}')}"
            decode_inline(spec.url, self._config.max_inline_bytes)  # size check up front
        elif source is StorageSourceType.LOCAL_DIRECTORY:
            real = self._local.resolve(spec.source_path, read_write=bool(spec.read_write))
            default = f"/inputs/{real.name}"
        else:
            raise InputError(f"{what}: storage source {source.value} is not supported")
        return spec, check_target(spec.path or default, what)

    async def _fetch(self, spec: StorageSpec, index: int, workdir: Path) -> Path:
        source = source_of(spec)
        if source is StorageSourceType.IPFS:
            return await self.cids.resolve(spec.cid)
        if source is StorageSourceType.URL_DOWNLOAD:
            folder = workdir / f"url-{index}"
            folder.mkdir(parents=True, exist_ok=True)
            assert spec.url is not None  # checked by _plan
            destination = folder / file_name_of(spec.url)
            async with self._downloads:
                await download(self._client, spec.url, destination, self._config.download)
            return destination
        if source is StorageSourceType.INLINE:
            inline = decode_inline(spec.url, self._config.max_inline_bytes)
            name = safe_file_name(spec.name or "", f"inline-{index}")
            return await asyncio.to_thread(
                materialise_inline,
                inline,
                workdir / f"inline-{index}",
                name,
                self._config.download.max_bytes,
            )
        return self._local.resolve(spec.source_path)

    # --- WASM modules (the WasmExecutor's resolver) ---

    async def resolve_module(self, spec: StorageSpec) -> Path:
        """A local file holding the module named by ``spec``; cached per spec."""
        key = hashlib.sha256(orjson.dumps(spec.model_dump(mode="json"))).hexdigest()[:32]
        known = self._modules.get(key)
        if known is not None and known.exists():
            return known
        path = await self._resolve_module(spec, key)
        if path.is_dir():
            # A folder holding exactly one file (e.g. `shoal put module.wasm` of a folder).
            files = [p for p in path.iterdir() if p.is_file()]
            if len(files) != 1:
                raise InputError(f"module {spec.name or spec.cid} is a directory, not a file")
            path = files[0]
        self._modules[key] = path
        return path

    async def _resolve_module(self, spec: StorageSpec, key: str) -> Path:
        source = source_of(spec)
        folder = self._modules_dir / key
        if source is StorageSourceType.IPFS:
            return await self.cids.resolve(spec.cid)
        if source is StorageSourceType.LOCAL_DIRECTORY:
            return self._local.resolve(spec.source_path)
        folder.mkdir(parents=True, exist_ok=True)
        if source is StorageSourceType.URL_DOWNLOAD:
            url = check_url(spec.url)
            destination = folder / file_name_of(url)
            if not destination.exists():
                partial = folder / (destination.name + ".part")
                async with self._downloads:
                    await download(self._client, url, partial, self._config.download)
                os.replace(partial, destination)
            return destination
        if source is StorageSourceType.INLINE:
            inline = decode_inline(spec.url, self._config.max_inline_bytes)
            destination = folder / safe_file_name(spec.name or "", "module.wasm")
            if not destination.exists():
                destination.write_bytes(inline.data)
            return destination
        raise InputError(f"module source {source.value} is not supported")
