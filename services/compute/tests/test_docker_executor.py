"""The Docker executor against a real Docker Engine and the locally built test images.

CI guarantees the engine (scripts/docker-setup.sh), so an unreachable daemon FAILS these tests
instead of skipping them. Images are built by scripts/build-test-images.sh when missing.
The fake-client tests at the bottom are unit tests (no daemon): they pin down the exact
container configuration, GPUs included, since this machine has none.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest

from shoal_common.spec import Job
from shoal_compute.executors.base import (
    BidCheck,
    ExecutionRequest,
    Limits,
    LogStream,
    Mount,
)
from shoal_compute.executors.docker import (
    LABEL_EXECUTION,
    LABEL_EXECUTOR,
    LABEL_MANAGED,
    LABEL_NODE,
    LABEL_NODE_HOME,
    DockerExecutor,
    _Demuxer,
    _OnePoolUnixAdapter,
    go_arch,
)
from shoal_compute.executors.docker import (
    docker_client as make_docker_client,
)

REPO = Path(__file__).resolve().parents[3]
BUILD_SCRIPT = REPO / "scripts" / "build-test-images.sh"
IMAGE = "shoal-test/busybox:latest"
FOREIGN_IMAGE = "shoal-test/busybox-foreign:latest"
MiB = 1024 * 1024
DEADLINE = 20.0  # seconds: generous bound for waits on events in these tests

docker_engine = [pytest.mark.docker, pytest.mark.integration]


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def docker_client() -> Iterator[Any]:
    """A client for the local engine; fails (never skips) when the engine is not reachable."""
    try:
        client = docker.from_env()
        client.ping()
    except Exception as exc:
        pytest.fail(
            f"Docker Engine not reachable ({exc}). These tests need a running engine: "
            "run scripts/docker-setup.sh (installs docker.io, starts dockerd, builds the images).",
            pytrace=False,
        )
    yield client
    client.close()


@pytest.fixture(scope="session")
def test_images(docker_client: Any) -> None:
    """Build the test images with scripts/build-test-images.sh if any is missing."""
    missing = []
    for image in (IMAGE, FOREIGN_IMAGE):
        try:
            docker_client.images.get(image)
        except docker.errors.ImageNotFound:
            missing.append(image)
    if not missing:
        return
    done = subprocess.run(
        [str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=300, check=False
    )
    if done.returncode != 0:
        pytest.fail(
            f"building test images {missing} failed:\n{done.stdout}\n{done.stderr}",
            pytrace=False,
        )


@pytest.fixture
async def executor(docker_client: Any, test_images: None) -> AsyncIterator[DockerExecutor]:
    ex = DockerExecutor(go_arch(), allow_networking=True)
    try:
        yield ex
        # Checked before close(): run() itself must leave nothing behind, whatever the ending
        # (an exited container's removal may still be under way: settled() waits for it).
        await ex.settled()
        assert _containers_of(docker_client, ex) == []
    finally:
        await ex.close()
    assert _containers_of(docker_client, ex) == []


def _containers_of(client: Any, ex: DockerExecutor) -> list[str]:
    found = client.api.containers(
        all=True,
        filters={"label": [f"{LABEL_MANAGED}=true", f"{LABEL_EXECUTOR}={ex.instance_id}"]},
    )
    return [c["Id"] for c in found]


def _job(entrypoint: list[str] | None, image: str = IMAGE, **docker_spec: Any) -> Job:
    spec: dict[str, Any] = {"Image": image, **docker_spec}
    if entrypoint is not None:
        spec["Entrypoint"] = entrypoint
    return Job.model_validate({"Spec": {"Engine": "Docker", "Docker": spec}})


def _sh(script: str) -> list[str]:
    return ["sh", "-c", script]


_counter = 0


def _request(
    tmp_path: Path,
    entrypoint: list[str] | None,
    *,
    job: Job | None = None,
    limits: Limits | None = None,
    timeout: float | None = 30.0,
    **kwargs: Any,
) -> ExecutionRequest:
    global _counter
    _counter += 1
    results = tmp_path / "results"
    results.mkdir(exist_ok=True)
    return ExecutionRequest(
        execution_id=f"exec-{_counter}",
        job=job or _job(entrypoint),
        inputs=kwargs.pop("inputs", []),
        outputs=kwargs.pop("outputs", []),
        results_dir=results,
        limits=limits or Limits(cpu=1.0, memory=256 * MiB, disk=0, pids=256),
        timeout=timeout,
        **kwargs,
    )


class _Sink:
    """A LogSink that records chunks and lets a test wait for some text to have arrived."""

    def __init__(self) -> None:
        self.chunks: list[tuple[LogStream, bytes]] = []
        self._changed = asyncio.Event()

    async def __call__(self, stream: LogStream, chunk: bytes) -> None:
        self.chunks.append((stream, chunk))
        self._changed.set()

    def text(self, stream: LogStream = LogStream.STDOUT) -> bytes:
        return b"".join(c for s, c in self.chunks if s is stream)

    async def wait_for(self, needle: bytes) -> None:
        async with asyncio.timeout(DEADLINE):
            while needle not in self.text():
                self._changed.clear()
                await self._changed.wait()


# --- running containers -------------------------------------------------------------------------


@pytest.mark.docker
@pytest.mark.integration
async def test_stdout_stderr_and_exit_code(executor: DockerExecutor, tmp_path: Path) -> None:
    request = _request(tmp_path, _sh("echo -n apples; echo -n oranges >&2; exit 19"))
    result = await executor.run(request)
    assert result.exit_code == 19
    assert not result.runner_error
    assert not result.timed_out
    assert not result.cancelled
    assert (request.results_dir / "stdout").read_bytes() == b"apples"
    assert (request.results_dir / "stderr").read_bytes() == b"oranges"
    assert (request.results_dir / "exitCode").read_text() == "19"


@pytest.mark.docker
@pytest.mark.integration
async def test_image_defaults_env_and_workdir(executor: DockerExecutor, tmp_path: Path) -> None:
    job = _job(
        _sh('echo "$GREETING $NODE_SET $(pwd)"'),
        EnvironmentVariables=["GREETING=hello", "NODE_SET=from-job"],
        WorkingDirectory="/tmp",
    )
    request = _request(tmp_path, None, job=job, env={"NODE_SET": "from-node"})
    result = await executor.run(request)
    assert result.exit_code == 0, result
    assert (request.results_dir / "stdout").read_text() == "hello from-node /tmp\n"


@pytest.mark.docker
@pytest.mark.integration
async def test_empty_entrypoint_runs_the_image_default(
    executor: DockerExecutor, tmp_path: Path
) -> None:
    # The test image's default is /bin/sh, which exits 0 at once on an empty stdin.
    result = await executor.run(_request(tmp_path, None))
    assert result.exit_code == 0, result


@pytest.mark.docker
@pytest.mark.integration
async def test_output_volume_lands_in_results(executor: DockerExecutor, tmp_path: Path) -> None:
    results = tmp_path / "results"
    (results / "outputs").mkdir(parents=True)
    request = _request(
        tmp_path,
        _sh("echo data > /outputs/file.txt && mkdir /outputs/sub && echo x > /outputs/sub/y"),
        outputs=[Mount(results / "outputs", "/outputs", read_only=False)],
    )
    result = await executor.run(request)
    assert result.exit_code == 0, (request.results_dir / "stderr").read_text()
    assert (results / "outputs" / "file.txt").read_text() == "data\n"
    assert (results / "outputs" / "sub" / "y").read_text() == "x\n"


@pytest.mark.docker
@pytest.mark.integration
async def test_inputs_are_read_only(executor: DockerExecutor, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "data.txt").write_text("input data\n")
    request = _request(
        tmp_path,
        _sh("cat /inputs/data.txt; echo changed > /inputs/data.txt || exit 7; touch /inputs/new"),
        inputs=[Mount(inputs, "/inputs", read_only=True)],
    )
    result = await executor.run(request)
    assert result.exit_code == 7
    assert (request.results_dir / "stdout").read_text() == "input data\n"
    assert b"Read-only file system" in (request.results_dir / "stderr").read_bytes()
    assert (inputs / "data.txt").read_text() == "input data\n"
    assert sorted(p.name for p in inputs.iterdir()) == ["data.txt"]


@pytest.mark.docker
@pytest.mark.integration
async def test_no_network_by_default(executor: DockerExecutor, tmp_path: Path) -> None:
    request = _request(tmp_path, _sh("ls /sys/class/net"))
    result = await executor.run(request)
    assert result.exit_code == 0
    assert (request.results_dir / "stdout").read_text().split() == ["lo"]


@pytest.mark.docker
@pytest.mark.integration
async def test_network_when_asked_and_allowed(executor: DockerExecutor, tmp_path: Path) -> None:
    request = _request(tmp_path, _sh("ls /sys/class/net"), network=True)
    result = await executor.run(request)
    assert result.exit_code == 0
    assert "eth0" in (request.results_dir / "stdout").read_text().split()


@pytest.mark.docker
@pytest.mark.integration
async def test_network_refused_when_node_disallows(
    docker_client: Any, test_images: None, tmp_path: Path
) -> None:
    ex = DockerExecutor(go_arch(), allow_networking=False)
    try:
        result = await ex.run(_request(tmp_path, _sh("true"), network=True))
        assert "does not allow" in result.runner_error
        networked = Job.model_validate(
            {"Spec": {"Docker": {"Image": IMAGE}, "Network": {"Type": "Full"}}}
        )
        check = await ex.check(networked)
        assert not check.ok
        assert "networking" in check.reason
    finally:
        await ex.close()


@pytest.mark.docker
@pytest.mark.integration
async def test_memory_limit_oom_is_reported(executor: DockerExecutor, tmp_path: Path) -> None:
    # dd allocates its 64 MiB block up front: well over the 32 MiB limit.
    request = _request(
        tmp_path,
        _sh("exec dd if=/dev/zero of=/dev/null bs=64M count=1"),
        limits=Limits(cpu=1.0, memory=32 * MiB, disk=0),
    )
    result = await executor.run(request)
    assert result.exit_code == 137
    assert result.runner_error.startswith("out of memory"), result
    assert str(32 * MiB) in result.runner_error


@pytest.mark.docker
@pytest.mark.integration
async def test_pids_limit_contains_a_fork_bomb(executor: DockerExecutor, tmp_path: Path) -> None:
    # Forks sleepers until the limit says no; ash gives up with "can't fork" and the container
    # ends, taking every sleeper with it.
    request = _request(
        tmp_path,
        _sh('n=0; while [ $n -lt 1000 ]; do sleep 60 & n=$((n+1)); done; echo "forked $n"'),
        limits=Limits(cpu=1.0, memory=256 * MiB, disk=0, pids=64),
    )
    started = time.monotonic()
    result = await executor.run(request)
    assert time.monotonic() - started < 15
    assert result.exit_code != 0
    assert b"forked" not in (request.results_dir / "stdout").read_bytes()
    assert b"can't fork" in (request.results_dir / "stderr").read_bytes()


@pytest.mark.docker
@pytest.mark.integration
async def test_timeout_kills_and_removes(
    executor: DockerExecutor, docker_client: Any, tmp_path: Path
) -> None:
    request = _request(tmp_path, _sh("echo before; sleep 60; echo after"), timeout=1.0)
    started = time.monotonic()
    result = await executor.run(request)
    assert time.monotonic() - started < 10
    assert result.timed_out
    assert not result.cancelled
    assert result.runner_error == "timed out after 1s"
    assert (request.results_dir / "stdout").read_text() == "before\n"
    assert (request.results_dir / "exitCode").read_text() == str(result.exit_code)
    assert _containers_of(docker_client, executor) == []


@pytest.mark.docker
@pytest.mark.integration
async def test_cancel_kills_and_removes(
    executor: DockerExecutor, docker_client: Any, tmp_path: Path
) -> None:
    sink = _Sink()
    request = _request(tmp_path, _sh("echo ready; sleep 60"), log_sink=sink)
    run = asyncio.create_task(executor.run(request))
    await sink.wait_for(b"ready")
    assert len(_containers_of(docker_client, executor)) == 1
    started = time.monotonic()
    await executor.cancel(request.execution_id)
    result = await asyncio.wait_for(run, DEADLINE)
    assert time.monotonic() - started < 10
    assert result.cancelled
    assert not result.timed_out
    assert _containers_of(docker_client, executor) == []
    await executor.cancel(request.execution_id)  # unknown by now: a no-op


@pytest.mark.docker
@pytest.mark.integration
async def test_cancel_before_the_container_exists(executor: DockerExecutor, tmp_path: Path) -> None:
    request = _request(tmp_path, _sh("echo should-not-run"))
    run = asyncio.create_task(executor.run(request))
    await asyncio.sleep(0)  # let run() register the execution; it is now creating the container
    await executor.cancel(request.execution_id)
    result = await asyncio.wait_for(run, DEADLINE)
    assert result.cancelled
    assert (request.results_dir / "stdout").read_bytes() == b""


@pytest.mark.docker
@pytest.mark.integration
async def test_close_stops_running_jobs(
    docker_client: Any, test_images: None, tmp_path: Path
) -> None:
    ex = DockerExecutor(go_arch())
    sink = _Sink()
    run = asyncio.create_task(ex.run(_request(tmp_path, _sh("echo up; sleep 60"), log_sink=sink)))
    await sink.wait_for(b"up")
    await ex.close()
    result = await asyncio.wait_for(run, DEADLINE)
    assert "shut down" in result.runner_error
    assert _containers_of(docker_client, ex) == []
    after = await ex.run(_request(tmp_path, _sh("true")))
    assert "shut down" in after.runner_error


@pytest.mark.docker
@pytest.mark.integration
async def test_large_stdout_is_streamed_whole(executor: DockerExecutor, tmp_path: Path) -> None:
    sink = _Sink()
    request = _request(tmp_path, _sh("seq 1 100000"), log_sink=sink)
    result = await executor.run(request)
    assert result.exit_code == 0
    out = (request.results_dir / "stdout").read_bytes()
    lines = out.splitlines()
    assert len(lines) == 100000
    assert lines[-1] == b"100000"
    assert sink.text() == out


@pytest.mark.docker
@pytest.mark.integration
async def test_log_sink_gets_output_while_running(executor: DockerExecutor, tmp_path: Path) -> None:
    # The job prints, then waits for the test to answer through its output folder: the answer
    # can only come after the sink has seen the first line, i.e. live.
    results = tmp_path / "results"
    (results / "outputs").mkdir(parents=True)
    sink = _Sink()
    request = _request(
        tmp_path,
        _sh(
            "echo first; echo warming >&2; "
            "while [ ! -e /outputs/go ]; do sleep 0.05; done; echo second"
        ),
        outputs=[Mount(results / "outputs", "/outputs", read_only=False)],
        log_sink=sink,
    )
    run = asyncio.create_task(executor.run(request))
    await sink.wait_for(b"first")
    assert not run.done()
    (results / "outputs" / "go").touch()
    result = await asyncio.wait_for(run, DEADLINE)
    assert result.exit_code == 0
    assert sink.text() == b"first\nsecond\n"
    assert sink.text(LogStream.STDERR) == b"warming\n"
    assert (request.results_dir / "stdout").read_bytes() == b"first\nsecond\n"


@pytest.mark.docker
@pytest.mark.integration
async def test_failing_log_sink_does_not_fail_the_job(
    executor: DockerExecutor, tmp_path: Path
) -> None:
    async def broken(stream: LogStream, chunk: bytes) -> None:
        raise RuntimeError("sink down")

    request = _request(tmp_path, _sh("echo one; echo two"), log_sink=broken)
    result = await executor.run(request)
    assert result.exit_code == 0
    assert not result.runner_error
    assert (request.results_dir / "stdout").read_bytes() == b"one\ntwo\n"


@pytest.mark.docker
@pytest.mark.integration
async def test_unknown_image_and_missing_command(executor: DockerExecutor, tmp_path: Path) -> None:
    missing = await executor.run(
        _request(tmp_path, None, job=_job(["true"], image="shoal-test/does-not-exist:latest"))
    )
    assert missing.runner_error == "image shoal-test/does-not-exist:latest not found on this node"
    assert (tmp_path / "results" / "exitCode").read_text() == str(missing.exit_code)
    no_such_command = await executor.run(_request(tmp_path, ["/no/such/program"]))
    assert no_such_command.runner_error.startswith("could not start the container")


@pytest.mark.docker
@pytest.mark.integration
async def test_is_available(executor: DockerExecutor) -> None:
    assert await executor.is_available()


# --- bid checks ---------------------------------------------------------------------------------


@pytest.mark.docker
@pytest.mark.integration
async def test_check_accepts_a_local_image_for_this_arch(executor: DockerExecutor) -> None:
    assert await executor.check(_job(["true"])) == BidCheck(True)


@pytest.mark.docker
@pytest.mark.integration
async def test_check_refuses_foreign_platform_and_unknown_image(
    executor: DockerExecutor,
) -> None:
    arch = go_arch()
    foreign_arch = "amd64" if arch == "arm64" else "arm64"
    foreign = await executor.check(_job(["true"], image=FOREIGN_IMAGE))
    assert foreign == BidCheck(
        False, f"image {FOREIGN_IMAGE} is linux/{foreign_arch}, this node is linux/{arch}"
    )
    unknown = await executor.check(_job(["true"], image="shoal-test/nope:latest"))
    assert unknown == BidCheck(False, "image shoal-test/nope:latest not found on this node")
    assert await executor.check(_job(None, image="")) == BidCheck(
        False, "the job has no Docker image"
    )


@pytest.mark.docker
@pytest.mark.integration
async def test_check_uses_the_declared_node_arch(docker_client: Any, test_images: None) -> None:
    arch = go_arch()
    other = "amd64" if arch == "arm64" else "arm64"
    ex = DockerExecutor(other)
    try:
        assert (await ex.check(_job(["true"], image=FOREIGN_IMAGE))).ok
        refused = await ex.check(_job(["true"]))
        assert refused.reason == f"image {IMAGE} is linux/{arch}, this node is linux/{other}"
    finally:
        await ex.close()


# --- unit tests: a fake client captures what would be sent to the daemon -------------------------


class _FakeAPI:
    api_version = "1.41"

    def __init__(self) -> None:
        self.created: list[dict[str, Any]] = []
        self.removed: list[str] = []

    def create_container(self, **kwargs: Any) -> dict[str, str]:
        self.created.append(kwargs)
        return {"Id": "c0ffee"}

    def attach_socket(self, container: str, params: dict[str, int]) -> Any:
        # Stop the run here: what matters is the create call, and that cleanup still happens.
        raise docker.errors.APIError("attach refused by the fake")

    def remove_container(self, container: str, **kwargs: Any) -> None:
        self.removed.append(container)

    def containers(self, **kwargs: Any) -> list[dict[str, Any]]:
        return []

    def inspect_image(self, image: str) -> dict[str, Any]:
        return {"Os": "linux", "Architecture": "amd64"}

    def ping(self) -> bool:
        return True


class _FakeClient:
    def __init__(self) -> None:
        self.api = _FakeAPI()
        self.closed = False

    def close(self) -> None:
        self.closed = True


async def _create_call(request: ExecutionRequest, **executor_args: Any) -> Any:
    """Run ``request`` on an executor over a fake client; return the create_container kwargs."""
    client = _FakeClient()
    ex = DockerExecutor("amd64", client_factory=lambda: client, **executor_args)
    try:
        result = await ex.run(request)
    finally:
        await ex.close()
    assert client.closed
    assert "attach refused" in result.runner_error
    assert client.api.removed == ["c0ffee"]  # cleaned up even though the run blew up
    (created,) = client.api.created
    return created


async def test_gpu_device_requests_carry_the_assigned_ids(tmp_path: Path) -> None:
    request = _request(
        tmp_path,
        ["nvidia-smi"],
        limits=Limits(cpu=2.0, memory=512 * MiB, disk=0, gpu_ids=("1", "GPU-abc"), pids=100),
    )
    created = await _create_call(request, gpus=["0", "1", "GPU-abc"])
    (device_request,) = created["host_config"]["DeviceRequests"]
    assert device_request["DeviceIDs"] == ["1", "GPU-abc"]
    assert device_request["Driver"] == "nvidia"
    assert device_request["Capabilities"] == [["gpu"]]


async def test_gpus_not_declared_on_the_node_are_refused(tmp_path: Path) -> None:
    ex = DockerExecutor("amd64", gpus=["0"], client_factory=_FakeClient)
    try:
        result = await ex.run(
            _request(tmp_path, ["true"], limits=Limits(cpu=1, memory=0, disk=0, gpu_ids=("3",)))
        )
    finally:
        await ex.close()
    assert result.runner_error == "GPU(s) 3 are not declared on this node"
    gpu_job = Job.model_validate({"Spec": {"Docker": {"Image": IMAGE}, "Resources": {"GPU": "2"}}})
    ex2 = DockerExecutor("amd64", gpus=["0"], client_factory=_FakeClient)
    try:
        assert await ex2.check(gpu_job) == BidCheck(
            False, "the job needs 2 GPU(s), this node has 1"
        )
    finally:
        await ex2.close()


async def test_container_config_is_locked_down(tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    outputs = tmp_path / "results" / "out"
    request = _request(
        tmp_path,
        ["python", "main.py"],
        job=_job(["python", "main.py"], EnvironmentVariables=["A=1", "BROKEN"]),
        inputs=[Mount(inputs, "/inputs", read_only=True)],
        outputs=[Mount(outputs, "/outputs", read_only=False)],
        limits=Limits(cpu=0.5, memory=64 * MiB, disk=0, pids=77),
    )
    created = await _create_call(request)
    host = created["host_config"]
    assert created["entrypoint"] == ["python", "main.py"]
    assert created["environment"] == ["A=1"]
    assert created["labels"][LABEL_MANAGED] == "true"
    assert created["labels"][LABEL_EXECUTION] == request.execution_id
    assert host["NetworkMode"] == "none"
    assert not host.get("Privileged", False)
    assert host["CapDrop"] == ["ALL"]
    assert "SYS_ADMIN" not in host["CapAdd"]
    assert "NET_RAW" not in host["CapAdd"]
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["NanoCpus"] == 500_000_000
    assert host["Memory"] == host["MemorySwap"] == 64 * MiB
    assert host["PidsLimit"] == 77
    assert "DeviceRequests" not in host
    assert host["LogConfig"]["Type"] == "none"
    assert [(m["Source"], m["Target"], m["ReadOnly"]) for m in host["Mounts"]] == [
        (str(inputs), "/inputs", True),
        (str(outputs), "/outputs", False),
    ]


async def test_unavailable_daemon_is_reported_not_raised(tmp_path: Path) -> None:
    def no_daemon() -> Any:
        raise docker.errors.DockerException("Error while fetching server API version")

    ex = DockerExecutor("amd64", client_factory=no_daemon)
    try:
        assert not await ex.is_available()
        result = await ex.run(_request(tmp_path, ["true"]))
        assert "fetching server API version" in result.runner_error
        assert (tmp_path / "results" / "exitCode").read_text() == str(result.exit_code)
    finally:
        await ex.close()


def test_docker_requests_share_one_connection_pool() -> None:
    adapter = _OnePoolUnixAdapter("http+unix:///nonexistent/docker.sock", 60, max_pool_size=4)
    start = adapter.get_connection("http+docker://localhost/v1.45/containers/a/start")
    wait = adapter.get_connection("http+docker://localhost/v1.45/containers/b/wait")
    assert start is wait
    assert start.pool.maxsize == 4


@pytest.mark.docker
@pytest.mark.integration
def test_default_client_uses_one_pool(docker_client: Any) -> None:
    client = make_docker_client(max_pool_size=3)
    try:
        assert isinstance(client.api.get_adapter("http+docker://localhost"), _OnePoolUnixAdapter)
        assert client.ping()
        assert client.api.version()["ApiVersion"]
    finally:
        client.close()


def test_demuxer_splits_and_joins_frames() -> None:
    def frame(stream: int, payload: bytes) -> bytes:
        return bytes([stream, 0, 0, 0]) + len(payload).to_bytes(4, "big") + payload

    wire = frame(1, b"a") + frame(1, b"b") + frame(2, b"err") + frame(3, b"sys") + frame(1, b"c")
    demux = _Demuxer()
    got: list[tuple[LogStream, bytes]] = []
    for i in range(0, len(wire), 5):  # arbitrary cuts through headers and payloads
        got += demux.feed(wire[i : i + 5])
    merged: list[tuple[LogStream, bytes]] = []
    for stream, chunk in got:
        if merged and merged[-1][0] is stream:
            merged[-1] = (stream, merged[-1][1] + chunk)
        else:
            merged.append((stream, chunk))
    assert merged == [
        (LogStream.STDOUT, b"ab"),
        (LogStream.STDERR, b"errsys"),
        (LogStream.STDOUT, b"c"),
    ]
    assert demux.feed(wire) == [
        (LogStream.STDOUT, b"ab"),
        (LogStream.STDERR, b"errsys"),
        (LogStream.STDOUT, b"c"),
    ]


def test_go_arch() -> None:
    assert go_arch("x86_64") == "amd64"
    assert go_arch("aarch64") == "arm64"
    assert go_arch("arm64") == "arm64"


@pytest.mark.docker
@pytest.mark.integration
async def test_remove_leftovers_of_a_previous_process(
    docker_client: Any, test_images: None
) -> None:
    """Only this node's leftovers go: not another node's, nor those of a node with the same id
    in another cluster on the same daemon (every devstack has a "compute-0")."""
    labels = {
        LABEL_MANAGED: "true",
        LABEL_NODE: "node-leftover-test",
        LABEL_NODE_HOME: "home-a",
        LABEL_EXECUTOR: "old",
    }

    def create(**overrides: str) -> str:
        found = docker_client.api.create_container(
            IMAGE, entrypoint=["true"], labels={**labels, **overrides}
        )
        return str(found["Id"])

    stale = create()
    other_node = create(**{LABEL_NODE: "someone-else"})
    other_cluster = create(**{LABEL_NODE_HOME: "home-b"})
    ex = DockerExecutor(go_arch(), node_id="node-leftover-test", node_home="home-a")
    try:
        assert await ex.remove_leftovers() == 1
        with pytest.raises(docker.errors.NotFound):
            docker_client.api.inspect_container(stale)
        docker_client.api.inspect_container(other_node)  # left alone
        docker_client.api.inspect_container(other_cluster)  # left alone
    finally:
        for container in (stale, other_node, other_cluster):
            with contextlib.suppress(docker.errors.NotFound):
                docker_client.api.remove_container(container, force=True)
        await ex.close()


@pytest.mark.docker
@pytest.mark.integration
async def test_many_runs_at_once(executor: DockerExecutor, tmp_path: Path) -> None:
    # More containers than docker-py's 25 per-URL pools: its default client closed pools other
    # threads were using ("'NoneType' object has no attribute 'qsize'").
    requests = []
    for i in range(40):
        (tmp_path / str(i)).mkdir()
        requests.append(_request(tmp_path / str(i), _sh(f"echo job {i}; exit {i % 3}")))
    results = await asyncio.gather(*(executor.run(r) for r in requests))
    for i, (request, result) in enumerate(zip(requests, results, strict=True)):
        assert result.exit_code == i % 3, result
        assert (request.results_dir / "stdout").read_text() == f"job {i}\n"


@pytest.mark.docker
@pytest.mark.integration
async def test_cancelling_the_run_task_still_removes_the_container(
    executor: DockerExecutor, docker_client: Any, tmp_path: Path
) -> None:
    sink = _Sink()
    run = asyncio.create_task(
        executor.run(_request(tmp_path, _sh("echo ready; sleep 60"), log_sink=sink))
    )
    await sink.wait_for(b"ready")
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert _containers_of(docker_client, executor) == []


class _LateOomFlagAPI(_FakeAPI):
    """Docker's OOMKilled flag shows only from the ``flag_from``-th inspect (cgroup v2: the
    OOM event can reach the daemon after the exit)."""

    def __init__(self, flag_from: int) -> None:
        super().__init__()
        self.flag_from = flag_from
        self.inspections = 0

    def inspect_container(self, container: str) -> dict[str, Any]:
        self.inspections += 1
        return {"State": {"OOMKilled": self.inspections >= self.flag_from}}


@pytest.mark.parametrize(("exit_code", "expected"), [(137, True), (1, False)])
async def test_a_late_oom_flag_is_waited_for_only_after_a_sigkill(
    exit_code: int, expected: bool
) -> None:
    client = _FakeClient()
    client.api = _LateOomFlagAPI(flag_from=3)
    ex = DockerExecutor("amd64", client_factory=lambda: client)
    try:
        assert await ex._oom_killed("c0ffee", killed=exit_code == 137) is expected
    finally:
        await ex.close()
    assert client.api.inspections == (3 if expected else 1)
