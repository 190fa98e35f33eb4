"""Reading dag-pb/UnixFS blocks back: links of a directory (plain or HAMT) and node types.

The content store hands out raw blocks; kubo's ``ls`` and path arguments (``<cid>/a/b``)
need the names and CIDs of a directory's entries, which live in those blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from shoal_common.cid import multihash_to_cid

UNIXFS_RAW = 0
UNIXFS_DIRECTORY = 1
UNIXFS_FILE = 2
UNIXFS_HAMT = 5

GetBlock = Callable[[str], bytes | None]


class DagError(ValueError):
    """A block that is missing or not the dag-pb/UnixFS node expected."""


@dataclass(frozen=True)
class Link:
    name: str
    cid: str
    tsize: int


@dataclass(frozen=True)
class Node:
    links: list[Link]
    unixfs_type: int
    filesize: int


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = 0
    shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise DagError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, bytes | int]]:
    """(field number, wire type, value) of a protobuf message."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, wire, value
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > len(buf):
                raise DagError("truncated field")
            yield number, wire, buf[pos : pos + length]
            pos += length
        else:
            raise DagError(f"unexpected protobuf wire type {wire}")


def decode(block: bytes) -> Node:
    """Links, UnixFS type and file size of a dag-pb block."""
    links: list[Link] = []
    data = b""
    for number, _, value in _fields(block):
        if number == 2 and isinstance(value, bytes):
            multihash, name, tsize = b"", b"", 0
            for n, _, v in _fields(value):
                if n == 1 and isinstance(v, bytes):
                    multihash = v
                elif n == 2 and isinstance(v, bytes):
                    name = v
                elif n == 3 and isinstance(v, int):
                    tsize = v
            links.append(Link(name.decode("utf-8", "surrogateescape"), _cid(multihash), tsize))
        elif number == 1 and isinstance(value, bytes):
            data = value
    kind, filesize = UNIXFS_RAW, 0
    for n, _, v in _fields(data):
        if n == 1 and isinstance(v, int):
            kind = v
        elif n == 3 and isinstance(v, int):
            filesize = v
    return Node(links, kind, filesize)


def _cid(multihash: bytes) -> str:
    if len(multihash) == 34 and multihash[:2] == b"\x12\x20":
        return multihash_to_cid(multihash)
    raise DagError("a link that is not a sha2-256 CIDv0")


def load(get_block: GetBlock, cid: str) -> Node:
    block = get_block(cid)
    if block is None:
        raise DagError(f"block was not found locally (offline): ipld: could not find {cid}")
    return decode(block)


def entries(get_block: GetBlock, node: Node) -> Iterator[Link]:
    """A directory's entries, sharded (HAMT) or not, with their real names."""
    if node.unixfs_type == UNIXFS_DIRECTORY:
        yield from node.links
    elif node.unixfs_type == UNIXFS_HAMT:
        for link in node.links:
            # Two hex digits name a sub-shard; more is the slot followed by the entry name.
            if len(link.name) == 2:
                yield from entries(get_block, load(get_block, link.cid))
            else:
                yield Link(link.name[2:], link.cid, link.tsize)
    else:
        raise DagError("this dag node is not a directory")


def resolve(get_block: GetBlock, cid: str, names: list[str]) -> str:
    """The CID at ``cid/names...``; raises DagError (kubo's wording) if there is none."""
    current = cid
    for name in names:
        node = load(get_block, current)
        if node.unixfs_type not in (UNIXFS_DIRECTORY, UNIXFS_HAMT):
            raise DagError(f"no link named {name!r} under {current}")
        for link in entries(get_block, node):
            if link.name == name:
                current = link.cid
                break
        else:
            raise DagError(f"no link named {name!r} under {current}")
    return current
