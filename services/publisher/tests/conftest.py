"""Fixtures of the publisher's tests: real NATS and databases, and apps on loopback ports."""

from __future__ import annotations

import asyncio
import io
import tarfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from shoal_common.natsserver import free_port
from shoal_common.testing import database_url, nats_server, postgres_url

__all__ = ["database_url", "nats_server", "postgres_url"]

Serve = Callable[[Any], Awaitable[str]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Serve ASGI apps on loopback ports for the test; returns each app's base URL."""
    running: list[tuple[uvicorn.Server, asyncio.Task[None]]] = []

    async def start(app: Any) -> str:
        port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                host="127.0.0.1",
                port=port,
                lifespan="off",
                log_level="warning",
                access_log=False,
            )
        )
        task = asyncio.create_task(server.serve())
        running.append((server, task))
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        return f"http://127.0.0.1:{port}"

    yield start
    for server, _ in running:
        server.should_exit = True
    await asyncio.gather(*(t for _, t in running), return_exceptions=True)


class Kit:
    """Builders of result folders and tars (a fixture: test modules cannot import conftest)."""

    @staticmethod
    def tree(root: Path, files: dict[str, bytes]) -> Path:
        """A folder with these files (relative paths), e.g. a results folder."""
        root.mkdir(parents=True, exist_ok=True)
        for rel, data in files.items():
            target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        return root

    @staticmethod
    def tar_of(root: Path) -> bytes:
        """A tar of a folder's entries (members relative to it, as compute nodes send them)."""
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for child in sorted(root.iterdir()):
                tar.add(child, arcname=child.name)
        return buf.getvalue()

    @staticmethod
    def evil_tar(name: str, data: bytes = b"x", *, symlink_to: str | None = None) -> bytes:
        """A tar with one member that tries to escape (``..``, absolute name, symlink)."""
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo(name)
            if symlink_to is not None:
                info.type = tarfile.SYMTYPE
                info.linkname = symlink_to
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()


@pytest.fixture
def kit() -> Kit:
    return Kit()
