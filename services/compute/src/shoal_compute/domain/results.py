"""The results folder and what is read back from it.

Layout, the same for every engine (the executors write the first three)::

    <state_dir>/executions/<execution id>/results/stdout
                                                 /stderr
                                                 /exitCode
                                                 /<output name>/...   one per output volume
    <state_dir>/executions/<execution id>/inputs/...                  downloads, removed after

A run whose executor keeps its results in memory (noop) writes none of it: the folder's
content is kept in the execution's row and written out by :func:`results_folder` the first
time something reads it (content, logs), so most noop jobs never touch the disk (ADR 0030).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from shoal_common.cid import FileCidBuilder, TreeCidBuilder
from shoal_common.result_folder import EXIT_CODE, exit_code_bytes
from shoal_common.spec import RunOutput, StorageSpec
from shoal_compute.domain.execution import ExecutionRecord
from shoal_compute.executors.base import Mount, RunFiles, RunResult
from shoal_compute.inputs.errors import InputError
from shoal_compute.inputs.paths import check_output_name, check_target


@dataclass(frozen=True)
class ExecutionPaths:
    root: Path

    @classmethod
    def under(cls, executions_dir: Path, execution_id: str) -> ExecutionPaths:
        return cls(executions_dir / execution_id)

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def inputs(self) -> Path:
        return self.root / "inputs"

    def stream(self, name: str) -> Path:
        return self.results / name


def make_results_dir(results_dir: Path) -> None:
    """The execution's folder and its results folder: on a first run, two mkdir calls (not
    pathlib's parents=True, which fails on the missing parent first and retries)."""
    try:
        os.mkdir(results_dir.parent)
        os.mkdir(results_dir)
    except OSError:  # already there (a run after a restart), or an executions folder missing
        results_dir.mkdir(parents=True, exist_ok=True)


def output_mounts(outputs: Sequence[StorageSpec] | None, results_dir: Path) -> list[Mount]:
    """One writable folder per output volume inside the results folder (not created here).

    Names are checked (one plain segment, not reserved, no two alike), so nothing a job names
    can land outside its results folder.
    """
    mounts: list[Mount] = []
    seen: set[str] = set()
    for spec in outputs or []:
        name = check_output_name(spec.name)
        if name in seen:
            raise InputError(f"two output volumes are named {name!r}")
        seen.add(name)
        target = check_target(spec.path or f"/outputs/{name}", f"output {name}")
        mounts.append(Mount(source=results_dir / name, target=target, read_only=False))
    return mounts


def prepare_outputs(outputs: Sequence[StorageSpec] | None, results_dir: Path) -> list[Mount]:
    """:func:`output_mounts`, with the results folder and the output folders created."""
    mounts = output_mounts(outputs, results_dir)
    make_results_dir(results_dir)
    for mount in mounts:
        mount.source.mkdir(exist_ok=True)
    return mounts


def utf8_cut(data: bytes) -> int:
    """Length of the longest prefix of ``data`` that does not end inside a UTF-8 character."""
    end = len(data)
    # Look back at most 3 bytes for the lead byte of an unfinished sequence.
    for back in range(1, min(4, end) + 1):
        byte = data[end - back]
        if byte & 0b1100_0000 == 0b1000_0000:
            continue  # continuation byte: keep looking for the lead
        if byte & 0b1000_0000 == 0:
            return end  # ASCII: complete
        width = 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4
        return end if back >= width else end - back
    return end


def head_text(data: bytes, max_bytes: int) -> tuple[str, bool]:
    """The first ``max_bytes`` of ``data`` as text (never cut inside a character), and
    whether there was more."""
    truncated = len(data) > max_bytes
    if truncated:
        data = data[: utf8_cut(data[:max_bytes])]
    return data.decode("utf-8", errors="replace"), truncated


def read_head(path: Path, max_bytes: int) -> tuple[str, bool]:
    """The first ``max_bytes`` of a file as text, and whether the file is longer."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return "", False
    try:  # plain reads: a buffered file object costs more than the read of a small file
        data = os.read(fd, min(max_bytes, os.fstat(fd).st_size) + 1)
        while len(data) <= max_bytes and (more := os.read(fd, max_bytes + 1 - len(data))):
            data += more  # (a file that grew since the fstat)
    finally:
        os.close(fd)
    return head_text(data, max_bytes)


def read_run_output(results_dir: Path, result: RunResult, max_bytes: int) -> RunOutput:
    """What the API shows of a run: stdout/stderr up to ``max_bytes`` each, with flags."""
    if result.files is not None:  # the same, from a run whose results are in memory
        stdout, stdout_truncated = head_text(result.files.stdout, max_bytes)
        stderr, stderr_truncated = head_text(result.files.stderr, max_bytes)
    else:
        stdout, stdout_truncated = read_head(results_dir / "stdout", max_bytes)
        stderr, stderr_truncated = read_head(results_dir / "stderr", max_bytes)
    return RunOutput(
        stdout=stdout,
        stdout_truncated=stdout_truncated,
        stderr=stderr,
        stderr_truncated=stderr_truncated,
        exit_code=result.exit_code,
        runner_error=result.runner_error,
    )


def read_from(path: Path, offset: int, max_bytes: int, *, final: bool) -> tuple[str, int]:
    """Text from byte ``offset`` (at most ``max_bytes``), and the offset to continue from.

    Never splits a UTF-8 character (unless the stream is ``final`` and ends mid-character),
    so a follower that resumes from the returned offset sees every character exactly once.
    """
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, offset))
            data = handle.read(max(0, max_bytes))
    except FileNotFoundError:
        return "", offset
    return _text_at(data, offset, max_bytes, final=final)


def text_from(content: bytes, offset: int, max_bytes: int, *, final: bool) -> tuple[str, int]:
    """:func:`read_from` over a stream's whole ``content`` held in memory."""
    start = max(0, offset)
    return _text_at(content[start : start + max(0, max_bytes)], offset, max_bytes, final=final)


def _text_at(data: bytes, offset: int, max_bytes: int, *, final: bool) -> tuple[str, int]:
    if data and (not final or len(data) == max_bytes):
        data = data[: utf8_cut(data)]
    return data.decode("utf-8", errors="replace"), max(0, offset) + len(data)


def file_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def address_files(files: RunFiles) -> tuple[str, int]:
    """CID and content size of a results folder held in memory: what
    :func:`shoal_common.cid.cid_and_size_of_path` gives once it is written out."""
    tree = TreeCidBuilder()
    for name, data in (
        ("stdout", files.stdout),
        ("stderr", files.stderr),
        (EXIT_CODE, exit_code_bytes(files.exit_code)),
    ):
        content = FileCidBuilder()
        content.update(data)
        tree.add_file((name,), content)
    for name in files.folders:
        tree.add_dir((name,))
    return tree.finish(), files.size


async def results_folder(record: ExecutionRecord, folder: Path) -> Path:
    """``folder``, the execution's results folder, written first from its row if the run's
    results were kept in memory and nothing has read them yet."""
    if record.result_files is not None:
        await asyncio.to_thread(record.result_files.write_to, folder)
    return folder
