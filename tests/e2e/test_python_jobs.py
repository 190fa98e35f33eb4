"""``shoal run python`` without --deterministic: Python in Docker on a devstack (issue 5).

Jobs run in ``shoal/python:3.11``, built locally from this machine's CPython by
scripts/build-python-image.sh (nothing is pulled). Each test drives the real CLI against the
devstack, then checks what the API says and what ``ShoalClient.download`` brings back. Jobs have
no network (the default), so requirements come from the job context (docs/adr/0008).
"""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import pytest
from click.testing import CliRunner, Result

from shoal_cli.main import cli
from shoal_cli.wasm_commands import DEFAULT_PYTHON_IMAGE
from shoal_client.client import ShoalClient
from shoal_common.spec import JobState
from tests.support import DevstackThread, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.docker]

DEADLINE = 90.0  # seconds a job may take to end (pip installs included)
REPO = Path(__file__).resolve().parents[2]


def require_python_image() -> None:
    """Fail (never skip) without an engine and the Python image: CI provides both."""
    try:
        engine = docker.from_env()
        try:
            engine.ping()
            engine.images.get(DEFAULT_PYTHON_IMAGE)
        finally:
            engine.close()
    except (docker.errors.DockerException, OSError) as exc:
        pytest.fail(
            f"Docker Engine or {DEFAULT_PYTHON_IMAGE} missing ({exc}): run scripts/docker-setup.sh",
            pytrace=False,
        )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevstackThread]:
    require_python_image()
    from shoal_cli.devstack import DevstackConfig

    root = tmp_path_factory.mktemp("python-stack")
    running = DevstackThread(DevstackConfig(state_dir=root, noop=False, compute_nodes=1)).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(stack: DevstackThread, tmp_path_factory: pytest.TempPathFactory) -> ShoalClient:
    return stack.client(tmp_path_factory.mktemp("key"))


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shoal-home")


def shoal(stack: DevstackThread, home: Path, *args: str) -> Result:
    port = stack.api_url.rsplit(":", 1)[1]
    env = {"SHOAL_API_HOST": "127.0.0.1", "SHOAL_API_PORT": port, "SHOAL_DIR": str(home)}
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def run_python(
    stack: DevstackThread, home: Path, client: ShoalClient, *args: str
) -> tuple[Result, JobState]:
    """``shoal run python --id-only ARGS`` (it waits), then the job's final state."""
    result = shoal(
        stack, home, "run", "python", "--id-only", "--wait-timeout", str(DEADLINE), *args
    )
    lines = result.stdout.strip().splitlines()
    assert lines, result.output
    return result, client.wait(lines[0], timeout=DEADLINE)


def comments(client: ShoalClient, job_id: str) -> str:
    return "\n".join(h.comment for h in client.events(job_id))


def download(client: ShoalClient, job_id: str, dest: Path) -> Path:
    cids = [str(r["Data"]["CID"]) for r in client.results(job_id)]
    assert len(cids) == 1, f"expected one published result, got {cids}"
    return client.download(cids[0], dest)


def completed(client: ShoalClient, result: Result, state: JobState) -> None:
    assert state.state.value == "Completed", (result.output, comments(client, state.job_id))
    assert result.exit_code == 0, result.output


def make_wheel(folder: Path, name: str, version: str, source: str, requires: str = "") -> Path:
    """A pure-Python wheel written by hand (no build tools, no network)."""
    dist = f"{name}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    if requires:
        metadata += f"Requires-Dist: {requires}\n"
    files = {
        f"{name}/__init__.py": source,
        f"{dist}/METADATA": metadata,
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: shoal-tests\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    record = ""
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record += f"{path},sha256={digest.decode()},{len(text.encode())}\n"
    files[f"{dist}/RECORD"] = record + f"{dist}/RECORD,,\n"
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


# --- the tests ------------------------------------------------------------------------------------


def test_code_runs_in_the_docker_python(
    stack: DevstackThread, home: Path, client: ShoalClient
) -> None:
    """Not the deterministic runtime (CPython 3.15 for WASI): this machine's 3.11, in Docker."""
    code = "import sys; print(1 + 1); print(sys.version_info[:2], sys.platform)"
    result, state = run_python(stack, home, client, "--context-path", "", "-c", code)
    completed(client, result, state)
    run = state.executions[0].run_output
    assert run is not None
    assert run.stdout == "2\n(3, 11) linux\n"
    assert run.exit_code == 0


def numbers_project(client: ShoalClient, tmp_path: Path) -> tuple[str, Path]:
    """A CSV stored by CID, and a folder with main.py (+ a helper module) summing it."""
    data = tmp_path / "numbers.csv"
    data.write_text("".join(f"{i},{i * i}\n" for i in range(1, 11)))
    cid = client.put(data)
    project = tmp_path / "project"
    project.mkdir()
    (project / "helpers.py").write_text("def total(rows):\n    return sum(b for _, b in rows)\n")
    (project / "main.py").write_text(
        "import pathlib\n"
        "from helpers import total\n"  # the context is the working directory, on sys.path
        "rows = [tuple(map(int, line.split(','))) for line in\n"
        "        pathlib.Path('/inputs/numbers.csv').read_text().splitlines()]\n"
        "out = pathlib.Path('/outputs')\n"
        "(out / 'summary.txt').write_text(f'rows={len(rows)} total={total(rows)}\\n')\n"
        "print('cwd', pathlib.Path.cwd())\n"
    )
    return cid, project


def run_numbers_main(
    stack: DevstackThread,
    home: Path,
    client: ShoalClient,
    tmp_path: Path,
    cid: str,
    project: Path,
    *flags: str,
) -> Path:
    """Run the numbers project's main.py over its input; its results, summary checked."""
    result, state = run_python(
        stack,
        home,
        client,
        *flags,
        "--context-path",
        str(project),
        "-i",
        f"ipfs://{cid}:/inputs/numbers.csv",
        "-o",
        "outputs:/outputs",
        "main.py",
    )
    completed(client, result, state)
    folder = download(client, state.job_id, tmp_path / "result")
    assert (folder / "outputs" / "summary.txt").read_text() == "rows=10 total=385\n"
    return folder


def test_main_py_reads_an_input_volume_and_writes_an_output_volume(
    stack: DevstackThread, home: Path, client: ShoalClient, tmp_path: Path
) -> None:
    cid, project = numbers_project(client, tmp_path)
    folder = run_numbers_main(stack, home, client, tmp_path, cid, project)
    assert (folder / "stdout").read_text() == "cwd /job\n"
    assert (folder / "exitCode").read_text().strip() == "0"


def test_requirements_are_installed_offline_from_the_context(
    stack: DevstackThread, home: Path, client: ShoalClient, tmp_path: Path
) -> None:
    """A wheel by path, and one found by name with --find-links (pulling its dependency)."""
    project = tmp_path / "project"
    make_wheel(project / "dist", "shoalgreet", "1.0", "def greet(who):\n    return f'hi {who}'\n")
    make_wheel(project / "wheels", "shoalbase", "2.0", "NAME = 'base'\n")
    make_wheel(
        project / "wheels",
        "shoaltop",
        "3.0",
        "from shoalbase import NAME\nTOP = 'top on ' + NAME\n",
        requires="shoalbase>=2",
    )
    (project / "requirements.txt").write_text(
        "--find-links ./wheels\n./dist/shoalgreet-1.0-py3-none-any.whl\nshoaltop==3.0\n"
    )
    (project / "main.py").write_text(
        "from importlib.metadata import version\n"
        "import shoalgreet, shoaltop\n"
        "print(shoalgreet.greet('shoal'), shoaltop.TOP)\n"
        "print([version(n) for n in ('shoalgreet', 'shoaltop', 'shoalbase')])\n"
        "print(shoalgreet.__file__)\n"
    )
    result, state = run_python(
        stack, home, client, "--context-path", str(project), "-r", "requirements.txt", "main.py"
    )
    completed(client, result, state)
    run = state.executions[0].run_output
    assert run is not None
    lines = run.stdout.splitlines()
    assert lines[:2] == ["hi shoal top on base", "['1.0', '3.0', '2.0']"]
    # Installed into the container's environment, not imported from the (read-only) context.
    assert lines[2].endswith("-packages/shoalgreet/__init__.py"), lines
    assert not lines[2].startswith("/job/")


def test_requirements_needing_pypi_fail_clearly_without_network(
    stack: DevstackThread, home: Path, client: ShoalClient, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "requirements.txt").write_text("shoal-surely-not-on-the-context==1.0\n")
    (project / "main.py").write_text("print('the program ran')\n")
    result, state = run_python(
        stack, home, client, "--context-path", str(project), "-r", "requirements.txt", "main.py"
    )
    assert "has no network" in result.stderr  # the CLI says so before submitting
    run = state.executions[0].run_output
    assert run is not None
    assert run.exit_code == 1
    assert "the program ran" not in run.stdout
    assert "shoal-surely-not-on-the-context" in run.stderr
    assert "this job has no network" in run.stderr
    assert "--network Full" in run.stderr


def test_missing_image_is_a_clear_error(
    stack: DevstackThread, home: Path, client: ShoalClient
) -> None:
    image = "shoal-test/no-such-python:1"
    result, state = run_python(
        stack, home, client, "--context-path", "", "--image", image, "-c", "print(1)"
    )
    assert result.exit_code == 1
    assert state.state.value == "Error"
    reason = comments(client, state.job_id)
    assert f"image {image} not found" in reason, reason
    assert "scripts/build-python-image.sh" in reason, reason


def test_deterministic_main_py_gets_its_context_and_volumes(
    stack: DevstackThread, home: Path, client: ShoalClient, tmp_path: Path
) -> None:
    """The same program with --deterministic: CPython for WASI, same context and volumes."""
    fetched = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "fetch-python-wasm.py")],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert fetched.returncode == 0, fetched.stderr
    # The node compiles the runtime once per machine (minutes the first time), then offers it.
    wait_until(
        lambda: any("PythonWasm" in node["engines"] for node in client.nodes()),
        timeout=600,
        what="a node offering deterministic Python",
    )
    cid, project = numbers_project(client, tmp_path)
    (project / "main.py").write_text(
        (project / "main.py").read_text() + "import sys; print(sys.platform)\n"
    )
    folder = run_numbers_main(stack, home, client, tmp_path, cid, project, "--deterministic")
    assert (folder / "stdout").read_text() == "cwd /job\nwasi\n"
