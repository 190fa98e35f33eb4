"""``shoal get``: fetch every published result of a job and lay it out like the reference system.

Merged layout (default): ``job-<id8>/`` (id8: the id's last 8 hex digits) with ``stdout``,
``stderr``, ``exitCode`` of the first execution and every output volume merged across
executions. ``--raw``: one folder per execution under ``job-<id8>/raw/<node>-<cid8>/``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from shoal_cli.output import progress_bar
from shoal_client.base import ShoalClientError, short_id
from shoal_common.wire_enums import JobStateType

if TYPE_CHECKING:
    from rich.console import Console

    from shoal_client.client import ShoalClient


def download_results(
    client: ShoalClient, job_id: str, output_dir: Path, *, raw: bool, console: Console
) -> Path:
    state = client.state_wire(job_id)
    full_id = str(state["JobID"])  # `job_id` may be a short id
    results = client.results(full_id)
    if not results:
        outcome = JobStateType(state["State"]).value
        raise ShoalClientError(0, f"job {job_id} has no published results yet (state: {outcome})")
    target = output_dir / f"job-{short_id(full_id)}"
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir) as tmp:
        fetched: list[tuple[str, Path]] = []
        for result in results:
            data = result.get("Data") or {}
            cid = data.get("CID")
            if not cid:
                continue
            node = str(result.get("NodeID", "node"))
            dest = Path(tmp) / f"{node}-{cid[:8]}"
            with progress_bar(console, f"Fetching {cid[:12]}… from {node}") as update:
                client.download(cid, dest, progress=update)
            fetched.append((node, dest))
        # Moved, not copied: the downloads sit on the same filesystem (a big result is not
        # written a second time).
        if raw:
            for _, folder in fetched:
                _merge(folder, target / "raw" / folder.name)
        else:
            for i, (_, folder) in enumerate(fetched):
                for entry in sorted(folder.iterdir()):
                    if entry.is_dir():
                        _merge(entry, target / entry.name)
                    elif i == 0:
                        shutil.move(entry, target / entry.name)
    return target


def _merge(source: Path, target: Path) -> None:
    """Move the tree ``source`` to ``target``, merged into what is there (files replaced)."""
    if not target.is_dir() or target.is_symlink():
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() or target.is_symlink():
            target.unlink()
        shutil.move(source, target)
        return
    for entry in sorted(source.iterdir()):
        if entry.is_dir():
            _merge(entry, target / entry.name)
        else:
            shutil.move(entry, target / entry.name)
