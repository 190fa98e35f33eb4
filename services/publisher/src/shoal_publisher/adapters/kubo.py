"""The ipfs publisher's view of a kubo RPC API: aioipfs for real, a dict for tests."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aioipfs

from shoal_common.cid import cid_of_path
from shoal_publisher.domain.models import PublishError, TransientPublishError


class AioipfsKubo:
    """:class:`~shoal_publisher.domain.ports.KuboClient` through aioipfs."""

    def __init__(self, url: str) -> None:
        parsed = urlsplit(url)
        if not parsed.hostname:
            raise ValueError(f"not a kubo RPC URL: {url!r} (e.g. http://127.0.0.1:5001)")
        self.url = url
        self._host = parsed.hostname
        self._port = parsed.port or 5001
        self._scheme = parsed.scheme or "http"
        self._client: Any = None

    def _get(self) -> Any:
        # aiohttp sessions must be made inside the running loop: build on first use.
        if self._client is None:
            self._client = aioipfs.AsyncIPFS(host=self._host, port=self._port, scheme=self._scheme)
        return self._client

    async def add_path(self, path: Path) -> str:
        root: str | None = None
        try:
            # hidden=True: Shoal's CIDs include dotfiles (ADR 0003), so must the upload.
            async for entry in self._get().add(
                str(path), recursive=True, hidden=True, pin=True, cid_version=0
            ):
                root = entry.get("Hash")
        except aioipfs.APIError as exc:
            raise PublishError(f"kubo refused the result: {exc.message}") from exc
        except (aioipfs.IPFSConnectionError, aioipfs.UnknownAPIError, OSError) as exc:
            raise TransientPublishError(f"kubo at {self.url} unreachable: {exc!r}") from exc
        if not root:
            raise TransientPublishError(f"kubo at {self.url} answered the add with nothing")
        return str(root)

    async def pin(self, cid: str) -> None:
        try:
            async for _ in self._get().pin.add(cid, recursive=True, progress=False):
                pass
        except aioipfs.APIError as exc:
            raise PublishError(f"kubo could not pin {cid}: {exc.message}") from exc
        except (aioipfs.IPFSConnectionError, aioipfs.UnknownAPIError, OSError) as exc:
            raise TransientPublishError(f"kubo at {self.url} unreachable: {exc!r}") from exc

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


class FakeKubo:
    """Records what was added and pinned; CIDs computed the way kubo would."""

    def __init__(self) -> None:
        self.added: dict[str, Path] = {}
        self.pinned: set[str] = set()

    async def add_path(self, path: Path) -> str:
        cid = await asyncio.to_thread(cid_of_path, path)
        self.added[cid] = path
        return cid

    async def pin(self, cid: str) -> None:
        if cid not in self.added:
            raise PublishError(f"kubo could not pin {cid}: not found")
        self.pinned.add(cid)

    async def close(self) -> None:
        return None
