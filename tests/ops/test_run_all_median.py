"""benchmarks/run_all.py: which of a target's three runs its row reports."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def run_all(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(ROOT))  # benchmarks/ is not a package the suite imports
    from benchmarks import run_all

    return run_all


def test_the_sustained_row_reports_the_run_with_the_median_p99(run_all: ModuleType) -> None:
    # Three runs that all kept up: their rates tie at 500.0 and only the p99 tells them apart.
    runs = [
        {"achieved_rate": 500.0, "failures": 0, "p99_ms": 1249.0},
        {"achieved_rate": 499.9, "failures": 0, "p99_ms": 48.5},
        {"achieved_rate": 500.0, "failures": 0, "p99_ms": 76.4},
    ]
    target = next(t for t in run_all.TARGETS if t.id == "3")
    chosen = run_all.median_run(target, runs)
    assert chosen["p99_ms"] == 76.4
    assert chosen["_runs"] == [1249.0, 48.5, 76.4]


def test_a_run_without_the_headline_figure_is_not_the_median(run_all: ModuleType) -> None:
    target = next(t for t in run_all.TARGETS if t.id == "1")
    runs = [{"p50_ms": 9.0}, {"error": "devstack did not start"}, {"p50_ms": 7.0}]
    assert run_all.median_run(target, runs)["p50_ms"] == 7.0


def _runs_cell(table: str, label: str) -> str:
    row = next(line for line in table.splitlines() if f"| {label} |" in line)
    return row.split("|")[10].strip()  # the `runs` column


def test_a_row_shows_its_three_values_beside_the_figure_that_picked_it(
    run_all: ModuleType,
) -> None:
    target = next(t for t in run_all.TARGETS if t.id == "3")
    runs = [{"achieved_rate": 500.0, "failures": 0, "p99_ms": p99} for p99 in (120.0, 80.0, 99.0)]
    picked = run_all.median_run(target, runs)
    table = run_all.render({"3": {"figures": picked, "command": "c", "date": "d"}}, False)
    assert _runs_cell(table, "p99") == "120 ms, 80.0 ms, 99.0 ms"
    assert _runs_cell(table, "achieved rate") == ""
    # A row recorded while the rate picked the run keeps its values beside the rate.
    older = {**picked, "_runs": [500.0, 499.9, 500.0], "_headline": "achieved_rate"}
    table = run_all.render({"3": {"figures": older, "command": "c", "date": "d"}}, False)
    assert _runs_cell(table, "achieved rate") == "500 /s, 500 /s, 500 /s"
    assert _runs_cell(table, "p99") == ""
