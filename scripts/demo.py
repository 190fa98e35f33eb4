"""`make demo`: start a devstack, run one job on the most real engine available, show the result.

Docker when an engine is reachable and the local busybox image exists (scripts/docker-setup.sh
builds it), else the noop engine. Everything lives in a temporary folder and is stopped at the end.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from rich.console import Console

from shoal_cli.devstack import Devstack, DevstackConfig
from shoal_cli.results import download_results
from shoal_client.client import ShoalClient
from shoal_common.logging import configure_logging
from shoal_common.signing import ClientKey
from shoal_common.spec import DockerSpec, Engine, Spec, StorageSourceType, StorageSpec

console = Console()
IMAGE = "shoal-test/busybox:latest"


def docker_ready() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=2)
        client.images.get(IMAGE)
        return True
    except Exception:
        return False


def demo_spec(engine: Engine) -> Spec:
    script = "echo 'Hello from Shoal!'; mkdir -p /outputs; echo 42 > /outputs/answer.txt; uname -m"
    return Spec(
        Engine=engine,
        Docker=DockerSpec(Image=IMAGE, Entrypoint=["sh", "-c", script]),
        outputs=[
            StorageSpec(StorageSource=StorageSourceType.IPFS, Name="outputs", path="/outputs")
        ],
    )


def run_job(api_url: str, workdir: Path, engine: Engine) -> None:
    client = ShoalClient(api_url, key=ClientKey.load_or_create(workdir / "client"))
    started = time.perf_counter()
    job = client.submit(demo_spec(engine))
    console.print(f"Submitted job [bold]{job.metadata.id}[/bold] ({engine.value} engine)")
    state = client.wait(job.metadata.id, timeout=120)
    elapsed = (time.perf_counter() - started) * 1000
    console.print(f"Job ended [bold]{state.state.value}[/bold] in {elapsed:.0f} ms")
    for execution in state.executions:
        console.print(f"  {execution.node_id}: {execution.state.value} {execution.status}")
    target = download_results(client, job.metadata.id, workdir, raw=False, console=console)
    console.print(f"Results downloaded to {target} (CID verified):")
    for path in sorted(target.rglob("*")):
        if path.is_file():
            text = path.read_text(errors="replace").strip()
            console.print(f"  {path.relative_to(target)}: {text!r}")


async def main() -> None:
    configure_logging(level="WARNING")
    engine = Engine.DOCKER if docker_ready() else Engine.NOOP
    if engine is Engine.NOOP:
        console.print(
            "[yellow]Docker is not available: running the demo on the noop engine.[/yellow]"
        )
    with tempfile.TemporaryDirectory(prefix="shoal-demo-") as tmp:
        workdir = Path(tmp)
        stack = Devstack(
            DevstackConfig(
                state_dir=workdir / "devstack", compute_nodes=3, noop=engine is Engine.NOOP
            )
        )
        t0 = time.perf_counter()
        await stack.start()
        console.print(
            f"Devstack up in {(time.perf_counter() - t0) * 1000:.0f} ms: "
            f"3 compute nodes, requester at {stack.api_url}"
        )
        try:
            await asyncio.to_thread(run_job, stack.api_url, workdir, engine)
        finally:
            await stack.stop()
    console.print("Devstack stopped.")


if __name__ == "__main__":
    asyncio.run(main())
