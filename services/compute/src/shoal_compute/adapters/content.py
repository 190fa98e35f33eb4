"""The node's local content, addressed by CID: fetched inputs and its own results.

Two places, one face:

* a :class:`shoal_common.content_store.ContentStore` under ``<state_dir>/content`` holds
  inputs fetched from elsewhere (so the next job over the same CID finds them here);
* results stay where the run wrote them (``executions/<id>/results``) and are indexed by their
  CID (recent ones in memory, all of them in the executions table). Copying each results
  folder into the store would cost a copy, a re-hash and an fsync on every job's critical path
  for nothing: the folder is already on disk and its CID already known.

ContentStore methods block (disk, SQLite); they run on worker threads here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import tarfile
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from shoal_common.cid import cid_to_multihash, multihash_to_cid
from shoal_common.content_store import ContentNotFoundError, ContentStore

__all__ = ["ContentCache", "ContentNotFoundError", "Located"]

_TAR_CHUNK_QUEUE = 8
_COPY_BUFFER = 1024 * 1024

ResultLookup = Callable[[str], Awaitable[Path | None]]


@dataclass(frozen=True)
class Located:
    path: Path
    kind: Literal["file", "dir"]
    in_store: bool  # False: a results folder outside the store


def canonical(cid: str) -> str | None:
    """The CIDv0 spelling, so v0 and v1 names of one dag-pb object meet; None if invalid."""
    try:
        return multihash_to_cid(cid_to_multihash(cid))
    except ValueError:
        return None


class ContentCache:
    """This node's content by CID: the input store plus the index of its results."""

    def __init__(self, root: Path, *, remember: int = 1000) -> None:
        self.root = root
        self._store = ContentStore(root)
        self._remember = remember
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._results: OrderedDict[str, Path] = OrderedDict()
        self._lookup: ResultLookup | None = None
        self._load_recent()

    def _load_recent(self) -> None:
        """Seed the locality hints from what a previous run of the node stored."""
        objects = self.root / "objects"
        if not objects.exists():
            return
        paths = sorted(objects.iterdir(), key=lambda p: p.stat().st_mtime)
        for path in paths[-self._remember :]:
            self._recent[path.name] = None

    def set_result_lookup(self, lookup: ResultLookup) -> None:
        """Where to find results older than the in-memory index (the executions table), and
        to have a result's folder written out when it is still kept in its row."""
        self._lookup = lookup

    @property
    def store(self) -> ContentStore:
        return self._store

    def _remember_cid(self, cid: str) -> None:
        self._recent.pop(cid, None)
        self._recent[cid] = None
        while len(self._recent) > self._remember:
            self._recent.popitem(last=False)

    def recent(self, limit: int) -> list[str]:
        """Up to ``limit`` CIDs held here, newest first (data-locality hints)."""
        out: list[str] = []
        for cid in reversed(self._recent):
            if len(out) >= limit:
                break
            out.append(cid)
        return out

    # --- writes ---

    def add_result(self, cid: str, folder: Path) -> None:
        """Index a finished results folder under its CID (no copy)."""
        key = canonical(cid) or cid
        self._results.pop(key, None)
        self._results[key] = folder
        while len(self._results) > self._remember:
            self._results.popitem(last=False)
        self._remember_cid(cid)

    async def put_path(self, path: Path) -> str:
        """Copy a file or tree into the store; returns its CID."""
        cid = await asyncio.to_thread(self._store.put_path, path)
        self._remember_cid(cid)
        return cid

    async def put_bytes(self, data: bytes) -> str:
        cid = await asyncio.to_thread(self._store.put_bytes, data)
        self._remember_cid(cid)
        return cid

    # --- reads ---

    def has(self, cid: str) -> bool:
        """Stored or a recent result. Blocking but cheap (one indexed SQLite read)."""
        key = canonical(cid)
        if key is None:
            return False
        return key in self._results or self._store.has(key)

    async def locate(self, cid: str) -> Located | None:
        """Where the content of ``cid`` is on this node, if anywhere."""
        key = canonical(cid)
        if key is None:
            return None
        folder = self._results.get(key)
        if folder is not None and _is_dir(folder):
            return Located(folder, "dir", in_store=False)
        # Older than the index, or not written yet: a result kept in its execution's row
        # (ADR 0030) gets its folder from the lookup, which may pick another execution with
        # the same CID, so that folder is indexed for the next read.
        if self._lookup is not None and not self._store.has(key):
            folder = await self._lookup(key)
            if folder is not None:
                if not _is_dir(folder):
                    return None  # removed behind our back
                self.add_result(key, folder)
                return Located(folder, "dir", in_store=False)
        try:
            path = await asyncio.to_thread(self._store.path_of, key)
            kind = await asyncio.to_thread(self._store.kind_of, key)
        except ContentNotFoundError:
            return None
        return Located(path, kind, in_store=True)

    async def path_of(self, cid: str) -> Path:
        """Raises ContentNotFoundError."""
        found = await self.locate(cid)
        if found is None:
            raise ContentNotFoundError(cid)
        return found.path

    async def tar_stream(self, found: Located) -> AsyncIterator[bytes]:
        """A directory as a tar stream (relative members, name order, normalised metadata —
        the content store's format), produced on a thread with backpressure."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(_TAR_CHUNK_QUEUE)
        stop = threading.Event()

        class _Writer:
            def write(self, data: bytes) -> int:
                if stop.is_set():
                    raise BrokenPipeError("reader went away")
                asyncio.run_coroutine_threadsafe(queue.put(bytes(data)), loop).result()
                return len(data)

            def flush(self) -> None:
                return None

        def produce() -> None:
            try:
                export_dir_tar(found.path, _Writer())  # type: ignore[arg-type]
            except BaseException as exc:
                if not stop.is_set():
                    asyncio.run_coroutine_threadsafe(queue.put(exc), loop).result()
                return
            asyncio.run_coroutine_threadsafe(queue.put(None), loop).result()

        producer = asyncio.ensure_future(asyncio.to_thread(produce))
        try:
            while True:
                item = await queue.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            # Unblock a producer waiting on a full queue, then let its thread finish.
            while not producer.done():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
                await asyncio.wait({producer}, timeout=0.01)
            with contextlib.suppress(BaseException):
                producer.result()


def _is_dir(path: Path) -> bool:
    return os.path.isdir(path)


def export_dir_tar(directory: Path, fileobj: IO[bytes]) -> None:
    """Write ``directory`` as a tar stream: members relative to it, in name-byte order,
    mtime 0, root owner, 0755/0644 (the same bytes the content store's export gives)."""
    with tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        _add_tree(tar, directory, "")


def _normalised(info: tarfile.TarInfo, mode: int) -> tarfile.TarInfo:
    info.mtime = 0
    info.mode = mode
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _add_tree(tar: tarfile.TarFile, directory: Path, prefix: str) -> None:
    with os.scandir(directory) as entries:
        names = sorted(os.fsencode(entry.name) for entry in entries)
    for raw in names:
        name = os.fsdecode(raw)
        child = directory / name
        arcname = f"{prefix}{name}"
        mode = os.lstat(child).st_mode
        if stat.S_ISDIR(mode):
            info = _normalised(tarfile.TarInfo(arcname), 0o755)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
            _add_tree(tar, child, f"{arcname}/")
        elif stat.S_ISREG(mode):
            info = _normalised(tarfile.TarInfo(arcname), 0o644)
            with open(child, "rb") as handle:
                info.size = os.fstat(handle.fileno()).st_size
                tar.addfile(info, handle)
        else:
            # cid_of_path refused these when the CID was made; refuse to serve them too.
            raise ValueError(f"not a regular file or directory: {child}")
