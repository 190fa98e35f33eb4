"""Hostile uploads to the publisher's content store (``POST /content`` and kubo's ``add``).

Every archive here tries to write outside the upload's folder, to smuggle in a link or a
device, or to expand past the upload cap. Each must be refused with a 4xx, and the disk must
look exactly as before: no file outside the store, nothing new in the store, no leftovers in
the staging area. The publisher's own tests cover the basic cases (``..``, absolute names, a
symlink: services/publisher/tests/test_content_api.py); these go further.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import httpx
import pytest

from shoal_common.bus import MemoryBus
from shoal_publisher.service import PublisherService
from shoal_publisher.settings import PublisherSettings
from shoal_publisher.store.memory import MemoryPublisherStore

CAP = 256 * 1024  # the upload cap of the publisher under test (small: bombs stay cheap)


@pytest.fixture
async def publisher(tmp_path: Path) -> AsyncIterator[tuple[PublisherService, httpx.AsyncClient]]:
    service = PublisherService(
        PublisherSettings(state_dir=tmp_path / "publisher", max_upload_bytes=CAP),
        bus=MemoryBus(),
        store=MemoryPublisherStore(),
    )
    await service.start()
    # Made on the first upload; made here so that disk snapshots compare only what uploads do.
    service.settings.staging_dir.mkdir(parents=True, exist_ok=True)
    transport = httpx.ASGITransport(app=service.app, raise_app_exceptions=False)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://publisher") as http:
            yield service, http
    finally:
        await service.stop()


def disk(root: Path) -> set[str]:
    """Every path under ``root`` (SQLite's own journal files aside)."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            if not name.endswith(("-wal", "-shm", "-journal")):
                found.add(os.path.relpath(os.path.join(dirpath, name), root))
    return found


Member = tuple[tarfile.TarInfo, bytes | None]


def reg(name: str, data: bytes = b"x") -> Member:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def special(name: str, kind: bytes, *, link: str = "", major: int = 0, minor: int = 0) -> Member:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.devmajor, info.devminor = major, minor
    return info, None


def pax_named(name: str) -> Member:
    """A member whose name travels in a PAX header (kept whole: a ustar name ends at NUL)."""
    info, data = reg("placeholder")
    info.pax_headers = {"path": name}
    return info, data


def directory(name: str) -> Member:
    return special(name, tarfile.DIRTYPE)


def tar_of(members: Iterable[Member], *, compress: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    raw = buf.getvalue()
    return gzip.compress(raw, compresslevel=1) if compress else raw


def zero_bomb(size: int) -> bytes:
    """A gzip'd tar of one file of ``size`` zero bytes: kilobytes on the wire."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=1) as gz:
        info = tarfile.TarInfo("zeros")
        info.size = size
        gz.write(info.tobuf(tarfile.GNU_FORMAT))
        block = bytes(1024 * 1024)
        left = size
        while left:
            gz.write(block[: min(left, len(block))])
            left -= min(left, len(block))
        gz.write(bytes(-size % 512 + 1024))
    return buf.getvalue()


def cases(outside: Path) -> dict[str, bytes]:
    return {
        "dotdot": tar_of([reg("../escape.txt")]),
        "dotdot-deep": tar_of([reg("a/../../../../escape.txt")]),
        "dot-dotdot": tar_of([reg("./../escape.txt")]),
        "absolute": tar_of([reg(str(outside / "absolute.txt"))]),
        "nul-in-name": tar_of([pax_named("ok\u0000/../../escape.txt")]),
        "symlink-absolute": tar_of([special("ln", tarfile.SYMTYPE, link=str(outside))]),
        "symlink-relative-out": tar_of([special("ln", tarfile.SYMTYPE, link="../../../..")]),
        # Each link looks inside on its own; together l2 resolves to the parent of the root.
        "symlink-chain": tar_of(
            [
                directory("sub"),
                special("sub/l", tarfile.SYMTYPE, link=".."),
                special("sub/l2", tarfile.SYMTYPE, link="l/.."),
            ]
        ),
        "write-through-symlink": tar_of(
            [special("d", tarfile.SYMTYPE, link="."), reg("d/x"), reg("d/../../escape.txt")]
        ),
        "hardlink-absolute": tar_of([special("h", tarfile.LNKTYPE, link="/etc/passwd")]),
        "hardlink-out": tar_of([special("h", tarfile.LNKTYPE, link="../../../outside.txt")]),
        "hardlink-to-symlink": tar_of(
            [
                special("ln", tarfile.SYMTYPE, link="/etc/passwd"),
                special("h", tarfile.LNKTYPE, link="ln"),
            ]
        ),
        "overwrite-file": tar_of([reg("a", b"first"), reg("a", b"second")]),
        "file-over-dir": tar_of([directory("d"), reg("d")]),
        "char-device": tar_of([special("null", tarfile.CHRTYPE, major=1, minor=3)]),
        "block-device": tar_of([special("sda", tarfile.BLKTYPE, major=8, minor=0)]),
        "fifo": tar_of([special("pipe", tarfile.FIFOTYPE)]),
        "content-bomb": zero_bomb(64 * CAP),
        "many-files-over-cap": tar_of(
            [reg(f"f{i}", bytes(CAP // 16)) for i in range(17)], compress=True
        ),
        "corrupt-gzip": zero_bomb(CAP // 2)[:-100],
    }


CASES = list(cases(Path("/outside")))


@pytest.mark.parametrize("case", CASES)
async def test_hostile_archives_are_refused_and_leave_nothing(
    publisher: tuple[PublisherService, httpx.AsyncClient], tmp_path: Path, case: str
) -> None:
    _service, http = publisher
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "outside.txt").write_text("the publisher's neighbour")
    body = cases(outside)[case]
    assert len(body) < CAP, "the attack must fit under the upload cap to be interesting"
    before = disk(tmp_path)
    resp = await http.post("/content", content=body)
    assert 400 <= resp.status_code < 500, f"{resp.status_code} {resp.text[:300]}"
    assert resp.json().get("detail"), "a refusal says why"
    assert disk(tmp_path) == before
    assert not list(outside.iterdir())
    assert (tmp_path / "outside.txt").read_text() == "the publisher's neighbour"


async def test_metadata_bomb_beyond_the_cap_is_refused(
    publisher: tuple[PublisherService, httpx.AsyncClient], tmp_path: Path
) -> None:
    """Thousands of empty entries: almost nothing on the wire, no file content to count, but
    every entry is a header block in the stream and an inode on disk once extracted. The cap
    must hold for what the archive expands to, not only for file bytes."""
    entries = 2 * CAP // 512  # twice the cap in tar headers alone
    body = tar_of([reg(f"e{i:05d}", b"") for i in range(entries)], compress=True)
    assert len(body) < CAP // 4
    _service, http = publisher
    before = disk(tmp_path)
    resp = await http.post("/content", content=body)
    assert 400 <= resp.status_code < 500, f"{resp.status_code} {resp.text[:300]}"
    assert disk(tmp_path) == before


async def test_safe_archive_with_inside_links_is_stored_as_plain_files(
    publisher: tuple[PublisherService, httpx.AsyncClient], tmp_path: Path
) -> None:
    """The control case: a hardlink to a file inside the archive is harmless, and what is
    stored has no links at all (two regular files with the same bytes)."""
    service, http = publisher
    body = tar_of(
        [directory("d"), reg("d/a", b"same"), special("d/b", tarfile.LNKTYPE, link="d/a")]
    )
    resp = await http.post("/content", content=body)
    assert resp.status_code == 200, resp.text
    stored = service.content.path_of(resp.json()["cid"])
    files = sorted(p for p in stored.rglob("*") if p.is_file())
    assert [p.read_bytes() for p in files] == [b"same", b"same"]
    assert files[0].stat().st_ino != files[1].stat().st_ino


async def test_file_upload_name_is_not_a_path(
    publisher: tuple[PublisherService, httpx.AsyncClient], tmp_path: Path
) -> None:
    service, http = publisher
    for name in ("../../../outside.txt", str(tmp_path / "abs.txt"), "a\u0000b"):
        resp = await http.post("/content", params={"filename": name}, content=b"data")
        assert resp.status_code in (200, 400), resp.text
    assert not (tmp_path / "abs.txt").exists()
    assert not (tmp_path / "outside.txt").exists()
    staging = service.settings.staging_dir
    assert not staging.exists() or not list(staging.iterdir())


def multipart(parts: Iterable[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    boundary = "shoal-security-boundary"
    out = b""
    for name, kind, data in parts:
        out += (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"'
                f"\r\nContent-Type: {kind}\r\n\r\n"
            ).encode()
            + data
            + b"\r\n"
        )
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


FILE = "application/octet-stream"
KUBO_CASES = {
    "absolute": [("%2Fetc%2Fescape", FILE, b"x")],
    "dotdot-deep": [("a%2F..%2F..%2F..%2Fescape", FILE, b"x")],
    "nul": [("a%00b", FILE, b"x")],
    "backslash": [("..%5C..%5Cescape", FILE, b"x")],
    "symlink-part": [("ln", "application/symlink", b"/etc/passwd")],
    "same-name-twice": [("a", FILE, b"1"), ("a", FILE, b"2")],
    "file-then-child": [("a", FILE, b"1"), ("a%2Fb", FILE, b"2")],
    "over-the-cap": [("big", FILE, bytes(CAP + 1))],
}


@pytest.mark.parametrize("case", KUBO_CASES)
async def test_hostile_kubo_adds_are_refused_and_leave_nothing(
    publisher: tuple[PublisherService, httpx.AsyncClient], tmp_path: Path, case: str
) -> None:
    _service, http = publisher
    body, content_type = multipart(KUBO_CASES[case])
    before = disk(tmp_path)
    resp = await http.post("/api/v0/add", content=body, headers={"Content-Type": content_type})
    assert 400 <= resp.status_code < 500, f"{resp.status_code} {resp.text[:300]}"
    assert disk(tmp_path) == before
