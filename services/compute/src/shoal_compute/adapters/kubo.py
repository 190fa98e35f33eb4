"""Fetching CIDs from an IPFS node's RPC API (kubo, or the content store's compatible subset).

Uses aioipfs for the connection, but streams ``/api/v0/get`` (a tar) into our own safe
extractor rather than aioipfs' ``get``, which unpacks with plain ``tarfile.extractall`` and so
would trust the daemon with our filesystem.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from shoal_common.content_store import UnsafeArchiveError, safe_extract_tar
from shoal_compute.inputs.errors import InputError, InputUnavailable

_CHUNK = 1024 * 1024


class CidFetcher(Protocol):
    """Puts the content of a CID under a fresh directory and returns where it landed."""

    async def fetch(self, cid: str, scratch: Path, *, max_bytes: int) -> Path: ...

    async def close(self) -> None: ...


class KuboFetcher:
    """:class:`CidFetcher` over a kubo RPC URL (``http://127.0.0.1:5001``)."""

    def __init__(self, rpc_url: str, *, timeout_s: float = 600.0) -> None:
        parts = urlsplit(rpc_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"kubo RPC URL {rpc_url!r} must look like http://host:5001")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 5001)
        self._scheme = parts.scheme
        self._timeout_s = timeout_s
        self._client: Any = None

    def _api(self) -> Any:
        # Created lazily: aioipfs binds its aiohttp session to the running loop.
        if self._client is None:
            import aioipfs

            self._client = aioipfs.AsyncIPFS(host=self._host, port=self._port, scheme=self._scheme)
        return self._client

    async def fetch(self, cid: str, scratch: Path, *, max_bytes: int) -> Path:
        client = self._api()
        archive = scratch / "kubo.tar"
        size = 0
        try:
            async with client.session.post(
                client.api_endpoint("get"),
                params={"arg": cid, "archive": "true"},
                auth=client.auth,
            ) as response:
                if response.status >= 500 and "not found" not in (await _peek(response)):
                    raise InputUnavailable(f"IPFS node answered HTTP {response.status} for {cid}")
                if response.status != 200:
                    raise InputUnavailable(f"{cid} not found on the IPFS node")
                with archive.open("wb") as out:
                    async for chunk in response.content.iter_chunked(_CHUNK):
                        size += len(chunk)
                        if size > max_bytes:
                            raise InputError(f"{cid} is larger than {max_bytes} bytes")
                        out.write(chunk)
        except (TimeoutError, OSError) as exc:
            raise InputUnavailable(f"IPFS node unreachable: {exc}") from exc
        except Exception as exc:
            if isinstance(exc, InputError | InputUnavailable):
                raise
            raise InputUnavailable(f"IPFS fetch of {cid} failed: {exc}") from exc
        unpacked = scratch / "unpacked"
        try:
            await asyncio.to_thread(_extract, archive, unpacked, max_bytes)
        except UnsafeArchiveError as exc:
            raise InputError(f"IPFS node sent an unsafe archive for {cid}: {exc}") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                archive.unlink()
        entries = os.listdir(unpacked)
        if len(entries) != 1:
            raise InputUnavailable(f"IPFS node sent {len(entries)} top-level entries for {cid}")
        return unpacked / entries[0]

    async def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.close()
            self._client = None


async def _peek(response: Any) -> str:
    with contextlib.suppress(Exception):
        return str(await response.text()).lower()[:500]
    return ""


def _extract(archive: Path, dest: Path, max_bytes: int) -> None:
    try:
        with archive.open("rb") as handle:
            safe_extract_tar(handle, dest, max_bytes=max_bytes)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
