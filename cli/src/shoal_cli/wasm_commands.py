"""``shoal wasm run|validate`` and ``shoal run python``: WASM modules and Python programs as jobs.

Registered on the root group by :func:`register` (``shoal_cli.main`` calls it once its shared
options exist). Local files a job needs (a module, the Python job context) are uploaded to the
content store with ``ShoalClient.put`` and referenced by CID; with ``--dry-run`` nothing is sent
and the CIDs are computed locally (they are the same).

The Python job context is the working directory (``--context-path``), without what its
``.shoalignore`` excludes (gitignore syntax: globs, ``**``, ``/``-anchored patterns, trailing
``/`` for folders only, ``!`` to re-include; ``.git/``, ``__pycache__/`` and ``*.pyc`` are
excluded by default), capped in size (``--context-size-limit``, ``SHOAL_CONTEXT_SIZE_LIMIT``,
10 MiB by default). The job sees it read-only at ``/job``, its working directory.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import click

from shoal_cli import jobspec
from shoal_cli.jobspec import SpecError, compact, storage, wire_spec
from shoal_cli.main import (
    client_from,
    console,
    job_options,
    out,
    split_submit_flags,
    submit_and_report,
)
from shoal_cli.output import progress_bar
from shoal_client.base import ShoalClientError
from shoal_common.cid import cid_of_path, is_valid_cid
from shoal_common.wire_enums import NetworkType, StorageSourceType, parse_bytes, parse_gpu

SHOALIGNORE = ".shoalignore"
DEFAULT_IGNORES = (".git/", "__pycache__/", "*.pyc")
DEFAULT_CONTEXT_SIZE_LIMIT = "10MiB"
JOB_CONTEXT_PATH = "/job"
PYTHON_LANGUAGE_VERSION = "3"
# Kept in step with shoal_compute.executors.python_wasm.DEFAULT_PYTHON_IMAGE (not imported here:
# that module loads wasmtime, which `shoal --help` should not pay for).
DEFAULT_PYTHON_IMAGE = "shoal/python:3.11"


def register(cli: click.Group) -> None:
    """Add the ``wasm`` and ``run`` groups to the root ``shoal`` group."""
    cli.add_command(wasm)
    cli.add_command(run)


# --- .shoalignore ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    pattern: re.Pattern[str]
    negate: bool
    dir_only: bool


def _glob_to_regex(glob: str) -> str:
    """gitignore glob -> regex over a ``/``-separated relative path (no anchors added)."""
    out: list[str] = []
    i, n = 0, len(glob)
    while i < n:
        c = glob[i]
        if c == "*" and glob.startswith("**", i):
            before_ok = i == 0 or glob[i - 1] == "/"
            after = glob[i + 2] if i + 2 < n else ""
            if before_ok and after == "/":
                out.append("(?:.*/)?")  # `**/`: zero or more folders
                i += 3
                continue
            if before_ok and after == "":
                out.append(".*")  # trailing `/**`: everything inside
                i += 2
                continue
            out.append("[^/]*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            end = glob.find("]", i + 2 if glob[i + 1 : i + 2] in ("!", "^") else i + 1)
            if end == -1:
                out.append(re.escape(c))
                i += 1
                continue
            body = glob[i + 1 : end]
            if body[:1] in ("!", "^"):
                body = "^" + body[1:]
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = end + 1
        elif c == "\\" and i + 1 < n:
            out.append(re.escape(glob[i + 1]))
            i += 2
        else:
            out.append(re.escape(c))
            i += 1
    return "".join(out)


@dataclass
class IgnoreRules:
    """gitignore-style rules; the last matching rule decides (``!`` re-includes)."""

    rules: list[_Rule] = field(default_factory=list)

    @classmethod
    def parse(cls, lines: list[str] | tuple[str, ...]) -> IgnoreRules:
        rules: list[_Rule] = []
        for raw in lines:
            line = raw.rstrip("\r\n")
            if not line.strip() or line.startswith("#"):
                continue
            line = re.sub(r"(?<!\\)\s+$", "", line)  # trailing spaces, unless escaped
            negate = line.startswith("!")
            if negate:
                line = line[1:]
            if line.startswith(("\\#", "\\!")):
                line = line[1:]
            dir_only = line.endswith("/")
            line = line.rstrip("/")
            if not line:
                continue
            anchored = "/" in line
            regex = _glob_to_regex(line.lstrip("/"))
            if not anchored:
                regex = "(?:.*/)?" + regex  # a bare name matches at any depth
            rules.append(_Rule(re.compile(regex + r"\Z", re.DOTALL), negate, dir_only))
        return cls(rules)

    @classmethod
    def for_folder(cls, root: Path) -> IgnoreRules:
        """The default exclusions, then the folder's own ``.shoalignore``."""
        lines = list(DEFAULT_IGNORES)
        ignore_file = root / SHOALIGNORE
        if ignore_file.is_file():
            lines += ignore_file.read_text(encoding="utf-8", errors="replace").splitlines()
        return cls.parse(lines)

    def ignored(self, relative: str, *, is_dir: bool) -> bool:
        decision = False
        for rule in self.rules:
            if rule.dir_only and not is_dir:
                continue
            if rule.pattern.match(relative):
                decision = not rule.negate
        return decision


# --- the job context ------------------------------------------------------------------------------


@dataclass
class ContextFiles:
    """What would be sent from a folder: files and folders (relative POSIX paths) and bytes."""

    root: Path
    files: list[str] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)
    skipped_links: list[str] = field(default_factory=list)
    total: int = 0


def _size_text(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"  # pragma: no cover - the loop always returns


def collect_context(root: Path, limit: int) -> ContextFiles:
    """Walk ``root`` honouring its ``.shoalignore``; SpecError as soon as ``limit`` is passed."""
    rules = IgnoreRules.for_folder(root)
    found = ContextFiles(root)
    sizes: dict[str, int] = {}  # per top-level entry, to say what to ignore

    def walk(folder: Path, prefix: str) -> None:
        with os.scandir(folder) as entries:
            ordered = sorted(entries, key=lambda e: e.name)
        for entry in ordered:
            relative = prefix + entry.name
            if entry.is_symlink():
                if not rules.ignored(relative, is_dir=False):
                    found.skipped_links.append(relative)
                continue
            is_dir = entry.is_dir(follow_symlinks=False)
            if rules.ignored(relative, is_dir=is_dir):
                continue
            if is_dir:
                found.folders.append(relative)
                walk(Path(entry.path), relative + "/")
            elif entry.is_file(follow_symlinks=False):
                size = entry.stat(follow_symlinks=False).st_size
                found.files.append(relative)
                found.total += size
                top = relative.split("/", 1)[0]
                sizes[top] = sizes.get(top, 0) + size
                if found.total > limit:
                    biggest = sorted(sizes.items(), key=lambda kv: -kv[1])[:5]
                    listed = ", ".join(f"{name} ({_size_text(size)})" for name, size in biggest)
                    raise SpecError(
                        f"the job context {root} is over the {_size_text(limit)} limit "
                        f"(stopped at {_size_text(found.total)}; largest: {listed}). "
                        f"Exclude files with a {SHOALIGNORE} file there (gitignore syntax), "
                        "send another folder with --context-path (or --context-path '' for "
                        "none), or raise --context-size-limit / SHOAL_CONTEXT_SIZE_LIMIT"
                    )
            # sockets, fifos, devices: never part of a context

    walk(root, "")
    return found


@contextlib.contextmanager
def staged_context(root: Path, limit: int) -> Iterator[tuple[Path, ContextFiles]]:
    """A temporary copy of what is sent (hard links where possible), for upload or CID."""
    found = collect_context(root, limit)
    with tempfile.TemporaryDirectory(prefix="shoal-context-") as tmp:
        staging = Path(tmp) / "context"
        staging.mkdir()
        for folder in found.folders:
            (staging / folder).mkdir(parents=True, exist_ok=True)
        for name in found.files:
            source, target = root / name, staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, target)
            except OSError:
                shutil.copyfile(source, target)
        yield staging, found


def _store(ctx: click.Context, path: Path, *, dry_run: bool, label: str) -> str:
    """Upload a file or folder and return its CID; with --dry-run only compute the CID."""
    if dry_run:
        return cid_of_path(path)
    import httpx

    client = client_from(ctx)
    try:
        with progress_bar(console(), f"Uploading {label}") as update:
            return client.put(path, progress=update)
    except httpx.HTTPError as exc:  # put() lets transport errors through
        raise ShoalClientError(
            0, f"cannot upload {label} to the requester at {client.base_url}: {exc}"
        ) from exc


def _parse_size(text: str, what: str) -> int:
    try:
        size = parse_bytes(text)
    except ValueError as exc:
        raise SpecError(f"{what}: {exc}") from None
    if size is None or size <= 0:
        raise SpecError(f"{what} must be a positive size such as 10MiB")
    return size


# --- shoal wasm ---------------------------------------------------------------------------------


@click.group()
def wasm() -> None:
    """Run WebAssembly (WASI) modules as jobs."""


@dataclass(frozen=True)
class _Module:
    """A module argument, checked: a local file to upload, or a CID already stored."""

    name: str | None
    path: Path | None = None
    cid: str | None = None

    def spec(self, ctx: click.Context, *, dry_run: bool) -> dict[str, Any]:
        """Its StorageSpec, in wire form."""
        cid = self.cid
        if self.path is not None:
            cid = _store(ctx, self.path, dry_run=dry_run, label=self.path.name)
        return storage(StorageSourceType.IPFS, cid=cid, name=self.name)


def _module_from(text: str, *, entry_point: str | None, link_name: str | None = None) -> _Module:
    """A local .wasm/.wat file (validated here) or a CID (``ipfs://`` optional)."""
    role = "module" if entry_point is not None else "import module"
    path = Path(text)
    if path.is_file():
        from shoal_compute.executors.wasm import validate_module

        problems = validate_module(path, entry_point)
        if problems:
            raise SpecError(f"{role} {text}: " + "; ".join(problems))
        name = link_name or (path.name if entry_point is not None else path.stem)
        return _Module(name=name, path=path)
    cid = text.removeprefix("ipfs://")
    if is_valid_cid(cid):
        if entry_point is None and link_name is None:
            raise SpecError(f"import module {text}: say which name it is imported as: NAME={text}")
        return _Module(name=link_name, cid=cid)
    raise SpecError(f"{role} {text!r} is neither a file nor a CID")


def _import_module(text: str) -> _Module:
    """``--import-module FILE``, ``NAME=FILE`` or ``NAME=CID`` (NAME: the import module name)."""
    if not Path(text).is_file() and "=" in text:
        name, _, target = text.partition("=")
        if not name or not target:
            raise SpecError(f"import module {text!r}: use FILE, NAME=FILE or NAME=CID")
        return _module_from(target, entry_point=None, link_name=name)
    return _module_from(text, entry_point=None)


def _env_map(items: tuple[str, ...]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in jobspec.parse_env(items):
        key, _, value = item.partition("=")
        env[key] = value
    return env


@wasm.command("run", context_settings={"ignore_unknown_options": True})
@job_options
@click.option(
    "--entry-point",
    default="_start",
    show_default=True,
    help="The exported function to call.",
)
@click.option("-e", "--env", multiple=True, help="KEY=VALUE for the module (passed sorted).")
@click.option(
    "--import-module",
    "import_modules",
    multiple=True,
    help="Another module to link: FILE (imported as its file stem), NAME=FILE or NAME=CID.",
)
@click.argument("module")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def wasm_run(
    ctx: click.Context,
    /,
    module: str,
    args: tuple[str, ...],
    entry_point: str,
    env: tuple[str, ...],
    import_modules: tuple[str, ...],
    **kwargs: Any,
) -> None:
    """Run MODULE (a .wasm/.wat file, uploaded first, or a CID) with ARGS, deterministically.

    Inputs (-i) are read-only folders and outputs (-o) writable folders inside the module's
    WASI filesystem, e.g. ``shoal wasm run hello.wasm -i ipfs://CID:/data``.
    """
    opts, flags = split_submit_flags(kwargs)
    dry_run = bool(flags["dry_run"])
    variables = _env_map(env)
    common = jobspec.common_spec(**opts)
    # Everything is checked before anything is uploaded.
    entry_module = _module_from(module, entry_point=entry_point)
    import_list = [_import_module(item) for item in import_modules]
    entry = entry_module.spec(ctx, dry_run=dry_run)
    imports = [item.spec(ctx, dry_run=dry_run) for item in import_list]
    spec = wire_spec(
        Engine="Wasm",
        Wasm=compact(
            {
                "EntryModule": entry,
                "EntryPoint": entry_point,
                "Parameters": list(args) or None,
                "EnvironmentVariables": variables or None,
                "ImportModules": imports or None,
            }
        ),
        **common,
    )
    submit_and_report(ctx, spec, flags)


@wasm.command("validate")
@click.argument("module", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--entry-point",
    default="_start",
    show_default=True,
    help="The exported function that must exist.",
)
def wasm_validate(module: Path, entry_point: str) -> None:
    """Check MODULE locally (valid WebAssembly, WASI core module, entry point exported)."""
    from shoal_compute.executors.wasm import validate_module

    problems = validate_module(module, entry_point or None)
    if problems:
        console().print(f"[red]{module} cannot run as a job:[/red]")
        for problem in problems:
            console().print(f"  - {problem}", markup=False, highlight=False)
        sys.exit(1)
    out().print(
        f"{module} is a valid WebAssembly module; entry point {entry_point!r} is exported.",
        markup=False,
        highlight=False,
    )


# --- shoal run python -----------------------------------------------------------------------------


@click.group()
def run() -> None:
    """Run programs in a language runtime as jobs."""


def _inside(root: Path, given: Path, what: str) -> str:
    """``given`` (relative to the current folder, else to ``root``) as a POSIX path relative to
    ``root``."""
    if not given.is_absolute() and not given.exists() and (root / given).exists():
        given = root / given
    resolved = given.resolve()
    try:
        relative = resolved.relative_to(root)
    except ValueError:
        raise SpecError(
            f"{what} {given} is not inside the job context {root}: the context (--context-path) "
            "is what is sent to the node"
        ) from None
    if not resolved.is_file():
        raise SpecError(f"{what} {given} does not exist")
    return PurePosixPath(*relative.parts).as_posix()


@run.command("python")
@job_options
@click.option(
    "--deterministic",
    is_flag=True,
    help="Run on CPython compiled to WASI: the same bytes out on every run and node.",
)
@click.option("-c", "--command", "code", default=None, help="Program passed in as a string.")
@click.option(
    "-r",
    "--requirement",
    "requirements",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="requirements.txt inside the context (deterministic: built-in packages only).",
)
@click.option(
    "--context-path",
    default=".",
    show_default=True,
    help="Folder sent as the job context and working directory ('' for none).",
)
@click.option(
    "--context-size-limit",
    envvar="SHOAL_CONTEXT_SIZE_LIMIT",
    default=DEFAULT_CONTEXT_SIZE_LIMIT,
    show_default=True,
    help="Refuse to send a bigger context (after .shoalignore).",
)
@click.option(
    "--image",
    envvar="SHOAL_PYTHON_IMAGE",
    default=DEFAULT_PYTHON_IMAGE,
    show_default=True,
    help="Docker image for runs without --deterministic (env SHOAL_PYTHON_IMAGE); built "
    "locally by scripts/build-python-image.sh.",
)
@click.argument("program", required=False)
@click.pass_context
def run_python(
    ctx: click.Context,
    /,
    program: str | None,
    deterministic: bool,
    code: str | None,
    requirements: Path | None,
    context_path: str,
    context_size_limit: str,
    image: str,
    **kwargs: Any,
) -> None:
    """Run a Python PROGRAM (e.g. main.py) or -c CODE with the working directory as context.

    \b
      shoal run python --deterministic -c "print(1+1)"
      shoal run python --deterministic main.py -i ipfs://CID:/inputs -o outputs:/outputs

    Without --deterministic the job runs in a Docker Python image, where -r requirements are
    installed with pip first: offline from the context (wheels, package folders, --find-links
    ./wheels) unless the job has --network. With it, only the packages built into the runtime
    (numpy, pandas, scipy, scikit-learn, ...) can be required.
    """
    opts, flags = split_submit_flags(kwargs)
    dry_run = bool(flags["dry_run"])
    if (program is None) == (code is None):
        raise SpecError("give a program to run (main.py) or -c CODE, one of the two")
    if deterministic:
        _check_deterministic_options(opts)
    limit = _parse_size(context_size_limit, "--context-size-limit")
    common = jobspec.common_spec(**opts)
    if context_path == "" and (program is not None or requirements is not None):
        raise SpecError("a program file or -r needs a job context; drop --context-path ''")

    with contextlib.ExitStack() as stack:
        job_context: dict[str, Any] | None = None
        program_path = requirements_path = None
        if context_path != "":
            root = Path(context_path).resolve()
            if not root.is_dir():
                raise SpecError(f"--context-path {context_path}: not a folder")
            if program is not None:
                program_path = _inside(root, Path(program), "program")
            if requirements is not None:
                requirements_path = _inside(root, requirements, "requirements file")
            staging, found = stack.enter_context(staged_context(root, limit))
            for relative, what in ((program_path, "program"), (requirements_path, "-r file")):
                if relative is not None and relative not in found.files:
                    raise SpecError(f"{what} {relative} is excluded by {root / SHOALIGNORE}")
            if found.skipped_links:
                from rich.markup import escape

                for link in found.skipped_links:
                    console().print(f"[yellow]Not sent (a symlink):[/yellow] {escape(link)}")
            if deterministic and requirements is not None:
                _check_requirements(requirements)
            cid = _store(ctx, staging, dry_run=dry_run, label="job context")
            if not flags["id_only"] and flags["output_format"] == "text":
                console().print(
                    f"Job context: {len(found.files)} files, {_size_text(found.total)}, {cid}"
                )
            job_context = storage(StorageSourceType.IPFS, cid=cid, path=JOB_CONTEXT_PATH)
    if requirements is not None and not deterministic and _network_off(opts):
        console().print(
            "[yellow]Note:[/yellow] the job has no network, so pip installs the requirements "
            "from the job context only (wheel files, package folders, --find-links ./wheels); "
            "for PyPI add --network Full (or HTTP with --domain pypi.org --domain "
            "files.pythonhosted.org)."
        )
    spec = wire_spec(
        Engine="Language",
        Language=compact(
            {
                "Language": "python",
                "LanguageVersion": PYTHON_LANGUAGE_VERSION,
                "DeterministicExecution": deterministic,
                "JobContext": job_context,
                "Command": code,
                "ProgramPath": program_path,
                "RequirementsPath": requirements_path,
            }
        ),
        Docker=None if deterministic else {"Image": image},
        **common,
    )
    submit_and_report(ctx, spec, flags)


def _network_off(opts: dict[str, Any]) -> bool:
    network = opts.get("network")
    return not network or NetworkType(network) is NetworkType.NONE


def _check_deterministic_options(opts: dict[str, Any]) -> None:
    try:
        network_off = _network_off(opts)
    except ValueError as exc:
        raise SpecError(str(exc)) from None
    if not network_off:
        raise SpecError("deterministic Python jobs have no network; drop --network")
    try:
        gpus = parse_gpu(opts.get("gpu"))
    except ValueError as exc:
        raise SpecError(str(exc)) from None
    if gpus:
        raise SpecError("deterministic Python jobs cannot use GPUs; drop --gpu")
    if opts.get("memory"):
        from shoal_compute.executors.python_wasm import MIN_MEMORY

        memory = _parse_size(opts["memory"], "--memory")
        if memory < MIN_MEMORY:
            raise SpecError(
                f"deterministic Python needs --memory of at least {MIN_MEMORY // 2**20}MiB"
            )


def _check_requirements(path: Path) -> None:
    """Fail before submitting if a requirement cannot be met (the node checks versions too)."""
    from shoal_compute.executors.python_wasm import builtin_packages_text, requirement_problems

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"cannot read {path}: {exc.strerror}") from None
    problems = requirement_problems(text, source=str(path))
    if problems:
        raise SpecError(
            "deterministic Python installs no packages; only those built into the runtime can "
            "be required:\n  " + "\n  ".join(problems) + f"\nBuilt in: {builtin_packages_text()}\n"
            "Run without --deterministic to install requirements with pip in Docker."
        )
