"""How the CLI shows things: state lines, job summaries, node tables, progress bars."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table

from shoal_common.spec import JobState


def state_line(state: JobState) -> str:
    running = sum(1 for e in state.executions if e.state.active)
    return f"  {state.state.value:<18} executions: {len(state.executions)} ({running} active)"


def job_summary(console: Console, out: Console, state: JobState, *, show_stdout: bool) -> None:
    """The end of ``shoal docker run``: outcome, then the first execution's output."""
    colour = "green" if state.state.value == "Completed" else "red"
    console.print(f"Job {state.job_id} [{colour}]{state.state.value}[/{colour}].")
    for execution in state.executions:
        if execution.status and execution.state.value not in ("Completed",):
            console.print(f"  {execution.node_id}: {execution.state.value}: {execution.status}")
    done = [e for e in state.executions if e.run_output is not None]
    if show_stdout and done and done[0].run_output:
        run = done[0].run_output
        if run.stdout:
            out.print(
                run.stdout,
                end="" if run.stdout.endswith("\n") else "\n",
                markup=False,
                highlight=False,
            )
        if run.stderr:
            console.print(run.stderr, markup=False, highlight=False, end="")
        if run.stdout_truncated or run.stderr_truncated:
            console.print("(output truncated: `shoal get` has all of it)")
    console.print(f"To download the results: shoal get {state.job_id}")


def nodes_table(nodes: list[dict[str, Any]]) -> Table:
    """One row per node, in the requester's /api/v1/nodes shape."""
    table = Table(box=None)
    # Ids and reputations stay whole in narrow terminals; the other columns give way first.
    table.add_column("ID", no_wrap=True)
    for header in ("STATE", "ARCH", "ENGINES", "CPU FREE", "MEM FREE (GiB)", "RUNNING"):
        table.add_column(header)
    table.add_column("REPUTATION", no_wrap=True)
    table.add_column("LABELS")
    for n in nodes:
        cap = n.get("capacity", {})
        avail, total = cap.get("available", {}), cap.get("total", {})
        table.add_row(
            str(n.get("id", "")),
            str(n.get("state", "")),
            str(n.get("arch", "")),
            ",".join(n.get("engines", [])),
            f"{avail.get('cpu', 0):g}/{total.get('cpu', 0):g}",
            f"{avail.get('memory', 0) / 2**30:.1f}/{total.get('memory', 0) / 2**30:.1f}",
            str(n.get("running_executions", "")),
            _reputation_cell(n.get("reputation") or {}),
            ",".join(f"{k}={v}" for k, v in sorted(n.get("labels", {}).items())),
        )
    return table


def _reputation_cell(rep: dict[str, Any]) -> str:
    """The ranking factor; a node caught returning wrong results says how often."""
    if not rep:
        return ""
    weight = f"{float(rep.get('weight', 1.0)):.2f}"
    return f"{weight} ({rep.get('rejected', 0)} wrong)" if rep.get("flagged") else weight


@contextlib.contextmanager
def progress_bar(console: Console, label: str) -> Iterator[Callable[[int, int | None], None]]:
    """A transfer progress bar; yields an ``update(done, total)`` callback."""
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task(label, total=None)

        def update(done: int, total: int | None) -> None:
            progress.update(task, completed=done, total=total)

        yield update
