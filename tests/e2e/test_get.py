"""Getting results back: ``shoal get`` layouts (merged and ``--raw``), results of failed runs,
integrity checks, and publishing failures (behaviours 10 and 38's publisher cases; issue 3).

Real Docker jobs on devstacks; the CLI runs in-process through click's runner, configured by
SHOAL_API_HOST / SHOAL_API_PORT / SHOAL_DIR exactly as a user's shell would.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
from click.testing import CliRunner, Result

from shoal_cli.devstack import DevstackConfig
from shoal_cli.main import cli
from shoal_client.client import ShoalClient, short_id
from shoal_common.selectors import parse_selector
from shoal_common.spec import (
    Deal,
    DockerSpec,
    Engine,
    JobState,
    Spec,
    StorageSourceType,
    StorageSpec,
    VerifierType,
)
from tests.support import DevstackThread, count

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.docker]

IMAGE = "shoal-test/busybox:latest"
FOREIGN_IMAGE = "shoal-test/busybox-foreign:latest"
DEADLINE = 60.0


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
    concurrency: int = 1,
    confidence: int | None = None,
    verifier: VerifierType | None = None,
    selector: str | None = None,
) -> Spec:
    return Spec(
        Engine=Engine.DOCKER,
        Verifier=verifier,
        Docker=DockerSpec(Image=image, Entrypoint=["sh", "-c", script]),
        outputs=[
            StorageSpec(StorageSource=StorageSourceType.IPFS, Name=name, path=path)
            for name, path in (outputs or {}).items()
        ]
        or None,
        Deal=Deal(Concurrency=concurrency, Confidence=confidence),
        NodeSelectors=parse_selector(selector) if selector else None,
    )


def run(client: ShoalClient, spec: Spec, timeout: float = DEADLINE) -> JobState:
    return client.wait(client.submit(spec).metadata.id, timeout=timeout)


def comments(client: ShoalClient, job_id: str) -> str:
    return "\n".join(h.comment for h in client.events(job_id))


def shoal(stack: DevstackThread, home: Path, *args: str) -> Result:
    port = stack.api_url.rsplit(":", 1)[1]
    env = {"SHOAL_API_HOST": "127.0.0.1", "SHOAL_API_PORT": port, "SHOAL_DIR": str(home)}
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def start_stack(root: Path, **fields: Any) -> DevstackThread:
    require_docker()
    return DevstackThread(DevstackConfig(state_dir=root, noop=False, **fields)).start()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevstackThread]:
    running = start_stack(tmp_path_factory.mktemp("get-stack"), compute_nodes=2)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The user's SHOAL_DIR (key file): the CLI and the client below are the same user."""
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def client(stack: DevstackThread, home: Path) -> ShoalClient:
    return stack.client(home)


# --- shoal get ----------------------------------------------------------------------------------

TWO_NODE_SCRIPT = (
    'h=$(hostname); echo "ran in $h"; echo "warning from $h" >&2; '
    "echo $h > /outputs/$h.txt; echo shared > /outputs/common.txt"
)


@pytest.fixture(scope="module")
def two_node_job(client: ShoalClient) -> JobState:
    """One job, concurrency 2: each execution writes a file of its own and a shared one."""
    state = run(client, busybox(TWO_NODE_SCRIPT, outputs={"outputs": "/outputs"}, concurrency=2))
    assert state.state.value == "Completed", comments(client, state.job_id)
    assert count(state, "Completed") == 2
    return state


def test_get_merges_executions_into_job_folder(
    stack: DevstackThread, home: Path, two_node_job: JobState, tmp_path: Path
) -> None:
    """``job-<id8>/`` (8 characters of the id's random end) holds stdout, stderr and exitCode
    of one execution and every output volume merged across executions, as the reference
    system laid it out."""
    job_id = two_node_job.job_id
    got = shoal(stack, home, "get", job_id, "--output-dir", str(tmp_path))
    assert got.exit_code == 0, got.output
    folder = tmp_path / f"job-{short_id(job_id)}"
    assert sorted(p.name for p in folder.iterdir()) == ["exitCode", "outputs", "stderr", "stdout"]

    outputs = [e.run_output for e in two_node_job.executions if e.run_output is not None]
    hosts = sorted(o.stdout.split()[-1] for o in outputs)
    assert len(set(hosts)) == 2
    stdout = (folder / "stdout").read_text()
    assert stdout in {o.stdout for o in outputs}
    assert (folder / "stderr").read_text() == f"warning from {stdout.split()[-1]}\n"
    assert (folder / "exitCode").read_text().strip() == "0"
    merged = folder / "outputs"
    assert sorted(p.name for p in merged.iterdir()) == sorted(
        ["common.txt", *(f"{h}.txt" for h in hosts)]
    )
    for host in hosts:
        assert (merged / f"{host}.txt").read_text() == f"{host}\n"
    assert (merged / "common.txt").read_text() == "shared\n"


def test_get_raw_keeps_one_folder_per_execution(
    stack: DevstackThread,
    home: Path,
    client: ShoalClient,
    two_node_job: JobState,
    tmp_path: Path,
) -> None:
    job_id = two_node_job.job_id
    got = shoal(stack, home, "get", job_id, "--raw", "--output-dir", str(tmp_path))
    assert got.exit_code == 0, got.output
    raw = tmp_path / f"job-{short_id(job_id)}" / "raw"
    expected = {f"{r['NodeID']}-{r['Data']['CID'][:8]}" for r in client.results(job_id)}
    assert {p.name for p in raw.iterdir()} == expected
    by_node = {e.node_id: e for e in two_node_job.executions if e.state.value == "Completed"}
    for folder in raw.iterdir():
        node = folder.name.rsplit("-", 1)[0]
        run_output = by_node[node].run_output
        assert run_output is not None
        assert (folder / "stdout").read_text() == run_output.stdout
        assert (folder / "exitCode").read_text().strip() == "0"
        host = run_output.stdout.split()[-1]
        assert sorted(p.name for p in (folder / "outputs").iterdir()) == sorted(
            ["common.txt", f"{host}.txt"]
        )


def test_get_downloads_the_results_of_a_failed_run(
    stack: DevstackThread, home: Path, client: ShoalClient, tmp_path: Path
) -> None:
    """Behaviour 10 through the CLI: a non-zero exit is a result, fetched like any other."""
    state = run(client, busybox("echo -n apples; echo -n oranges >&2; exit 19"))
    assert state.state.value == "Completed", comments(client, state.job_id)
    got = shoal(stack, home, "get", state.job_id, "--output-dir", str(tmp_path))
    assert got.exit_code == 0, got.output
    folder = tmp_path / f"job-{short_id(state.job_id)}"
    assert (folder / "stdout").read_text() == "apples"
    assert (folder / "stderr").read_text() == "oranges"
    assert (folder / "exitCode").read_text().strip() == "19"


def test_get_of_a_job_without_results_says_so(
    stack: DevstackThread, home: Path, client: ShoalClient, tmp_path: Path
) -> None:
    state = run(client, busybox("true", image=FOREIGN_IMAGE))
    assert state.state.value == "Error"
    got = shoal(stack, home, "get", state.job_id, "--output-dir", str(tmp_path))
    assert got.exit_code == 1
    assert "no published results" in got.stderr
    assert "Traceback" not in got.output


def test_get_of_an_unknown_job_is_a_clear_error(
    stack: DevstackThread, home: Path, tmp_path: Path
) -> None:
    got = shoal(stack, home, "get", "01a20000-0000-7000-8000-000000000000", "--output-dir", ".")
    assert got.exit_code == 1
    assert "Traceback" not in got.output
    assert got.stderr.strip()


def test_get_refuses_content_that_does_not_match_its_cid(
    stack: DevstackThread, home: Path, client: ShoalClient, tmp_path: Path
) -> None:
    """The CID of what arrives is checked: bytes changed in the store (same length, so only
    hashing can tell) make ``shoal get`` fail instead of handing over wrong results."""
    state = run(client, busybox("echo the-original-result"))
    assert state.state.value == "Completed", comments(client, state.job_id)
    [result] = client.results(state.job_id)
    cid = result["Data"]["CID"]
    stored = stack.config.state_dir / "publisher" / "content" / "objects" / cid / "stdout"
    assert stored.read_text() == "the-original-result\n", "the publisher's store layout changed"
    os.chmod(stored, 0o644)
    stored.write_text("the-tampered-result\n")

    got = shoal(stack, home, "get", state.job_id, "--output-dir", str(tmp_path))
    assert got.exit_code == 1
    assert "corrupted" in got.stderr or cid in got.stderr, got.stderr
    assert "Traceback" not in got.output
    leaked = list(tmp_path.rglob("stdout"))
    assert all(p.read_text() != "the-tampered-result\n" for p in leaked), leaked


# --- publishing failures (behaviour 38) ---------------------------------------------------------


@pytest.fixture(scope="module")
def failing_publisher_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevstackThread]:
    """3 nodes; the publisher fails every result that comes from compute-0."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SHOAL_PUBLISHER_FAIL_NODES", '["compute-0"]')
        running = start_stack(
            tmp_path_factory.mktemp("failing-publisher"),
            compute_nodes=3,
            requester_settings={"max_retries": 1},
        )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def failing_publisher_client(
    failing_publisher_stack: DevstackThread, tmp_path_factory: pytest.TempPathFactory
) -> ShoalClient:
    return failing_publisher_stack.client(tmp_path_factory.mktemp("key"))


def published_nodes(client: ShoalClient, job_id: str) -> list[str]:
    return sorted(str(r["NodeID"]) for r in client.results(job_id))


def test_failing_publisher_beside_a_good_one_completes_partially(
    failing_publisher_client: ShoalClient,
) -> None:
    """Concurrency 2 on [failing, good]: the good result is published, the other's failure is
    recorded; one of two is CompletedPartially (fewer published than the deal asked)."""
    client = failing_publisher_client
    state = run(
        client,
        busybox("echo noop-verified", concurrency=2, selector="name in (compute-0,compute-1)"),
    )
    assert state.state.value == "CompletedPartially", comments(client, state.job_id)
    assert published_nodes(client, state.job_id) == ["compute-1"]
    failed = [e for e in state.executions if e.node_id == "compute-0"]
    assert failed
    assert all(e.state.value == "Failed" for e in failed)
    assert "failure injected" in comments(client, state.job_id)


def test_failing_publisher_with_confidence_met_completes(
    failing_publisher_client: ShoalClient,
) -> None:
    """Deterministic, concurrency 3, confidence 2, one node's publisher failing: the 2 agreeing
    results that were published meet the confidence, so the job is Completed."""
    client = failing_publisher_client
    state = run(
        client,
        busybox(
            "echo same-everywhere",
            concurrency=3,
            confidence=2,
            verifier=VerifierType.DETERMINISTIC,
        ),
    )
    assert state.state.value == "Completed", comments(client, state.job_id)
    assert published_nodes(client, state.job_id) == ["compute-1", "compute-2"]
    assert "failure injected" in comments(client, state.job_id)


def test_failing_publisher_below_confidence_completes_partially(
    failing_publisher_client: ShoalClient,
) -> None:
    """Deterministic, concurrency 2, confidence 2 on [failing, good]: only 1 published, fewer
    than the confidence: CompletedPartially, and the published result is still downloadable."""
    client = failing_publisher_client
    state = run(
        client,
        busybox(
            "echo agreed-but-half-published",
            concurrency=2,
            confidence=2,
            verifier=VerifierType.DETERMINISTIC,
            selector="name in (compute-0,compute-1)",
        ),
    )
    assert state.state.value == "CompletedPartially", comments(client, state.job_id)
    assert published_nodes(client, state.job_id) == ["compute-1"]
    assert "failure injected" in comments(client, state.job_id)
