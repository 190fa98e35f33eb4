"""The content store over HTTP: Shoal's own routes, and kubo's RPC subset through aioipfs."""

from __future__ import annotations

import io
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aioipfs
import httpx
import pytest

from shoal_common.bus import MemoryBus
from shoal_common.cid import cid_of_bytes, cid_of_path
from shoal_publisher.service import PublisherService
from shoal_publisher.settings import PublisherSettings
from shoal_publisher.store.memory import MemoryPublisherStore

HELLO = b"hello world\n"
HELLO_CID = "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o"


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[PublisherService]:
    svc = PublisherService(
        PublisherSettings(state_dir=tmp_path / "publisher", max_upload_bytes=8 * 1024 * 1024),
        bus=MemoryBus(),
        store=MemoryPublisherStore(),
    )
    await svc.start()
    try:
        yield svc
    finally:
        await svc.stop()


@pytest.fixture
async def http(service: PublisherService, serve: Any) -> AsyncIterator[httpx.AsyncClient]:
    url = await serve(service.app)
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        yield client


@pytest.fixture
async def ipfs(service: PublisherService, serve: Any) -> AsyncIterator[Any]:
    url = httpx.URL(await serve(service.app))
    client = aioipfs.AsyncIPFS(host=url.host, port=url.port)
    try:
        yield client
    finally:
        await client.close()


def _results(kit: Any, root: Path) -> Path:
    return kit.tree(
        root,
        {
            "stdout": b"hello\n",
            "stderr": b"",
            "exitCode": b"0",
            "outputs/big.bin": bytes(range(256)) * 4096,  # 1 MiB: several chunks
            "outputs/nested/.hidden": b"dotfiles count",
            "outputs/nested/deeper/x.txt": b"x" * 1000,
        },
    )


def _untar(data: bytes, dest: Path) -> Path:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    return dest


# --- Shoal's routes -------------------------------------------------------------------------------


async def test_directory_round_trip(http: httpx.AsyncClient, kit: Any, tmp_path: Path) -> None:
    folder = _results(kit, tmp_path / "results")
    expected = cid_of_path(folder)
    resp = await http.post("/content", params={"kind": "directory"}, content=kit.tar_of(folder))
    assert resp.status_code == 200, resp.text
    assert resp.json()["cid"] == expected
    assert resp.json()["kind"] == "directory"

    got = await http.get(f"/content/{expected}")
    assert got.status_code == 200
    assert got.headers["X-Shoal-Kind"] == "directory"
    assert int(got.headers["Content-Length"]) == len(got.content)
    back = _untar(got.content, tmp_path / "back")
    assert cid_of_path(back) == expected
    assert (back / "outputs/nested/.hidden").read_bytes() == b"dotfiles count"

    head = await http.head(f"/content/{expected}")
    assert head.status_code == 200
    assert head.headers["Content-Length"] == got.headers["Content-Length"]
    assert head.headers["X-Shoal-Kind"] == "directory"


async def test_same_content_gives_the_same_tar(
    http: httpx.AsyncClient, kit: Any, tmp_path: Path
) -> None:
    folder = _results(kit, tmp_path / "results")
    cid = (await http.post("/content", content=kit.tar_of(folder))).json()["cid"]
    first = await http.get(f"/content/{cid}")
    second = await http.get(f"/content/{cid}")
    assert first.content == second.content


async def test_file_round_trip(http: httpx.AsyncClient) -> None:
    resp = await http.post("/content", params={"filename": "hello.txt"}, content=HELLO)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"cid": HELLO_CID, "kind": "file", "size": len(HELLO)}
    got = await http.get(f"/content/{HELLO_CID}")
    assert got.content == HELLO
    assert got.headers["X-Shoal-Kind"] == "file"
    assert got.headers["Content-Length"] == str(len(HELLO))
    head = await http.head(f"/content/{HELLO_CID}")
    assert head.headers["Content-Length"] == str(len(HELLO))
    assert head.headers["X-Shoal-Kind"] == "file"


async def test_big_file_streams(http: httpx.AsyncClient) -> None:
    data = bytes(range(251)) * 20_000  # ~5 MB, not a multiple of the chunk size
    cid = (await http.post("/content", params={"kind": "file"}, content=data)).json()["cid"]
    assert cid == cid_of_bytes(data)
    async with http.stream("GET", f"/content/{cid}") as resp:
        body = b"".join([chunk async for chunk in resp.aiter_bytes()])
    assert body == data


@pytest.mark.parametrize(
    ("name", "link"),
    [("../escape.txt", None), ("/etc/escape", None), ("a/../../escape", None), ("ln", "/etc")],
)
async def test_escaping_archives_are_refused(
    http: httpx.AsyncClient, kit: Any, name: str, link: str | None
) -> None:
    resp = await http.post("/content", content=kit.evil_tar(name, symlink_to=link))
    assert resp.status_code == 400, resp.text
    assert resp.headers["Content-Type"] == "application/problem+json"
    assert "refused" in resp.json()["detail"]


async def test_symlinks_inside_are_refused(http: httpx.AsyncClient, kit: Any) -> None:
    resp = await http.post("/content", content=kit.evil_tar("ln", symlink_to="stdout"))
    assert resp.status_code == 400
    assert "symlink" in resp.json()["detail"]


async def test_not_a_tar_is_a_clear_400(http: httpx.AsyncClient) -> None:
    resp = await http.post("/content", content=b"this is not a tar stream at all" * 30)
    assert resp.status_code == 400
    assert "not a tar stream" in resp.json()["detail"]


async def test_uploads_are_size_capped(http: httpx.AsyncClient) -> None:
    big = b"\0" * (8 * 1024 * 1024 + 1)
    resp = await http.post("/content", params={"filename": "big"}, content=big)
    assert resp.status_code == 413

    async def unsized() -> AsyncIterator[bytes]:
        for _ in range(9):
            yield b"\0" * (1024 * 1024)

    resp = await http.post("/content", params={"filename": "big"}, content=unsized())
    assert resp.status_code == 413


async def test_unknown_and_invalid_cids(http: httpx.AsyncClient) -> None:
    assert (await http.get(f"/content/{HELLO_CID}")).status_code == 404
    assert (await http.head(f"/content/{HELLO_CID}")).status_code == 404
    bad = await http.get("/content/not-a-cid")
    assert bad.status_code == 400
    assert "not a valid CID" in bad.json()["detail"]


async def test_health_and_metrics(http: httpx.AsyncClient) -> None:
    assert (await http.get("/readyz")).status_code == 200
    metrics = await http.get("/metrics")
    assert "shoal_publisher_content_bytes_total" in metrics.text


# --- kubo's RPC API through aioipfs ---------------------------------------------------------------


async def test_aioipfs_add_bytes_gives_kubos_cid(ipfs: Any) -> None:
    added = await ipfs.core.add_bytes(HELLO)
    assert added["Hash"] == HELLO_CID
    assert added["Size"] == "20"  # kubo's DAG size for this file
    assert await ipfs.cat(HELLO_CID) == HELLO


async def test_aioipfs_add_directory_cat_get_ls(
    ipfs: Any, kit: Any, tmp_path: Path, service: PublisherService
) -> None:
    folder = _results(kit, tmp_path / "results")
    entries = [e async for e in ipfs.add(str(folder), recursive=True, hidden=True)]
    root = entries[-1]
    assert root["Name"] == "results"
    assert root["Hash"] == cid_of_path(folder)
    by_name = {e["Name"]: e for e in entries}
    assert by_name["results/stdout"]["Hash"] == cid_of_bytes(b"hello\n")
    assert by_name["results/outputs/nested"]["Hash"] == cid_of_path(folder / "outputs/nested")
    assert service.content.has(root["Hash"])

    assert await ipfs.cat(f"{root['Hash']}/stdout") == b"hello\n"
    assert await ipfs.cat(f"/ipfs/{root['Hash']}/outputs/nested/.hidden") == b"dotfiles count"
    assert await ipfs.cat(f"{root['Hash']}/stdout", offset=1, length=3) == b"ell"

    dest = tmp_path / "got"
    dest.mkdir()
    assert await ipfs.get(root["Hash"], dstdir=str(dest))
    assert cid_of_path(dest / root["Hash"]) == root["Hash"]

    listing = await ipfs.core.ls(root["Hash"])
    links = {link["Name"]: link for link in listing["Objects"][0]["Links"]}
    assert set(links) == {"exitCode", "outputs", "stderr", "stdout"}
    assert links["outputs"]["Type"] == 1
    assert links["stdout"]["Type"] == 2
    assert links["stdout"]["Size"] == 6
    assert links["stdout"]["Hash"] == cid_of_bytes(b"hello\n")

    block = await ipfs.block.get(root["Hash"])
    assert isinstance(block, bytes)
    assert block  # the directory node itself

    pins = [p async for p in ipfs.pin.add(root["Hash"])]
    assert pins[-1]["Pins"] == [root["Hash"]]


async def test_aioipfs_add_without_hidden_matches_kubo(ipfs: Any, kit: Any, tmp_path: Path) -> None:
    folder = _results(kit, tmp_path / "results")
    entries = [e async for e in ipfs.add(str(folder), recursive=True)]
    # aioipfs leaves dotfiles out by default, like `ipfs add -r`; so does the CID.
    assert entries[-1]["Hash"] == cid_of_path(folder, hidden=False)
    assert entries[-1]["Hash"] != cid_of_path(folder)


async def test_aioipfs_version_and_id(ipfs: Any) -> None:
    version = await ipfs.version()
    assert version["Version"]
    ident = await ipfs.id()
    assert ident["AgentVersion"].startswith("kubo/")
    # aioipfs parses the agent version with distutils, which warns on its own account.
    with pytest.warns(DeprecationWarning, match="distutils"):
        await ipfs.agent_version_get()
    assert ipfs.agent_version is not None


async def test_kubo_errors_look_like_kubos(ipfs: Any, http: httpx.AsyncClient) -> None:
    with pytest.raises(aioipfs.APIError) as missing:
        await ipfs.cat(HELLO_CID)
    assert "not found" in missing.value.message
    await ipfs.core.add_bytes(HELLO)
    with pytest.raises(aioipfs.APIError):
        await ipfs.core.add_bytes(b"other", cid_version=1)
    folder_cid = (
        await ipfs.core.add_str("x", name="x")  # a file: cat works, ls lists nothing
    )["Hash"]
    assert (await ipfs.core.ls(folder_cid))["Objects"][0]["Links"] == []
    resp = await http.post("/api/v0/cat")
    assert resp.status_code == 400
    assert resp.json()["Type"] == "error"


async def test_kubo_add_refuses_unsafe_names(http: httpx.AsyncClient) -> None:
    boundary = "xyz"
    body = (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="file"; filename="..%2Fevil"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
        f"data\r\n--{boundary}--\r\n"
    ).encode()
    resp = await http.post(
        "/api/v0/add",
        content=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert resp.status_code == 400
    assert "unsafe path" in resp.json()["Message"]


async def test_sharded_directory_lists_and_resolves(
    ipfs: Any, service: PublisherService, kit: Any, tmp_path: Path
) -> None:
    """Past kubo's 256 KiB estimate a folder is a HAMT shard; ls and paths still work."""
    # Long names reach the threshold (name length + 34 bytes per entry) with few files.
    files = {f"{'n' * 200}-{i:05d}.txt": str(i).encode() for i in range(1200)}
    folder = kit.tree(tmp_path / "many", files)
    cid = service.content.put_path(folder)
    assert cid == cid_of_path(folder)
    listing = await ipfs.core.ls(cid)
    names = {link["Name"] for link in listing["Objects"][0]["Links"]}
    assert names == set(files)
    assert await ipfs.cat(f"{cid}/{'n' * 200}-01199.txt") == b"1199"
    root = await ipfs.block.get(cid)
    assert b"\x08\x05" in root  # UnixFS type 5: a HAMT shard
