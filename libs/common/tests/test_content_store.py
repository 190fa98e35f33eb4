"""Tests for shoal_common.content_store (filesystem only, no sockets)."""

from __future__ import annotations

import io
import os
import shutil
import sqlite3
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from shoal_common.cid import (
    CHUNK_SIZE,
    EMPTY_DIR_CID,
    EMPTY_FILE_CID,
    cid_of_bytes,
    cid_of_path,
    iter_blocks,
)
from shoal_common.content_store import (
    ContentCorruptedError,
    ContentNotFoundError,
    ContentStore,
    UnsafeArchiveError,
    safe_extract_tar,
)


@pytest.fixture
def store(tmp_path: Path) -> ContentStore:
    return ContentStore(tmp_path / "store")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    files = {
        "stdout": b"hello world\n",
        "stderr": b"",
        "exitCode": b"0",
        "outputs/big.bin": bytes(range(256)) * (3 * CHUNK_SIZE // 256 + 7),
        "outputs/nested/deep.txt": b"deep\n",
        ".hidden": b"kept",
    }
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    (root / "outputs" / "empty").mkdir()
    return root


def _objects(store: ContentStore) -> list[str]:
    return sorted(os.listdir(store.root / "objects"))


# --------------------------------------------------------------------------- put / get


def test_put_bytes_roundtrip(store: ContentStore) -> None:
    cid = store.put_bytes(b"hello world\n")
    assert cid == "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o"
    assert store.has(cid)
    assert store.path_of(cid).read_bytes() == b"hello world\n"
    assert store.size_of(cid) == 12
    assert store.kind_of(cid) == "file"
    assert store.put_bytes(b"hello world\n") == cid
    assert _objects(store) == [cid]


def test_put_empty_file_and_dir(store: ContentStore, tmp_path: Path) -> None:
    assert store.put_bytes(b"") == EMPTY_FILE_CID
    assert store.get_block(EMPTY_FILE_CID) == bytes.fromhex("0a0408021800")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert store.put_path(empty) == EMPTY_DIR_CID
    assert store.path_of(EMPTY_DIR_CID).is_dir()
    assert store.size_of(EMPTY_DIR_CID) == 0
    assert store.get_block(EMPTY_DIR_CID) == bytes.fromhex("0a020801")


def test_put_path_tree(store: ContentStore, tree: Path) -> None:
    cid = store.put_path(tree)
    assert cid == cid_of_path(tree)
    stored = store.path_of(cid)
    assert cid_of_path(stored) == cid
    assert (stored / "outputs" / "nested" / "deep.txt").read_bytes() == b"deep\n"
    assert (stored / ".hidden").read_bytes() == b"kept"
    assert store.kind_of(cid) == "dir"
    total = sum(p.stat().st_size for p in tree.rglob("*") if p.is_file())
    assert store.size_of(cid) == total
    # Idempotent: the same tree again is the same object, stored once.
    assert store.put_path(tree) == cid
    assert _objects(store) == [cid]
    assert os.listdir(store.root / "tmp") == []


def test_put_single_file_path(store: ContentStore, tree: Path) -> None:
    cid = store.put_path(tree / "outputs" / "big.bin")
    assert cid == cid_of_path(tree / "outputs" / "big.bin")
    assert store.path_of(cid).read_bytes() == (tree / "outputs" / "big.bin").read_bytes()


def test_sub_entries_resolve(store: ContentStore, tree: Path) -> None:
    root = store.put_path(tree)
    nested = cid_of_path(tree / "outputs" / "nested")
    assert store.has(nested)
    assert store.path_of(nested) == store.path_of(root) / "outputs" / "nested"
    assert store.size_of(nested) == 5
    stdout = cid_of_bytes(b"hello world\n")
    assert store.path_of(stdout).read_bytes() == b"hello world\n"
    # Content already present inside a tree is not copied again.
    assert store.put_bytes(b"hello world\n") == stdout
    assert _objects(store) == [root]


def test_every_block_served(store: ContentStore, tree: Path) -> None:
    store.put_path(tree)
    blocks = list(iter_blocks(tree))
    assert len(blocks) > 5
    for block in blocks:
        assert store.get_block(block.cid) == block.data


def test_get_block_accepts_cidv1(store: ContentStore) -> None:
    store.put_bytes(b"hello\n")
    # ipfs/kubo t0114 README: base32 CIDv1 spelling of QmZULkCE... ("hello\n").
    v1 = "bafybeiffndsajwhk3lwjewwdxqntmjm4b5wxaaanokonsggenkbw6slwk4"
    assert store.get_block(v1) == store.get_block("QmZULkCELmmk5XNfCgTnCyFgAVxBRBXyDHGGMVoLFLiXEN")
    assert store.has(v1)


def test_missing_and_invalid(store: ContentStore) -> None:
    missing = cid_of_bytes(b"never stored")
    assert not store.has(missing)
    assert store.get_block(missing) is None
    with pytest.raises(ContentNotFoundError):
        store.path_of(missing)
    with pytest.raises(ContentNotFoundError):
        store.size_of(missing)
    for bad in ("../../etc/passwd", "/etc/passwd", "Qm..", "", "objects"):
        assert not store.has(bad)
        assert store.get_block(bad) is None
        with pytest.raises(ValueError, match="CID"):
            store.path_of(bad)


def test_corruption_detected(store: ContentStore) -> None:
    data = bytes(CHUNK_SIZE + 10)
    cid = store.put_bytes(data)
    path = store.path_of(cid)
    leaf = next(iter(iter_blocks(path)))
    path.chmod(0o644)
    path.write_bytes(b"\x01" + data[1:])
    with pytest.raises(ContentCorruptedError):
        store.get_block(leaf.cid)
    # Internal nodes live in the index, unaffected.
    assert store.get_block(cid) is not None


def test_stored_files_are_read_only(store: ContentStore, tree: Path) -> None:
    cid = store.put_path(tree)
    mode = (store.path_of(cid) / "stdout").stat().st_mode
    assert mode & 0o222 == 0


def test_symlink_in_tree_refused_and_nothing_stored(
    store: ContentStore, tree: Path, tmp_path: Path
) -> None:
    (tree / "outputs" / "link").symlink_to(tmp_path)
    with pytest.raises(ValueError, match="symlink"):
        store.put_path(tree)
    assert _objects(store) == []
    assert os.listdir(store.root / "tmp") == []
    link = tmp_path / "filelink"
    link.symlink_to(tree / "stdout")
    with pytest.raises(ValueError, match="symlink"):
        store.put_path(link)


def test_special_file_refused(store: ContentStore, tree: Path) -> None:
    os.mkfifo(tree / "pipe")
    with pytest.raises(ValueError, match="regular file"):
        store.put_path(tree)
    assert _objects(store) == []


def test_threads_write_and_read_through_their_own_connections(store: ContentStore) -> None:
    def put_and_read(i: int) -> bool:
        cid = store.put_bytes(f"item {i}".encode())
        return store.has(cid) and store.path_of(cid).read_bytes() == f"item {i}".encode()

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(put_and_read, range(40)))
    # Every thread sees what the others committed, and the store works again after close().
    assert all(store.has(cid_of_bytes(f"item {i}".encode())) for i in range(40))
    store.close()
    assert store.has(cid_of_bytes(b"item 7"))
    assert store.has(store.put_bytes(b"after close"))
    store.close()


def test_concurrent_puts_of_same_tree(store: ContentStore, tree: Path) -> None:
    with ThreadPoolExecutor(4) as pool:
        cids = list(pool.map(lambda _: store.put_path(tree), range(8)))
    assert len(set(cids)) == 1
    assert _objects(store) == [cids[0]]
    assert cid_of_path(store.path_of(cids[0])) == cids[0]


def test_recovers_object_left_unindexed(store: ContentStore, tree: Path) -> None:
    # A crash between the rename and the index write leaves objects/<cid> unindexed.
    cid = cid_of_path(tree)
    shutil.copytree(tree, store.root / "objects" / cid)
    assert not store.has(cid)
    assert store.put_path(tree) == cid
    assert store.has(cid)
    assert store.get_block(cid) is not None


def test_reopen_store(store: ContentStore, tree: Path) -> None:
    cid = store.put_path(tree)
    again = ContentStore(store.root)
    assert again.has(cid)
    with sqlite3.connect(store.root / "index.sqlite3") as db:
        (count,) = db.execute("SELECT count(*) FROM entries WHERE cid = ?", (cid,)).fetchone()
    assert count == 1


# --------------------------------------------------------------------------- tar


class _WriteOnly(io.RawIOBase):
    """A non-seekable sink, like an HTTP response body."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, b: object) -> int:
        data = bytes(b)  # type: ignore[call-overload]
        self.chunks.append(data)
        return len(data)


def test_export_tar_roundtrip(store: ContentStore, tree: Path, tmp_path: Path) -> None:
    cid = store.put_path(tree)
    sink = _WriteOnly()
    store.export_tar(cid, sink)  # type: ignore[arg-type]
    raw = b"".join(sink.chunks)
    out = tmp_path / "out"
    safe_extract_tar(io.BytesIO(raw), out)
    assert cid_of_path(out) == cid
    # Deterministic: same CID, same bytes.
    again = io.BytesIO()
    store.export_tar(cid, again)
    assert again.getvalue() == raw
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [
        ".hidden",
        "exitCode",
        "outputs",
        "outputs/big.bin",
        "outputs/empty",
        "outputs/nested",
        "outputs/nested/deep.txt",
        "stderr",
        "stdout",
    ]
    assert {(m.mtime, m.uid, m.gid) for m in members} == {(0, 0, 0)}


def test_export_tar_of_file(store: ContentStore, tmp_path: Path) -> None:
    cid = store.put_bytes(b"payload")
    buffer = io.BytesIO()
    store.export_tar(cid, buffer)
    buffer.seek(0)
    with tarfile.open(fileobj=buffer) as tar:
        member = tar.getmembers()[0]
        assert member.name == cid
        extracted = tar.extractfile(member)
        assert extracted is not None
        assert extracted.read() == b"payload"


def test_export_tar_missing(store: ContentStore) -> None:
    with pytest.raises(ContentNotFoundError):
        store.export_tar(cid_of_bytes(b"nope"), io.BytesIO())


def _tar(*members: tuple[tarfile.TarInfo, bytes | None], gz: bool = False) -> io.BytesIO:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if gz else "w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    buffer.seek(0)
    return buffer


def _file(name: str) -> tarfile.TarInfo:
    return tarfile.TarInfo(name)


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def _dir(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def test_extract_plain_and_gzip(tmp_path: Path) -> None:
    for gz in (False, True):
        dest = tmp_path / f"d{gz}"
        archive = _tar(
            (_dir("./"), None),
            (_dir("sub"), None),
            (_file("./sub/a.txt"), b"a"),
            (_file("b/c.txt"), b"c"),
            gz=gz,
        )
        safe_extract_tar(archive, dest)
        assert (dest / "sub" / "a.txt").read_bytes() == b"a"
        assert (dest / "b" / "c.txt").read_bytes() == b"c"


@pytest.mark.parametrize(
    "member",
    [
        _file("../evil"),
        _file("/abs/evil"),
        _file("a/../../evil"),
        _file("a/b/../../../evil"),
        _link("link", "/etc/passwd"),
        _link("link", "../outside"),
        _link("sub/link", "../../outside"),
        _link("hard", "/etc/passwd", tarfile.LNKTYPE),
        _link("hard", "../outside", tarfile.LNKTYPE),
    ],
    ids=lambda m: f"{m.name}->{m.linkname}",
)
def test_extract_refuses_escapes(tmp_path: Path, member: tarfile.TarInfo) -> None:
    dest = tmp_path / "dest"
    (tmp_path / "outside").write_bytes(b"secret")
    data = b"x" if member.isreg() else None
    with pytest.raises(UnsafeArchiveError):
        safe_extract_tar(_tar((member, data)), dest)
    assert (tmp_path / "outside").read_bytes() == b"secret"
    assert not (tmp_path / "evil").exists()


@pytest.mark.parametrize("kind", [tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE])
def test_extract_refuses_special_members(tmp_path: Path, kind: bytes) -> None:
    info = tarfile.TarInfo("dev")
    info.type = kind
    with pytest.raises(UnsafeArchiveError, match="type"):
        safe_extract_tar(_tar((info, None)), tmp_path / "dest")


def test_extract_symlink_chain_cannot_escape(tmp_path: Path) -> None:
    # Each link looks inside on its own; together a -> b/../x with b -> . means ../x.
    dest = tmp_path / "dest"
    archive = _tar((_link("a", "b/../x"), None), (_link("b", "."), None))
    with pytest.raises(UnsafeArchiveError, match="outside"):
        safe_extract_tar(archive, dest)
    assert not os.path.lexists(dest / "a")
    assert not os.path.lexists(dest / "b")


def test_extract_no_writing_through_symlinks(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "escape").symlink_to(tmp_path)
    with pytest.raises(UnsafeArchiveError):
        safe_extract_tar(_tar((_file("escape/evil"), b"x")), dest)
    assert not (tmp_path / "evil").exists()
    # Symlinks are created last, so a file cannot be written through an archive link.
    archive = _tar((_link("l", "sub"), None), (_file("l/x"), b"x"))
    with pytest.raises(UnsafeArchiveError):
        safe_extract_tar(archive, tmp_path / "dest2")


def test_extract_allows_links_inside(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    archive = _tar(
        (_file("run1/result.txt"), b"r"),
        (_link("outputs/latest", "../run1"), None),
        (_link("copy.txt", "run1/result.txt", tarfile.LNKTYPE), None),
    )
    safe_extract_tar(archive, dest)
    assert (dest / "outputs" / "latest" / "result.txt").read_bytes() == b"r"
    assert (dest / "copy.txt").read_bytes() == b"r"
    assert os.path.samefile(dest / "copy.txt", dest / "run1" / "result.txt")


def test_extract_refuses_overwrite_and_limits_size(tmp_path: Path) -> None:
    with pytest.raises(UnsafeArchiveError, match="overwrite"):
        safe_extract_tar(_tar((_file("a"), b"1"), (_file("a"), b"2")), tmp_path / "d1")
    with pytest.raises(UnsafeArchiveError, match="exceeds"):
        safe_extract_tar(
            _tar((_file("a"), b"x" * 10), (_file("b"), b"y" * 10)), tmp_path / "d2", max_bytes=15
        )


def test_extract_then_put_matches(store: ContentStore, tree: Path, tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(tree, arcname=".")
    buffer.seek(0)
    out = tmp_path / "x"
    safe_extract_tar(buffer, out)
    assert store.put_path(out) == cid_of_path(tree)
