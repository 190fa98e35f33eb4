"""Verified downloads in one pass: receive, write and hash at the same time.

The calling thread reads the HTTP body; a worker thread writes what arrived and hashes it
(a file), or extracts it member by member while hashing (a tar of a directory), through
:mod:`shoal_common.verified_tar`. Hashing and disk writes release the GIL, so receiving and
verifying overlap. The result is written next to ``dest`` under a temporary name and only
moved into place once its CID matches: a corrupted or cut download leaves nothing behind
that looks like a result.
"""

from __future__ import annotations

import os
import queue
import shutil
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path

from shoal_common import verified_tar
from shoal_common.content_store import UnsafeArchiveError

Progress = Callable[[int, int | None], None]

# Network reads (64 KiB each) are handed over in batches of about this many bytes, at most
# _DEPTH batches in flight: a few MiB of memory, whatever the size of the download.
_BATCH = 1 << 20
_DEPTH = 16
_POLL = 0.1


class DownloadError(Exception):
    """What arrived is not the content asked for (wrong CID, unsafe or malformed archive)."""


class _Aborted(Exception):
    """The receiving side gave up (network error, interrupt): stop the worker."""


class _Feed:
    """Batches of chunks from the receiving thread, read piecewise (no copies) by the worker."""

    def __init__(self) -> None:
        self._batches: queue.Queue[list[bytes] | None] = queue.Queue(_DEPTH)
        self._pieces: deque[bytes] = deque()
        self._current = memoryview(b"")
        self._eof = False
        self.aborted = threading.Event()
        self.finished = threading.Event()  # the worker is done (whatever the outcome)

    # --- receiving side

    def put(self, batch: list[bytes] | None) -> bool:
        """Hand over a batch (None: the end); False once the worker stopped reading."""
        while not self.finished.is_set():
            try:
                self._batches.put(batch, timeout=_POLL)
                return True
            except queue.Full:
                continue
        return False

    # --- worker side

    def read(self, n: int) -> memoryview:
        while not self._current:
            if self._pieces:
                self._current = memoryview(self._pieces.popleft())
                continue
            if self._eof:
                return self._current
            try:
                batch = self._batches.get(timeout=_POLL)
            except queue.Empty:
                if self.aborted.is_set():
                    raise _Aborted from None
                continue
            if batch is None:
                self._eof = True
            else:
                self._pieces.extend(batch)
        piece, self._current = self._current[:n], self._current[n:]
        return piece


def _scratch(dest: Path) -> Path:
    """A fresh folder beside ``dest`` (same filesystem, so moving the result is a rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))


def _move_into_place(source: Path, dest: Path) -> None:
    """``source`` becomes ``dest``; into an existing folder, entry by entry, never over one."""
    if not os.path.lexists(dest):
        os.rename(source, dest)
        return
    if source.is_file() and dest.is_file() and not dest.is_symlink():
        os.replace(source, dest)  # a file downloaded again
        return
    if not source.is_dir() or not dest.is_dir() or dest.is_symlink():
        raise DownloadError(f"{dest} exists already")
    entries = sorted(source.iterdir())
    clashes = [e.name for e in entries if os.path.lexists(dest / e.name)]
    if clashes:
        raise DownloadError(f"{dest} already holds {', '.join(clashes)}")
    for entry in entries:
        os.rename(entry, dest / entry.name)
    source.rmdir()


def fetch(
    chunks: Iterable[bytes],
    dest: Path,
    *,
    cid: str,
    directory: bool,
    total: int | None = None,
    progress: Progress | None = None,
) -> Path:
    """Receive ``chunks`` (the content of ``cid``) into ``dest``: a file, or a folder when
    ``directory`` (the chunks are then a tar of it). Raises :class:`DownloadError` when the
    data is not that content; on any error nothing is left at ``dest``."""
    scratch = _scratch(dest)
    landing = scratch / "content"
    feed = _Feed()
    outcome: dict[str, object] = {}

    def work() -> None:
        try:
            if directory:
                outcome["cid"] = verified_tar.extract_tar(feed.read, landing)
            else:
                outcome["cid"] = verified_tar.write_file(feed.read, landing)
        except BaseException as exc:
            outcome["error"] = exc
        finally:
            feed.finished.set()

    worker = threading.Thread(target=work, name="shoal-download", daemon=True)
    worker.start()
    try:
        done = 0
        batch: list[bytes] = []
        batched = 0
        for chunk in chunks:
            batch.append(chunk)
            batched += len(chunk)
            if batched >= _BATCH:
                if not feed.put(batch):
                    break  # the worker stopped early: its error says why
                done += batched
                batch, batched = [], 0
                if progress:
                    progress(done, total)
        else:
            if batch and feed.put(batch):
                done += batched
            feed.put(None)
            if progress:
                progress(done, total)
        worker.join()
    except BaseException:
        feed.aborted.set()
        worker.join()
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    try:
        error = outcome.get("error")
        if isinstance(error, UnsafeArchiveError | ValueError):
            raise DownloadError(f"refused the download of {cid}: {error}") from error
        if isinstance(error, BaseException):
            raise error
        got = outcome["cid"]
        if got != cid:
            raise DownloadError(f"downloaded data has CID {got}, expected {cid}: corrupted")
        _move_into_place(landing, dest)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return dest
