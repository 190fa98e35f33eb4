"""Tar streams of stored content with a length known before the first byte.

The headers are planned up front (one per entry, never the file bytes), so a response can
carry ``Content-Length`` and clients can show progress; the bytes then stream from disk in
1 MiB pieces. Metadata is normalised (mtime 0, root owner, 0755/0644), entries sorted by
name bytes: the same content always gives the same tar.
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from shoal_common.content_store import ContentCorruptedError

BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Member:
    header: bytes
    path: Path | None  # the file whose bytes follow the header; None for a directory
    size: int


def _header(name: str, *, directory: bool, size: int = 0) -> bytes:
    info = tarfile.TarInfo(name)
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if directory:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
    else:
        info.mode = 0o644
        info.size = size
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def plan(source: Path, *, prefix: str = "", file_name: str = "") -> list[Member]:
    """Members for ``source``: a file as one member named ``file_name``, a directory as its
    entries under ``prefix`` (``"name/"`` adds a top folder, ``""`` none)."""
    mode = os.lstat(source).st_mode
    if stat.S_ISREG(mode):
        size = source.stat().st_size
        return [Member(_header(file_name, directory=False, size=size), source, size)]
    members: list[Member] = []
    if prefix:
        members.append(Member(_header(prefix.rstrip("/"), directory=True), None, 0))
    _plan_tree(source, prefix, members)
    return members


def _plan_tree(directory: Path, prefix: str, out: list[Member]) -> None:
    with os.scandir(directory) as entries:
        names = sorted(os.fsencode(entry.name) for entry in entries)
    for raw in names:
        name = os.fsdecode(raw)
        child = directory / name
        arcname = prefix + name
        st = os.lstat(child)
        if stat.S_ISDIR(st.st_mode):
            out.append(Member(_header(arcname, directory=True), None, 0))
            _plan_tree(child, arcname + "/", out)
        elif stat.S_ISREG(st.st_mode):
            out.append(
                Member(_header(arcname, directory=False, size=st.st_size), child, st.st_size)
            )
        else:
            raise ContentCorruptedError(f"unexpected non-regular file in the store: {child}")


def _padding(size: int) -> int:
    return -size % BLOCK


def length(members: list[Member]) -> int:
    """Exact byte length of the tar :func:`write_chunks` produces."""
    total = sum(len(m.header) + m.size + _padding(m.size) for m in members) + 2 * BLOCK
    return total + (-total % RECORD)


def write_chunks(members: list[Member]) -> Iterator[bytes]:
    """The tar bytes in ~1 MiB pieces (blocking reads: run it on a worker thread)."""
    pending = bytearray()
    written = 0
    for member in members:
        pending += member.header
        written += len(member.header)
        if member.path is None:
            continue
        remaining = member.size
        with open(member.path, "rb") as handle:
            while remaining:
                if len(pending) >= _CHUNK:
                    yield bytes(pending)
                    pending.clear()
                data = handle.read(min(_CHUNK, remaining))
                if not data:
                    raise ContentCorruptedError(f"{member.path} shrank while being sent")
                remaining -= len(data)
                if pending:
                    pending += data
                else:
                    # Big reads go out as they are, without a copy into the buffer.
                    yield data
                written += len(data)
        pad = _padding(member.size)
        pending += b"\0" * pad
        written += pad
        if len(pending) >= _CHUNK:
            yield bytes(pending)
            pending.clear()
    end = 2 * BLOCK
    end += -(written + end) % RECORD
    pending += b"\0" * end
    yield bytes(pending)
