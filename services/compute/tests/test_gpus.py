"""GPU discovery: parsing recorded nvidia-smi output, and running a stand-in nvidia-smi."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal_compute.gpus import GpuInfo, detect_gpus, parse_nvidia_smi

# Recorded from `nvidia-smi --query-gpu=index,uuid,name,memory.total --format=csv,noheader,nounits`
# on a 2 x A100 host.
SAMPLE = """\
0, GPU-5d2c9f4e-6c1f-4a1e-9b8e-3f1f0b6a7c21, NVIDIA A100-SXM4-40GB, 40960
1, GPU-8e4b1a32-0d5f-4c1a-8f4b-2a9c3d7e6b10, NVIDIA A100-SXM4-40GB, 40960
"""


def test_parse_recorded_sample() -> None:
    assert parse_nvidia_smi(SAMPLE) == [
        GpuInfo(0, "GPU-5d2c9f4e-6c1f-4a1e-9b8e-3f1f0b6a7c21", "NVIDIA A100-SXM4-40GB", 40960),
        GpuInfo(1, "GPU-8e4b1a32-0d5f-4c1a-8f4b-2a9c3d7e6b10", "NVIDIA A100-SXM4-40GB", 40960),
    ]


def test_parse_odd_lines() -> None:
    text = "\n  \n2, GPU-x, Tesla T4, [N/A]\r\n3, GPU-y, Quadro RTX 8000, Lenovo, 48601\n"
    assert parse_nvidia_smi(text) == [
        GpuInfo(2, "GPU-x", "Tesla T4", 0),
        GpuInfo(3, "GPU-y", "Quadro RTX 8000, Lenovo", 48601),
    ]
    assert parse_nvidia_smi("") == []


@pytest.mark.parametrize(
    "bad", ["0, GPU-x, 40960", "zero, GPU-x, Tesla T4, 15360", "No devices were found"]
)
def test_parse_rejects_malformed_lines(bad: str) -> None:
    with pytest.raises(ValueError, match="nvidia-smi line 1"):
        parse_nvidia_smi(bad)


def _fake_nvidia_smi(tmp_path: Path, body: str) -> str:
    path = tmp_path / "nvidia-smi"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


def test_detect_gpus_runs_nvidia_smi(tmp_path: Path) -> None:
    args_file = tmp_path / "args"
    script = f'echo "$@" > {args_file}\ncat <<EOF\n{SAMPLE}EOF'
    gpus = detect_gpus(_fake_nvidia_smi(tmp_path, script))
    assert [g.index for g in gpus] == [0, 1]
    assert args_file.read_text().split() == [
        "--query-gpu=index,uuid,name,memory.total",
        "--format=csv,noheader,nounits",
    ]


def test_detect_gpus_without_a_working_nvidia_smi(tmp_path: Path) -> None:
    assert detect_gpus(str(tmp_path / "not-installed")) == []
    failing = _fake_nvidia_smi(tmp_path, "echo 'NVIDIA-SMI has failed' >&2; exit 9")
    assert detect_gpus(failing) == []


def test_no_nvidia_smi_means_no_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert detect_gpus() == []
