"""The results folder of a run, as compute nodes lay it out, and rebuilding it from a run output.

A run's results folder holds ``stdout``, ``stderr`` and ``exitCode`` (the number alone), plus one
folder per output volume the job declared. The run output that travels in the lifecycle events
(``RunOutput``) carries the first two as text and the exit code, so for the common job without
output volumes whose output was not cut short, a publisher can put the folder together from the
event instead of downloading it from the node. The result CID decides: only a rebuilt folder
whose CID equals the one the node proposed (and the verifier accepted) is used, so a lossy
rebuild (output that was not UTF-8, an output volume) is never stored; it is fetched instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from shoal_common.cid import FileCidBuilder, TreeCidBuilder

if TYPE_CHECKING:  # for annotations only: `shoal get` (via content_store) need not load pydantic
    from shoal_common.spec import RunOutput

STDOUT = "stdout"
STDERR = "stderr"
EXIT_CODE = "exitCode"


def exit_code_bytes(exit_code: int) -> bytes:
    """What the ``exitCode`` file holds: the number alone, as the reference system wrote it."""
    return str(exit_code).encode()


def folder_from_run_output(output: RunOutput | None) -> dict[str, bytes] | None:
    """The files of a results folder with no output volumes, rebuilt from its run output;
    None when the output was cut short (the folder holds more than the event)."""
    if output is None or output.stdout_truncated or output.stderr_truncated:
        return None
    return {
        STDOUT: output.stdout.encode(),
        STDERR: output.stderr.encode(),
        EXIT_CODE: exit_code_bytes(output.exit_code),
    }


def cid_of_files(files: Mapping[str, bytes]) -> str:
    """CID of a folder holding exactly these files (plain names), as ``cid_of_path`` gives it."""
    tree = TreeCidBuilder()
    tree.add_dir(())
    for name, data in files.items():
        file = FileCidBuilder()
        file.update(data)
        tree.add_file((name,), file)
    return tree.finish()
