"""Shoal's content store over HTTP: upload (``POST /content``), download, ``HEAD``.

Downloads: a file as its raw bytes, a directory as a tar stream whose members are relative
to the directory (no top folder); ``X-Shoal-Kind: file|directory`` says which, and
``Content-Length`` is always set. Uploads: a tar stream of a directory, or a single file's
raw bytes with ``?filename=`` (or ``?kind=file``); answered with ``{"cid": ...}``.
Everything streams: memory use does not grow with the size of the content.
"""

from __future__ import annotations

import asyncio
import bz2
import gzip
import io
import lzma
import tarfile
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response, StreamingResponse
from pydantic import BaseModel

from shoal_common.content_store import UnsafeArchiveError, safe_extract_tar
from shoal_common.errors import InvalidInput, PayloadTooLarge
from shoal_publisher import metrics
from shoal_publisher.api import tarstream
from shoal_publisher.api.deps import ContentDep
from shoal_publisher.streams import consume_in_thread, iterate_in_thread

router = APIRouter(tags=["content"])

_CHUNK = 1 << 20


class UploadResult(BaseModel):
    cid: str
    kind: str
    size: int


class _FileResponse(FileResponse):
    chunk_size = _CHUNK  # starlette's 64 KiB costs a thread hop per 64 KiB


def _headers(cid: str, kind: str, length: int) -> dict[str, str]:
    return {
        "X-Shoal-Kind": "file" if kind == "file" else "directory",
        "X-Content-CID": cid,
        "Content-Length": str(length),
    }


async def capped(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The request body, refusing (413) more than ``limit`` bytes."""
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:
            raise PayloadTooLarge(f"the upload is larger than the {limit}-byte limit")
        metrics.CONTENT_BYTES.labels("in").inc(len(chunk))
        yield chunk


def _check_declared_length(request: Request, limit: int) -> None:
    declared = request.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the upload is {declared} bytes, over the {limit}-byte limit")


class _ExpansionCap(io.RawIOBase):
    """The tar stream as it expands, refused (413) past ``limit`` bytes.

    The wire cap alone lets a small compressed body expand into thousands of empty entries:
    no file content for the extractor to count, but a header block in the stream and an inode
    on disk each. Counting the decompressed stream holds a compressed upload to the same cap
    as an uncompressed one, headers included.
    """

    def __init__(self, source: io.BufferedReader, limit: int) -> None:
        super().__init__()
        head = source.peek(6)[:6]
        # Closed with this stream (close below); a context manager cannot span the reads.
        self._inner: io.BufferedIOBase
        if head.startswith(b"\x1f\x8b"):
            self._inner = gzip.GzipFile(fileobj=source, mode="rb")
        elif head.startswith(b"BZh"):
            self._inner = bz2.BZ2File(source, mode="rb")
        elif head.startswith(b"\xfd7zXZ\x00"):
            self._inner = lzma.LZMAFile(source, mode="rb")  # noqa: SIM115
        else:
            self._inner = source
        self._compressed = self._inner is not source
        self._limit = limit
        self._seen = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        try:
            data = self._inner.read(len(view))
        except (OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
            if not self._compressed:
                raise
            # What tarfile says of a corrupt stream it decompresses itself: a 400, not a 500.
            raise tarfile.ReadError(f"corrupt compressed stream: {exc}") from exc
        self._seen += len(data)
        if self._seen > self._limit:
            raise PayloadTooLarge(
                f"the archive expands past the {self._limit}-byte upload limit "
                "(file content and tar headers both count): send fewer or smaller entries"
            )
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if self._compressed:
            self._inner.close()
        super().close()


def _extract_capped(source: IO[bytes], target: Path, limit: int) -> None:
    assert isinstance(source, io.BufferedReader)
    stream = io.BufferedReader(_ExpansionCap(source, limit), buffer_size=_CHUNK)
    safe_extract_tar(stream, target, max_bytes=limit)


def _write_file(source: IO[bytes], target: Path) -> None:
    with target.open("xb") as out:
        while chunk := source.read(_CHUNK):
            out.write(chunk)


@router.post("/content", response_model=UploadResult)
async def upload(
    request: Request,
    content: ContentDep,
    filename: str | None = None,
    kind: str | None = None,
) -> Any:
    """Store a directory (tar stream) or a file (raw bytes, ``?filename=``); returns its CID."""
    limit = content.max_upload_bytes
    _check_declared_length(request, limit)
    as_file = kind == "file" or (kind is None and filename is not None)
    if kind not in (None, "file", "directory", "dir"):
        raise InvalidInput(f"kind must be 'file' or 'directory', not {kind!r}")
    async with content.workdir() as work:
        target = work / "content"
        try:
            if as_file:
                await consume_in_thread(capped(request, limit), lambda r: _write_file(r, target))
            else:
                await consume_in_thread(
                    capped(request, limit),
                    lambda r: _extract_capped(r, target, limit),
                )
        except UnsafeArchiveError as exc:
            raise InvalidInput(f"refused archive: {exc}") from exc
        except tarfile.TarError as exc:
            raise InvalidInput(
                f"the body is not a tar stream ({exc}); send a file with ?filename=NAME"
            ) from exc
        try:
            cid = await asyncio.to_thread(content.store.put_path, target)
        except ValueError as exc:  # a symlink or special file inside the archive
            raise InvalidInput(f"refused content: {exc}") from exc
    size = await asyncio.to_thread(content.store.size_of, cid)
    return UploadResult(cid=cid, kind="file" if as_file else "directory", size=size)


@router.get("/content/{cid}")
async def download(cid: str, content: ContentDep) -> Response:
    """The content: raw bytes for a file, a tar stream for a directory."""
    path, kind, size = await content.locate(cid)
    if kind == "file":
        metrics.CONTENT_BYTES.labels("out").inc(size)
        return _FileResponse(
            path,
            media_type="application/octet-stream",
            headers={"X-Shoal-Kind": "file", "X-Content-CID": cid},
        )
    members = await asyncio.to_thread(tarstream.plan, path)
    length = tarstream.length(members)
    metrics.CONTENT_BYTES.labels("out").inc(length)
    return StreamingResponse(
        iterate_in_thread(lambda: tarstream.write_chunks(members)),
        media_type="application/x-tar",
        headers=_headers(cid, kind, length),
    )


@router.head("/content/{cid}")
async def head(cid: str, content: ContentDep) -> Response:
    """What a GET would send, without the body."""
    path, kind, size = await content.locate(cid)
    if kind == "file":
        return Response(media_type="application/octet-stream", headers=_headers(cid, kind, size))
    members = await asyncio.to_thread(tarstream.plan, path)
    return Response(
        media_type="application/x-tar", headers=_headers(cid, kind, tarstream.length(members))
    )
