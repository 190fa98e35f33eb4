"""A filesystem content store addressed by kubo-compatible CIDs.

Layout under ``root``::

    objects/<cid>    each stored file or directory tree, read-only files, named by its CID
    tmp/             staging area; a put copies here, hashes the copy, then renames it
                     into objects/ (same filesystem, so the rename is atomic)
    index.sqlite3    entries: CID -> (object, relative path, kind, content size) for every
                     file and directory inside every object, so a sub-folder's CID resolves
                     too; blocks: CID -> dag-pb bytes for internal and directory nodes, or
                     (object, path, offset, length) for file leaves, which are rebuilt from
                     the stored file on demand instead of being kept twice

Methods are synchronous and blocking; async callers run them in a thread
(``await asyncio.to_thread(store.put_path, p)``). Every method opens its own SQLite
connection, so one store may be shared by threads and processes.

Hashing is done on the staged copy, never on the source, so the CID always describes the
bytes actually stored even if the source changes during the put.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import stat
import tarfile
import tempfile
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO, Literal

from shoal_common.cid import (
    DagItem,
    cid_of_bytes,
    cid_to_multihash,
    encode_file_leaf,
    multihash_to_cid,
    walk_dag,
)
from shoal_common.result_folder import cid_of_files

__all__ = [
    "ContentCorruptedError",
    "ContentNotFoundError",
    "ContentStore",
    "UnsafeArchiveError",
    "safe_extract_tar",
]

_COPY_BUFFER = 1024 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    cid TEXT PRIMARY KEY,
    object TEXT NOT NULL,
    path TEXT NOT NULL,
    kind TEXT NOT NULL,
    size INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS blocks (
    cid TEXT PRIMARY KEY,
    data BLOB,
    object TEXT,
    path TEXT,
    offset INTEGER NOT NULL,
    length INTEGER NOT NULL
);
"""


class ContentNotFoundError(LookupError):
    """No content with this CID is stored."""


class ContentCorruptedError(RuntimeError):
    """Stored bytes no longer hash to their CID (modified on disk behind the store)."""


class UnsafeArchiveError(ValueError):
    """A tar member would escape the destination or is of a refused type."""


def _canonical(cid: str) -> str:
    """CIDv0 spelling of a dag-pb CID; ValueError if ``cid`` is not one.

    Validating here is what keeps a CID from ever being a path like ``../x``.
    """
    return multihash_to_cid(cid_to_multihash(cid))


class ContentStore:
    """Files and directory trees on local disk, stored and found by CID."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._objects = self.root / "objects"
        self._tmp = self.root / "tmp"
        self._db_path = self.root / "index.sqlite3"
        self._objects.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)
        # One index connection per thread, kept open: opening one per call cost more than the
        # queries, and closing the last connection to a WAL database checkpoints it (two
        # fsyncs) every time.
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        with self._connect() as db:
            # WAL lets readers (block/get) proceed while a put writes its index rows.
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """This thread's index connection, in a transaction (committed on success)."""
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self._db_path, timeout=60, check_same_thread=False)
            with self._connections_lock:
                self._connections.append(db)
            self._local.db = db
        with db:
            yield db

    def close(self) -> None:
        """Close the index connections (the store opens new ones if used again)."""
        with self._connections_lock:
            connections, self._connections = self._connections, []
        self._local = threading.local()
        for db in connections:
            db.close()

    # ------------------------------------------------------------------ writes

    def put_path(self, path: Path) -> str:
        """Store a file or a directory tree and return its CID.

        Idempotent: storing the same content again returns the same CID and keeps one
        copy. Raises ValueError if the tree contains a symlink or a special file, in which
        case nothing is stored.
        """
        source = Path(path)
        mode = os.lstat(source).st_mode
        with self._staging() as work:
            staged = work / "data"
            if stat.S_ISLNK(mode):
                raise ValueError(f"refusing to store a symlink: {source}")
            if stat.S_ISREG(mode):
                _copy_file(source, staged)
            elif stat.S_ISDIR(mode):
                _copy_tree(source, staged)
            else:
                raise ValueError(f"not a regular file or directory: {source}")
            return self._ingest(staged)

    def put_bytes(self, data: bytes) -> str:
        """Store ``data`` as a file and return its CID."""
        cid = cid_of_bytes(data)
        if self.has(cid):
            return cid
        with self._staging() as work:
            staged = work / "data"
            staged.write_bytes(data)
            return self._ingest(staged)

    def put_files(self, files: Mapping[str, bytes]) -> str:
        """Store a folder holding exactly these files (plain names) and return its CID."""
        cid = cid_of_files(files)
        if self.has(cid):
            return cid
        with self._staging() as work:
            staged = work / "data"
            staged.mkdir()
            for name, data in files.items():
                if not name or "/" in name or name in (".", ".."):
                    raise ValueError(f"not a plain file name: {name!r}")
                (staged / name).write_bytes(data)
            return self._ingest(staged)

    @contextmanager
    def _staging(self) -> Iterator[Path]:
        work = Path(tempfile.mkdtemp(dir=self._tmp))
        try:
            yield work
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _ingest(self, staged: Path) -> str:
        items = list(walk_dag(staged, leaf_bytes=False))
        cid = items[-1].cid
        if self.has(cid):
            return cid
        _make_read_only(staged)
        target = self._objects / cid
        try:
            os.rename(staged, target)
        except OSError:
            # A concurrent put of the same content, or one that crashed before indexing,
            # got there first. Same CID means same tree, so our index rows describe it.
            if not os.path.lexists(target):
                raise
        self._index(cid, items)
        return cid

    def _index(self, cid: str, items: list[DagItem]) -> None:
        entries: list[tuple[str, str, str, str, int]] = []
        blocks: list[tuple[str, bytes | None, str | None, str | None, int, int]] = []
        for item in items:
            if item.offset >= 0:
                blocks.append((item.cid, None, cid, item.path, item.offset, item.length))
            else:
                blocks.append((item.cid, item.data, None, None, -1, 0))
            if item.root is not None:
                entries.append((item.cid, cid, item.path, item.root, item.size))
        # The object's own entry goes last, in the same transaction: an object counts as
        # stored only once all its blocks are findable.
        root_entry = entries.pop()
        with self._connect() as db:
            db.executemany("INSERT OR IGNORE INTO blocks VALUES (?, ?, ?, ?, ?, ?)", blocks)
            db.executemany("INSERT OR IGNORE INTO entries VALUES (?, ?, ?, ?, ?)", entries)
            db.execute("INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?)", root_entry)

    # ------------------------------------------------------------------ reads

    def _entry(self, cid: str) -> tuple[str, str, str, int]:
        key = _canonical(cid)
        with self._connect() as db:
            row = db.execute(
                "SELECT object, path, kind, size FROM entries WHERE cid = ?", (key,)
            ).fetchone()
        if row is None:
            raise ContentNotFoundError(cid)
        object_cid, rel, kind, size = row
        return object_cid, rel, kind, size

    def _location(self, object_cid: str, rel: str) -> Path:
        base = self._objects / object_cid
        return base.joinpath(*PurePosixPath(rel).parts) if rel else base

    def has(self, cid: str) -> bool:
        """Whether a file or directory with this CID is stored (alone or inside a tree)."""
        try:
            self._entry(cid)
        except (ValueError, ContentNotFoundError):
            return False
        return True

    def path_of(self, cid: str) -> Path:
        """Where the stored file or directory lives. Treat it as read-only.

        Raises ContentNotFoundError if absent, ValueError if ``cid`` is not a dag-pb CID.
        """
        object_cid, rel, _, _ = self._entry(cid)
        return self._location(object_cid, rel)

    def size_of(self, cid: str) -> int:
        """Content size in bytes: the file's length, or the sum over a tree's files."""
        return self._entry(cid)[3]

    def kind_of(self, cid: str) -> Literal["file", "dir"]:
        """Whether the CID names a stored file or directory."""
        kind = self._entry(cid)[2]
        return "dir" if kind == "dir" else "file"

    def get_block(self, cid: str) -> bytes | None:
        """The raw dag-pb block with this CID (as kubo's ``block/get``), or None.

        File leaves are rebuilt from the stored file and checked against the CID; a
        mismatch raises ContentCorruptedError rather than serving wrong bytes.
        """
        try:
            key = _canonical(cid)
        except ValueError:
            return None
        with self._connect() as db:
            row = db.execute(
                "SELECT data, object, path, offset, length FROM blocks WHERE cid = ?", (key,)
            ).fetchone()
        if row is None:
            return None
        data, object_cid, rel, offset, length = row
        if data is not None:
            return bytes(data)
        try:
            with open(self._location(object_cid, rel), "rb") as handle:
                handle.seek(offset)
                chunk = handle.read(length)
        except FileNotFoundError as exc:
            raise ContentCorruptedError(f"{cid}: stored file is missing") from exc
        block = encode_file_leaf(chunk)
        if len(chunk) != length or multihash_to_cid(_sha256_multihash(block)) != key:
            raise ContentCorruptedError(f"{cid}: stored bytes do not match the CID")
        return block

    def export_tar(self, cid: str, fileobj: IO[bytes]) -> None:
        """Write a tar stream of the stored content to ``fileobj`` (never seeks).

        A directory's members are its relative paths (no top-level folder), in name-byte
        order with normalised metadata (mtime 0, root owner, 0755/0644), so the same CID
        always gives the same tar bytes. A file is exported as one member named by its CID.
        """
        base = self.path_of(cid)
        with tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            if base.is_file():
                _tar_add_file(tar, base, _canonical(cid))
            else:
                _tar_add_tree(tar, base, "")


def _sha256_multihash(block: bytes) -> bytes:
    return b"\x12\x20" + hashlib.sha256(block).digest()


# ---------------------------------------------------------------------- copying in


def _copy_file(source: Path, target: Path) -> None:
    # O_NOFOLLOW: a file swapped for a symlink after our lstat is refused, not followed.
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        if os.path.islink(source):
            raise ValueError(f"refusing to store a symlink: {source}") from exc
        raise
    with open(fd, "rb") as src:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"not a regular file: {source}")
        os.set_blocking(fd, True)
        with open(target, "xb") as dst:
            shutil.copyfileobj(src, dst, _COPY_BUFFER)


def _copy_tree(source: Path, target: Path) -> None:
    target.mkdir()
    with os.scandir(source) as entries:
        for entry in entries:
            child = source / entry.name
            if entry.is_symlink():
                raise ValueError(f"refusing to store a symlink: {child}")
            if entry.is_dir(follow_symlinks=False):
                _copy_tree(child, target / entry.name)
            elif entry.is_file(follow_symlinks=False):
                _copy_file(child, target / entry.name)
            else:
                raise ValueError(f"not a regular file or directory: {child}")


def _make_read_only(path: Path) -> None:
    # Stored files must not change under their CID; directories stay writable so the
    # store (and test clean-up) can still remove them.
    if path.is_file():
        path.chmod(0o444)
        return
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o444)


# ---------------------------------------------------------------------- tar out


def _normalised(info: tarfile.TarInfo, mode: int) -> tarfile.TarInfo:
    info.mtime = 0
    info.mode = mode
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _tar_add_file(tar: tarfile.TarFile, path: Path, arcname: str) -> None:
    info = _normalised(tarfile.TarInfo(arcname), 0o644)
    with open(path, "rb") as handle:
        info.size = os.fstat(handle.fileno()).st_size
        tar.addfile(info, handle)


def _tar_add_tree(tar: tarfile.TarFile, directory: Path, prefix: str) -> None:
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
            _tar_add_tree(tar, child, f"{arcname}/")
        elif stat.S_ISREG(mode):
            _tar_add_file(tar, child, arcname)
        else:
            raise ContentCorruptedError(f"unexpected non-regular file in store: {child}")


# ---------------------------------------------------------------------- tar in


def _member_parts(name: str) -> tuple[str, ...]:
    """Components of a member name, refusing absolute names and ``..``."""
    if "\0" in name:
        raise UnsafeArchiveError(f"NUL in member name: {name!r}")
    if name.startswith("/"):
        raise UnsafeArchiveError(f"absolute member name: {name!r}")
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if ".." in parts:
        raise UnsafeArchiveError(f"'..' in member name: {name!r}")
    return parts


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def _prepare_parent(dest: Path, parts: tuple[str, ...]) -> Path:
    """Create the member's parent directories, refusing to pass through a symlink."""
    current = dest
    for part in parts[:-1]:
        current = current / part
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            current.mkdir()
            continue
        if not stat.S_ISDIR(mode):
            raise UnsafeArchiveError(f"member path goes through a non-directory: {current}")
    return current / parts[-1]


def safe_extract_tar(fileobj: IO[bytes], dest: Path, *, max_bytes: int | None = None) -> None:
    """Extract a (possibly compressed) tar stream into ``dest``, refusing anything unsafe.

    Refused with UnsafeArchiveError: absolute names, ``..`` components, members that would
    be written through a symlink or over an existing entry, symlinks or hardlinks that
    point outside ``dest``, device files, FIFOs and other special members, and more than
    ``max_bytes`` of file content. Symlinks are created only after every other member and
    then checked by resolving them, so a chain of links cannot reach outside either.
    Permissions, owners and times from the archive are not applied. On error ``dest`` may
    hold a partial extraction: extract into a fresh directory and discard it on failure.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = os.path.realpath(dest)
    dest = Path(root)
    total = 0
    symlinks: list[tuple[Path, str]] = []
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for member in tar:
            parts = _member_parts(member.name)
            if not parts:
                if member.isdir():
                    continue  # the archive's "./" entry is dest itself
                raise UnsafeArchiveError(f"member without a name: {member.name!r}")
            target = _prepare_parent(dest, parts)
            existing = os.path.lexists(target)
            if member.isdir():
                if existing and not (target.is_dir() and not target.is_symlink()):
                    raise UnsafeArchiveError(f"directory would replace an entry: {member.name}")
                if not existing:
                    target.mkdir(mode=0o755)
                continue
            if existing:
                raise UnsafeArchiveError(f"member would overwrite an entry: {member.name}")
            if member.isreg():
                total += member.size
                if max_bytes is not None and total > max_bytes:
                    raise UnsafeArchiveError(f"archive content exceeds {max_bytes} bytes")
                source = tar.extractfile(member)
                if source is None:
                    raise UnsafeArchiveError(f"unreadable member: {member.name}")
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                with source, open(os.open(target, flags, 0o644), "wb") as out:
                    shutil.copyfileobj(source, out, _COPY_BUFFER)
            elif member.issym():
                link = member.linkname
                if os.path.isabs(link):
                    raise UnsafeArchiveError(f"absolute symlink target: {member.name}")
                lexical = os.path.normpath(os.path.join(target.parent, link))
                if not _inside(lexical, root):
                    raise UnsafeArchiveError(f"symlink points outside: {member.name}")
                symlinks.append((target, link))
            elif member.islnk():
                link_parts = _member_parts(member.linkname)
                if not link_parts:
                    raise UnsafeArchiveError(f"hardlink without a target: {member.name}")
                real = os.path.realpath(dest.joinpath(*link_parts))
                if not _inside(real, root) or not os.path.isfile(real):
                    raise UnsafeArchiveError(f"hardlink target unsafe: {member.name}")
                os.link(real, target)
            else:
                raise UnsafeArchiveError(f"refused member type for {member.name}")
    _create_symlinks(symlinks, root)


def _create_symlinks(symlinks: list[tuple[Path, str]], root: str) -> None:
    created: list[Path] = []
    try:
        for target, link in symlinks:
            if os.path.lexists(target):
                raise UnsafeArchiveError(f"symlink would overwrite an entry: {target}")
            os.symlink(link, target)
            created.append(target)
        # Resolve only once all links exist: a link that looked inside on its own can be
        # redirected by another (a -> b/../x with b -> .), so check the final state.
        for target in created:
            if not _inside(os.path.realpath(target), root):
                raise UnsafeArchiveError(f"symlink resolves outside: {target}")
    except BaseException:
        for target in created:
            target.unlink(missing_ok=True)
        raise
