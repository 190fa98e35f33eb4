"""The shared :class:`~shoal_common.content_store.ContentStore` behind an async face."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path

from shoal_common.content_store import ContentStore


class AsyncContentStore:
    """:class:`~shoal_publisher.domain.ports.LocalContent`: store calls on worker threads."""

    def __init__(self, store: ContentStore) -> None:
        self.store = store

    async def has(self, cid: str) -> bool:
        return await asyncio.to_thread(self.store.has, cid)

    async def put_path(self, path: Path) -> str:
        return await asyncio.to_thread(self.store.put_path, path)

    async def path_of(self, cid: str) -> Path:
        return await asyncio.to_thread(self.store.path_of, cid)

    async def put_files(self, files: Mapping[str, bytes]) -> str:
        return await asyncio.to_thread(self.store.put_files, files)
