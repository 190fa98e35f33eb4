"""Input sources: URL downloads (parallel, retried, capped), inline, local dirs, CIDs."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import tarfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from shoal_common.cid import cid_of_path
from shoal_common.spec import StorageSpec
from shoal_compute.adapters.content import ContentCache, export_dir_tar
from shoal_compute.domain.results import prepare_outputs
from shoal_compute.inputs import InputConfig, InputError, InputFetcher, InputUnavailable
from shoal_compute.inputs.url import DownloadPolicy

HELLO_CID = "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o"  # "hello world\n"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def server() -> AsyncIterator[Callable[[dict[str, Handler]], Awaitable[str]]]:
    """A loopback HTTP server with the given routes; returns its base URL."""
    runners: list[web.AppRunner] = []

    async def start(routes: dict[str, Handler]) -> str:
        app = web.Application()
        for path, handler in routes.items():
            app.router.add_get(path, handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://127.0.0.1:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


def fetcher(tmp_path: Path, **config: Any) -> InputFetcher:
    download = DownloadPolicy(
        max_bytes=config.pop("max_bytes", 1 << 20),
        retries=config.pop("retries", 3),
        backoff_s=0.01,
        timeout_s=5,
    )
    return InputFetcher(
        InputConfig(download=download, **config),
        ContentCache(tmp_path / "content"),
        scratch=tmp_path / "scratch",
        modules_dir=tmp_path / "modules",
    )


@pytest.fixture
async def make_fetcher(tmp_path: Path) -> AsyncIterator[Callable[..., InputFetcher]]:
    made: list[InputFetcher] = []

    def make(**config: Any) -> InputFetcher:
        f = fetcher(tmp_path, **config)
        made.append(f)
        return f

    yield make
    for f in made:
        await f.close()


def url_input(url: str, path: str | None = None) -> StorageSpec:
    return StorageSpec(StorageSource="URLDownload", URL=url, path=path)


# --- URL ---------------------------------------------------------------------------------------


async def test_urls_download_in_parallel(server: Any, make_fetcher: Any, tmp_path: Path) -> None:
    """Behaviour 32: three downloads are in flight at once (each waits for the others)."""
    barrier = asyncio.Barrier(3)

    async def slow(request: web.Request) -> web.Response:
        await asyncio.wait_for(barrier.wait(), 5)  # only passes if all 3 arrive together
        return web.Response(body=f"file {request.match_info['n']}".encode())

    base = await server({"/f/{n}": slow})
    f = make_fetcher()
    specs = [url_input(f"{base}/f/{n}") for n in range(3)]
    mounts = await f.fetch_inputs(specs, tmp_path / "work")
    assert [m.target for m in mounts] == ["/inputs/0", "/inputs/1", "/inputs/2"]
    assert [m.source.read_text() for m in mounts] == ["file 0", "file 1", "file 2"]
    assert all(m.read_only for m in mounts)


async def test_flaky_url_succeeds_through_retries(
    server: Any, make_fetcher: Any, tmp_path: Path
) -> None:
    calls = 0

    async def flaky(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        if calls < 3:
            return web.Response(status=503)
        return web.Response(body=b"finally")

    base = await server({"/data.csv": flaky})
    mounts = await make_fetcher(retries=3).fetch_inputs(
        [url_input(f"{base}/data.csv", "/inputs/x.csv")], tmp_path / "w"
    )
    assert calls == 3
    assert mounts[0].target == "/inputs/x.csv"
    assert mounts[0].source.read_bytes() == b"finally"


async def test_unreachable_url_gives_up_retryably(make_fetcher: Any, tmp_path: Path) -> None:
    with pytest.raises(InputUnavailable, match="after 2 attempts"):
        await make_fetcher(retries=1).fetch_inputs(
            [url_input("http://127.0.0.1:9/nothing")], tmp_path / "w"
        )


async def test_missing_url_is_not_retried(server: Any, make_fetcher: Any, tmp_path: Path) -> None:
    calls = 0

    async def gone(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        return web.Response(status=404)

    base = await server({"/gone": gone})
    with pytest.raises(InputError, match="404"):
        await make_fetcher().fetch_inputs([url_input(f"{base}/gone")], tmp_path / "w")
    assert calls == 1


async def test_download_size_cap(server: Any, make_fetcher: Any, tmp_path: Path) -> None:
    async def declared(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 2000)

    async def streamed(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()  # chunked: no Content-Length to refuse early
        await response.prepare(request)
        for _ in range(20):
            await response.write(b"y" * 100)
        await response.write_eof()
        return response

    base = await server({"/declared": declared, "/streamed": streamed})
    f = make_fetcher(max_bytes=1000)
    for path in ("/declared", "/streamed"):
        with pytest.raises(InputError, match="larger than"):
            await f.fetch_inputs([url_input(base + path)], tmp_path / "w" / path.strip("/"))
        assert not any((tmp_path / "w").rglob("*y*"))
    with pytest.raises(InputError, match="not an http"):
        await f.fetch_inputs([url_input("ftp://example.com/x")], tmp_path / "w")


# --- inline ------------------------------------------------------------------------------------


def inline(url: str, path: str = "/inputs/data", name: str | None = None) -> StorageSpec:
    return StorageSpec(StorageSource="Inline", URL=url, path=path, Name=name)


async def test_inline_data_urls_and_text(make_fetcher: Any, tmp_path: Path) -> None:
    f = make_fetcher()
    encoded = base64.b64encode(b"hello\x00world").decode()
    mounts = await f.fetch_inputs(
        [
            inline(f"data:application/octet-stream;base64,{encoded}", "/a"),
            inline("data:,plain%20text", "/b"),
            inline("just some text", "/c"),
        ],
        tmp_path / "w",
    )
    assert [m.source.read_bytes() for m in mounts] == [
        b"hello\x00world",
        b"plain text",
        b"just some text",
    ]


async def test_inline_tar_becomes_a_folder(make_fetcher: Any, tmp_path: Path) -> None:
    folder = tmp_path / "src"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "f.txt").write_text("inside")
    buffer = io.BytesIO()
    export_dir_tar(folder, buffer)
    url = "data:application/x-tar;base64," + base64.b64encode(buffer.getvalue()).decode()
    mounts = await make_fetcher().fetch_inputs([inline(url, "/inputs")], tmp_path / "w")
    assert (mounts[0].source / "sub" / "f.txt").read_text() == "inside"


async def test_oversized_inline_data_is_refused(make_fetcher: Any, tmp_path: Path) -> None:
    f = make_fetcher(max_inline_bytes=10)
    with pytest.raises(InputError, match="above this node's limit"):
        await f.fetch_inputs([inline("x" * 11)], tmp_path / "w")
    big = base64.b64encode(b"y" * 11).decode()
    with pytest.raises(InputError, match="above this node's limit"):
        await f.fetch_inputs([inline(f"data:;base64,{big}")], tmp_path / "w")
    exact = base64.b64encode(b"y" * 10).decode()
    assert await f.fetch_inputs([inline(f"data:;base64,{exact}")], tmp_path / "w2")


async def test_inline_tar_escaping_its_folder_is_refused(make_fetcher: Any, tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    url = "data:application/x-tar;base64," + base64.b64encode(buffer.getvalue()).decode()
    with pytest.raises(InputError, match="refused"):
        await make_fetcher().fetch_inputs([inline(url, "/inputs")], tmp_path / "w")
    assert not (tmp_path / "w" / "escape.txt").exists()


# --- local directories -------------------------------------------------------------------------


def local(path: str, target: str = "/data", rw: bool = False) -> StorageSpec:
    return StorageSpec(StorageSource="LocalDirectory", SourcePath=path, path=target, ReadWrite=rw)


async def test_local_dirs_only_inside_the_allow_list(make_fetcher: Any, tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    (allowed / "set").mkdir(parents=True)
    outside = tmp_path / "secret"
    outside.mkdir()
    os.symlink(outside, allowed / "sneaky")
    f = make_fetcher(local_dirs_allowed=[allowed])
    mounts = await f.fetch_inputs([local(str(allowed / "set"))], tmp_path / "w")
    assert mounts[0].source == (allowed / "set").resolve()
    assert mounts[0].read_only
    for path in (str(outside), str(allowed / "sneaky"), str(allowed / "set" / ".." / "..")):
        with pytest.raises(InputError, match="outside"):
            await f.fetch_inputs([local(path)], tmp_path / "w")
    with pytest.raises(InputError, match="read-only"):
        await f.fetch_inputs([local(str(allowed / "set"), rw=True)], tmp_path / "w")
    with pytest.raises(InputError, match="does not exist"):
        await f.fetch_inputs([local(str(allowed / "nope"))], tmp_path / "w")
    assert f.supported_sources()[-1].value == "LocalDirectory"


async def test_no_allow_list_means_no_local_dirs(make_fetcher: Any, tmp_path: Path) -> None:
    f = make_fetcher()
    with pytest.raises(InputError, match="outside"):
        await f.fetch_inputs([local(str(tmp_path))], tmp_path / "w")
    assert "LocalDirectory" not in [s.value for s in f.supported_sources()]


# --- paths -------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["relative/path", "/inputs/../etc", "/"])
async def test_mount_targets_must_be_absolute_and_clean(
    make_fetcher: Any, tmp_path: Path, target: str
) -> None:
    with pytest.raises(InputError, match="mount"):
        await make_fetcher().fetch_inputs([inline("x", target)], tmp_path / "w")


async def test_two_inputs_at_one_target(make_fetcher: Any, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="two inputs"):
        await make_fetcher().fetch_inputs([inline("a", "/x"), inline("b", "/x")], tmp_path / "w")


@pytest.mark.parametrize("name", ["../up", "a/b", "/abs", "..", "stdout", "", "we ird"])
def test_output_names_cannot_escape_the_results_folder(tmp_path: Path, name: str) -> None:
    with pytest.raises(InputError):
        prepare_outputs([StorageSpec(Name=name, path="/outputs")], tmp_path / "results")
    assert not (tmp_path / "up").exists()


def test_outputs_get_folders_in_the_results(tmp_path: Path) -> None:
    mounts = prepare_outputs(
        [StorageSpec(Name="outputs", path="/outputs"), StorageSpec(Name="test", path="/o2")],
        tmp_path / "results",
    )
    assert [(m.source.name, m.target, m.read_only) for m in mounts] == [
        ("outputs", "/outputs", False),
        ("test", "/o2", False),
    ]
    with pytest.raises(InputError, match="two output"):
        prepare_outputs(
            [StorageSpec(Name="a", path="/a"), StorageSpec(Name="a", path="/b")], tmp_path
        )


# --- CIDs --------------------------------------------------------------------------------------


def cid_input(cid: str, path: str = "/inputs") -> StorageSpec:
    return StorageSpec(StorageSource="IPFS", CID=cid, path=path)


async def test_bad_cid_is_refused(make_fetcher: Any, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a valid CID"):
        await make_fetcher().fetch_inputs([cid_input("not-a-cid")], tmp_path / "w")


async def test_cid_from_the_local_cache(make_fetcher: Any, tmp_path: Path) -> None:
    f = make_fetcher()
    source = tmp_path / "hello.txt"
    source.write_text("hello world\n")
    assert await f.cids._cache.put_path(source) == HELLO_CID
    mounts = await f.fetch_inputs([cid_input(HELLO_CID, "/data/file.txt")], tmp_path / "w")
    assert mounts[0].source.read_text() == "hello world\n"


async def test_cid_without_a_source(make_fetcher: Any, tmp_path: Path) -> None:
    with pytest.raises(InputUnavailable, match="no content source"):
        await make_fetcher().fetch_inputs([cid_input(HELLO_CID)], tmp_path / "w")


async def test_cids_from_the_content_store_over_http(
    server: Any, make_fetcher: Any, tmp_path: Path
) -> None:
    folder = tmp_path / "tree"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("A")
    (folder / "sub" / "b.txt").write_text("B")
    tree_cid = cid_of_path(folder)
    buffer = io.BytesIO()
    export_dir_tar(folder, buffer)
    served: list[str] = []

    async def content(request: web.Request) -> web.Response:
        cid = request.match_info["cid"]
        served.append(cid)
        if cid == HELLO_CID:
            return web.Response(body=b"hello world\n", content_type="application/octet-stream")
        if cid == tree_cid:
            return web.Response(body=buffer.getvalue(), content_type="application/x-tar")
        return web.Response(status=404)

    base = await server({"/content/{cid}": content})
    f = make_fetcher(content_store_url=base)
    mounts = await f.fetch_inputs(
        [cid_input(HELLO_CID, "/in/hello.txt"), cid_input(tree_cid, "/in/tree")], tmp_path / "w"
    )
    assert mounts[0].source.read_text() == "hello world\n"
    assert (mounts[1].source / "sub" / "b.txt").read_text() == "B"
    again = await f.fetch_inputs([cid_input(tree_cid)], tmp_path / "w2")
    assert again[0].source == mounts[1].source
    assert served.count(tree_cid) == 1  # cached after the first fetch
    missing = "QmNLei78zWmzUdbeRB3CiUfAizWUrbeeZh5K1rhAQKCh51"
    with pytest.raises(InputError, match="404"):
        await f.fetch_inputs([cid_input(missing)], tmp_path / "w3")


async def test_content_that_does_not_match_its_cid_is_refused(
    server: Any, make_fetcher: Any, tmp_path: Path
) -> None:
    async def liar(request: web.Request) -> web.Response:
        return web.Response(body=b"not hello\n", content_type="application/octet-stream")

    base = await server({"/content/{cid}": liar})
    f = make_fetcher(content_store_url=base)
    with pytest.raises(InputError, match="not " + HELLO_CID):
        await f.fetch_inputs([cid_input(HELLO_CID)], tmp_path / "w")
    assert not f.cids._cache.has(HELLO_CID)


async def test_wasm_module_resolver(server: Any, make_fetcher: Any, tmp_path: Path) -> None:
    async def module(request: web.Request) -> web.Response:
        return web.Response(body=b"\x00asm\x01\x00\x00\x00")

    base = await server({"/m.wasm": module})
    f = make_fetcher()
    path = await f.resolve_module(url_input(f"{base}/m.wasm"))
    assert path.read_bytes().startswith(b"\x00asm")
    assert await f.resolve_module(url_input(f"{base}/m.wasm")) == path
    inline_path = await f.resolve_module(inline("data:;base64,AGFzbQEAAAA=", name="mod.wasm"))
    assert inline_path.name == "mod.wasm"


async def test_cid_from_a_kubo_rpc_api(make_fetcher: Any, tmp_path: Path) -> None:
    """The IPFS fallback: /api/v0/get (a tar whose one top-level entry is the CID) via aioipfs."""
    folder = tmp_path / "tree"
    folder.mkdir()
    (folder / "f.txt").write_text("from kubo")
    tree_cid = cid_of_path(folder)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(folder, arcname=tree_cid)
    asked: list[str] = []

    async def get(request: web.Request) -> web.Response:
        asked.append(request.query["arg"])
        if request.query["arg"] != tree_cid:
            return web.Response(status=500, text='{"Message": "block not found", "Type": "error"}')
        return web.Response(body=buffer.getvalue(), content_type="application/x-tar")

    app = web.Application()
    app.router.add_post("/api/v0/get", get)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        f = make_fetcher(kubo_rpc_url=f"http://127.0.0.1:{port}")
        mounts = await f.fetch_inputs([cid_input(tree_cid)], tmp_path / "w")
        assert (mounts[0].source / "f.txt").read_text() == "from kubo"
        with pytest.raises(InputUnavailable, match="not found"):
            await f.fetch_inputs([cid_input(HELLO_CID)], tmp_path / "w2")
        assert asked == [tree_cid, HELLO_CID]
    finally:
        await runner.cleanup()
