"""Rebuilding a results folder from a run output: the same CID as the folder on disk, or None."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal_common.cid import cid_of_path
from shoal_common.content_store import ContentStore
from shoal_common.result_folder import cid_of_files, folder_from_run_output
from shoal_common.spec import RunOutput


def _write(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


@pytest.mark.parametrize(
    ("stdout", "stderr", "code"),
    [("hello\n", "", 0), ("", "", 0), ("ünïcode ✓\n" * 50, "warn\n", 3), ("x" * 300_000, "", 1)],
)
def test_rebuilt_folder_has_the_cid_of_the_folder_on_disk(
    tmp_path: Path, stdout: str, stderr: str, code: int
) -> None:
    on_disk = _write(
        tmp_path / "results",
        {"stdout": stdout.encode(), "stderr": stderr.encode(), "exitCode": str(code).encode()},
    )
    files = folder_from_run_output(RunOutput(stdout=stdout, stderr=stderr, exitCode=code))
    assert files is not None
    assert cid_of_files(files) == cid_of_path(on_disk)


def test_output_cut_short_is_not_rebuilt() -> None:
    assert folder_from_run_output(RunOutput(stdout="a", stdouttruncated=True)) is None
    assert folder_from_run_output(RunOutput(stderr="a", stderrtruncated=True)) is None
    assert folder_from_run_output(None) is None


def test_a_folder_with_more_than_the_run_output_gets_another_cid(tmp_path: Path) -> None:
    files = {"stdout": b"hi\n", "stderr": b"", "exitCode": b"0"}
    with_outputs = _write(tmp_path / "results", files)
    (with_outputs / "outputs").mkdir()
    assert cid_of_files(files) != cid_of_path(with_outputs)
    not_utf8 = _write(tmp_path / "binary", {**files, "stdout": b"\xff\xfe"})
    lossy = folder_from_run_output(RunOutput(stdout=b"\xff\xfe".decode(errors="replace")))
    assert lossy is not None
    assert cid_of_files(lossy) != cid_of_path(not_utf8)


def test_content_store_puts_files_as_a_folder(tmp_path: Path) -> None:
    store = ContentStore(tmp_path / "store")
    files = {"stdout": b"hello\n", "stderr": b"", "exitCode": b"0"}
    cid = store.put_files(files)
    assert cid == cid_of_files(files)
    assert store.has(cid)
    assert (store.path_of(cid) / "stdout").read_bytes() == b"hello\n"
    assert store.put_files(files) == cid  # idempotent
    with pytest.raises(ValueError, match="plain file name"):
        store.put_files({"../escape": b"x"})
