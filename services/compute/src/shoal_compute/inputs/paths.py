"""Checks on paths named by jobs: mount targets and output names must stay where they belong."""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from shoal_compute.inputs.errors import InputError

# Names the results folder already uses for itself.
RESERVED_OUTPUT_NAMES = frozenset({"stdout", "stderr", "exitCode"})
_SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def check_target(target: str, what: str) -> str:
    """A mount target inside the sandbox: absolute, normalised, without ``..``."""
    if not target or not target.startswith("/"):
        raise InputError(f"{what}: mount path {target!r} must be absolute (like /inputs)")
    parts = PurePosixPath(target).parts
    if ".." in parts or "\0" in target:
        raise InputError(f"{what}: mount path {target!r} must not contain '..'")
    normal = str(PurePosixPath(*parts))
    if normal == "/":
        raise InputError(f"{what}: cannot mount over the sandbox root")
    return normal


def check_output_name(name: str | None) -> str:
    """An output volume's folder name in the results: one plain path segment."""
    if not name:
        raise InputError("an output volume needs a name (name:/path)")
    if name in (".", "..") or not _SAFE_NAME.match(name):
        raise InputError(
            f"output volume name {name!r} is not allowed: use letters, digits, '.', '_' or '-' "
            "(no '/', no '..': it must stay inside the results folder)"
        )
    if name in RESERVED_OUTPUT_NAMES:
        raise InputError(f"output volume name {name!r} is reserved for the run's own output")
    return name


def safe_file_name(name: str, default: str) -> str:
    """A file name taken from a URL or label, reduced to something harmless."""
    base = name.rsplit("/", 1)[-1].strip()
    if base in ("", ".", "..") or not _SAFE_NAME.match(base):
        cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", base).strip(".")
        base = cleaned or default
    return base[:200]
