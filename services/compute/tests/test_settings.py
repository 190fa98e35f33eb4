"""ComputeSettings: env parsing (labels, lists, sizes), derived values."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal_common.spec import Engine, StorageSourceType
from shoal_compute.settings import ComputeSettings, go_arch, parse_labels


def test_labels_from_env_string(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SHOAL_COMPUTE_LABELS", "env=prod, zone=eu-1,empty=")
    monkeypatch.setenv("SHOAL_COMPUTE_STATE_DIR", str(tmp_path))
    settings = ComputeSettings()
    assert settings.labels == {"env": "prod", "zone": "eu-1", "empty": ""}


def test_labels_reject_garbage() -> None:
    with pytest.raises(ValueError, match="key=value"):
        parse_labels("novalue")
    assert parse_labels({"a": 1}) == {"a": "1"}
    assert parse_labels(None) == {}


def test_lists_sizes_and_engines_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SHOAL_COMPUTE_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("SHOAL_COMPUTE_GPU_IDS", "gpu-a,gpu-b")
    monkeypatch.setenv("SHOAL_COMPUTE_TIMEOUT_BYPASS_CLIENTS", "c1,c2")
    monkeypatch.setenv("SHOAL_COMPUTE_MEMORY", "1Gb")
    monkeypatch.setenv("SHOAL_COMPUTE_MAX_JOB_CPU", "500m")
    monkeypatch.setenv("SHOAL_COMPUTE_ENGINES", "noop,docker")
    monkeypatch.setenv("SHOAL_COMPUTE_STORAGE_SOURCES", "ipfs,url")
    monkeypatch.setenv("SHOAL_COMPUTE_LOCAL_DIRS_ALLOWED", f"{tmp_path},/data")
    s = ComputeSettings()
    assert s.resolved_gpu_ids() == ("gpu-a", "gpu-b")
    assert s.timeout_bypass_clients == ["c1", "c2"]
    assert s.memory == 1_000_000_000
    assert s.max_job_cpu == 0.5
    assert s.engines == [Engine.NOOP, Engine.DOCKER]
    assert s.storage_sources == [StorageSourceType.IPFS, StorageSourceType.URL_DOWNLOAD]
    assert s.local_dirs_allowed == [tmp_path, Path("/data")]
    total = s.total_capacity()
    assert total.gpu == 2
    assert total.memory == 1_000_000_000
    assert s.per_job_max(total).cpu == 0.5


def test_machine_defaults_and_gpu_count(tmp_path: Path) -> None:
    s = ComputeSettings(state_dir=tmp_path, gpus=3)
    total = s.total_capacity()
    assert total.cpu >= 1
    assert total.memory > 0
    assert total.disk > 0
    assert s.resolved_gpu_ids() == ("0", "1", "2")
    assert s.per_job_max(total) == total


def test_node_id_is_made_once_and_kept(tmp_path: Path) -> None:
    first = ComputeSettings(state_dir=tmp_path).resolved_node_id()
    assert first.startswith("compute-")
    assert ComputeSettings(state_dir=tmp_path).resolved_node_id() == first
    assert ComputeSettings(state_dir=tmp_path, node_id="n-1").resolved_node_id() == "n-1"
    with pytest.raises(ValueError, match="subject"):
        ComputeSettings(state_dir=tmp_path, node_id="bad.id")


@pytest.mark.parametrize(
    ("machine", "arch"),
    [("x86_64", "amd64"), ("AMD64", "amd64"), ("aarch64", "arm64"), ("arm64", "arm64")],
)
def test_go_arch(machine: str, arch: str) -> None:
    assert go_arch(machine) == arch


def test_the_chosen_http_port_is_kept_per_node(tmp_path: Path) -> None:
    s = ComputeSettings(state_dir=tmp_path / "state")
    assert s.remembered_http_port("n-1") is None  # nothing kept yet (no state dir even)
    s.remember_http_port("n-1", 41234)
    assert s.remembered_http_port("n-1") == 41234
    assert s.remembered_http_port("n-2") is None  # nodes sharing a state dir keep their own
    for garbage in ("", "port", "0", "70000"):
        s.http_port_path("n-1").write_text(garbage)
        assert s.remembered_http_port("n-1") is None
