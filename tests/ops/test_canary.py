"""The canary's scenario runner against a fake cluster (no sockets), and its command's exit code."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from shoal_cli import canary as canary_mod
from shoal_cli.canary import (
    CANARY_ANNOTATION,
    INPUT_MD5,
    SCENARIOS,
    CanaryConfig,
    CanaryMetrics,
    CanaryRunner,
    parse_duration,
)
from shoal_client.client import JobDetails, Progress
from shoal_common.cid import cid_of_path
from shoal_common.spec import Job, JobHistory, JobState, Spec


def _now() -> str:
    return datetime.now(UTC).isoformat()


class FakeCluster:
    """Answers like a requester whose jobs all succeed (unless told otherwise)."""

    def __init__(
        self,
        *,
        wrong_stdout: bool = False,
        fail_state: str | None = None,
        honour_exclude: bool = True,
    ) -> None:
        self.wrong_stdout = wrong_stdout
        self.honour_exclude = honour_exclude
        self.fail_state = fail_state
        self.specs: dict[str, Spec] = {}
        self.content: dict[str, bytes] = {}
        self.list_calls: list[dict[str, Any]] = []

    # --- the CanaryClient protocol ---

    def list_jobs(self, **kwargs: Any) -> list[dict[str, Any]]:
        self.list_calls.append(kwargs)
        excluded = set(kwargs.get("exclude_tags") or ()) if self.honour_exclude else set()
        jobs = [
            {"Job": {"Metadata": {"ID": job_id}, "Spec": {"Annotations": spec.annotations}}}
            for job_id, spec in self.specs.items()
            if not excluded.intersection(spec.annotations or ())
        ]
        return jobs[-kwargs.get("limit", 10) :]

    def submit(self, spec: Spec) -> Job:
        job_id = f"job-{len(self.specs) + 1}"
        self.specs[job_id] = spec
        return Job.model_validate({"Metadata": {"ID": job_id}, "Spec": {}})

    def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        on_change: Callable[[JobState], None] | None = None,
    ) -> JobState:
        return self._state(job_id)

    def describe(self, job_id: str) -> JobDetails:
        history = JobHistory.model_validate(
            {"Type": "JobLevel", "JobID": job_id, "Comment": "Job created", "Time": _now()}
        )
        job = Job.model_validate({"Metadata": {"ID": job_id}, "Spec": {}})
        return JobDetails(job=job, state=self._state(job_id), history=[history])

    def results(self, job_id: str) -> list[dict[str, Any]]:
        return [{"NodeID": "n1", "Data": {"StorageSource": "IPFS", "CID": f"result-{job_id}"}}]

    def download(self, cid: str, dest: Path, *, progress: Progress | None = None) -> Path:
        spec = self.specs[cid.removeprefix("result-")]
        assert spec.docker is not None
        command = spec.docker.entrypoint or []
        if command[0] == "echo":
            stdout = " ".join(command[1:]) + "\n"
        else:  # md5sum /inputs/<file> of the CID mounted at /inputs
            (source,) = spec.inputs or []
            assert source.cid is not None
            digest = hashlib.md5(self.content[source.cid]).hexdigest()
            stdout = f"{digest}  {command[1]}\n"
        if self.wrong_stdout:
            stdout = "something else\n"
        dest.mkdir(parents=True)
        (dest / "stdout").write_text(stdout)
        return dest

    def put(self, path: Path, *, progress: Progress | None = None) -> str:
        (child,) = sorted(path.iterdir())
        cid = cid_of_path(path)
        self.content[cid] = child.read_bytes()
        return cid

    def _state(self, job_id: str) -> JobState:
        spec = self.specs[job_id]
        n = spec.deal.concurrency if spec.deal and spec.deal.concurrency else 1
        executions = [
            {
                "JobID": job_id,
                "NodeId": f"n{i}",
                "ComputeReference": f"e{i}",
                "State": "Completed",
                "CreateTime": _now(),
                "UpdateTime": _now(),
            }
            for i in range(n)
        ]
        return JobState.model_validate(
            {
                "JobID": job_id,
                "State": self.fail_state or "Completed",
                "Executions": executions,
                "CreateTime": _now(),
                "UpdateTime": _now(),
            }
        )


def test_every_scenario_passes_on_a_healthy_cluster() -> None:
    cluster = FakeCluster()
    runner = CanaryRunner(cluster, CanaryConfig(image="img:1"))
    results = runner.run_all()
    assert [r.scenario for r in results] == list(SCENARIOS)
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    # canary jobs are tagged, run the configured image, and the concurrency one asks for 3
    assert cluster.specs
    for spec in cluster.specs.values():
        assert spec.annotations == [CANARY_ANNOTATION]
        assert spec.docker is not None
        assert spec.docker.image == "img:1"
    assert any(s.deal and s.deal.concurrency == 3 for s in cluster.specs.values())
    assert cluster.list_calls[0]["limit"] == 10
    assert cluster.list_calls[0]["exclude_tags"] == [CANARY_ANNOTATION]
    m = runner.metrics
    for name in SCENARIOS:
        assert m.value("shoal_canary_runs_total", scenario=name, outcome="success") == 1
        assert m.value("shoal_canary_latency_seconds_count", scenario=name) == 1
        assert m.value("shoal_canary_last_run_success", scenario=name) == 1


def test_wrong_output_fails_the_checks_and_is_counted() -> None:
    runner = CanaryRunner(FakeCluster(wrong_stdout=True))
    by_name = {r.scenario: r for r in runner.run_all()}
    assert by_name["submit"].ok
    assert not by_name["submit_get"].ok
    assert "expected" in by_name["submit_get"].error
    assert by_name["submit_get"].job_id is not None
    assert not by_name["cid_input"].ok
    assert INPUT_MD5 in by_name["cid_input"].error
    m = runner.metrics
    assert m.value("shoal_canary_runs_total", scenario="submit_get", outcome="failure") == 1
    assert m.value("shoal_canary_last_run_success", scenario="submit_get") == 0


def test_a_job_that_errors_fails_every_submitting_scenario() -> None:
    runner = CanaryRunner(FakeCluster(fail_state="Error"))
    results = {r.scenario: r for r in runner.run_all()}
    assert results["list"].ok
    assert all(not r.ok for name, r in results.items() if name != "list")
    assert "ended Error" in results["submit"].error


def test_slow_scenarios_count_as_slow() -> None:
    ticks = iter(range(0, 1000, 100))  # every clock read is 100 s after the previous one
    metrics = CanaryMetrics()
    runner = CanaryRunner(
        FakeCluster(),
        CanaryConfig(max_latency=30, scenarios=("submit",)),
        metrics,
        clock=lambda: float(next(ticks)),
    )
    (result,) = runner.run_all()
    assert result.outcome == "slow"
    assert not result.ok
    assert metrics.value("shoal_canary_runs_total", scenario="submit", outcome="slow") == 1
    assert metrics.value("shoal_canary_max_latency_seconds") == 30


def test_list_fails_when_canary_jobs_show() -> None:
    cluster = FakeCluster(honour_exclude=False)
    runner = CanaryRunner(cluster, CanaryConfig(scenarios=("submit", "list")))
    submit, listed = runner.run_all()
    assert submit.ok
    assert not listed.ok
    assert "canary job" in listed.error


def test_unknown_scenario_is_refused() -> None:
    with pytest.raises(ValueError, match="nope"):
        CanaryRunner(FakeCluster(), CanaryConfig(scenarios=("nope",)))


@pytest.mark.parametrize(
    ("text", "seconds"), [("300", 300), ("30s", 30), ("5m", 300), ("1h", 3600), ("500ms", 0.5)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("cluster_ok", "exit_code"), [(True, 0), (False, 1)])
def test_once_exits_non_zero_on_failure(
    monkeypatch: pytest.MonkeyPatch, cluster_ok: bool, exit_code: int
) -> None:
    cluster = FakeCluster(wrong_stdout=not cluster_ok)

    class FakeClient(FakeCluster):
        def __new__(cls, *args: Any, **kwargs: Any) -> Any:
            return cluster

    def enter(self: FakeCluster) -> FakeCluster:
        return self

    monkeypatch.setattr(FakeCluster, "__enter__", enter, raising=False)
    monkeypatch.setattr(FakeCluster, "__exit__", lambda self, *a: None, raising=False)
    monkeypatch.setattr("shoal_client.client.ShoalClient", FakeClient)
    result = CliRunner().invoke(canary_mod.canary, ["--once"])
    assert result.exit_code == exit_code, result.output
    assert ("6 passed, 0 failed" if cluster_ok else "failed") in result.output


def test_once_and_every_are_exclusive() -> None:
    result = CliRunner().invoke(canary_mod.canary, [])
    assert result.exit_code == 2
    result = CliRunner().invoke(canary_mod.canary, ["--once", "--every", "5m"])
    assert result.exit_code == 2
