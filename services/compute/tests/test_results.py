"""The results folder, run output truncation, and the node's content endpoint."""

from __future__ import annotations

import io
import os
from pathlib import Path

import httpx
import pytest

from shoal_common.cid import cid_of_path
from shoal_common.content_store import safe_extract_tar
from shoal_common.events import ExecutionFailed, ResultProposed
from shoal_common.spec import StorageSpec
from shoal_compute.domain.results import make_results_dir
from shoal_compute.executors.base import ExecutionRequest, write_run_files
from shoal_compute.executors.noop import NoopOutput
from shoal_compute.testing import MakeNode, noop_job


async def write_outputs(request: ExecutionRequest) -> NoopOutput:
    for mount in request.outputs:
        (mount.source / "output_file.txt").write_text(f"written to {mount.target}\n")
    return NoopOutput(stdout="done\n")


async def test_results_folder_layout(make_node: MakeNode) -> None:
    node = await make_node(hook=write_outputs, noop_exit_code=3)
    job = noop_job(outputs=[StorageSpec(Name="test", path="/output_data")])
    eid = await node.run(job)
    event = await node.outcome(eid)
    assert isinstance(event, ResultProposed)
    results = node.service.settings.state_dir / "executions" / eid / "results"
    assert sorted(p.name for p in results.iterdir()) == ["exitCode", "stderr", "stdout", "test"]
    assert (results / "exitCode").read_text() == "3"
    assert (results / "stdout").read_text() == "done\n"
    assert (results / "test" / "output_file.txt").read_text() == "written to /output_data\n"
    assert event.result_cid == cid_of_path(results)
    assert event.size == len("done\n") + 1 + len("written to /output_data\n")
    assert event.run_output.exit_code == 3
    assert not (results.parent / "inputs").exists()


@pytest.mark.parametrize(("length", "truncated"), [(9, False), (10, False), (11, True)])
async def test_behaviour_12_run_output_truncation(
    make_node: MakeNode, length: int, truncated: bool
) -> None:
    text = "ä" + "x" * (length - 2)  # a two-byte character first: lengths are in bytes
    node = await make_node(max_run_output_bytes=10, noop_stdout=text, noop_stderr=text)
    eid = await node.run(noop_job())
    event = await node.outcome(eid)
    assert isinstance(event, ResultProposed)
    out = event.run_output
    assert out.stdout_truncated is truncated
    assert out.stderr_truncated is truncated
    assert out.stdout == (text if not truncated else text.encode()[:10].decode())
    found = await node.service.cache.locate(event.result_cid)  # written out when read
    assert found is not None
    assert (found.path / "stdout").read_text() == text  # the full text stays in the results


async def test_symlink_in_an_output_is_refused(make_node: MakeNode, tmp_path: Path) -> None:
    async def link_out(request: ExecutionRequest) -> NoopOutput:
        os.symlink("/etc/passwd", request.outputs[0].source / "passwd")
        return NoopOutput()

    node = await make_node(hook=link_out)
    eid = await node.run(noop_job(outputs=[StorageSpec(Name="out", path="/out")]))
    event = await node.outcome(eid)
    assert isinstance(event, ExecutionFailed)
    assert "symlink" in event.error
    assert not event.retryable


async def test_content_endpoint_serves_results(make_node: MakeNode, tmp_path: Path) -> None:
    node = await make_node(serve_http=True, hook=write_outputs)
    base = node.service.content_url
    assert base is not None
    assert base.startswith("http://127.0.0.1:")
    eid = await node.run(noop_job(outputs=[StorageSpec(Name="outputs", path="/outputs")]))
    event = await node.outcome(eid)
    assert isinstance(event, ResultProposed)
    assert event.result_url == f"{base}/content/{event.result_cid}"
    async with httpx.AsyncClient() as client:
        response = await client.get(event.result_url)
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/x-tar"
        assert response.headers["x-shoal-kind"] == "directory"
        target = tmp_path / "fetched"
        safe_extract_tar(io.BytesIO(response.content), target)
        assert cid_of_path(target) == event.result_cid
        assert (target / "outputs" / "output_file.txt").exists()

        missing = await client.get(f"{base}/content/QmNLei78zWmzUdbeRB3CiUfAizWUrbeeZh5K1rhAQKCh51")
        assert missing.status_code == 404
        assert missing.headers["content-type"] == "application/problem+json"
        bad = await client.get(f"{base}/content/not-a-cid")
        assert bad.status_code == 400
        health = await client.get(f"{base}/readyz")
        assert health.status_code == 200
        info = (await client.get(f"{base}/node")).json()
        assert info["node_id"] == node.node_id


async def test_content_endpoint_serves_cached_files(make_node: MakeNode, tmp_path: Path) -> None:
    node = await make_node(serve_http=True)
    source = tmp_path / "hello.txt"
    source.write_text("hello world\n")
    cid = await node.service.cache.put_path(source)
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{node.service.content_url}/content/{cid}")
    assert response.content == b"hello world\n"
    assert response.headers["x-shoal-kind"] == "file"


async def test_results_survive_a_restart(make_node: MakeNode, tmp_path: Path) -> None:
    """Results stay downloadable from the node after it restarts (found via its store)."""
    first = await make_node("n", sql=True, serve_http=True, advertised_cids=1, results_index_size=1)
    eids = [await first.run(noop_job("echo", str(i))) for i in range(2)]
    events = [await first.outcome(e) for e in eids]
    await first.service.stop()
    second = await make_node(
        "n", sql=True, serve_http=True, advertised_cids=1, results_index_size=1
    )
    async with httpx.AsyncClient() as client:
        for event in events:
            assert isinstance(event, ResultProposed)
            url = f"{second.service.content_url}/content/{event.result_cid}"
            response = await client.get(url)
            assert response.status_code == 200, event


async def test_timed_out_run_still_serves_what_it_wrote(
    make_node: MakeNode, tmp_path: Path
) -> None:
    """Behaviour 11's harder case: killed at its timeout, the partial result is addressable."""

    async def early(request: ExecutionRequest) -> NoopOutput | None:
        (request.outputs[0].source / "early.txt").write_text("partial\n")
        return None

    node = await make_node(serve_http=True, hook=early, noop_delay_s=30)
    job = noop_job(timeout=0.2, outputs=[StorageSpec(Name="outputs", path="/outputs")])
    event = await node.outcome(await node.run(job))
    assert isinstance(event, ExecutionFailed)
    assert event.timed_out
    assert event.result_cid
    assert event.result_url == f"{node.service.content_url}/content/{event.result_cid}"
    async with httpx.AsyncClient() as client:
        response = await client.get(event.result_url)
    assert response.status_code == 200
    target = tmp_path / "partial"
    safe_extract_tar(io.BytesIO(response.content), target)
    assert (target / "outputs" / "early.txt").read_text() == "partial\n"
    assert cid_of_path(target) == event.result_cid


def test_run_files_replace_what_was_there_and_make_a_missing_folder(tmp_path: Path) -> None:
    folder = tmp_path / "executions" / "e1" / "results"
    write_run_files(folder, b"a much longer first output\n", b"warning\n", 1)
    write_run_files(folder, b"short\n", b"", 0)  # written again in place: nothing left over
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == {
        "stdout": b"short\n",
        "stderr": b"",
        "exitCode": b"0",
    }


def test_results_folder_is_made_once_and_again_without_error(tmp_path: Path) -> None:
    results = tmp_path / "executions" / "e1" / "results"
    make_results_dir(results)  # the executions folder itself missing
    (results / "stdout").write_bytes(b"kept")
    make_results_dir(results)  # a second run (after a restart): already there
    assert (results / "stdout").read_bytes() == b"kept"
    make_results_dir(tmp_path / "executions" / "e2" / "results")  # the usual case
    assert sorted(p.name for p in (tmp_path / "executions").iterdir()) == ["e1", "e2"]


def test_run_files_are_not_written_through_a_symlink(tmp_path: Path) -> None:
    folder = tmp_path / "results"
    folder.mkdir()
    outside = tmp_path / "outside"
    (folder / "exitCode").symlink_to(outside)
    with pytest.raises(OSError, match="Too many levels of symbolic links"):  # ELOOP
        write_run_files(folder, b"", b"", 0)
    assert not outside.exists()
