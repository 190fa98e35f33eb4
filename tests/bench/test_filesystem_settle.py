"""The benchmarks wait for a calm file system before they start a devstack (benchmarks/common.py):
right after a mass deletion, creating inodes is 10-25x slower here for minutes."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.common import FS_CALM_US, inode_create_us, settle_filesystem

SLOW = FS_CALM_US * 10


def test_it_waits_until_inode_creation_is_calm_again() -> None:
    readings = iter([SLOW, FS_CALM_US * 3, FS_CALM_US / 2, SLOW])
    slept: list[float] = []
    assert settle_filesystem(60, probe=lambda: next(readings), sleep=slept.append) == FS_CALM_US / 2
    assert slept == [5, 5]


def test_it_gives_up_after_its_longest_wait() -> None:
    slept: list[float] = []
    assert settle_filesystem(0.05, probe=lambda: SLOW, sleep=slept.append) == SLOW
    assert slept  # it did wait


def test_no_wait_at_all_when_told_so() -> None:
    slept: list[float] = []
    assert settle_filesystem(0, probe=lambda: SLOW, sleep=slept.append) == SLOW
    assert slept == []


def test_the_probe_measures_and_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    assert inode_create_us() > 0
    assert list(tmp_path.iterdir()) == []
