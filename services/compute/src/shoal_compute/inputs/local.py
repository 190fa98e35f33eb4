"""Local directory inputs: host paths, only below directories the operator allow-listed."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from shoal_compute.inputs.errors import InputError


class LocalPaths:
    """Decides which host paths a job may mount (always read-only)."""

    def __init__(self, allowed: Sequence[Path]) -> None:
        # Resolved once: an allow-listed path that is itself a symlink means its target.
        self._allowed = [os.path.realpath(p) for p in allowed]

    @property
    def enabled(self) -> bool:
        return bool(self._allowed)

    def resolve(self, source: str | None, *, read_write: bool = False) -> Path:
        """The real path of ``source`` if it lies inside an allow-listed directory."""
        if not source:
            raise InputError("a local directory input needs a source path")
        if read_write:
            raise InputError(f"local path {source} can only be mounted read-only")
        if not os.path.isabs(source):
            raise InputError(f"local path {source!r} must be absolute")
        # realpath follows every symlink and '..', so a link inside an allowed directory that
        # points outside it is judged by where it really leads.
        real = os.path.realpath(source)
        if not any(os.path.commonpath([real, root]) == root for root in self._allowed):
            raise InputError(
                f"local path {source} is outside the directories this node allows",
                hint="the operator lists them in SHOAL_COMPUTE_LOCAL_DIRS_ALLOWED",
            )
        if not os.path.exists(real):
            raise InputError(f"local path {source} does not exist on this node")
        return Path(real)
