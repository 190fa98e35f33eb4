"""Write content-addressed data as it streams in, computing its CID on the way: one pass.

A download used to be spooled to disk, extracted, then read back to hash it (three passes
over the bytes). Here each byte is written once and hashed while it is in memory: a file
straight into its leaf blocks, a tar of a directory member by member, the directory's CID
put together from its files' (:class:`~shoal_common.cid.TreeCidBuilder`).

The tar reader is deliberately narrow: a content-addressed tree holds only directories and
regular files, so anything else (links, devices, sparse files) is refused, as are names that
would leave the destination (see :func:`shoal_common.content_store.safe_extract_tar`).
Callers write into a fresh folder and present it only when the CID matches.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

from shoal_common.cid import FileCidBuilder, TreeCidBuilder
from shoal_common.content_store import UnsafeArchiveError, _member_parts, _prepare_parent

# Returns up to ``n`` bytes of the stream (no more), b"" only at its end.
ReadPiece = Callable[[int], bytes | bytearray | memoryview]

_BLOCK = tarfile.BLOCKSIZE
_ZERO_BLOCK = bytes(_BLOCK)
_PIECE = 1 << 20
_EXTENDED = frozenset(
    {
        tarfile.XHDTYPE,
        tarfile.XGLTYPE,
        tarfile.SOLARIS_XHDTYPE,
        tarfile.GNUTYPE_LONGNAME,
        tarfile.GNUTYPE_LONGLINK,
    }
)
_FILE_TYPES = frozenset({tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE})
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _exact(read: ReadPiece, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        piece = read(n - len(out))
        if not piece:
            raise UnsafeArchiveError("the archive ends early (truncated download?)")
        out += piece
    return bytes(out)


def _write_all(fd: int, piece: bytes | bytearray | memoryview) -> None:
    view = memoryview(piece)
    while view:
        view = view[os.write(fd, view) :]


def _copy(read: ReadPiece, fd: int, size: int | None) -> FileCidBuilder:
    """Copy ``size`` bytes (None: to the end) from the stream to ``fd``, hashing them."""
    builder = FileCidBuilder()
    left = size
    while left is None or left > 0:
        piece = read(_PIECE if left is None else min(_PIECE, left))
        if not piece:
            if left is None:
                break
            raise UnsafeArchiveError("the archive ends early (truncated download?)")
        _write_all(fd, piece)
        builder.update(piece)
        if left is not None:
            left -= len(piece)
    return builder


def write_file(read: ReadPiece, target: Path) -> str:
    """Write the whole stream to a new file ``target``; returns the file's CID."""
    fd = os.open(target, _CREATE, 0o644)
    try:
        builder = _copy(read, fd, None)
    finally:
        os.close(fd)
    return builder.finish()


def _header(read: ReadPiece) -> tarfile.TarInfo | None:
    """The next member's header (long names and pax records applied); None at the end."""
    raw = _exact(read, _BLOCK)
    if raw == _ZERO_BLOCK:
        return None
    try:
        info = tarfile.TarInfo.frombuf(raw, "utf-8", "surrogateescape")
        if info.type not in _EXTENDED:
            return info
        # Rare (names over 100 bytes): let tarfile apply the records to the header after.
        blob = bytearray(raw)
        while info.type in _EXTENDED:
            blob += _exact(read, -(-info.size // _BLOCK) * _BLOCK)
            raw = _exact(read, _BLOCK)
            blob += raw
            info = tarfile.TarInfo.frombuf(raw, "utf-8", "surrogateescape")
        blob += _ZERO_BLOCK * 2
        with tarfile.open(
            fileobj=io.BytesIO(bytes(blob)), mode="r:", encoding="utf-8", errors="surrogateescape"
        ) as tar:
            member = tar.next()
    except tarfile.TarError as exc:
        raise UnsafeArchiveError(f"unreadable tar header: {exc}") from exc
    if member is None:
        raise UnsafeArchiveError("unreadable tar header")
    return member


def extract_tar(read: ReadPiece, dest: Path) -> str:
    """Extract an uncompressed tar stream into the (new, empty) folder ``dest``; returns the
    CID of the tree it holds, as :func:`~shoal_common.cid.cid_of_path` would give ``dest``.

    Raises UnsafeArchiveError for a malformed, truncated or unsafe archive; ``dest`` then
    holds a partial extraction for the caller to remove.
    """
    dest.mkdir(parents=True, exist_ok=True)
    root = Path(os.path.realpath(dest))
    tree = TreeCidBuilder()
    while (info := _header(read)) is not None:
        parts = _member_parts(info.name)
        if info.isdir():
            if parts:
                target = _prepare_parent(root, parts)
                if not os.path.lexists(target):
                    target.mkdir(mode=0o755)
                elif os.path.islink(target) or not os.path.isdir(target):
                    raise UnsafeArchiveError(f"directory would replace an entry: {info.name}")
            tree.add_dir(parts)
            # A directory has no data, whatever its header says.
            continue
        if info.type not in _FILE_TYPES:
            raise UnsafeArchiveError(
                f"refused member type for {info.name}: content holds only files and folders"
            )
        if not parts:
            raise UnsafeArchiveError(f"member without a name: {info.name!r}")
        target = _prepare_parent(root, parts)
        try:
            fd = os.open(target, _CREATE, 0o644)
        except FileExistsError as exc:
            raise UnsafeArchiveError(f"member would overwrite an entry: {info.name}") from exc
        try:
            builder = _copy(read, fd, info.size)
        finally:
            os.close(fd)
        if info.size % _BLOCK:
            _exact(read, _BLOCK - info.size % _BLOCK)
        try:
            tree.add_file(parts, builder)
        except ValueError as exc:
            raise UnsafeArchiveError(str(exc)) from exc
    # The end-of-archive blocks and record padding: read to the end, nothing else may follow.
    while piece := read(_PIECE):
        if piece != bytes(len(piece)):
            raise UnsafeArchiveError("data after the end of the archive")
    return tree.finish()
