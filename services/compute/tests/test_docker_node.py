"""Docker jobs through a whole compute node: bids, inputs, outputs, results (real engine).

Behaviours 2, 10, 11, 23, 32, 33 as the node sees them. The engine and the test images come
from scripts/docker-setup.sh; an unreachable engine fails these tests (CI guarantees one).
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from shoal_common.events import ExecutionCancelled, ExecutionFailed, ResultProposed
from shoal_common.spec import DockerSpec, Engine, StorageSpec
from shoal_compute.testing import MakeNode, noop_job

pytestmark = [pytest.mark.docker, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[3]
IMAGE = "shoal-test/busybox:latest"
FOREIGN_IMAGE = "shoal-test/busybox-foreign:latest"


@pytest.fixture(scope="module")
def images() -> None:
    import docker

    try:
        client = docker.from_env()
        client.ping()
    except Exception as exc:
        pytest.fail(f"Docker Engine not reachable ({exc}): run scripts/docker-setup.sh")
    try:
        for image in (IMAGE, FOREIGN_IMAGE):
            client.images.get(image)
    except docker.errors.ImageNotFound:
        subprocess.run([str(REPO / "scripts" / "build-test-images.sh")], check=True, timeout=300)
    finally:
        client.close()


def docker_job(script: str, image: str = IMAGE, **spec: Any) -> Any:
    job = noop_job(engine=Engine.DOCKER, **spec)
    job.spec.docker = DockerSpec(Image=image, Entrypoint=["sh", "-c", script])
    return job


@pytest.fixture
async def docker_node(make_node: MakeNode, images: None) -> Any:
    node = await make_node("docker-node", engines=["Docker", "Noop"])
    assert Engine.DOCKER in node.service.engines(), "the node found no Docker Engine"
    return node


async def test_behaviour_10_exit_code_and_streams(docker_node: Any) -> None:
    job = docker_job("echo -n apples; echo -n oranges >&2; exit 19")
    event = await docker_node.outcome(await docker_node.run(job), timeout=60)
    assert isinstance(event, ResultProposed), event
    out = event.run_output
    assert (out.stdout, out.stderr, out.exit_code) == ("apples", "oranges", 19)


async def test_behaviour_2_output_volume_and_cid_input(docker_node: Any, tmp_path: Path) -> None:
    data = tmp_path / "file.txt"
    data.write_text("hello world\n")
    cid = await docker_node.service.cache.put_path(data)
    job = docker_job(
        "cat /data/file.txt; cat /data/file.txt > /output_data/output_file.txt",
        inputs=[StorageSpec(StorageSource="IPFS", CID=cid, path="/data/file.txt")],
        outputs=[StorageSpec(Name="test", path="/output_data")],
    )
    eid = await docker_node.run(job)
    event = await docker_node.outcome(eid, timeout=60)
    assert isinstance(event, ResultProposed), event
    assert event.run_output.stdout == "hello world\n"
    results = docker_node.service.node_paths(eid).results
    assert (results / "test" / "output_file.txt").read_text() == "hello world\n"


async def test_behaviour_32_url_and_cid_inputs_combine(docker_node: Any, tmp_path: Path) -> None:
    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=b"from a url\n")

    app = web.Application()
    app.router.add_get("/x.txt", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        data = tmp_path / "c.txt"
        data.write_text("from a cid\n")
        cid = await docker_node.service.cache.put_path(data)
        job = docker_job(
            "cat /inputs/x.txt /cid/c.txt",
            inputs=[
                StorageSpec(StorageSource="URLDownload", URL=f"http://127.0.0.1:{port}/x.txt"),
                StorageSpec(StorageSource="IPFS", CID=cid, path="/cid/c.txt"),
            ],
        )
        event = await docker_node.outcome(await docker_node.run(job), timeout=60)
        assert isinstance(event, ResultProposed), event
        assert event.run_output.stdout == "from a url\nfrom a cid\n"
    finally:
        await runner.cleanup()


async def test_behaviour_33_foreign_image_is_not_bid_on(docker_node: Any) -> None:
    answer = await docker_node.ask(docker_job("true", image=FOREIGN_IMAGE))
    assert not answer.accepted
    assert "arm64" in answer.reason


async def test_behaviour_11_partial_output_of_a_failing_job(docker_node: Any) -> None:
    job = docker_job(
        "echo first; echo part > /out/p.txt; exit 3", outputs=[StorageSpec(Name="out", path="/out")]
    )
    eid = await docker_node.run(job)
    event = await docker_node.outcome(eid, timeout=60)
    assert isinstance(event, ResultProposed)
    assert event.run_output.exit_code == 3
    assert (docker_node.service.node_paths(eid).results / "out" / "p.txt").read_text() == "part\n"


async def test_timeout_and_cancel_stop_the_container(docker_node: Any) -> None:
    late = await docker_node.run(docker_job("sleep 30", timeout=1))
    event = await docker_node.outcome(late, timeout=60)
    assert isinstance(event, ExecutionFailed)
    assert event.timed_out

    running = await docker_node.run(docker_job("echo started; sleep 30"))

    async def started() -> bool:
        return "started" in (await docker_node.logs(running)).stdout

    from shoal_common.testing import wait_for

    await wait_for(started, timeout=30)
    assert (await docker_node.cancel(running)).ok
    assert isinstance(await docker_node.outcome(running, timeout=30), ExecutionCancelled)
    await asyncio.sleep(0)
