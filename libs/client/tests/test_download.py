"""The client's one-pass download: what is presented at ``dest`` is always verified content.

Chunks are fed as the HTTP body would arrive (64 KiB reads); a wrong CID, a broken archive
or a connection cut part-way leave nothing at ``dest`` and no scratch folder behind.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from shoal_client.download import DownloadError, fetch
from shoal_common.cid import cid_of_bytes, cid_of_path

READ = 64 * 1024


def chunks(data: bytes, *, fail_after: int | None = None) -> Iterator[bytes]:
    for start in range(0, len(data), READ):
        if fail_after is not None and start >= fail_after:
            raise ConnectionError("connection reset by peer")
        yield data[start : start + READ]


def result_tree(root: Path, stdout: bytes = b"42\n") -> Path:
    (root / "outputs").mkdir(parents=True)
    (root / "stdout").write_bytes(stdout)
    (root / "exitCode").write_bytes(b"0")
    (root / "outputs" / "blob").write_bytes(os.urandom(3_000_000))
    return root


def tar_of(root: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(root.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(root)), recursive=False)
    return buf.getvalue()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name)


def test_a_directory_arrives_verified_with_progress(tmp_path: Path) -> None:
    source = result_tree(tmp_path / "source")
    data = tar_of(source)
    seen: list[tuple[int, int | None]] = []
    dest = tmp_path / "out" / "result"
    got = fetch(
        chunks(data),
        dest,
        cid=cid_of_path(source),
        directory=True,
        total=len(data),
        progress=lambda done, total: seen.append((done, total)),
    )
    assert got == dest
    assert cid_of_path(dest) == cid_of_path(source)
    assert seen[-1] == (len(data), len(data))
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    assert leftovers(dest.parent) == []


def test_a_file_arrives_verified_and_replaces_an_older_copy(tmp_path: Path) -> None:
    data = os.urandom(1_000_003)
    dest = tmp_path / "blob"
    dest.write_bytes(b"an older download")
    fetch(chunks(data), dest, cid=cid_of_bytes(data), directory=False)
    assert dest.read_bytes() == data
    assert leftovers(tmp_path) == []


def test_into_an_existing_folder_the_entries_are_added(tmp_path: Path) -> None:
    source = result_tree(tmp_path / "source")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "mine.txt").write_text("keep")
    fetch(chunks(tar_of(source)), dest, cid=cid_of_path(source), directory=True)
    assert sorted(p.name for p in dest.iterdir()) == ["exitCode", "mine.txt", "outputs", "stdout"]


@pytest.mark.parametrize("directory", [True, False], ids=["directory", "file"])
def test_a_wrong_cid_leaves_nothing_behind(tmp_path: Path, directory: bool) -> None:
    source = result_tree(tmp_path / "source")
    expected = cid_of_path(source) if directory else cid_of_bytes(b"42\n")
    (source / "stdout").write_bytes(b"43\n")  # same length: only hashing can tell
    data = tar_of(source) if directory else b"43\n"
    dest = tmp_path / "dest"
    with pytest.raises(DownloadError, match="corrupted"):
        fetch(chunks(data), dest, cid=expected, directory=directory)
    assert not dest.exists()
    assert leftovers(tmp_path) == []


def test_a_cut_connection_leaves_nothing_behind(tmp_path: Path) -> None:
    source = result_tree(tmp_path / "source")
    data = tar_of(source)
    dest = tmp_path / "dest"
    with pytest.raises(ConnectionError):
        fetch(
            chunks(data, fail_after=len(data) // 2), dest, cid=cid_of_path(source), directory=True
        )
    assert not dest.exists()
    assert leftovers(tmp_path) == []


def test_an_unsafe_archive_is_refused_early(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("../escape")
        tar.addfile(info, io.BytesIO(b""))
        big = tarfile.TarInfo("big")
        big.size = 8_000_000
        tar.addfile(big, io.BytesIO(bytes(big.size)))
    dest = tmp_path / "dest"
    with pytest.raises(DownloadError, match=r"'\.\.'"):
        fetch(chunks(buf.getvalue()), dest, cid=cid_of_bytes(b""), directory=True)
    assert not dest.exists()
    assert not (tmp_path / "escape").exists()
    assert leftovers(tmp_path) == []
