"""Docker jobs on a devstack with real Docker: results, output volumes, exit codes, truncation,
GPUs, image platforms and chained jobs (behaviours 2, 3, 9-12, 26, 33; issue 3).

Jobs run ``shoal-test/busybox`` (built locally by scripts/build-test-images.sh; nothing is
pulled). Each test submits through the real client, waits on the job's state with a deadline and
checks both what the API says and what ``ShoalClient.download`` brings back (CID-checked).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest

from shoal_cli.devstack import DevstackConfig
from shoal_client.client import ShoalClient, ShoalClientError
from shoal_common.selectors import parse_selector
from shoal_common.spec import (
    Deal,
    DockerSpec,
    Engine,
    Job,
    JobState,
    ResourcesSpec,
    Spec,
    StorageSourceType,
    StorageSpec,
)
from tests.conftest import StackFactory
from tests.support import DevstackThread, count

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.docker]

IMAGE = "shoal-test/busybox:latest"
FOREIGN_IMAGE = "shoal-test/busybox-foreign:latest"  # built for another architecture
DEADLINE = 60.0  # seconds a job may take to end; a hang fails the test instead of blocking


def require_docker() -> None:
    """Fail (never skip) without an engine and the test images: CI provides both."""
    try:
        engine = docker.from_env()
        try:
            engine.ping()
            for image in (IMAGE, FOREIGN_IMAGE):
                engine.images.get(image)
        finally:
            engine.close()
    except (docker.errors.DockerException, OSError) as exc:
        pytest.fail(
            f"Docker Engine or test images missing ({exc}): run scripts/docker-setup.sh",
            pytrace=False,
        )


def busybox(
    script: str,
    *,
    image: str = IMAGE,
    outputs: dict[str, str] | None = None,
    inputs: list[StorageSpec] | None = None,
    concurrency: int = 1,
    selector: str | None = None,
    gpu: str | None = None,
    timeout: float | None = None,
) -> Spec:
    """A Docker job running ``sh -c script``; ``outputs`` maps volume names to paths."""
    return Spec(
        Engine=Engine.DOCKER,
        Docker=DockerSpec(Image=image, Entrypoint=["sh", "-c", script]),
        outputs=[
            StorageSpec(StorageSource=StorageSourceType.IPFS, Name=name, path=path)
            for name, path in (outputs or {}).items()
        ]
        or None,
        inputs=inputs,
        Deal=Deal(Concurrency=concurrency),
        NodeSelectors=parse_selector(selector) if selector else None,
        Resources=ResourcesSpec(GPU=gpu) if gpu else None,
        Timeout=timeout,
    )


def run(client: ShoalClient, spec: Spec, timeout: float = DEADLINE) -> JobState:
    return client.wait(client.submit(spec).metadata.id, timeout=timeout)


def comments(client: ShoalClient, job_id: str) -> str:
    return "\n".join(h.comment for h in client.events(job_id))


def result_cids(client: ShoalClient, job_id: str) -> dict[str, str]:
    """Published result CID per node."""
    return {str(r["NodeID"]): str(r["Data"]["CID"]) for r in client.results(job_id)}


def download_result(client: ShoalClient, job_id: str, dest: Path) -> Path:
    """The (single) published result folder of a job, fetched and CID-checked by the client."""
    cids = list(result_cids(client, job_id).values())
    assert len(cids) == 1, f"expected one published result, got {cids}"
    return client.download(cids[0], dest)


def submit_or_refusal(client: ShoalClient, spec: Spec) -> Job | ShoalClientError:
    try:
        return client.submit(spec)
    except ShoalClientError as exc:
        return exc


def assert_refused(client: ShoalClient, spec: Spec, *words: str) -> str:
    """The job is refused at submit (4xx) or ends in Error, and the reason names ``words``.

    Returns the reason. A job left running or queued fails the test at the wait's deadline.
    """
    submitted = submit_or_refusal(client, spec)
    if isinstance(submitted, ShoalClientError):
        assert 400 <= submitted.status < 500, submitted
        reason = submitted.message
    else:
        state = client.wait(submitted.metadata.id, timeout=DEADLINE)
        reason = comments(client, state.job_id)
        assert state.state.value == "Error", reason
        assert count(state, "Completed") == 0
    for word in words:
        assert word.lower() in reason.lower(), reason
    return reason


def start_stack(root: Path, **fields: Any) -> DevstackThread:
    require_docker()
    fields.setdefault("compute_nodes", 2)
    return DevstackThread(DevstackConfig(state_dir=root, noop=False, **fields)).start()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevstackThread]:
    """One real-Docker devstack shared by the tests that need no special node settings."""
    running = start_stack(tmp_path_factory.mktemp("docker-stack"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(stack: DevstackThread, tmp_path_factory: pytest.TempPathFactory) -> ShoalClient:
    return stack.client(tmp_path_factory.mktemp("key"))


# --- results ------------------------------------------------------------------------------------


def test_output_volume_lands_in_the_downloaded_result(client: ShoalClient, tmp_path: Path) -> None:
    """Behaviour 2."""
    state = run(
        client,
        busybox(
            "echo 'hello from the output volume' > /output_data/output_file.txt",
            outputs={"test": "/output_data"},
        ),
    )
    assert state.state.value == "Completed", comments(client, state.job_id)
    result = download_result(client, state.job_id, tmp_path / "result")
    assert (result / "test" / "output_file.txt").read_text() == "hello from the output volume\n"
    assert (result / "exitCode").read_text().strip() == "0"


FIXTURE_LINES = [f"{i},{'even' if i % 2 == 0 else 'odd'},{i * i}" for i in range(1, 101)]


@pytest.fixture(scope="module")
def fixture_cid(client: ShoalClient, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 100-line CSV stored with ``client.put`` (what ``shoal put`` does)."""
    path = tmp_path_factory.mktemp("fixture") / "squares.csv"
    path.write_text("\n".join(FIXTURE_LINES) + "\n")
    return client.put(path)


@pytest.mark.parametrize(
    ("script", "expected_line", "expected_lines"),
    [
        ("grep ',even,' /inputs/squares.csv", "64,even,4096", 50),
        ("sed -n '/^7[0-9],/p' /inputs/squares.csv | sed 's/odd/ODD/'", "77,ODD,5929", 10),
        ("awk -F, '$3 > 9000 {print $1 \":\" $3}' /inputs/squares.csv", "95:9025", 6),
    ],
    ids=["grep", "sed", "awk"],
)
def test_text_tools_over_an_uploaded_file(
    client: ShoalClient, fixture_cid: str, script: str, expected_line: str, expected_lines: int
) -> None:
    """Behaviour 3: the file is uploaded once and mounted by CID."""
    spec = busybox(
        script,
        inputs=[
            StorageSpec(
                StorageSource=StorageSourceType.IPFS, CID=fixture_cid, path="/inputs/squares.csv"
            )
        ],
    )
    state = run(client, spec)
    assert state.state.value == "Completed", comments(client, state.job_id)
    output = state.executions[0].run_output
    assert output is not None
    lines = output.stdout.splitlines()
    assert expected_line in lines
    assert len(lines) == expected_lines


def test_large_stdout_is_kept_whole_in_the_results(client: ShoalClient, tmp_path: Path) -> None:
    """Behaviour 9: ~7 MB of stdout in small writes; the last line is in the downloaded
    stdout, while the API's copy is truncated and flagged."""
    lines = 1_000_000
    state = run(client, busybox(f"seq 1 {lines}"))
    assert state.state.value == "Completed", comments(client, state.job_id)
    output = state.executions[0].run_output
    assert output is not None
    assert output.stdout_truncated
    assert output.stdout.startswith("1\n2\n3\n")
    assert len(output.stdout.encode()) < 64 * 1024, "the API must not carry the whole stdout"
    result = download_result(client, state.job_id, tmp_path / "result")
    stdout = (result / "stdout").read_bytes()
    assert stdout.endswith(f"\n{lines - 1}\n{lines}\n".encode())
    assert stdout.count(b"\n") == lines


def test_non_zero_exit_is_a_result(client: ShoalClient, tmp_path: Path) -> None:
    """Behaviour 10."""
    state = run(client, busybox("echo -n apples; echo -n oranges >&2; exit 19"))
    assert state.state.value == "Completed", comments(client, state.job_id)
    output = state.executions[0].run_output
    assert output is not None
    assert (output.stdout, output.stderr, output.exit_code) == ("apples", "oranges", 19)
    result = download_result(client, state.job_id, tmp_path / "result")
    assert (result / "stdout").read_text() == "apples"
    assert (result / "stderr").read_text() == "oranges"
    assert (result / "exitCode").read_text().strip() == "19"


def test_job_failing_part_way_publishes_what_it_wrote(client: ShoalClient, tmp_path: Path) -> None:
    """Behaviour 11: the script dies half-way (a missing command under ``set -e``); the output
    written before that is published and downloadable."""
    script = (
        "set -e; echo step-1; echo partial > /outputs/step1.txt; "
        "no-such-command; echo step-2; echo never > /outputs/step2.txt"
    )
    state = run(client, busybox(script, outputs={"outputs": "/outputs"}))
    assert state.state.value == "Completed", comments(client, state.job_id)
    result = download_result(client, state.job_id, tmp_path / "result")
    assert (result / "stdout").read_text() == "step-1\n"
    assert "no-such-command" in (result / "stderr").read_text()
    assert (result / "exitCode").read_text().strip() == "127"
    assert (result / "outputs" / "step1.txt").read_text() == "partial\n"
    assert not (result / "outputs" / "step2.txt").exists()


def test_job_timing_out_part_way_keeps_what_it_wrote(client: ShoalClient, tmp_path: Path) -> None:
    """Behaviour 11, the harder case: the run is killed at its timeout after writing output.

    The execution fails ("timed out"), and what it wrote before is still downloadable: the
    issue's "results of failed runs are downloadable too".
    """
    script = "echo before-the-timeout; echo partial > /outputs/early.txt; sleep 30; echo late"
    state = run(client, busybox(script, outputs={"outputs": "/outputs"}, timeout=2))
    assert state.state.value == "Error"
    assert "timed out" in comments(client, state.job_id)
    failed = [e for e in state.executions if e.state.value == "Failed"]
    assert failed
    assert failed[0].run_output is not None
    assert failed[0].run_output.stdout == "before-the-timeout\n"
    # What it wrote is published and downloadable, like a non-zero exit's results.
    result = download_result(client, state.job_id, tmp_path / "result")
    assert (result / "stdout").read_text() == "before-the-timeout\n"
    assert (result / "outputs" / "early.txt").read_text() == "partial\n"


@pytest.mark.parametrize(
    "where",
    [
        pytest.param({"requester_settings": {"max_output_bytes": 100}}, id="requester"),
        pytest.param({"extra_compute": {"max_run_output_bytes": 100}}, id="compute-node"),
    ],
)
def test_api_output_is_truncated_at_the_configured_maximum(
    make_devstack: StackFactory, tmp_path: Path, where: dict[str, Any]
) -> None:
    """Behaviour 12: max-1 and max bytes are returned whole, max+1 is cut to max with the flag
    set; the full text stays in the published results. Either limit (the requester's
    ``max_output_bytes`` or the node's ``max_run_output_bytes``) is honoured."""
    require_docker()
    stack = make_devstack(noop=False, compute_nodes=1, **where)
    client = stack.client(tmp_path / "key")
    limit = 100
    for size, truncated in ((limit - 1, False), (limit, False), (limit + 1, True)):
        script = f"head -c {size} /dev/zero | tr '\\0' o; head -c {size} /dev/zero | tr '\\0' e >&2"
        state = run(client, busybox(script))
        assert state.state.value == "Completed", comments(client, state.job_id)
        output = state.executions[0].run_output
        assert output is not None
        shown = min(size, limit)
        assert (output.stdout, output.stdout_truncated) == ("o" * shown, truncated), size
        assert (output.stderr, output.stderr_truncated) == ("e" * shown, truncated), size
        result = download_result(client, state.job_id, tmp_path / f"result-{size}")
        assert (result / "stdout").read_text() == "o" * size
        assert (result / "stderr").read_text() == "e" * size


def test_the_same_spec_submitted_twice_runs_twice(client: ShoalClient) -> None:
    """Running a job again is a new job. Only a replay of the very same signed request may
    return the original (the requester keys replays on the signed bytes), so the client must
    make each submit unique."""
    spec = busybox("echo once more")
    first = client.submit(spec).metadata.id
    second = client.submit(spec).metadata.id
    assert first != second, "the second submit returned the first job"
    for job_id in (first, second):
        assert client.wait(job_id, timeout=DEADLINE).state.value == "Completed"


# --- chaining -----------------------------------------------------------------------------------


def test_a_results_cid_feeds_the_next_job(client: ShoalClient, tmp_path: Path) -> None:
    """y = f(x): job 1's published result CID is job 2's input; job 2 reads job 1's output."""
    first = run(client, busybox("seq 1 10 > /outputs/numbers.txt", outputs={"outputs": "/outputs"}))
    assert first.state.value == "Completed", comments(client, first.job_id)
    [cid] = result_cids(client, first.job_id).values()

    second = run(
        client,
        busybox(
            "awk '{s += $1} END {print s}' /inputs/outputs/numbers.txt; cat /inputs/exitCode",
            inputs=[StorageSpec(StorageSource=StorageSourceType.IPFS, CID=cid, path="/inputs")],
        ),
    )
    assert second.state.value == "Completed", comments(client, second.job_id)
    output = second.executions[0].run_output
    assert output is not None
    assert output.stdout.split() == ["55", "0"]
    assert output.exit_code == 0


# --- GPUs ---------------------------------------------------------------------------------------


def test_gpu_jobs_share_the_declared_gpus(make_devstack: StackFactory, tmp_path: Path) -> None:
    """Behaviour 26: 2 nodes with 1 (declared, fake) GPU each, 4 GPU jobs submitted together:
    all complete, each node runs exactly 2, never 2 at once (its one GPU is exclusive), and
    each run is handed its node's declared GPU id (no hard-coded device 0).

    Each job prints its assigned devices and the host's uptime (one clock for every
    container) when it starts and ends.
    """
    require_docker()
    declared = {"compute-0": "GPU-fake-a", "compute-1": "GPU-fake-b"}
    stack = make_devstack(
        noop=False,
        compute_nodes=2,
        compute_gpus=1,
        node_settings={
            0: {"gpu_ids": [declared["compute-0"]]},
            1: {"gpu_ids": [declared["compute-1"]]},
        },
    )
    client = stack.client(tmp_path / "key")
    script = (
        "read s _ < /proc/uptime; sleep 1.5; read e _ < /proc/uptime; "
        'echo "$s $e ${NVIDIA_VISIBLE_DEVICES:-none}"'
    )
    jobs = [client.submit(busybox(f"{script} # job {i}", gpu="1")).metadata.id for i in range(4)]
    states = [client.wait(job_id, timeout=DEADLINE) for job_id in jobs]

    spans: dict[str, list[tuple[float, float]]] = {}
    for state in states:
        assert state.state.value == "Completed", comments(client, state.job_id)
        [done] = [e for e in state.executions if e.state.value == "Completed"]
        assert done.run_output is not None
        fields = done.run_output.stdout.split()
        assert len(fields) == 3, done.run_output
        start, end, devices = fields
        assert devices == declared[done.node_id]
        spans.setdefault(done.node_id, []).append((float(start), float(end)))
    assert sorted(spans) == ["compute-0", "compute-1"]
    assert all(len(runs) == 2 for runs in spans.values()), spans
    for node, runs in spans.items():
        (_, first_end), (second_start, _) = sorted(runs)
        assert first_end <= second_start, f"{node} ran two GPU jobs at once: {runs}"


# --- image platform -----------------------------------------------------------------------------


def test_no_node_bids_on_an_image_for_another_platform(client: ShoalClient) -> None:
    """Behaviour 33: refused at submit, or no bid from any node and a clear platform message."""
    submitted = submit_or_refusal(client, busybox("echo should not run", image=FOREIGN_IMAGE))
    if isinstance(submitted, ShoalClientError):
        assert 400 <= submitted.status < 500, submitted
        assert "arm64" in submitted.message, submitted
        return
    state = client.wait(submitted.metadata.id, timeout=DEADLINE)
    assert state.state.value == "Error"
    assert state.executions, "nodes were asked"
    assert all(e.state.value == "AskForBidRejected" for e in state.executions)
    assert count(state, "BidAccepted") == count(state, "Completed") == 0
    text = comments(client, state.job_id)
    assert "arm64" in text
    assert "amd64" in text or "this node is" in text


# --- clear errors -------------------------------------------------------------------------------


def test_unknown_image_is_a_clear_error(client: ShoalClient) -> None:
    assert_refused(client, busybox("true", image="shoal-test/does-not-exist:1"), "not found")


@pytest.mark.parametrize("name", ["../x", "a/b", "/abs", "..", "stdout"])
def test_output_volume_names_cannot_escape_the_results(client: ShoalClient, name: str) -> None:
    """An output volume is one folder inside the results: no ``..``, ``/`` or reserved names."""
    spec = busybox("echo escaped > /out/file", outputs={name: "/out"})
    assert_refused(client, spec, "output volume")


def test_symlink_out_of_an_output_volume_is_not_followed(
    client: ShoalClient, tmp_path: Path
) -> None:
    """A job that leaves a symlink to a host path in its output must not publish that path's
    content: refused with a clear message, or published as something that is not the target."""
    spec = busybox("ln -s /etc/hostname /outputs/leak", outputs={"outputs": "/outputs"})
    job = client.submit(spec)
    state = client.wait(job.metadata.id, timeout=DEADLINE)
    if state.state.value == "Error":
        assert "symlink" in comments(client, state.job_id).lower()
        return
    result = download_result(client, state.job_id, tmp_path / "result")
    leak = result / "outputs" / "leak"
    assert not leak.is_symlink()
    assert not leak.exists() or leak.read_bytes() != Path("/etc/hostname").read_bytes()
