"""What publishers need from the outside world, each a Protocol with a real adapter and a fake."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol


class ResultFetcher(Protocol):
    """Downloads a compute node's results (a tar of the folder, or one file's bytes)."""

    async def fetch(self, url: str, workdir: Path) -> Path:
        """Fetch ``url`` into the empty folder ``workdir``; return the content's path.

        Raises :class:`~shoal_publisher.domain.models.PublishError` (transient for network
        trouble and 5xx answers) and refuses unsafe archives.
        """
        ...


class LocalContent(Protocol):
    """The publisher's content store, seen from async code."""

    async def has(self, cid: str) -> bool: ...

    async def put_path(self, path: Path) -> str:
        """Store a file or folder; returns its CID. Raises ValueError on symlinks."""
        ...

    async def path_of(self, cid: str) -> Path:
        """Where stored content lives (read-only)."""
        ...

    async def put_files(self, files: Mapping[str, bytes]) -> str:
        """Store a folder holding exactly these files; returns its CID."""
        ...


class KuboClient(Protocol):
    """The part of a kubo RPC API the ipfs publisher uses."""

    async def add_path(self, path: Path) -> str:
        """``ipfs add -r --hidden --pin`` of a file or folder; returns the root CID."""
        ...

    async def pin(self, cid: str) -> None:
        """``ipfs pin add`` (recursive)."""
        ...

    async def close(self) -> None: ...
