"""The shared :class:`~shoal_common.content_store.ContentStore` behind an async face."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path

from shoal_common.content_store import ContentStore


class AsyncContentStore:
    """:class:`~shoal_publisher.domain.ports.LocalContent`: file work on worker threads, the
    keyed lookup on the event loop.

    ``has`` is one indexed read of the store's WAL index (tens of microseconds, never waiting
    for a writer); the hop to a thread and back cost a busy process 3 ms p50, waiting for the
    GIL (wasm_e2e, a publish of an already stored result, docs/adr/0019).
    """

    def __init__(self, store: ContentStore) -> None:
        self.store = store

    async def has(self, cid: str) -> bool:
        return self.store.has(cid)

    async def put_path(self, path: Path) -> str:
        return await asyncio.to_thread(self.store.put_path, path)

    async def path_of(self, cid: str) -> Path:
        return await asyncio.to_thread(self.store.path_of, cid)

    async def put_files(self, files: Mapping[str, bytes]) -> str:
        return await asyncio.to_thread(self.store.put_files, files)
