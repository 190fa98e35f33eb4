"""Kubo-compatible content addressing (UnixFS v1 over dag-pb), in pure Python.

A file or directory gets the CID that ``ipfs add`` (kubo, default settings) prints for it:

* files are cut into fixed 256 KiB (262144 byte) chunks; each chunk becomes a dag-pb leaf
  holding a UnixFS ``File`` message with the bytes inline (raw leaves are off in kubo's
  CIDv0 mode);
* leaves are assembled in kubo's *balanced* layout with at most 174 links per node;
* directories are UnixFS ``Directory`` nodes whose links are sorted by name bytes, each link
  carrying the child's name and cumulative DAG size (``Tsize``);
* a directory whose estimated size (sum over entries of name length + CID byte length)
  reaches kubo's ``UnixFSShardingSizeThreshold`` (256 KiB, about 6,000 entries) becomes a
  HAMT shard (murmur3 hash, fanout 256), exactly as kubo builds it;
* CIDs are CIDv0: base58btc of the sha2-256 multihash of the block.

Two deliberate differences from ``ipfs add -r``: dotfiles are included (kubo skips them
unless ``--hidden``; a compute platform must not silently drop ``.something`` outputs), and
symlinks are refused with ``ValueError`` instead of being stored as UnixFS symlink nodes.
For trees without dotfiles and symlinks the CID equals ``ipfs add -r -Q <dir>``.

The protobuf encoding is written by hand: every message here is a handful of fields.
Field order follows what go-merkledag emits (PBNode: Links then Data; PBLink: Hash, Name,
Tsize, the empty name included; UnixFS Data: fields in number order, ``blocksizes`` not
packed because unixfs.proto is proto2).
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import stat
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Literal, NamedTuple

__all__ = [
    "CHUNK_SIZE",
    "EMPTY_DIR_CID",
    "EMPTY_FILE_CID",
    "HAMT_SHARDING_THRESHOLD",
    "MAX_LINKS",
    "Block",
    "DagItem",
    "FileCidBuilder",
    "cid_and_size_of_path",
    "cid_of_bytes",
    "cid_of_file",
    "cid_of_path",
    "cid_of_small_tree",
    "cid_to_multihash",
    "encode_file_leaf",
    "is_valid_cid",
    "iter_blocks",
    "multihash_to_cid",
    "walk_dag",
]

CHUNK_SIZE = 262144
"""kubo's default chunker: ``size-262144``."""
MAX_LINKS = 174
"""Links per node in kubo's balanced layout (``helpers.DefaultLinksPerBlock``)."""
HAMT_SHARDING_THRESHOLD = 262144
"""kubo's ``Internal.UnixFSShardingSizeThreshold`` default: directories whose estimated
size is at least this many bytes are stored as HAMT shards."""
HAMT_FANOUT = 256

EMPTY_FILE_CID = "QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH"
EMPTY_DIR_CID = "QmUNLLsPACCz1vLxQVkXqqLX5R1X345qqfHbsf67hvA3Nn"

# Reads of several chunks at a time keep the per-call Python overhead negligible.
_READ_SIZE = 16 * CHUNK_SIZE
_SHA256_PREFIX = b"\x12\x20"  # multihash: code sha2-256, length 32
_MULTIHASH_LEN = 34
_UNIXFS_HAMT_SHARD = 5
_MURMUR3_X64_64 = 0x22  # multicodec of the HAMT hash function
_B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58_ALPHABET)}
_B32_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyz234567")


# --------------------------------------------------------------------------- encoding


def _varint(n: int) -> bytes:
    """Protobuf / multiformats unsigned varint."""
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode a varint at ``pos``; return (value, next position). Raises ValueError."""
    value = 0
    shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated or oversized varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


# Two base58 digits per division: half the big-integer divisions of one digit at a time
# (6.4 -> 3.5 us for a CIDv0, which every result and every stored block is named by).
_B58_PAIRS = [high + low for high in _B58_ALPHABET for low in _B58_ALPHABET]


def _b58encode(raw: bytes) -> str:
    n = int.from_bytes(raw, "big")
    pairs: list[str] = []
    while n:
        n, rem = divmod(n, 58 * 58)
        pairs.append(_B58_PAIRS[rem])
    # The top pair may start with a zero digit ("1"), which is not part of the number.
    digits = "".join(reversed(pairs)).lstrip("1")
    leading_zeros = len(raw) - len(raw.lstrip(b"\0"))
    return "1" * leading_zeros + digits


def _b58decode(text: str) -> bytes:
    n = 0
    for char in text:
        digit = _B58_INDEX.get(char)
        if digit is None:
            raise ValueError(f"not a base58btc character: {char!r}")
        n = n * 58 + digit
    leading_ones = len(text) - len(text.lstrip("1"))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\0" * leading_ones + body


def multihash_to_cid(multihash: bytes) -> str:
    """CIDv0 string (``Qm...``) of a 34-byte sha2-256 multihash."""
    return _b58encode(multihash)


def cid_to_multihash(cid: str) -> bytes:
    """The sha2-256 multihash a dag-pb CID names.

    Accepts CIDv0 (``Qm...``) and CIDv1 base32 (``b...``) with the dag-pb codec, so both
    spellings of the same node map to the same bytes. Raises ValueError otherwise.
    """
    if cid.startswith("Qm") and len(cid) == 46:
        raw = _b58decode(cid)
        if len(raw) == _MULTIHASH_LEN and raw.startswith(_SHA256_PREFIX):
            return raw
        raise ValueError(f"not a sha2-256 CIDv0: {cid!r}")
    version, codec, multihash = _parse_cidv1(cid)
    if version != 1 or codec != 0x70 or not multihash.startswith(_SHA256_PREFIX):
        raise ValueError(f"not a dag-pb sha2-256 CID: {cid!r}")
    if len(multihash) != _MULTIHASH_LEN:
        raise ValueError(f"bad multihash length in {cid!r}")
    return multihash


def _parse_cidv1(cid: str) -> tuple[int, int, bytes]:
    """Split a base32 CIDv1 into (version, codec, multihash); ValueError if malformed."""
    body = cid[1:]
    if not cid.startswith("b") or not body or not set(body) <= _B32_ALPHABET:
        raise ValueError(f"not a base32 CIDv1: {cid!r}")
    raw = base64.b32decode(body.upper() + "=" * (-len(body) % 8))
    version, pos = _read_varint(raw, 0)
    codec, pos = _read_varint(raw, pos)
    hash_code, digest_at = _read_varint(raw, pos)
    length, digest_at = _read_varint(raw, digest_at)
    del hash_code  # any multihash function is syntactically fine
    if version != 1 or length == 0 or len(raw) - digest_at != length:
        raise ValueError(f"malformed CIDv1: {cid!r}")
    return version, codec, raw[pos:]


def is_valid_cid(s: str) -> bool:
    """Whether ``s`` is a syntactically valid CID.

    CIDv0: ``Qm`` + base58btc of a sha2-256 multihash (46 characters). CIDv1: multibase
    ``b`` (lowercase base32, no padding) over version 1, a codec and a complete multihash.
    """
    if not isinstance(s, str):
        return False
    if s.startswith("Qm"):
        try:
            cid_to_multihash(s)
        except ValueError:
            return False
        return True
    try:
        _parse_cidv1(s)
    except ValueError:
        return False
    return True


class _Link(NamedTuple):
    """What a parent needs to know about a child node."""

    multihash: bytes
    tsize: int  # cumulative serialized size of the child's DAG (dag-pb Tsize)
    filesize: int  # content bytes below the child (UnixFS blocksizes entry)


def _multihash(block: bytes) -> bytes:
    return _SHA256_PREFIX + hashlib.sha256(block).digest()


def _encode_links(links: list[tuple[bytes, _Link]]) -> bytes:
    """Encode PBNode.Links (field 2) for (name, link) pairs, in the given order."""
    parts: list[bytes] = []
    for name, link in links:
        body = b"".join(
            (
                b"\x0a\x22",
                link.multihash,
                b"\x12",
                _varint(len(name)),
                name,
                b"\x18",
                _varint(link.tsize),
            )
        )
        parts.append(b"\x12" + _varint(len(body)) + body)
    return b"".join(parts)


def _encode_node(links: list[tuple[bytes, _Link]], unixfs: bytes) -> bytes:
    """A dag-pb PBNode: links first, then the UnixFS message as Data (field 1)."""
    return _encode_links(links) + b"\x0a" + _varint(len(unixfs)) + unixfs


def _leaf_frame(size: int) -> tuple[bytes, bytes]:
    """Bytes before and after a chunk of ``size`` bytes in its leaf block.

    Leaf = PBNode{Data: UnixFS{Type: File, Data: chunk, filesize: size}}. Hashing
    header + chunk + trailer piecewise avoids copying the chunk.
    """
    if size == 0:
        # kubo leaves an empty file's Data field unset: 0a 04 08 02 18 00.
        return b"\x0a\x04\x08\x02\x18\x00", b""
    size_varint = _varint(size)
    unixfs_len = 3 + len(size_varint) + size + 1 + len(size_varint)
    header = b"\x0a" + _varint(unixfs_len) + b"\x08\x02\x12" + size_varint
    return header, b"\x18" + size_varint


_FULL_FRAME = _leaf_frame(CHUNK_SIZE)


def encode_file_leaf(chunk: bytes | bytearray | memoryview) -> bytes:
    """The dag-pb leaf block kubo stores for one file chunk (at most CHUNK_SIZE bytes)."""
    header, trailer = _leaf_frame(len(chunk))
    return b"".join((header, chunk, trailer))


def _internal_file_node(children: list[_Link]) -> bytes:
    filesize = sum(child.filesize for child in children)
    unixfs = b"".join(
        [b"\x08\x02\x18", _varint(filesize)]
        + [b"\x20" + _varint(child.filesize) for child in children]
    )
    return _encode_node([(b"", child) for child in children], unixfs)


# --------------------------------------------------------------------------- files


class Block(NamedTuple):
    """One dag-pb block: its CIDv0 and its exact bytes."""

    cid: str
    data: bytes


# Called for every block a file DAG produces, children before parents:
# (multihash, block bytes or None for a leaf built without its bytes, leaf content length
# or -1 for an internal node).
_Emit = Callable[[bytes, bytes | None, int], None]


class _FileDag:
    """Streaming builder of kubo's balanced file DAG.

    ``levels[k]`` holds the finished links at depth k (0 = leaves) not yet under a parent.
    A level is folded into a parent as soon as it holds ``max_links`` links; ``finish``
    then folds the partial levels bottom-up. This yields exactly the tree of go-unixfs'
    ``balanced.Layout``: full subtrees on the left, partial ones along the right edge
    (never collapsed), and a one-chunk file being just its leaf. The root is always the
    last block emitted.
    """

    def __init__(
        self,
        emit: _Emit | None = None,
        *,
        leaf_bytes: bool = True,
        chunk_size: int = CHUNK_SIZE,
        max_links: int = MAX_LINKS,
    ) -> None:
        if chunk_size <= 0 or max_links < 2:
            raise ValueError("chunk_size must be positive and max_links at least 2")
        self._emit = emit
        self._build_leaves = emit is not None and leaf_bytes
        self._chunk_size = chunk_size
        self._max_links = max_links
        self._full_frame = _FULL_FRAME if chunk_size == CHUNK_SIZE else _leaf_frame(chunk_size)
        self._pending = bytearray()
        self._levels: list[list[_Link]] = [[]]
        self._leaves = 0
        self.size = 0
        self._finished = False

    def update(self, data: bytes | bytearray | memoryview) -> None:
        if self._finished:
            raise RuntimeError("update() after finish()")
        view = memoryview(data).cast("B")
        self.size += len(view)
        chunk_size = self._chunk_size
        if self._pending:
            take = chunk_size - len(self._pending)
            self._pending += view[:take]
            view = view[take:]
            if len(self._pending) < chunk_size:
                return
            self._add_leaf(self._pending)
            self._pending.clear()
        start = 0
        end = len(view)
        # Whole chunks are hashed straight from the caller's buffer: no copy.
        while end - start >= chunk_size:
            self._add_leaf(view[start : start + chunk_size])
            start += chunk_size
        if start < end:
            self._pending += view[start:]

    def _add_leaf(self, chunk: bytes | bytearray | memoryview) -> None:
        size = len(chunk)
        header, trailer = self._full_frame if size == self._chunk_size else _leaf_frame(size)
        block: bytes | None = None
        if self._build_leaves:
            block = b"".join((header, chunk, trailer))
            multihash = _multihash(block)
        else:
            # hashlib releases the GIL and reads the chunk in place.
            hasher = hashlib.sha256(header)
            hasher.update(chunk)
            hasher.update(trailer)
            multihash = _SHA256_PREFIX + hasher.digest()
        if self._emit is not None:
            self._emit(multihash, block, size)
        self._leaves += 1
        self._push(0, _Link(multihash, len(header) + size + len(trailer), size))

    def _push(self, level: int, link: _Link) -> None:
        levels = self._levels
        while True:
            if level == len(levels):
                levels.append([])
            links = levels[level]
            links.append(link)
            if len(links) < self._max_links:
                return
            link = self._fold(links)
            links.clear()
            level += 1

    def _fold(self, children: list[_Link]) -> _Link:
        block = _internal_file_node(children)
        multihash = _multihash(block)
        if self._emit is not None:
            self._emit(multihash, block, -1)
        tsize = len(block) + sum(child.tsize for child in children)
        return _Link(multihash, tsize, sum(child.filesize for child in children))

    def finish(self) -> _Link:
        if self._finished:
            raise RuntimeError("finish() called twice")
        self._finished = True
        if self._pending or self._leaves == 0:
            self._add_leaf(bytes(self._pending))
            self._pending.clear()
        levels = self._levels
        level = 0
        while True:
            links = levels[level]
            if links and len(links) == 1 and not any(levels[level + 1 :]):
                return links[0]
            if links:
                parent = self._fold(links)
                links.clear()
                if level + 1 == len(levels):
                    levels.append([])
                levels[level + 1].append(parent)
            level += 1


class FileCidBuilder:
    """Incremental CID of a byte stream, for verifying a download while it streams.

    Feed any chunking of the content to :meth:`update`; :meth:`finish` returns the same
    CID as :func:`cid_of_bytes` over the concatenation. Memory use is one chunk plus a few
    links per tree level.
    """

    def __init__(self) -> None:
        self._dag = _FileDag()

    @property
    def size(self) -> int:
        """Bytes fed so far."""
        return self._dag.size

    def update(self, chunk: bytes | bytearray | memoryview) -> None:
        """Add the next bytes of the content."""
        self._dag.update(chunk)

    def finish(self) -> str:
        """Close the stream and return its CIDv0. The builder cannot be reused."""
        return multihash_to_cid(self._dag.finish().multihash)


class TreeCidBuilder:
    """CID of a directory tree put together from its entries, for verifying a tree that
    arrives as a stream (a tar) without reading it back from disk.

    Add every directory and file (as a :class:`FileCidBuilder` fed the file's bytes), in any
    order; :meth:`finish` returns what :func:`cid_of_path` gives the same tree. Parents are
    implied by their children. Raises ValueError when an entry clashes with another (a file
    where a directory is, the same file twice).
    """

    def __init__(self) -> None:
        # name -> _Link (a file) or a dict like this one (a directory)
        self._root: dict[bytes, object] = {}

    def _folder(self, parts: tuple[str, ...]) -> dict[bytes, object]:
        node = self._root
        for i, part in enumerate(parts):
            child = node.setdefault(os.fsencode(part), {})
            if not isinstance(child, dict):
                raise ValueError(f"{'/'.join(parts[: i + 1])} is a file, not a directory")
            node = child
        return node

    def add_dir(self, parts: tuple[str, ...]) -> None:
        """A directory, by its path components below the root (``()`` is the root)."""
        self._folder(parts)

    def add_file(self, parts: tuple[str, ...], file: FileCidBuilder) -> None:
        """A file whose bytes ``file`` has been fed (finished here)."""
        if not parts:
            raise ValueError("a file cannot be the root of a tree")
        folder = self._folder(parts[:-1])
        name = os.fsencode(parts[-1])
        if name in folder:
            raise ValueError(f"{'/'.join(parts)} appears twice")
        folder[name] = file._dag.finish()

    def finish(self) -> str:
        """The tree's CIDv0."""
        return multihash_to_cid(_fold_tree(self._root).multihash)


def _fold_tree(node: dict[bytes, object]) -> _Link:
    children: list[tuple[bytes, _Link]] = []
    size = 0
    for name, child in node.items():
        link = _fold_tree(child) if isinstance(child, dict) else child
        assert isinstance(link, _Link)
        children.append((name, link))
        size += link.filesize
    return _dir_link(children, size, HAMT_SHARDING_THRESHOLD)


def cid_of_bytes(data: bytes | bytearray | memoryview) -> str:
    """CIDv0 that ``ipfs add`` gives to a file with exactly these bytes."""
    dag = _FileDag()
    dag.update(data)
    return multihash_to_cid(dag.finish().multihash)


def _open_regular_fd(path: str | Path) -> int:
    """A descriptor of a regular file for reading (still non-blocking), refusing (ValueError)
    a symlink or special file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        if os.path.islink(path):
            raise ValueError(f"refusing to follow symlink: {path}") from exc
        raise
    try:
        # O_NONBLOCK above keeps a FIFO from blocking the open; it is rejected here.
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"not a regular file: {path}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_regular(path: str | Path) -> io.FileIO:
    """Open a regular file for reading, refusing (ValueError) a symlink or special file."""
    fd = _open_regular_fd(path)
    try:
        os.set_blocking(fd, True)
        return open(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def _read_small_regular(path: str, size: int) -> bytes:
    """All of a small regular file (``size`` as lstat saw it), refusing what _open_regular
    refuses. Plain reads on the descriptor: O_NONBLOCK does not apply to regular files, and a
    file object would cost more than the read (three of these per execution's results)."""
    fd = _open_regular_fd(path)
    try:
        data = os.read(fd, size + 1)
        if len(data) <= size:
            return data  # all of it: a regular file reads short only at its end
        chunks = [data]
        while more := os.read(fd, _READ_SIZE):  # it grew since the lstat: on to the end
            chunks.append(more)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _read_buffer(handle: io.FileIO) -> bytearray:
    """A read buffer no bigger than the file needs: a fresh bytearray is zero-filled, and
    results folders are mostly a few tiny files (4 MiB each was 6% of the devstack's CPU)."""
    size = os.fstat(handle.fileno()).st_size
    # +1: a file read whole ends at the first read instead of a second one. At least 64 KiB
    # in case the file grows while it is read.
    return bytearray(min(_READ_SIZE, max(size + 1, 1 << 16)))


def _read_into(dag: _FileDag, path: str | Path) -> None:
    with _open_regular(path) as handle:
        buffer = _read_buffer(handle)
        view = memoryview(buffer)
        while n := handle.readinto(buffer):
            dag.update(view[:n])


def cid_of_file(path: Path) -> str:
    """CIDv0 of a regular file, read in a streaming fashion (bounded memory).

    Raises ValueError for a symlink or anything that is not a regular file.
    """
    dag = _FileDag()
    _read_into(dag, Path(path))
    return multihash_to_cid(dag.finish().multihash)


# --------------------------------------------------------------------------- trees


class DagItem(NamedTuple):
    """One block of a walked tree, with where its content lives on disk.

    ``path`` is the POSIX path of the file or directory the block belongs to, relative to
    the walked root ("" for the root itself). For file leaves ``offset``/``length`` locate
    the chunk inside that file, so a store can rebuild the leaf with
    :func:`encode_file_leaf` instead of keeping a second copy, and ``data`` is None unless
    leaf bytes were asked for. Other blocks always carry ``data`` and have ``offset`` -1.
    ``root`` marks the top block of each file ("file") or directory ("dir"); ``size`` is
    then its content size in bytes (sum of file sizes for a directory), else 0.
    """

    cid: str
    data: bytes | None
    path: str
    offset: int
    length: int
    root: Literal["file", "dir"] | None
    size: int


def _walk_file(path: Path, rel: str, leaf_bytes: bool) -> Generator[DagItem, None, _Link]:
    out: list[DagItem] = []
    offset = 0

    def emit(multihash: bytes, block: bytes | None, leaf_len: int) -> None:
        nonlocal offset
        cid = multihash_to_cid(multihash)
        if leaf_len >= 0:
            out.append(DagItem(cid, block, rel, offset, leaf_len, None, 0))
            offset += leaf_len
        else:
            out.append(DagItem(cid, block, rel, -1, 0, None, 0))

    dag = _FileDag(emit, leaf_bytes=leaf_bytes)
    with _open_regular(path) as handle:
        buffer = _read_buffer(handle)
        view = memoryview(buffer)
        while n := handle.readinto(buffer):
            dag.update(view[:n])
            # Hold back the newest block: it may turn out to be the root.
            if len(out) > 1:
                yield from out[:-1]
                del out[:-1]
    root = dag.finish()
    out[-1] = out[-1]._replace(root="file", size=dag.size)
    yield from out
    return root


def _murmur3_x64_64(data: bytes) -> int:
    """First 64 bits of MurmurHash3 x64 128 (seed 0): go-unixfs' HAMT hash function."""
    mask = 0xFFFFFFFFFFFFFFFF
    c1 = 0x87C37B91114253D5
    c2 = 0x4CF5AD432745937F

    def rotl(x: int, r: int) -> int:
        return ((x << r) | (x >> (64 - r))) & mask

    def fmix(k: int) -> int:
        k ^= k >> 33
        k = (k * 0xFF51AFD7ED558CCD) & mask
        k ^= k >> 33
        k = (k * 0xC4CEB9FE1A85EC53) & mask
        return k ^ (k >> 33)

    h1 = h2 = 0
    nblocks = len(data) // 16
    for i in range(nblocks):
        k1 = int.from_bytes(data[16 * i : 16 * i + 8], "little")
        k2 = int.from_bytes(data[16 * i + 8 : 16 * i + 16], "little")
        h1 ^= (rotl((k1 * c1) & mask, 31) * c2) & mask
        h1 = (rotl(h1, 27) + h2) & mask
        h1 = (h1 * 5 + 0x52DCE729) & mask
        h2 ^= (rotl((k2 * c2) & mask, 33) * c1) & mask
        h2 = (rotl(h2, 31) + h1) & mask
        h2 = (h2 * 5 + 0x38495AB5) & mask
    tail = data[16 * nblocks :]
    if len(tail) > 8:
        k2 = int.from_bytes(tail[8:], "little")
        h2 ^= (rotl((k2 * c2) & mask, 33) * c1) & mask
    if tail:
        k1 = int.from_bytes(tail[:8], "little")
        h1 ^= (rotl((k1 * c1) & mask, 31) * c2) & mask
    h1 ^= len(data)
    h2 ^= len(data)
    h1 = (h1 + h2) & mask
    h2 = (h2 + h1) & mask
    h1 = fmix(h1)
    h2 = fmix(h2)
    return (h1 + h2) & mask


def _dir_items(
    children: list[tuple[bytes, _Link]], rel: str, size: int, threshold: int
) -> tuple[list[DagItem], _Link]:
    """Blocks of a directory (root last) given its (name, link) entries."""
    # kubo's estimate: name length + CID byte length (34 for CIDv0) per entry.
    estimate = sum(len(name) + _MULTIHASH_LEN for name, _ in children)
    items: list[DagItem] = []
    if estimate >= threshold:
        hashed = [(name, link, _murmur3_x64_64(name).to_bytes(8, "big")) for name, link in children]
        link = _hamt_shard(hashed, 0, rel, items)
    else:
        block = _encode_node(sorted(children), b"\x08\x01")
        link = _block_link(block, children)
        items.append(DagItem(multihash_to_cid(link.multihash), block, rel, -1, 0, None, 0))
    items[-1] = items[-1]._replace(root="dir", size=size)
    return items, link


def _block_link(block: bytes, children: list[tuple[bytes, _Link]]) -> _Link:
    tsize = len(block) + sum(link.tsize for _, link in children)
    return _Link(_multihash(block), tsize, 0)


def _hamt_shard(
    entries: list[tuple[bytes, _Link, bytes]], depth: int, rel: str, items: list[DagItem]
) -> _Link:
    """One HAMT shard node as go-unixfs builds it, sub-shards appended to ``items`` first.

    A slot (8 hash bits per level, most significant first) holds an entry when only one
    name hashes there, and a sub-shard otherwise. Link names are the slot in two uppercase
    hex digits, followed by the entry name for entries.
    """
    if depth >= 8:
        raise ValueError("HAMT hash bits exhausted (64-bit murmur3 collision)")
    buckets: dict[int, list[tuple[bytes, _Link, bytes]]] = {}
    for entry in entries:
        buckets.setdefault(entry[2][depth], []).append(entry)
    links: list[tuple[bytes, _Link]] = []
    bitfield = 0
    for slot in sorted(buckets):
        bitfield |= 1 << slot
        group = buckets[slot]
        prefix = b"%02X" % slot
        if len(group) == 1:
            links.append((prefix + group[0][0], group[0][1]))
        else:
            links.append((prefix, _hamt_shard(group, depth + 1, rel, items)))
    # go-bitfield serialises big-endian with leading zero bytes stripped.
    bits = bitfield.to_bytes((bitfield.bit_length() + 7) // 8, "big")
    unixfs = b"".join(
        (
            b"\x08",
            _varint(_UNIXFS_HAMT_SHARD),
            b"\x12" + _varint(len(bits)) + bits if bits else b"",
            b"\x28",
            _varint(_MURMUR3_X64_64),
            b"\x30",
            _varint(HAMT_FANOUT),
        )
    )
    block = _encode_node(sorted(links), unixfs)
    link = _block_link(block, links)
    items.append(DagItem(multihash_to_cid(link.multihash), block, rel, -1, 0, None, 0))
    return link


def _dir_names(path: str | Path, mode: int, hidden: bool) -> list[bytes]:
    """A directory's entry names in byte order (kubo's), dot files left out unless ``hidden``."""
    if not stat.S_ISDIR(mode):
        raise ValueError(f"unsupported file type (not a file or directory): {path}")
    with os.scandir(path) as entries:
        names = sorted(os.fsencode(entry.name) for entry in entries)
    return [n for n in names if hidden or not n.startswith(b".")]


def _walk(
    path: Path, rel: str, leaf_bytes: bool, hidden: bool, threshold: int
) -> Generator[DagItem, None, _Link]:
    mode = os.lstat(path).st_mode
    if stat.S_ISLNK(mode):
        raise ValueError(f"refusing to follow symlink: {path}")
    if stat.S_ISREG(mode):
        return (yield from _walk_file(path, rel, leaf_bytes))
    children: list[tuple[bytes, _Link]] = []
    size = 0
    for name in _dir_names(path, mode, hidden):
        text = os.fsdecode(name)
        child = yield from _walk(
            path / text, f"{rel}/{text}" if rel else text, leaf_bytes, hidden, threshold
        )
        children.append((name, child))
        size += child.filesize
    items, link = _dir_items(children, rel, size, threshold)
    yield from items
    # A directory link carries its content size so the parent can total it.
    return link._replace(filesize=size)


def walk_dag(
    path: Path,
    *,
    leaf_bytes: bool = True,
    hidden: bool = True,
    _sharding_threshold: int = HAMT_SHARDING_THRESHOLD,
) -> Iterator[DagItem]:
    """Every block of the DAG of a file or directory tree, children first, root last.

    Directory entries are visited in name-byte order. A block that occurs several times
    (repeated chunks, identical files) is yielded each time. ``hidden=False`` skips
    dotfiles like ``ipfs add -r`` without ``--hidden``. Raises ValueError on symlinks and
    special files anywhere in the tree.
    """
    yield from _walk(Path(path), "", leaf_bytes, hidden, _sharding_threshold)


def iter_blocks(path: Path, *, hidden: bool = True) -> Iterator[Block]:
    """Each distinct dag-pb block of a file or tree once, leaves first, root last."""
    seen: set[str] = set()
    for item in walk_dag(path, leaf_bytes=True, hidden=hidden):
        if item.cid in seen:
            continue
        seen.add(item.cid)
        assert item.data is not None  # leaf_bytes=True
        yield Block(item.cid, item.data)


class _OverBudget(Exception):
    """A tree turned out bigger than the caller wanted to address inline."""


def _tree_link(path: str, hidden: bool, threshold: int, budget: list[int] | None) -> _Link:
    """Root link of a file or tree, with its content size as ``filesize``.

    What :func:`_walk` computes, without making a :class:`DagItem` (and a base58 CID) of
    every block: only the root is wanted. ``budget`` ([bytes, entries] left) makes it raise
    :class:`_OverBudget` as soon as the tree is bigger.
    """
    st = os.lstat(path)
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        raise ValueError(f"refusing to follow symlink: {path}")
    if budget is not None:
        budget[0] -= st.st_size if stat.S_ISREG(mode) else 0
        budget[1] -= 1
        if budget[0] < 0 or budget[1] < 0:
            raise _OverBudget
    if stat.S_ISREG(mode):
        dag = _FileDag()
        if st.st_size >= _READ_SIZE:
            _read_into(dag, path)
        else:  # small: one read to the end, no buffer to allocate
            dag.update(_read_small_regular(path, st.st_size))
        return dag.finish()
    children: list[tuple[bytes, _Link]] = []
    size = 0
    for name in _dir_names(path, mode, hidden):
        child = _tree_link(os.path.join(path, os.fsdecode(name)), hidden, threshold, budget)
        children.append((name, child))
        size += child.filesize
    return _dir_link(children, size, threshold)


def _dir_link(children: list[tuple[bytes, _Link]], size: int, threshold: int) -> _Link:
    """A directory's link when its blocks are not wanted: a plain directory is one block,
    hashed here; only a HAMT needs ``_dir_items`` (which also names every block it makes,
    one base58 encoding each)."""
    if sum(len(name) + _MULTIHASH_LEN for name, _ in children) >= threshold:
        _items, link = _dir_items(children, "", size, threshold)  # a HAMT: as _walk does
    else:
        link = _block_link(_encode_node(sorted(children), b"\x08\x01"), children)
    return link._replace(filesize=size)


def cid_of_path(
    path: Path, *, hidden: bool = True, _sharding_threshold: int = HAMT_SHARDING_THRESHOLD
) -> str:
    """CIDv0 of a file or directory tree (recursive), as ``ipfs add -r --hidden`` gives it.

    Raises ValueError if the path or anything below it is a symlink or a special file.
    """
    link = _tree_link(os.fspath(path), hidden, _sharding_threshold, None)
    return multihash_to_cid(link.multihash)


def cid_and_size_of_path(path: Path, *, hidden: bool = True) -> tuple[str, int]:
    """:func:`cid_of_path` and the content size in bytes (the sum of the file sizes)."""
    link = _tree_link(os.fspath(path), hidden, HAMT_SHARDING_THRESHOLD, None)
    return multihash_to_cid(link.multihash), link.filesize


def cid_of_small_tree(
    path: Path, *, max_bytes: int, max_entries: int, hidden: bool = True
) -> tuple[str, int] | None:
    """:func:`cid_and_size_of_path` of a tree of at most ``max_entries`` files and folders
    (the root included) and ``max_bytes`` of content; None, after at most that much work,
    for a bigger one. Cheap enough for small trees to run without a thread hop.
    """
    try:
        link = _tree_link(
            os.fspath(path), hidden, HAMT_SHARDING_THRESHOLD, [max_bytes, max_entries]
        )
    except _OverBudget:
        return None
    return multihash_to_cid(link.multihash), link.filesize
