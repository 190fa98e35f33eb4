"""What the HTTP routes share: the content store, a staging area and the upload limit."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request

from shoal_common.cid import is_valid_cid
from shoal_common.content_store import ContentNotFoundError, ContentStore
from shoal_common.errors import InvalidInput, NotFound


@dataclass
class ContentContext:
    store: ContentStore
    staging: Path
    max_upload_bytes: int

    @asynccontextmanager
    async def workdir(self) -> AsyncIterator[Path]:
        """A fresh folder for one upload, removed afterwards whatever happens."""

        def make() -> Path:
            self.staging.mkdir(parents=True, exist_ok=True)
            return Path(tempfile.mkdtemp(prefix="upload-", dir=self.staging))

        path = await asyncio.to_thread(make)
        try:
            yield path
        finally:
            await asyncio.to_thread(shutil.rmtree, path, True)

    async def locate(self, cid: str) -> tuple[Path, str, int]:
        """(path, "file"|"dir", content size) of stored content; 400 / 404 otherwise."""
        if not is_valid_cid(cid):
            raise InvalidInput(f"{cid!r} is not a valid CID")

        def find() -> tuple[Path, str, int]:
            return self.store.path_of(cid), self.store.kind_of(cid), self.store.size_of(cid)

        try:
            return await asyncio.to_thread(find)
        except (ContentNotFoundError, ValueError) as exc:
            raise NotFound(f"no content with CID {cid} is stored here") from exc


async def _context(request: Request) -> ContentContext:
    context: ContentContext = request.app.state.content
    return context


ContentDep = Annotated[ContentContext, Depends(_context)]
