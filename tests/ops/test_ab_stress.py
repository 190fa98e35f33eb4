"""benchmarks/ab_stress.py: the A B B A comparison's arithmetic and its argument checks."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def ab(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.syspath_prepend(str(ROOT))  # benchmarks/ is not a package the suite imports
    from benchmarks import ab_stress

    return ab_stress


def _run(mean: float, p99: float, rate: float) -> dict[str, float]:
    fixed = {"cpu_ms_per_job": 5.0, "nats_msgs_per_job": 5.0}
    return {"mean_ms": mean, "p99_ms": p99, "jobs_per_s": rate, **fixed}


def test_each_round_compares_the_mean_of_both_sides_two_runs(ab) -> None:  # type: ignore[no-untyped-def]
    a = ab.Side("A", Path("/a"))
    b = ab.Side("B", Path("/b"))
    # Round 1 drifts slower run by run (A 40, B 42, B 44, A 46): the drift cancels, so B is
    # level with A; round 2: B 10% faster on the mean and 10% more jobs/s.
    a.runs = [_run(40, 60, 250), _run(46, 60, 217), _run(50, 80, 200), _run(50, 80, 200)]
    b.runs = [_run(42, 60, 238), _run(44, 60, 227), _run(45, 70, 220), _run(45, 70, 220)]
    summary = ab.summary(a, b, ab.FIGURES["stress"])
    lines = {line.split(":")[0].strip(): line for line in summary}
    assert "per round +0.0%, -10.0%" in lines["mean_ms"]
    assert "B better in 1 of 2" in lines["mean_ms"]
    assert "B better in 1 of 2" in lines["p99_ms"]  # a tie is not a win
    assert "-0.4%, +10.0%; median +4.8%; B better in 1 of 2" in lines["jobs_per_s"]  # higher wins


def test_cpu_per_job_is_the_devstack_cpu_over_the_run_per_job(ab) -> None:  # type: ignore[no-untyped-def]
    figures = ab.with_cpu_per_job({"devstack_cpu_cores": 1.5, "wall_s": 20.0, "jobs": 4000})
    assert figures["cpu_ms_per_job"] == 7.5  # 30 CPU seconds over 4,000 jobs
    assert figures["jobs"] == 4000


def test_environment_settings_must_be_key_value(ab) -> None:  # type: ignore[no-untyped-def]
    assert ab.parse_env(["SHOAL_X=1", "Y="]) == {"SHOAL_X": "1", "Y": ""}
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        ab.parse_env(["SHOAL_X"])


def test_the_requester_cpu_load_compares_its_own_figures(ab) -> None:  # type: ignore[no-untyped-def]
    a = ab.Side("A", Path("/a"))
    b = ab.Side("B", Path("/b"))
    a.runs = [{"cpu_us_per_job": 5000.0, "jobs_per_s": 200.0}] * 2
    b.runs = [{"cpu_us_per_job": 4000.0, "jobs_per_s": 250.0}] * 2
    lines = ab.summary(a, b, ab.FIGURES["requester-cpu"])
    assert lines[0].startswith("cpu_us_per_job: B vs A per round -20.0%")
    assert lines[0].endswith("B better in 1 of 1")  # lower CPU wins
    assert "+25.0%" in lines[1]
    assert ab.REQUESTER_CPU.exists()
