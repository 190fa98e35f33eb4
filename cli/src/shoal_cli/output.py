"""How the CLI shows things: state lines, job summaries, node tables, progress bars."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from shoal_common.wire_enums import ExecutionStateType, JobStateType

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table


def state_line(state: dict[str, Any]) -> str:
    """``state``: a JobState in wire form, as every function here takes it."""
    executions = state.get("Executions") or []
    running = sum(1 for e in executions if ExecutionStateType(e["State"]).active)
    outcome = JobStateType(state["State"]).value
    return f"  {outcome:<18} executions: {len(executions)} ({running} active)"


def job_summary(
    console: Console, out: Console, state: dict[str, Any], *, show_stdout: bool
) -> None:
    """The end of ``shoal docker run``: outcome, then the first execution's output."""
    job_id, outcome = state["JobID"], JobStateType(state["State"]).value
    colour = "green" if outcome == "Completed" else "red"
    console.print(f"Job {job_id} [{colour}]{outcome}[/{colour}].")
    executions = state.get("Executions") or []
    for execution in executions:
        status = execution.get("Status")
        execution_state = ExecutionStateType(execution["State"]).value
        if status and execution_state != "Completed":
            console.print(f"  {execution['NodeId']}: {execution_state}: {status}")
    done = [e for e in executions if e.get("RunOutput") is not None]
    if show_stdout and done and done[0]["RunOutput"]:
        run = done[0]["RunOutput"]
        stdout, stderr = run.get("stdout") or "", run.get("stderr") or ""
        if stdout:
            out.print(
                stdout,
                end="" if stdout.endswith("\n") else "\n",
                markup=False,
                highlight=False,
            )
        if stderr:
            console.print(stderr, markup=False, highlight=False, end="")
        if run.get("stdouttruncated") or run.get("stderrtruncated"):
            console.print("(output truncated: `shoal get` has all of it)")
    console.print(f"To download the results: shoal get {job_id}")


def nodes_table(nodes: list[dict[str, Any]]) -> Table:
    """One row per node, in the requester's /api/v1/nodes shape."""
    from rich.table import Table

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
    """A transfer progress bar; yields an ``update(done, total)`` callback.

    The bar (and rich.progress, a noticeable import) appears only for a transfer still under
    way at its first update: one that is done in one go, like a small job context, has none.
    """
    with contextlib.ExitStack() as stack:
        shown: list[Callable[[int, int | None], None]] = []

        def update(done: int, total: int | None) -> None:
            if not shown:
                if total is not None and done >= total:
                    return
                shown.append(stack.enter_context(_rich_progress(console, label)))
            shown[0](done, total)

        yield update


@contextlib.contextmanager
def _rich_progress(console: Console, label: str) -> Iterator[Callable[[int, int | None], None]]:
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

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
