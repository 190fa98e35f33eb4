"""``GET /content/{cid}``: results (and cached inputs) of this node, for the publisher.

A directory is sent as a tar stream (``application/x-tar``, members relative to the folder),
a file as its raw bytes (``application/octet-stream``), ``X-Shoal-Kind: directory|file``
saying which: the same convention as the Shoal content store, so one client reads either.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, Response, StreamingResponse

from shoal_common.cid import is_valid_cid
from shoal_common.errors import InvalidInput, NotFound, Unavailable
from shoal_compute.adapters.content import ContentCache


# async: FastAPI runs a plain def dependency on a worker thread for every request.
async def get_cache(request: Request) -> ContentCache:
    cache: ContentCache = request.app.state.content_cache
    return cache


CacheDep = Annotated[ContentCache, Depends(get_cache)]

router = APIRouter()


@router.get("/content/{cid}", summary="Download stored content by CID")
async def get_content(cid: str, cache: CacheDep) -> Response:
    if not is_valid_cid(cid):
        raise InvalidInput(f"{cid!r} is not a valid CID")
    try:
        found = await cache.locate(cid)
    except OSError as exc:  # a result kept in its row could not be written out (disk full)
        raise Unavailable(f"{cid} cannot be served now: {exc.strerror or exc}") from exc
    if found is None:
        raise NotFound(f"{cid} is not stored on this node")
    headers = {
        "X-Content-CID": cid,
        "X-Shoal-Kind": "file" if found.kind == "file" else "directory",
    }
    if found.kind == "file":
        return FileResponse(found.path, media_type="application/octet-stream", headers=headers)
    return StreamingResponse(
        cache.tar_stream(found), media_type="application/x-tar", headers=headers
    )
