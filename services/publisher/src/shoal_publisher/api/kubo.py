"""The subset of kubo's RPC API (``/api/v0``) that aioipfs and IPFS tooling use.

``add`` answers what kubo answers, line for line (NDJSON of ``{"Name", "Hash", "Size"}``,
``Size`` being the DAG size as a string), with kubo's CIDs: the store's CIDs are kubo's
(ADR 0003). Options that would make kubo give *other* CIDs (CIDv1, raw leaves, another chunker
or hash, trickle, inlining) are refused rather than answered with a CID kubo would not give.
Errors are kubo's shape: HTTP 500 with ``{"Message", "Code": 0, "Type": "error"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import stat
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from shoal_common.cid import walk_dag
from shoal_common.content_store import ContentNotFoundError, ContentStore
from shoal_publisher.api import dagpb, tarstream
from shoal_publisher.api.content import capped
from shoal_publisher.api.deps import ContentContext, ContentDep
from shoal_publisher.api.multipart import (
    UNNAMED,
    MultipartError,
    Part,
    boundary_of,
    read_into_tree,
)
from shoal_publisher.streams import consume_in_thread, iterate_in_thread

router = APIRouter(prefix="/api/v0", tags=["kubo"])

KUBO_VERSION = "0.24.0"
_TRUE = ("true", "1", "")
_CHUNK = 1 << 20


class KuboError(Exception):
    """An error answered the way kubo answers errors."""

    def __init__(self, message: str, *, status: int = 500) -> None:
        super().__init__(message)
        self.message = message
        self.status = status

    def response(self) -> JSONResponse:
        return JSONResponse(
            {"Message": self.message, "Code": 0, "Type": "error"}, status_code=self.status
        )


def _flag(request: Request, name: str, default: bool = False) -> bool:
    value = request.query_params.get(name)
    if value is None:
        return default
    return value.lower() in _TRUE


def _arg(request: Request) -> str:
    arg = request.query_params.get("arg")
    if not arg:
        raise KuboError('argument "ipfs-path" is required', status=400)
    return arg


def _split_path(arg: str) -> tuple[str, list[str]]:
    path = arg.strip()
    if path.startswith("/ipfs/"):
        path = path[len("/ipfs/") :]
    elif path.startswith("/"):
        raise KuboError(f"unsupported path namespace: {arg}")
    cid, *rest = path.split("/")
    names = [n for n in rest if n]
    if any(n in (".", "..") for n in names):
        raise KuboError(f"invalid path {arg!r}")
    return cid, names


def _resolve(store: ContentStore, arg: str) -> str:
    cid, names = _split_path(arg)
    try:
        return dagpb.resolve(store.get_block, cid, names)
    except ValueError as exc:  # DagError, or an invalid CID
        raise KuboError(f"{arg}: {exc}") from exc


async def _resolved(content: ContentContext, arg: str) -> tuple[str, Path, str, int]:
    cid = await asyncio.to_thread(_resolve, content.store, arg)
    if not await asyncio.to_thread(content.store.has, cid):
        raise KuboError(f"block was not found locally (offline): ipld: could not find {cid}")
    path, kind, size = await content.locate(cid)
    return cid, path, kind, size


# --- add ----------------------------------------------------------------------------------------

_REFUSED = {
    "raw-leaves": "raw leaves",
    "trickle": "the trickle layout",
    "inline": "inlined blocks",
    "nocopy": "the filestore",
}


def _check_add_options(request: Request) -> None:
    q = request.query_params
    problems = [what for key, what in _REFUSED.items() if _flag(request, key)]
    if q.get("cid-version", "0") != "0":
        problems.append(f"CID version {q['cid-version']}")
    if q.get("chunker", "size-262144") not in ("size-262144", "default"):
        problems.append(f"chunker {q['chunker']}")
    if q.get("hash", "sha2-256") != "sha2-256":
        problems.append(f"hash {q['hash']}")
    if problems:
        raise KuboError(
            "this kubo API gives kubo's default CIDs only (CIDv0, 256 KiB chunks, balanced "
            f"layout, sha2-256); not supported: {', '.join(problems)}",
            status=400,
        )


def _add_lines(root: Path, parts: list[Part], *, wrap: bool) -> list[dict[str, str]]:
    """kubo's add output for the tree under ``root``: files, then folders deepest first."""
    tops: list[str] = []
    for part in parts:
        top = part.path.split("/")[0] if part.path else ""
        if top not in tops:
            tops.append(top)
    files: list[dict[str, str]] = []
    folders: list[dict[str, str]] = []
    for top in tops:
        _entries(root / (top or UNNAMED), top, files, folders)
    lines = files + folders
    if wrap:
        wrapper = root.parent / "wrap"
        wrapper.mkdir()
        for top in tops:
            os.rename(root / (top or UNNAMED), wrapper / (top or UNNAMED))
        os.rename(wrapper, root / "__wrapper__")
        wrapped_files: list[dict[str, str]] = []
        wrapped_folders: list[dict[str, str]] = []
        _entries(root / "__wrapper__", "", wrapped_files, wrapped_folders)
        lines.append({**wrapped_folders[-1], "Name": ""})
    return lines


def _entries(
    path: Path, name: str, files: list[dict[str, str]], folders: list[dict[str, str]]
) -> None:
    sizes: dict[str, int] = {}
    for item in walk_dag(path, leaf_bytes=True):
        assert item.data is not None
        # A node's DAG size (kubo's "Size") counts its block and every block below it.
        rel = item.path
        while True:
            sizes[rel] = sizes.get(rel, 0) + len(item.data)
            if not rel:
                break
            rel = rel.rpartition("/")[0]
        if item.root is not None:
            full = "/".join(p for p in (name, item.path) if p)
            line = {"Name": full or item.cid, "Hash": item.cid, "Size": str(sizes[item.path])}
            (files if item.root == "file" else folders).append(line)


def _add(
    reader: Any,
    boundary: bytes,
    work: Path,
    store: ContentStore,
    *,
    limit: int,
    keep: bool,
    wrap: bool,
) -> list[dict[str, str]]:
    root = work / "tree"
    root.mkdir()
    try:
        parts = read_into_tree(reader, boundary, root, max_bytes=limit)
    except OSError as exc:
        raise MultipartError(f"cannot lay out the upload: {exc}") from exc
    if not parts:
        raise MultipartError("the upload holds no file")
    lines = _add_lines(root, parts, wrap=wrap)
    if keep:
        for entry in sorted(os.listdir(root)):
            store.put_path(root / entry)
    return lines


@router.post("/add")
async def add(request: Request, content: ContentDep) -> Response:
    """``ipfs add``: store what the multipart body holds; NDJSON lines like kubo's."""
    _check_add_options(request)
    try:
        boundary = boundary_of(request.headers.get("Content-Type", ""))
    except MultipartError as exc:
        raise KuboError(str(exc), status=400) from exc
    keep = not _flag(request, "only-hash")
    wrap = _flag(request, "wrap-with-directory")
    async with content.workdir() as work:
        try:
            lines = await consume_in_thread(
                capped(request, content.max_upload_bytes),
                lambda r: _add(
                    r,
                    boundary,
                    work,
                    content.store,
                    limit=content.max_upload_bytes,
                    keep=keep,
                    wrap=wrap,
                ),
            )
        except (MultipartError, ValueError) as exc:
            raise KuboError(str(exc), status=400) from exc
    if _flag(request, "silent"):
        lines = []
    elif _flag(request, "quieter"):
        lines = lines[-1:]
    body = b"".join(orjson.dumps(line) + b"\n" for line in lines)
    return Response(body, media_type="application/json", headers={"X-Chunked-Output": "1"})


# --- reads --------------------------------------------------------------------------------------


def _file_range(path: Path, offset: int, length: int | None) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        handle.seek(offset)
        remaining = length
        while remaining is None or remaining > 0:
            want = _CHUNK if remaining is None else min(_CHUNK, remaining)
            data = handle.read(want)
            if not data:
                return
            if remaining is not None:
                remaining -= len(data)
            yield data


@router.post("/cat")
@router.get("/cat", include_in_schema=False)
async def cat(request: Request, content: ContentDep) -> Response:
    """``ipfs cat``: a file's bytes (``offset``/``length`` supported)."""
    _, path, kind, size = await _resolved(content, _arg(request))
    if kind != "file":
        raise KuboError("this dag node is a directory")
    offset = int(request.query_params.get("offset", "0") or 0)
    raw_length = request.query_params.get("length")
    length = int(raw_length) if raw_length not in (None, "", "-1") else None
    if offset < 0 or offset > size:
        raise KuboError(f"invalid offset {offset} for a {size}-byte file", status=400)
    sent = size - offset if length is None else min(length, size - offset)
    return StreamingResponse(
        iterate_in_thread(lambda: _file_range(path, offset, length)),
        media_type="text/plain",
        headers={"X-Stream-Output": "1", "Content-Length": str(sent)},
    )


def _gzip(chunks: Iterator[bytes]) -> Iterator[bytes]:
    compressor = zlib.compressobj(wbits=31)  # 31: gzip framing
    for chunk in chunks:
        out = compressor.compress(chunk)
        if out:
            yield out
    yield compressor.flush()


@router.post("/get")
@router.get("/get", include_in_schema=False)
async def get(request: Request, content: ContentDep) -> Response:
    """``ipfs get``: a tar whose top entry is named after the argument's last segment."""
    arg = _arg(request)
    cid, path, kind, size = await _resolved(content, arg)
    _, names = _split_path(arg)
    top = names[-1] if names else cid
    members = await asyncio.to_thread(
        tarstream.plan, path, prefix=f"{top}/" if kind == "dir" else "", file_name=top
    )
    headers = {"X-Stream-Output": "1", "X-Content-Length": str(size)}
    if _flag(request, "compress"):
        return StreamingResponse(
            iterate_in_thread(lambda: _gzip(tarstream.write_chunks(members))),
            media_type="application/x-gzip",
            headers=headers,
        )
    headers["Content-Length"] = str(tarstream.length(members))
    return StreamingResponse(
        iterate_in_thread(lambda: tarstream.write_chunks(members)),
        media_type="application/x-tar",
        headers=headers,
    )


def _child_kind(store: ContentStore, base: Path | None, link: dagpb.Link) -> tuple[bool, int]:
    """(is a directory, file size) of a directory entry."""
    if base is not None:
        # The stored tree is on disk: a stat is much cheaper than loading the child's block
        # (a file leaf is rebuilt and re-hashed on every block read).
        with contextlib.suppress(OSError):
            st = os.lstat(base / link.name)
            return stat.S_ISDIR(st.st_mode), st.st_size
    child = dagpb.load(store.get_block, link.cid)
    return child.unixfs_type in (dagpb.UNIXFS_DIRECTORY, dagpb.UNIXFS_HAMT), child.filesize


def _ls(store: ContentStore, arg: str) -> dict[str, Any]:
    cid = _resolve(store, arg)
    try:
        node = dagpb.load(store.get_block, cid)
        links: list[dict[str, Any]] = []
        if node.unixfs_type in (dagpb.UNIXFS_DIRECTORY, dagpb.UNIXFS_HAMT):
            base: Path | None = None
            with contextlib.suppress(ContentNotFoundError, ValueError):
                base = store.path_of(cid)
            for link in dagpb.entries(store.get_block, node):
                is_dir, size = _child_kind(store, base, link)
                links.append(
                    {
                        "Name": link.name,
                        "Hash": link.cid,
                        "Size": 0 if is_dir else size,
                        "Type": 1 if is_dir else 2,
                        "Target": "",
                    }
                )
    except ValueError as exc:
        raise KuboError(f"{arg}: {exc}") from exc
    return {"Objects": [{"Hash": arg, "Links": links}]}


@router.post("/ls")
@router.get("/ls", include_in_schema=False)
async def ls(request: Request, content: ContentDep) -> Response:
    """``ipfs ls``: a directory's entries with their CIDs, sizes and types."""
    listing = await asyncio.to_thread(_ls, content.store, _arg(request))
    if _flag(request, "stream"):
        objects = listing["Objects"]
        return Response(
            b"".join(orjson.dumps({"Objects": [o]}) + b"\n" for o in objects),
            media_type="application/json",
        )
    return JSONResponse(listing)


@router.post("/block/get")
@router.get("/block/get", include_in_schema=False)
async def block_get(request: Request, content: ContentDep) -> Response:
    """``ipfs block get``: one raw dag-pb block."""
    arg = _arg(request)
    cid, _ = _split_path(arg)
    block = await asyncio.to_thread(content.store.get_block, cid)
    if block is None:
        raise KuboError(f"block was not found locally (offline): ipld: could not find {cid}")
    return Response(block, media_type="application/octet-stream")


@router.post("/pin/add")
async def pin_add(request: Request, content: ContentDep) -> Response:
    """``ipfs pin add``: everything stored here stays; answers once it is known to be here."""
    cid, _, _, _ = await _resolved(content, _arg(request))
    body = orjson.dumps({"Pins": [cid]}) + b"\n"
    return Response(body, media_type="application/json")


@router.post("/version")
@router.get("/version", include_in_schema=False)
async def version() -> Response:
    """``ipfs version``: a kubo version aioipfs accepts, marked as Shoal's."""
    system = f"{platform.machine()}/{platform.system().lower()}"
    return JSONResponse(
        {"Version": KUBO_VERSION, "Commit": "shoal", "Repo": "15", "System": system, "Golang": ""}
    )


@router.post("/id")
@router.get("/id", include_in_schema=False)
async def node_id(request: Request) -> Response:
    """``ipfs id``: who answers (Shoal's content store, not a libp2p peer)."""
    return JSONResponse(
        {
            "ID": request.app.state.node_name,
            "PublicKey": "",
            "Addresses": [],
            "AgentVersion": f"kubo/{KUBO_VERSION}/shoal",
            "ProtocolVersion": "ipfs/0.1.0",
            "Protocols": [],
        }
    )
