"""Tests for shoal_common.cid against CIDs produced by real IPFS implementations.

Every expected CID below was produced by kubo/go-ipfs (or, where noted, another
implementation) and comes from the public source named next to it. Where a vector needs a
non-default chunk size, the private ``_FileDag`` is used with that size: the balanced
layout does not depend on the chunk size, so those vectors check the tree shape with
small inputs.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import os
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal_common.cid import (
    CHUNK_SIZE,
    EMPTY_DIR_CID,
    EMPTY_FILE_CID,
    MAX_LINKS,
    Block,
    FileCidBuilder,
    TreeCidBuilder,
    _b58decode,
    _b58encode,
    _FileDag,
    _murmur3_x64_64,
    _read_small_regular,
    cid_and_size_of_path,
    cid_of_bytes,
    cid_of_file,
    cid_of_path,
    cid_of_small_tree,
    cid_to_multihash,
    encode_file_leaf,
    is_valid_cid,
    iter_blocks,
    multihash_to_cid,
    walk_dag,
)

# --------------------------------------------------------------------------- helpers
# A deliberately separate, minimal protobuf reader, so structure checks do not trust the
# encoder under test.


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    out: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            out.append((number, value))
        elif wire == 2:
            length, pos = _varint(buf, pos)
            out.append((number, buf[pos : pos + length]))
            pos += length
        else:
            raise AssertionError(f"unexpected wire type {wire}")
    return out


def decode_node(block: bytes) -> dict[str, Any]:
    """dag-pb PBNode + UnixFS Data as plain dicts."""
    links = []
    unixfs: dict[str, Any] = {"blocksizes": []}
    for number, value in _fields(block):
        if number == 2:
            assert isinstance(value, bytes)
            link = {}
            for lnum, lval in _fields(value):
                link[{1: "hash", 2: "name", 3: "tsize"}[lnum]] = lval
            links.append(link)
        elif number == 1:
            assert isinstance(value, bytes)
            for unum, uval in _fields(value):
                if unum == 4:
                    unixfs["blocksizes"].append(uval)
                else:
                    unixfs[{1: "type", 2: "data", 3: "filesize", 5: "hash", 6: "fanout"}[unum]] = (
                        uval
                    )
    return {"links": links, "unixfs": unixfs}


def cid_of_block(block: bytes) -> str:
    return multihash_to_cid(b"\x12\x20" + hashlib.sha256(block).digest())


def blocks_by_cid(path: Path) -> dict[str, bytes]:
    return {block.cid: block.data for block in iter_blocks(path)}


def cat(cid: str, blocks: dict[str, bytes]) -> bytes:
    """Reassemble a file's bytes by walking its DAG (like ``ipfs cat``)."""
    node = decode_node(blocks[cid])
    if not node["links"]:
        data: bytes = node["unixfs"].get("data", b"")
        return data
    return b"".join(cat(multihash_to_cid(link["hash"]), blocks) for link in node["links"])


def small_dag_cid(data: bytes, chunk_size: int, max_links: int = MAX_LINKS) -> str:
    dag = _FileDag(chunk_size=chunk_size, max_links=max_links)
    dag.update(data)
    return multihash_to_cid(dag.finish().multihash)


def make_tree(root: Path, files: dict[str, bytes | None]) -> Path:
    """Create files (bytes) and empty directories (None) under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            path.mkdir()
        else:
            path.write_bytes(content)
    return root


# --------------------------------------------------------------------------- file vectors

FILE_VECTORS = [
    # Given in the task brief (the classic `echo "hello world" | ipfs add`).
    (b"hello world\n", "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o"),
    # ipfs/kubo test/sharness/t0040-add-and-cat.sh ("zero length file has correct hash");
    # also ethereum/solidity test/libsolutil/IpfsHash.cpp and rs-ipfs/rust-ipfs.
    (b"", "QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH"),
    # ipfs/kubo test/sharness/t0040-add-and-cat.sh
    (b"Hello Worlds!\n", "QmVr26fY1tKyspEJBniVhqxQeEjhF78XerGiqWAwraVLQH"),
    (b"Helloo Worlds!\n", "Qmf35k66MZNW2GijohUmXQEWKZU4cCGTCwK6idfnt152wJ"),
    (b"IPFS\n", "QmdFyxZXsFiP4csgfM5uPu99AvFiKH62CSPDw5TP92nr7w"),
    (b"Hello Venus!\n", "QmU5kp3BH3B8tnWUU2Pikdb2maksBNkb92FHRr56hyghh4"),
    (b"Hello Mars!\n", "QmPrrHqJzto9m7SyiRzarwkqPcCSsKR2EB1AyqJfe8L8tN"),
    (b"Hello Jupiter!\n", "QmUnvPcBctVTAcJpigv6KMqDvmDewksPWrNVoy1E1WP5fh"),
    (b"Hello Neptune!\nHello Pluton!", "QmZDhWpi8NvKrekaYYhxKCdNVGWsFFe1CREnAjP1QbPaB3"),
    (b"World\n", "Qma9CyFdG5ffrZCcYSin2uAETygB25cswVwEYYzwfQuhTe"),
    # ipfs/kubo test/sharness/t0041-add-cat-offline.sh
    (b"some content\n", "Qmb1EXrDyKhNWfvLPYK4do3M9nU7BuLAcbqBir6aUrDsRY"),
    # ipfs/kubo test/sharness/t0260-sharding.sh (`ipfs resolve .../file100`)
    (b"100\n", "QmZ3RfWk1u5LEGYLHA633B5TNJy3Du27K6Fny9wcxpowGS"),
    # ipfs/kubo test/sharness/t0114-gateway-subdomains/README.md (CIDv0 of `echo hello`)
    (b"hello\n", "QmZULkCELmmk5XNfCgTnCyFgAVxBRBXyDHGGMVoLFLiXEN"),
    # ipfs/gateway-conformance test/fixtures.ts (dir/ascii.txt)
    (b"goodbye application/vnd.ipld.raw\n", "QmPPwobbE7eyUTZukZxWVu3etJEc7bk3b35bs6LxkLECRa"),
    # rs-ipfs/rust-ipfs unixfs/src/file/adder.rs; the same CID is quoted as "generated
    # with go-ipfs" in libipld's dag-cbor roundtrip test.
    (b"foobar\n", "QmRgutAxd8t7oGkSm4wmeuByG6M51wcTso6cubDdQtuEfL"),
    # rs-ipfs/rust-ipfs src/unixfs/mod.rs test_file_cid: "matches cid from go-ipfs 0.6.0"
    (
        b"\x08\x02\x12\x12Here is some data\n\x18\x12",
        "QmQZE72h2Vdm3F5gWr9RLuzSw3rUJEkKedWEa8t8XVygT5",
    ),
    # aleph-im/py-ipfs-cid tests/test_compute_cid.py
    (b"1234", "QmTPqcLhVnCtjoYuCZwPzfXcFrUviiPComTepHfEEaGf7g"),
    # ethereum/solidity test/libsolutil/IpfsHash.cpp (zero-filled buffers up to one chunk)
    (b"x", "QmULKig5Fxrs2sC4qt9nNduucXfb92AFYQ6Hi3YRqDmrYC"),
    (b"Solidity\n", "QmSsm9M7PQRBnyiz1smizk8hZw3URfk8fSeHzeTo3oZidS"),
    (bytes(200), "QmSXR1N23uWzsANi8wpxMPw5dmmhqBVUAb4hUrHVLpNaMr"),
    (bytes(10250), "QmVJJBB3gKKBWYC9QTywpH8ZL1bDeTDJ17B63Af5kino9i"),
    (bytes(100000), "QmYgKa25YqEGpQmmZtPPFMNK3kpqqneHk6nMSEUYryEX1C"),
    (bytes(121071), "QmdMdRshQmqvyc92N82r7AKYdUF5FRh4DJo6GtrmEk3wgj"),
    (bytes(131071), "QmSxYSToKHsPqqRdRnsM9gmr3EYS6dakhVaHgbFdgYQWi6"),
    (bytes(CHUNK_SIZE - 1), "QmbNDspMkzkMFKyS3eCJGedG7GWRQHSCzJCZLjxP7wyVAx"),
    # ethereum/solidity test/libsolutil/IpfsHash.cpp, the commented-out test_large (5 full
    # chunks + 1 partial: a two-level balanced tree). Solidity never implemented chunking,
    # so this value can only have come from go-ipfs.
    (bytes(1310710), "QmNg7BJo8gEMDK8yGQbHEwPtycesnE6FUULX5iVd5TAL9f"),
    # Secondary sources whose repository the code search did not name: a Python script
    # that shells out to `ipfs add --only-hash`, a .NET IPFS client's docs, and the
    # KimlikDAO JS test suite. Kept because they agree with everything above.
    (b"\x00", "QmS9JArPwa55ePgDnyg6TzX24mYTS1b1vLqWNebyVotKxQ"),
    (b"hello world", "Qmf412jQZiuVUtdgnB36FXFX7xg5V6KEbSJ4dpQuhkLyfD"),
    (b"a" * 2680, "Qmawd3DRAY5YwtCzQe8gBumMXA1JCrzvbH2WQR6ZTykVoG"),
    (b"KimlikDAO\n", "QmafCiqeYQtiXokAEUB4ToMcZJREhJcShbzvjrYmC1WCsi"),
    (b"foo\n", "QmYNmQKp6SuaVrpgWRsPTgCQCnpxUYGq76YEKBXuj2N4H6"),
]


@pytest.mark.parametrize(("data", "expected"), FILE_VECTORS, ids=lambda v: str(v)[:24])
def test_file_vectors(data: bytes, expected: str) -> None:
    assert cid_of_bytes(data) == expected


@pytest.mark.parametrize(
    ("data", "expected"),
    [v for v in FILE_VECTORS if len(v[0]) in (0, 1, 12, 14, CHUNK_SIZE - 1, 1310710)],
)
def test_file_vectors_from_disk_and_streaming(tmp_path: Path, data: bytes, expected: str) -> None:
    path = tmp_path / "f"
    path.write_bytes(data)
    assert cid_of_file(path) == expected
    assert cid_of_path(path) == expected
    builder = FileCidBuilder()
    for i in range(0, len(data), 7):
        builder.update(data[i : i + 7])
    assert builder.finish() == expected
    assert [item.root for item in walk_dag(path)][-1] == "file"


def test_named_constants() -> None:
    assert cid_of_bytes(b"") == EMPTY_FILE_CID
    assert CHUNK_SIZE == 262144
    assert MAX_LINKS == 174


def test_empty_file_block_bytes() -> None:
    # rs-ipfs/rust-ipfs unixfs/src/file/adder.rs empty_file: the exact block kubo stores.
    assert encode_file_leaf(b"") == bytes.fromhex("0a0408021800")


def test_gateway_conformance_blocks(tmp_path: Path) -> None:
    # ipfs/gateway-conformance test/fixtures.ts: the exact blocks of root/dir/ascii.txt.
    root = make_tree(tmp_path / "root", {"dir/ascii.txt": b"goodbye application/vnd.ipld.raw\n"})
    expected = {
        "Qmckhu9X5A4K6wNzQGSrDRoHPhSpbmUELTFRdYjeQZx1M3": (
            "EisKIhIgIE7LR5inp4/eN2jGFANfjmr8mtK0Il7JmoGHItfZh4MSA2RpchhgCgIIAQ=="
        ),
        "QmQWmSaF8SdriHSSZUCwTTWwC3ti7WY1dEEX25Etve9m78": (
            "EjEKIhIgD7PCI2Z6hZNKl2Kd7ViL4ByIVDe+K/ENWGXu17xNxHUSCWFzY2lpLnR4dBgpCgIIAQ=="
        ),
        "QmPPwobbE7eyUTZukZxWVu3etJEc7bk3b35bs6LxkLECRa": (
            "CicIAhIhZ29vZGJ5ZSBhcHBsaWNhdGlvbi92bmQuaXBsZC5yYXcKGCE="
        ),
    }
    blocks = list(iter_blocks(root))
    assert [b.cid for b in blocks] == list(reversed(expected))
    for block in blocks:
        assert block.data == base64.b64decode(expected[block.cid])
    assert cid_of_path(root) == "Qmckhu9X5A4K6wNzQGSrDRoHPhSpbmUELTFRdYjeQZx1M3"


# --------------------------------------------------------------------------- layout


def test_layout_vectors_with_small_chunks() -> None:
    lorem = (
        b"Lorem ipsum dolor sit amet, sit enim montes aliquam. Cras non lorem, "
        b"rhoncus condimentum, irure et ante. Pulvinar suscipit odio ante, et tellus a enim, "
        b"wisi ipsum, vel rhoncus eget faucibus varius, luctus turpis nibh vel odio nulla pede."
    )
    # rs-ipfs/rust-ipfs adder.rs three_layers: "go-ipfs 0.5 result" with --chunker=size-1,
    # i.e. 237 leaves: root -> [174 leaves, 63 leaves], 240 blocks in all.
    emitted: list[tuple[str, int]] = []
    dag = _FileDag(
        lambda mh, _block, leaf_len: emitted.append((multihash_to_cid(mh), leaf_len)),
        chunk_size=1,
    )
    dag.update(lorem)
    assert multihash_to_cid(dag.finish().multihash) == (
        "QmRQ6NZNUs4JrCT2y7tmCC1wUhjqYuTssB8VXbbN3rMffg"
    )
    assert len(emitted) == 240
    internal = [cid for cid, leaf_len in emitted if leaf_len < 0]
    assert internal == [
        "QmXUcuLGKc8SCMEqG4wgct6NKsSRZQfvB2FCfjDow1PfpB",
        "QmeEn8dxWTzGAFKvyXoLj4oWbh9putL4vSw4uhLXJrSZhs",
        "QmRQ6NZNUs4JrCT2y7tmCC1wUhjqYuTssB8VXbbN3rMffg",
    ]
    # Same file, rust-ipfs three_layers_all_subchunks (32-byte chunks).
    assert small_dag_cid(lorem, 32) == "QmYSLcVQqxKygiq7x9w1XGYxU29EShB8ZemiaQ8GAAw17h"


def test_foobar_two_byte_chunks_block_order() -> None:
    # rs-ipfs/rust-ipfs adder.rs favourite_multi_block_file ("fo", "ob", "ar", "\n", root).
    emitted: list[str] = []
    dag = _FileDag(lambda mh, _b, _n: emitted.append(multihash_to_cid(mh)), chunk_size=2)
    dag.update(b"foobar\n")
    dag.finish()
    assert emitted == [
        "QmfVyMoStzTvdnUR7Uotzh82gmL427q9z3xW5Y8fUoszi4",
        "QmdPyW4CWE3QBkgjWfjM5f7Tjb3HukxVuBXZtkqAGwsMnm",
        "QmNhDQpphvMWhdCzP74taRzXDaEfPGq8vWfFRzD7mEgePM",
        "Qmc5m94Gu7z62RC8waSKkZUrCCBJPyHbkpmGzEePxy2oXJ",
        "QmRJHYTNvC3hmd9gJQARxLR1QMEincccBV53bBw524yyq6",
    ]


def test_full_link_block_and_a_byte() -> None:
    # rs-ipfs/rust-ipfs adder.rs full_link_block_and_a_byte: 174 two-byte chunks + 1 byte.
    # (rust-ipfs' own result, same shape as a 174 * 256 KiB + 1 byte file under kubo.)
    assert small_dag_cid(bytes(174 * 2 + 1), 2) == "QmcHNWF1d56uCDSfJPA7t9fadZRV9we5HGSTGSmwuqmMP9"


def _go_balanced_shape(n_leaves: int, max_links: int) -> Any:
    """The tree go-unixfs balanced.Layout builds, as nested lists of leaf indexes.

    A direct port of its Layout/fillNodeRec recursion, used as an oracle for the streaming
    builder (which folds levels eagerly instead of recursing).
    """
    counter = iter(range(n_leaves))
    remaining = [n_leaves]

    def take_leaf() -> int:
        remaining[0] -= 1
        return next(counter)

    def fill(node: list[Any], depth: int) -> list[Any]:
        while len(node) < max_links and remaining[0] > 0:
            node.append(take_leaf() if depth == 1 else fill([], depth - 1))
        return node

    if n_leaves == 0:
        return 0
    root: Any = take_leaf()
    depth = 1
    while remaining[0] > 0:
        root = fill([root], depth)
        depth += 1
    return root


def _shape_from_blocks(cid: str, blocks: dict[str, bytes], counter: list[int]) -> Any:
    """The decoded tree as nested lists, leaves numbered in order (like the oracle)."""
    node = decode_node(blocks[cid])
    if not node["links"]:
        counter[0] += 1
        return counter[0] - 1
    return [
        _shape_from_blocks(multihash_to_cid(link["hash"]), blocks, counter)
        for link in node["links"]
    ]


@settings(max_examples=60, deadline=None)
@given(n_leaves=st.integers(1, 80), max_links=st.integers(2, 5), tail=st.integers(0, 3))
def test_streaming_builder_matches_go_balanced_layout(
    n_leaves: int, max_links: int, tail: int
) -> None:
    chunk_size = 4
    data = b"".join(i.to_bytes(4, "big") for i in range(n_leaves))
    if tail:
        data += n_leaves.to_bytes(4, "big")[:tail]
    expected_leaves = n_leaves + (1 if tail else 0)
    blocks: dict[str, bytes] = {}

    def emit(mh: bytes, block: bytes | None, _leaf_len: int) -> None:
        assert block is not None
        blocks[multihash_to_cid(mh)] = block

    dag = _FileDag(emit, chunk_size=chunk_size, max_links=max_links)
    dag.update(data)
    root = multihash_to_cid(dag.finish().multihash)
    assert _shape_from_blocks(root, blocks, [0]) == _go_balanced_shape(expected_leaves, max_links)
    assert cat(root, blocks) == data


@pytest.mark.parametrize(
    "size",
    [0, 1, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 3 * CHUNK_SIZE + 5, 174 * CHUNK_SIZE],
)
def test_sizes_structure(tmp_path: Path, size: int) -> None:
    data = random.Random(size).randbytes(size)
    path = tmp_path / "f"
    path.write_bytes(data)
    blocks = list(iter_blocks(path))
    by_cid = {b.cid: b.data for b in blocks}
    root = blocks[-1].cid
    assert root == cid_of_bytes(data) == cid_of_file(path)
    assert all(cid_of_block(b.data) == b.cid for b in blocks)
    assert cat(root, by_cid) == data
    node = decode_node(by_cid[root])
    n_chunks = max(1, -(-size // CHUNK_SIZE))
    if n_chunks == 1:
        # A single chunk is its own root: a leaf with Data and filesize.
        assert node["links"] == []
        assert node["unixfs"]["type"] == 2
        assert node["unixfs"].get("filesize") == size
        assert len(blocks) == 1
    else:
        assert len(node["links"]) == n_chunks
        assert node["unixfs"]["blocksizes"] == [
            min(CHUNK_SIZE, size - i * CHUNK_SIZE) for i in range(n_chunks)
        ]
        assert node["unixfs"]["filesize"] == size
        assert "data" not in node["unixfs"]
        assert all(link["name"] == b"" for link in node["links"])
        assert len(blocks) == n_chunks + 1


def test_two_levels_at_174_chunks_plus_one_byte() -> None:
    size = 174 * CHUNK_SIZE + 1
    data = random.Random(7).randbytes(size)
    blocks: dict[str, bytes] = {}
    order: list[str] = []

    def emit(mh: bytes, block: bytes | None, _n: int) -> None:
        assert block is not None
        order.append(multihash_to_cid(mh))
        blocks[order[-1]] = block

    dag = _FileDag(emit)
    dag.update(data)
    root = multihash_to_cid(dag.finish().multihash)
    assert root == cid_of_bytes(data) == order[-1]
    top = decode_node(blocks[root])
    # go-unixfs balanced layout: root -> [full node of 174 leaves, node -> [1-byte leaf]].
    assert len(top["links"]) == 2
    assert top["unixfs"]["blocksizes"] == [174 * CHUNK_SIZE, 1]
    full, partial = (decode_node(blocks[multihash_to_cid(li["hash"])]) for li in top["links"])
    assert len(full["links"]) == 174
    assert len(partial["links"]) == 1
    assert partial["unixfs"]["filesize"] == 1
    # Tsize = serialized size of the whole subtree.
    for link in top["links"]:
        child = multihash_to_cid(link["hash"])
        sub = decode_node(blocks[child])
        expected = len(blocks[child]) + sum(li["tsize"] for li in sub["links"])
        assert link["tsize"] == expected
    assert cat(root, blocks) == data


def test_big_zero_file_cid_of_file_equals_bytes(tmp_path: Path) -> None:
    path = tmp_path / "zeros"
    with path.open("wb") as handle:
        handle.truncate(1310710)
    assert cid_of_file(path) == "QmNg7BJo8gEMDK8yGQbHEwPtycesnE6FUULX5iVd5TAL9f"


# --------------------------------------------------------------------------- streaming


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    size=st.sampled_from(
        [0, 1, 100, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 2 * CHUNK_SIZE + 3]
    ),
    cuts=st.lists(st.integers(0, 2 * CHUNK_SIZE + 3), max_size=8),
)
def test_file_cid_builder_any_chunking(seed: int, size: int, cuts: list[int]) -> None:
    data = random.Random(seed).randbytes(size)
    points = sorted({c for c in cuts if c <= size} | {0, size})
    builder = FileCidBuilder()
    for start, end in itertools.pairwise(points):
        piece = data[start:end]
        builder.update(memoryview(piece) if start % 2 else bytearray(piece))
    assert builder.size == size
    assert builder.finish() == cid_of_bytes(data)


def test_file_cid_builder_is_single_use() -> None:
    builder = FileCidBuilder()
    builder.update(b"x")
    builder.finish()
    with pytest.raises(RuntimeError):
        builder.update(b"y")
    with pytest.raises(RuntimeError):
        builder.finish()


# --------------------------------------------------------------------------- directories


def test_empty_dir(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cid_of_path(empty) == EMPTY_DIR_CID == "QmUNLLsPACCz1vLxQVkXqqLX5R1X345qqfHbsf67hvA3Nn"
    assert list(iter_blocks(empty)) == [Block(EMPTY_DIR_CID, bytes.fromhex("0a020801"))]


def test_dir_with_hello_file_by_spec(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "d", {"hello.txt": b"hello world\n"})
    file_cid = "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o"
    leaf = encode_file_leaf(b"hello world\n")
    # Spelled out from the dag-pb + UnixFS specs: one link (Hash, Name, Tsize = leaf size)
    # then Data = UnixFS{Type: Directory}.
    link = b"\x0a\x22" + cid_to_multihash(file_cid) + b"\x12\x09hello.txt\x18" + bytes([len(leaf)])
    expected = b"\x12" + bytes([len(link)]) + link + b"\x0a\x02\x08\x01"
    blocks = list(iter_blocks(root))
    assert blocks == [Block(file_cid, leaf), Block(cid_of_block(expected), expected)]
    assert cid_of_path(root) == cid_of_block(expected)
    node = decode_node(expected)
    assert node["links"][0]["tsize"] == 20 == len(leaf)


def test_kubo_planets_dir(tmp_path: Path) -> None:
    # ipfs/kubo test/sharness/t0040-add-and-cat.sh add_directory (PLANETS, default flags).
    root = make_tree(
        tmp_path / "planets", {"mars.txt": b"Hello Mars!\n", "venus.txt": b"Hello Venus!\n"}
    )
    assert cid_of_path(root) == "QmWSgS32xQEcXMeqd3YPJLrNBLSdsfYCep2U7CFkyrjXwY"


def test_kubo_moons_nested_dirs(tmp_path: Path) -> None:
    # ipfs/kubo test/sharness/t0040-add-and-cat.sh "'ipfs add -rn' output looks good".
    root = make_tree(
        tmp_path / "moons",
        {
            "jupiter/europa.txt": b"Hello Europa!\n",
            "saturn/titan.txt": b"Hello Titan!\n",
            "mercury.txt": b"hey youre no moon!\n",
        },
    )
    expected = {
        "": "QmVKvomp91nMih5j6hYBA8KjbiaYvEetU2Q7KvtZkLe9nQ",
        "jupiter/europa.txt": "Qmbjg7zWdqdMaK2BucPncJQDxiALExph5k3NkQv5RHpccu",
        "jupiter": "QmS5mZddhFPLWFX3w6FzAy9QxyYkaxvUpsWCtZ3r7jub9J",
        "saturn": "QmaMagZT4rTE7Nonw8KGSK4oe1bh533yhZrCo1HihSG8FK",
        "saturn/titan.txt": "QmZzppb9WHn552rmRqpPfgU5FEiHH6gDwi3MrB9cTdPwdb",
        "mercury.txt": "QmUJjVtnN8YEeYcS8VmUeWffTWhnMQAkk5DzZdKnPhqUdK",
    }
    roots = {item.path: item.cid for item in walk_dag(root) if item.root}
    assert roots == expected
    assert cid_of_path(root) == expected[""]
    assert cid_of_path(root / "jupiter") == expected["jupiter"]


def test_kubo_add_current_dir(tmp_path: Path) -> None:
    # ipfs/kubo test/sharness/t0040-add-and-cat.sh "ipfs add -r ." (test_current_dir).
    root = make_tree(tmp_path / "test_current_dir", {"hey": b"Hey\n", "hello/world": b"World\n"})
    assert cid_of_path(root) == "QmZQWnfcqJ6hNkkPvrY9Q5X39GP3jUnUbAV4AbmbbR3Cb1"


def test_kubo_2000_files_flat_and_forced_hamt(tmp_path: Path) -> None:
    # ipfs/kubo test/sharness/t0260-sharding.sh (2014-2021 version): `echo $i > file$i`.
    root = make_tree(tmp_path / "testdata", {f"file{i}": f"{i}\n".encode() for i in range(1, 2001)})
    assert cid_of_path(root) == "QmavrTrQG4VhoJmantURAYuw3bowq3E2WcvP36NRQDAC1N"
    # Same data with UnixFSShardingSizeThreshold forced to "1B": every dir is a HAMT.
    assert (
        cid_of_path(root, _sharding_threshold=1) == "QmSCJD1KYLhVVHqBK3YyXuoEqHt7vggyJhzoFYbT8v1XYL"
    )


def test_kubo_hamt_threshold(tmp_path: Path) -> None:
    # ipfs/kubo test/sharness/t0260-sharding.sh (current version): 10-char names, so each
    # entry is estimated at 10 + 34 bytes and 5960 entries cross 256 KiB while 5955 do not.
    def make(name: str, numbers: range) -> Path:
        return make_tree(tmp_path / name, {f"file{i:06d}": f"{i}\n".encode() for i in numbers})

    assert cid_of_path(make("big_dir", range(1, 5961))) == (
        "QmWfjnRWRvdvYezQWnfbvrvY7JjrpevsE9cato1x76UqGr"
    )
    # UNSHAREDED in the test: big_dir minus file000001..5, back under the threshold.
    assert cid_of_path(make("unsharded", range(6, 5961))) == (
        "QmbVxi5zDdzytrjdufUejM92JsWj8wGVmukk6tiPce3p1m"
    )
    assert cid_of_path(make("small_dir", range(1, 101))) == (
        "QmdBXmm4HRpUhyzzctbFvi2tLai3XFL1YjmE1qfpJe61NX"
    )


def test_hamt_node_format(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "d", {"a": b"1", "b": b"2"})
    assert decode_node(list(iter_blocks(root))[-1].data)["unixfs"]["type"] == 1
    top = decode_node(list(walk_dag(root, _sharding_threshold=1))[-1].data or b"")
    assert top["unixfs"]["type"] == 5
    assert top["unixfs"]["fanout"] == 256
    assert top["unixfs"]["hash"] == 0x22  # murmur3-x64-64
    # The slot is the top byte of the hash; link names are "%02X" % slot + entry name.
    slots = {name: _murmur3_x64_64(name) >> 56 for name in (b"a", b"b")}
    assert slots[b"a"] != slots[b"b"]
    assert [link["name"] for link in top["links"]] == sorted(
        b"%02X" % slot + name for name, slot in slots.items()
    )
    # go-bitfield: big-endian, leading zero bytes dropped.
    bitfield = sum(1 << slot for slot in slots.values())
    assert top["unixfs"]["data"] == bitfield.to_bytes((bitfield.bit_length() + 7) // 8, "big")


@pytest.mark.parametrize(
    ("text", "h1"),
    [
        # spaolacci/murmur3 murmur_test.go (h64_1 column): the Go package go-unixfs' HAMT
        # hashes names with.
        (b"", 0x0000000000000000),
        (b"hello", 0xCBD8A7B341BD9B02),
        (b"hello, world", 0x342FAC623A5EBC8E),
        (b"19 Jan 2038 at 3:14:07 AM", 0xB89E5988B737AFFC),
        (b"The quick brown fox jumps over the lazy dog.", 0xCD99481F9EE902C9),
    ],
)
def test_murmur3_known_values(text: bytes, h1: int) -> None:
    assert _murmur3_x64_64(text) == h1


def test_nested_dirs_and_empty_subdir(tmp_path: Path) -> None:
    root = make_tree(
        tmp_path / "n",
        {"a/b/c/deep.txt": b"deep\n", "a/empty": None, "z.txt": b"z", "a/b/x": b""},
    )
    items = list(walk_dag(root))
    roots = {item.path: item for item in items if item.root}
    assert roots["a/empty"].cid == EMPTY_DIR_CID
    assert roots["a/b/x"].cid == EMPTY_FILE_CID
    assert roots[""].size == len(b"deep\n") + 1
    assert items[-1].path == ""
    assert items[-1].root == "dir"
    # A directory's CID does not depend on where it sits.
    assert cid_of_path(root / "a") == roots["a"].cid
    blocks = blocks_by_cid(root)
    top = decode_node(blocks[roots[""].cid])
    assert [link["name"] for link in top["links"]] == [b"a", b"z.txt"]
    a_node = decode_node(blocks[roots["a"].cid])
    # Tsize of a directory link = block size of the child + its links' Tsizes.
    child = decode_node(blocks[multihash_to_cid(a_node["links"][0]["hash"])])
    assert a_node["links"][0]["tsize"] == len(
        blocks[multihash_to_cid(a_node["links"][0]["hash"])]
    ) + sum(li["tsize"] for li in child["links"])


def test_links_sorted_by_name_bytes(tmp_path: Path) -> None:
    names = ["b", "B", "a", "_", "Z1", "é", "a.txt", "a-b", "10", "9"]
    root = make_tree(tmp_path / "s", {name: name.encode() for name in names})
    node = decode_node(list(iter_blocks(root))[-1].data)
    got = [link["name"] for link in node["links"]]
    assert got == sorted(n.encode() for n in names)


def test_non_utf8_name(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    root.mkdir()
    with open(os.path.join(os.fsencode(root), b"caf\xe9"), "wb") as handle:
        handle.write(b"x")
    node = decode_node(list(iter_blocks(root))[-1].data)
    assert node["links"][0]["name"] == b"caf\xe9"


def test_hidden_files_included_by_default(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "h", {"mars.txt": b"Hello Mars!\n", ".secret": b"s"})
    venus_root = make_tree(tmp_path / "v", {"mars.txt": b"Hello Mars!\n"})
    assert cid_of_path(root) != cid_of_path(venus_root)
    # Like `ipfs add -r` without --hidden.
    assert cid_of_path(root, hidden=False) == cid_of_path(venus_root)


def test_iter_blocks_dedupes_and_verifies(tmp_path: Path) -> None:
    root = make_tree(
        tmp_path / "dup", {"a": bytes(3 * CHUNK_SIZE), "b": bytes(3 * CHUNK_SIZE), "c": b"c"}
    )
    blocks = list(iter_blocks(root))
    cids = [b.cid for b in blocks]
    assert len(cids) == len(set(cids))
    # zero chunk leaf, file node (shared by a and b), file c, directory
    assert len(blocks) == 4
    assert all(cid_of_block(b.data) == b.cid for b in blocks)
    assert cids[-1] == cid_of_path(root)
    leaf_items = [i for i in walk_dag(root, leaf_bytes=False) if i.offset >= 0]
    assert [(i.path, i.offset, i.length) for i in leaf_items[:3]] == [
        ("a", 0, CHUNK_SIZE),
        ("a", CHUNK_SIZE, CHUNK_SIZE),
        ("a", 2 * CHUNK_SIZE, CHUNK_SIZE),
    ]
    assert all(i.data is None for i in leaf_items)


# --------------------------------------------------------------------------- refusals


def test_symlinks_refused(tmp_path: Path) -> None:
    target = tmp_path / "target.txt"
    target.write_bytes(b"t")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(ValueError, match="symlink"):
        cid_of_path(link)
    with pytest.raises(ValueError, match="symlink"):
        cid_of_file(link)
    tree = make_tree(tmp_path / "tree", {"ok": b"ok"})
    (tree / "inner").symlink_to(target)
    with pytest.raises(ValueError, match="symlink"):
        cid_of_path(tree)
    with pytest.raises(ValueError, match="symlink"):
        list(iter_blocks(tree))
    dir_link = tmp_path / "dirlink"
    dir_link.symlink_to(tree, target_is_directory=True)
    with pytest.raises(ValueError, match="symlink"):
        cid_of_path(dir_link)


def test_special_files_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="regular file"):
        cid_of_file(fifo)
    with pytest.raises(ValueError, match="unsupported file type"):
        cid_of_path(tmp_path)


# --------------------------------------------------------------------------- CID syntax


@pytest.mark.parametrize(
    "cid",
    [
        "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o",
        EMPTY_DIR_CID,
        # ipfs/kubo test/sharness/t0040-add-and-cat.sh (--cid-base=base32, raw leaf)
        "bafybeibyosqxljd2eptb4ebbtvk7pb4aoxzqa6ttdsflty6rsslz5y6i34",
        "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku",
        # t0040, --hash=blake2b-256 (a different multihash function)
        "bafk2bzaceaqcxw46uzkyd2jmczoogof6pnkqt4dpiv3pwkunsv4g5rkkmecie",
    ],
)
def test_valid_cids(cid: str) -> None:
    assert is_valid_cid(cid)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Qm",
        "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5",  # too short
        "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5oo",  # too long
        "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff50",  # '0' is not base58
        "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ffIl",
        "bafybeibyosqxljd2eptb4ebbtvk7pb4aoxzqa6ttdsflty6rsslz5y6i3",  # truncated digest
        "BAFYBEIBYOSQXLJD2EPTB4EBBTVK7PB4AOXZQA6TTDSFLTY6RSSLZ5Y6I34",
        "bafybeibyosqxljd2eptb4ebbtvk7pb4aoxzqa6ttdsflty6rsslz5y6i34!",
        "b",
        "zdj7WWeQ43G6JJvLWQWZpyHuAMq6uYWRjkBXFad11vE2LHhQ7",
        "../../etc/passwd",
        "hello world",
    ],
)
def test_invalid_cids(text: str) -> None:
    assert not is_valid_cid(text)


def test_cid_v0_and_v1_name_the_same_multihash() -> None:
    # ipfs/kubo t0114-gateway-subdomains/README.md: CIDv0to1 = `ipfs cid base32` of CIDv0.
    v0 = "QmZULkCELmmk5XNfCgTnCyFgAVxBRBXyDHGGMVoLFLiXEN"
    v1 = "bafybeiffndsajwhk3lwjewwdxqntmjm4b5wxaaanokonsggenkbw6slwk4"
    assert cid_to_multihash(v1) == cid_to_multihash(v0)
    assert multihash_to_cid(cid_to_multihash(v1)) == v0
    with pytest.raises(ValueError, match="dag-pb"):
        cid_to_multihash("bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku")


# --------------------------------------------------------------------------- root CID only


KUBO_TREES = [
    (
        {"mars.txt": b"Hello Mars!\n", "venus.txt": b"Hello Venus!\n"},
        "QmWSgS32xQEcXMeqd3YPJLrNBLSdsfYCep2U7CFkyrjXwY",
    ),
    (
        {
            "jupiter/europa.txt": b"Hello Europa!\n",
            "saturn/titan.txt": b"Hello Titan!\n",
            "mercury.txt": b"hey youre no moon!\n",
        },
        "QmVKvomp91nMih5j6hYBA8KjbiaYvEetU2Q7KvtZkLe9nQ",
    ),
    (
        {"hey": b"Hey\n", "hello/world": b"World\n"},
        "QmZQWnfcqJ6hNkkPvrY9Q5X39GP3jUnUbAV4AbmbbR3Cb1",
    ),
]


@pytest.mark.parametrize(("files", "expected"), KUBO_TREES)
def test_root_only_walks_give_kubo_cids_and_sizes(
    tmp_path: Path, files: dict[str, bytes], expected: str
) -> None:
    root = make_tree(tmp_path / "t", dict(files))
    size = sum(len(data) for data in files.values())
    assert cid_and_size_of_path(root) == (expected, size)
    assert cid_of_small_tree(root, max_bytes=size, max_entries=64) == (expected, size)


def results_folder(root: Path) -> dict[str, bytes | None]:
    """A results folder as the executors leave it, and with what else a job may write."""
    files: dict[str, bytes | None] = {
        "stdout": b"hello\n",
        "stderr": b"",
        "exitCode": b"0",
        "outputs/.hidden": b"dot",
        "outputs/nested/empty": None,
        "outputs/two-chunks": bytes(range(256)) * (CHUNK_SIZE // 256) + b"tail",
        "logs": None,
    }
    make_tree(root, files)
    return files


def test_small_tree_equals_the_block_walk_and_the_in_memory_tree(tmp_path: Path) -> None:
    """The runner's inline addressing of a results folder gives exactly the CID of the full
    block walk (what the content store serves) and of the same tree built from bytes in
    memory, with the content size."""
    root = tmp_path / "results"
    files = results_folder(root)
    [walked] = [item for item in walk_dag(root) if item.path == "" and item.root == "dir"]
    built = TreeCidBuilder()
    for rel, data in files.items():
        parts = tuple(rel.split("/"))
        if data is None:
            built.add_dir(parts)
        else:
            file = FileCidBuilder()
            file.update(data)
            built.add_file(parts, file)
    size = sum(len(data) for data in files.values() if data is not None)
    expected = (walked.cid, size)
    assert walked.size == size
    assert built.finish() == walked.cid
    assert cid_of_path(root) == walked.cid
    assert cid_and_size_of_path(root) == expected
    assert cid_of_small_tree(root, max_bytes=size, max_entries=len(files) + 3) == expected


def test_small_tree_gives_up_past_its_budget(tmp_path: Path) -> None:
    root = tmp_path / "results"
    files = results_folder(root)
    size = sum(len(data) for data in files.values() if data is not None)
    entries = len(files) + 3  # the root, outputs/ and outputs/nested/ are implied
    assert cid_of_small_tree(root, max_bytes=size - 1, max_entries=entries) is None
    assert cid_of_small_tree(root, max_bytes=size, max_entries=entries - 1) is None
    assert cid_of_small_tree(root, max_bytes=size, max_entries=entries) is not None


def test_small_tree_refuses_symlinks(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "results", {"stdout": b"x"})
    (root / "link").symlink_to(root / "stdout")
    with pytest.raises(ValueError, match="symlink"):
        cid_of_small_tree(root, max_bytes=1 << 20, max_entries=10)
    with pytest.raises(ValueError, match="symlink"):
        cid_and_size_of_path(root)


def test_a_small_file_that_grew_since_its_lstat_is_read_to_its_end(tmp_path: Path) -> None:
    path = tmp_path / "stdout"
    path.write_bytes(b"0123456789" * 10)
    assert _read_small_regular(str(path), 100) == b"0123456789" * 10
    assert _read_small_regular(str(path), 5) == b"0123456789" * 10  # as if it grew after lstat
    assert _read_small_regular(str(path), 500) == b"0123456789" * 10  # or shrank


def test_a_small_file_swapped_after_its_lstat_is_still_refused(tmp_path: Path) -> None:
    # What _tree_link's small-file read meets if a run swaps a file for a FIFO or a symlink
    # between its lstat and the open.
    fifo, link = tmp_path / "fifo", tmp_path / "link"
    os.mkfifo(fifo)
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="regular file"):
        _read_small_regular(str(fifo), 10)
    with pytest.raises(ValueError, match="symlink"):
        _read_small_regular(str(link), 10)


_BITCOIN_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def _b58_one_digit_at_a_time(raw: bytes) -> str:
    """The textbook base58btc, a separate reference for the encoder's two-digit steps."""
    n = int.from_bytes(raw, "big")
    out = ""
    while n:
        n, rem = divmod(n, 58)
        out = _BITCOIN_ALPHABET[rem] + out
    return "1" * (len(raw) - len(raw.lstrip(b"\0"))) + out


@given(st.binary(max_size=40), st.integers(min_value=0, max_value=3))
def test_base58_matches_the_one_digit_at_a_time_encoding(raw: bytes, zeros: int) -> None:
    raw = b"\0" * zeros + raw  # leading zero bytes are "1"s, not part of the number
    text = _b58encode(raw)
    assert text == _b58_one_digit_at_a_time(raw)
    assert _b58decode(text) == raw


@pytest.mark.parametrize("n", [1, 57, 58, 59, 58 * 58 - 1, 58 * 58, 58**3, 58**3 - 1])
def test_base58_of_numbers_around_digit_boundaries(n: int) -> None:
    # An odd digit count leaves a top pair that starts with a zero digit.
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    assert _b58encode(raw) == _b58_one_digit_at_a_time(raw)
