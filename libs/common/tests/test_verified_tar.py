"""One-pass writes of streamed content: the CID computed on the way equals ``cid_of_path`` of
what was written, and unsafe or broken archives are refused."""

from __future__ import annotations

import io
import os
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from shoal_common.cid import CHUNK_SIZE, EMPTY_DIR_CID, HAMT_SHARDING_THRESHOLD, cid_of_path
from shoal_common.content_store import UnsafeArchiveError
from shoal_common.verified_tar import ReadPiece, extract_tar, write_file


def reader(data: bytes, piece: int) -> ReadPiece:
    """The stream in pieces of ``piece`` bytes (never aligned with tar blocks or chunks)."""
    view = memoryview(data)
    pos = 0

    def read(n: int) -> memoryview:
        nonlocal pos
        got = view[pos : pos + min(n, piece)]
        pos += len(got)
        return got

    return read


def make_tree(root: Path, files: dict[str, bytes], dirs: tuple[str, ...] = ()) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    for rel in dirs:
        (root / rel).mkdir(parents=True, exist_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    return root


def tar_of(root: Path, *, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(dirnames) + sorted(filenames):
                path = Path(dirpath) / name
                tar.add(path, arcname=str(path.relative_to(root)), recursive=False)
    return buf.getvalue()


def members(*entries: tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            if isinstance(entry, tuple):
                info, data = entry
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(entry)
    return buf.getvalue()


def trees() -> Iterator[tuple[str, dict[str, bytes], tuple[str, ...]]]:
    rng = __import__("random").Random(7)
    yield "empty", {}, ()
    yield "one-empty-file", {"e": b""}, ()
    yield (
        "results-folder",
        {"stdout": b"42\n", "stderr": b"", "exitCode": b"0", "outputs/data.bin": b"\1" * 300_000},
        ("outputs/empty-dir",),
    )
    yield (
        "multi-chunk-nested",
        {
            "a/b/c/big": rng.randbytes(3 * CHUNK_SIZE + 17),
            "a/.hidden": b"dot",
            "a/b/x": b"x",
            "z": rng.randbytes(CHUNK_SIZE),
        },
        (),
    )
    yield "long-names", {"d" * 120 + "/" + "f" * 150: b"long", "ü-ñame": b"utf8"}, ()
    # Enough entries for kubo to shard the directory (HAMT).
    many = {f"file-{i:05d}-{'x' * 40}": b"%d" % i for i in range(HAMT_SHARDING_THRESHOLD // 60)}
    yield "hamt-sharded", many, ()


@pytest.mark.parametrize(("files", "dirs"), [pytest.param(f, d, id=n) for n, f, d in trees()])
def test_tar_extraction_gives_the_cid_of_what_it_wrote(
    tmp_path: Path, files: dict[str, bytes], dirs: tuple[str, ...]
) -> None:
    source = make_tree(tmp_path / "source", files, dirs)
    data = tar_of(source)
    dest = tmp_path / "dest"
    got = extract_tar(reader(data, 65_537), dest)
    assert got == cid_of_path(source)
    assert got == cid_of_path(dest)
    for rel, content in files.items():
        assert (dest / rel).read_bytes() == content


def test_an_empty_archive_is_the_empty_directory(tmp_path: Path) -> None:
    assert extract_tar(reader(members(), 512), tmp_path / "d") == EMPTY_DIR_CID


@pytest.mark.parametrize("size", [0, 1, CHUNK_SIZE, 5 * CHUNK_SIZE + 3])
def test_file_write_gives_the_files_cid(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    target = tmp_path / "f"
    assert write_file(reader(data, 70_001), target) == cid_of_path(_written(tmp_path, data))
    assert target.read_bytes() == data


def _written(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "reference"
    path.write_bytes(data)
    return path


def test_changed_bytes_change_the_cid(tmp_path: Path) -> None:
    source = make_tree(tmp_path / "s", {"stdout": b"the-original-result\n"})
    data = tar_of(source).replace(b"original", b"tampered")
    assert extract_tar(reader(data, 1000), tmp_path / "d") != cid_of_path(source)


def _file(name: str) -> tarfile.TarInfo:
    return tarfile.TarInfo(name)


def _link(name: str, kind: bytes, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def _device(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    return info


@pytest.mark.parametrize(
    ("archive", "words"),
    [
        pytest.param(members((_file("../escape"), b"x")), "'..'", id="dot-dot"),
        pytest.param(members((_file("/etc/passwd"), b"x")), "absolute", id="absolute"),
        pytest.param(members(_link("l", tarfile.SYMTYPE, "/etc")), "member type", id="symlink"),
        pytest.param(
            members((_file("a"), b"x"), _link("b", tarfile.LNKTYPE, "a")),
            "member type",
            id="hardlink",
        ),
        pytest.param(members(_device("dev")), "member type", id="device"),
        pytest.param(
            members((_file("a"), b"1"), (_file("a"), b"2")), "overwrite", id="same-file-twice"
        ),
        pytest.param(
            members((_file("a"), b"1"), (_file("a/b"), b"2")), "non-directory", id="file-as-dir"
        ),
        pytest.param(members((_file("a"), b"x" * 2000))[:1024], "ends early", id="truncated"),
        pytest.param(members((_file("a"), b"x")) + b"junk", "after the end", id="trailing-data"),
        pytest.param(b"\1" * 512, "header", id="not-a-tar"),
    ],
)
def test_unsafe_or_broken_archives_are_refused(tmp_path: Path, archive: bytes, words: str) -> None:
    with pytest.raises(UnsafeArchiveError, match=re.escape(words)):
        extract_tar(reader(archive, 300), tmp_path / "d")
    assert not (tmp_path / "escape").exists()
