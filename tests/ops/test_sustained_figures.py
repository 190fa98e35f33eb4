"""benchmarks/sustained.py: the achieved rate's arithmetic and where the tail came from."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def sustained(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(ROOT))  # benchmarks/ is not a package the suite imports
    from benchmarks import sustained

    return sustained


def _ends(rate: float, seconds: float, latency: float, t0: float = 100.0) -> list[float]:
    return [t0 + i / rate + latency for i in range(int(rate * seconds))]


def test_a_run_that_keeps_up_reads_the_offered_rate(sustained: ModuleType) -> None:
    ends = _ends(500, 600, latency=0.05)
    assert sustained.steady_rate(ends, 100.0, 100.0 + 600) == pytest.approx(500, abs=0.1)
    # What the figure used to be: ended by the poll after the last send, from t0.
    old = sum(1 for at in ends if at <= 700.4) / 600.4
    assert old < 499.7


def test_a_run_that_falls_behind_reads_its_completion_rate(sustained: ModuleType) -> None:
    ends = _ends(450, 60, latency=0.05)  # offered 500/s, finished 450/s
    assert sustained.steady_rate(ends, 100.0, 160.0) == pytest.approx(450, abs=1)


def test_a_short_run_settles_for_a_quarter_of_its_span(sustained: ModuleType) -> None:
    ends = [100.5, 101.0, 103.0, 104.0]  # 4 s span: counts (101, 104]
    assert sustained.steady_rate(ends, 100.0, 104.0) == pytest.approx(2 / 3)


class _Env:
    def around(self, at: float, width: float = 2.0) -> dict[str, float]:
        return {"steal_cores": 0.0, "iowait_cores": 0.5 if abs(at - 12.0) <= width else 0.0}


def test_tail_seconds_names_the_stall_and_what_the_machine_did(sustained: ModuleType) -> None:
    by_second = {s: [0.05] * 100 for s in range(20)}
    by_second[10] = [0.05] * 90 + [0.4] * 10  # a stall: 10 jobs over the 250 ms goal
    by_second[11] = [0.05] * 99 + [0.3]
    figures = sustained.tail_seconds(by_second, offset=2.0, env=_Env(), worst=2)
    assert figures["seconds_over_p99_goal"] == 2
    worst = figures["worst_seconds"]
    assert [w["at_s"] for w in worst] == [10, 11]
    assert worst[0]["jobs_over_goal"] == 10
    assert worst[0]["max_ms"] == 400.0
    assert worst[0]["iowait_cores"] == 0.5  # second 10 of arrivals is 12 s into the sampling
