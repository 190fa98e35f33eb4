"""Results kept in memory (ADR 0030): a noop run writes no folder, its row holds the results,
and the folder appears, the same bytes under the same CID, the first time anything reads it."""

from __future__ import annotations

import asyncio
import errno
import io
from pathlib import Path

import httpx
import pytest

from shoal_common.cid import cid_and_size_of_path
from shoal_common.content_store import safe_extract_tar
from shoal_common.events import ExecutionFailed, ResultProposed
from shoal_common.spec import StorageSpec
from shoal_compute.domain.results import address_files
from shoal_compute.executors.base import RunFiles
from shoal_compute.testing import MakeNode, NodeHarness, noop_job


def results_dir(node: NodeHarness, eid: str) -> Path:
    return node.service.settings.state_dir / "executions" / eid / "results"


@pytest.mark.parametrize(
    "files",
    [
        RunFiles(b"", b"", 0),
        RunFiles(b"hello\n", b"warn\n", 3, folders=("outputs", "more")),
        RunFiles(b"\xff\xfe not text", b"", -1),
        # Several 256 KiB chunks: a file DAG with internal nodes.
        RunFiles(bytes(range(256)) * 3000, b"e" * 70_000, 137, folders=("a",)),
    ],
    ids=["empty", "folders", "binary", "chunked"],
)
def test_the_cid_of_files_in_memory_is_the_cid_of_the_folder_they_make(
    files: RunFiles, tmp_path: Path
) -> None:
    folder = tmp_path / "e1" / "results"
    files.write_to(folder)
    assert address_files(files) == cid_and_size_of_path(folder)
    assert RunFiles.decode(files.encode()) == files


def test_writing_files_out_keeps_a_folder_already_there(tmp_path: Path) -> None:
    folder = tmp_path / "results"
    RunFiles(b"first\n", b"", 0).write_to(folder)
    RunFiles(b"second\n", b"", 1).write_to(folder)  # a second reader: nothing changes
    assert (folder / "stdout").read_bytes() == b"first\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]  # no staging left


async def test_a_noop_run_writes_no_folder_until_its_result_is_read(
    make_node: MakeNode, tmp_path: Path
) -> None:
    node = await make_node(sql=True, serve_http=True, noop_stdout="hi\n", noop_stderr="w\n")
    job = noop_job(outputs=[StorageSpec(Name="outputs", path="/outputs")])
    eid = await node.run(job)
    event = await node.outcome(eid)
    assert isinstance(event, ResultProposed)
    assert not results_dir(node, eid).parent.exists()  # not even the execution's folder
    record = await node.service.store.get(eid)
    assert record.result_files == RunFiles(b"hi\n", b"w\n", 0, folders=("outputs",))
    assert event.run_output.stdout == "hi\n"
    assert event.size == len("hi\n") + len("w\n") + len("0")

    assert event.result_url is not None
    async with httpx.AsyncClient() as client:
        answers = await asyncio.gather(*(client.get(event.result_url) for _ in range(3)))
    assert [a.status_code for a in answers] == [200] * 3
    assert len({a.content for a in answers}) == 1  # three readers at once: one folder
    fetched = tmp_path / "fetched"
    safe_extract_tar(io.BytesIO(answers[0].content), fetched)
    assert cid_and_size_of_path(fetched) == (event.result_cid, event.size)
    assert (fetched / "outputs").is_dir()
    assert cid_and_size_of_path(results_dir(node, eid)) == (event.result_cid, event.size)


async def test_logs_of_a_finished_run_come_from_its_row(make_node: MakeNode) -> None:
    node = await make_node(noop_stdout="line one\nline two ✓\n", noop_stderr="warn\n")
    eid = await node.run(noop_job())
    await node.outcome(eid)
    logs = await node.logs(eid)
    assert (logs.stdout, logs.stderr, logs.finished) == ("line one\nline two ✓\n", "warn\n", True)


async def test_results_kept_in_rows_are_served_after_a_restart(make_node: MakeNode) -> None:
    first = await make_node("n", sql=True, serve_http=True, noop_stdout="kept\n")
    eid = await first.run(noop_job())
    event = await first.outcome(eid)
    assert isinstance(event, ResultProposed)
    await first.service.stop()
    assert not results_dir(first, eid).exists()
    second = await make_node("n", sql=True, serve_http=True)
    url = f"{second.service.content_url}/content/{event.result_cid}"
    async with httpx.AsyncClient() as client:
        response = await client.get(url)
    assert response.status_code == 200
    assert (results_dir(second, eid) / "stdout").read_bytes() == b"kept\n"


async def test_big_output_is_written_out_at_once_and_not_kept_in_the_row(
    make_node: MakeNode,
) -> None:
    big = "x" * (64 * 1024 + 1)
    node = await make_node(sql=True, noop_stdout=big)
    eid = await node.run(noop_job())
    event = await node.outcome(eid)
    assert isinstance(event, ResultProposed)
    assert (await node.service.store.get(eid)).result_files is None
    assert (results_dir(node, eid) / "stdout").read_text() == big
    assert cid_and_size_of_path(results_dir(node, eid)) == (event.result_cid, event.size)


async def test_a_timed_out_noop_run_keeps_its_partial_result_in_memory(
    make_node: MakeNode,
) -> None:
    node = await make_node(sql=True, noop_delay_s=30)
    eid = await node.run(noop_job(timeout=0.2))
    event = await node.outcome(eid)
    assert isinstance(event, ExecutionFailed)
    assert event.timed_out
    record = await node.service.store.get(eid)
    assert record.result_files == RunFiles(b"", b"", 124)
    assert event.result_cid == address_files(RunFiles(b"", b"", 124))[0]
    assert not results_dir(node, eid).exists()


async def test_a_result_that_cannot_be_written_out_is_unavailable_not_an_error(
    make_node: MakeNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = await make_node(serve_http=True)
    event = await node.outcome(await node.run(noop_job()))
    assert isinstance(event, ResultProposed)
    assert event.result_url is not None

    def full(self: RunFiles, folder: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(RunFiles, "write_to", full)
    async with httpx.AsyncClient() as client:
        response = await client.get(event.result_url)
    assert response.status_code == 503
    assert "No space left on device" in response.json()["detail"]
