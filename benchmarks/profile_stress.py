"""Where the devstack's time goes under the stress load: py-spy, summarised as text.

    uv run python benchmarks/profile_stress.py --jobs 2000 --concurrency 10

Runs the stress load (benchmarks/stress.py's closed loop) against a devstack while py-spy
samples the devstack process (100 Hz, ``--nonblocking``: the process is never paused; blocking
sampling of a process with ~20 threads slowed it several-fold here), then writes
``benchmarks/profiles/stress-<date>.txt``:

* self time by function (where the CPU is actually spent),
* inclusive time by function (what the spending is for),
* self time by package (sqlite3/sqlalchemy, pydantic, asyncio, uvicorn, nats, ...),
* time by service (the innermost ``shoal_*`` package on the stack),
* time by thread (the event loop vs the SQLite writer and reader threads),
* with ``--focus TEXT`` (repeatable), the share of samples with a frame containing TEXT: the
  inclusive cost of one part, to compare before/after a change. ``--stacks FILE`` summarises
  the raw stacks of an earlier run again (e.g. with other ``--focus`` values).

The load line ends with ``devstack_cpu_ms_per_job``: CPU of the devstack's process tree
(Python and nats-server) per job while sampled (py-spy's own cost is not in it).

Percentages are of the samples in which a thread was working: samples of threads blocked in
select, a queue or a lock are counted apart and left out (py-spy's own idle detection misses
threads blocked in C when it does not pause the process). Time in a C call (sqlite3's execute
or commit, fsync included) shows on the Python line that made it. The raw collapsed stacks
stay in /tmp (the path is printed); any collapsed-stack tool makes flamegraphs of them.
py-spy comes from $PY_SPY, PATH or ``uvx py-spy``.
"""

from __future__ import annotations

import argparse
import asyncio
import linecache
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    HERE,
    DevstackProcess,
    Environment,
    JobWatcher,
    bench_key,
    closed_loop,
    command_line,
    git_commit,
    signed_submits,
    summary_ms,
)

PROFILES = HERE / "profiles"
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> list[str]:
    if os.environ.get("PY_SPY"):
        return [os.environ["PY_SPY"]]
    found = shutil.which("py-spy")
    if found:
        return [found]
    return ["uvx", "py-spy"]


def package_of(file: str) -> str:
    """``sqlalchemy/engine/base.py`` -> ``sqlalchemy``; stdlib modules by their own name."""
    head = file.split("/", 1)[0]
    if head.endswith(".py"):
        head = head[:-3]
    return head or "?"


def short_path(file: str) -> str:
    """``/.../site-packages/sqlalchemy/engine/base.py`` -> ``sqlalchemy/engine/base.py``."""
    path = file.replace("\\", "/")
    for marker in ("site-packages/", "/src/", "lib/python3.11/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def parse_frame(frame: str) -> tuple[str, str]:
    """(``file:function``, package) of one py-spy frame ``function (file:line)``."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip(), "?"
    file = short_path(m.group("file"))
    return f"{file}:{m.group('func')}", package_of(file)


# Frames on (nearly) every stack, which say nothing: the entry point and the loop's own frames.
_TRUNK = {"click", "runpy", "<frozen runpy>", "shoal_cli", "threading"}
_TRUNK_FUNCS = (
    "asyncio/runners.py:run",
    ":Runner.run",
    ":BaseEventLoop.run_forever",
    ":BaseEventLoop.run_until_complete",
    ":BaseEventLoop._run_once",
    ":Handle._run",
    ":_run_code",
    ":_run_module_as_main",
)

# Leaf frames that are a thread waiting, not working: py-spy's own idle detection is not
# reliable for threads blocked in C (a SimpleQueue.get, a lock) so these are filtered here.
_WAIT_FUNCS = {"select", "wait", "_wait_for_tstate_lock", "acquire", "get", "sleep"}
_WAIT_FILES = ("threading.py", "queue.py", "selectors.py", "concurrent/futures/", "aiosqlite/")
_WAIT_CALL = re.compile(r"\.(get|wait|select|acquire|sleep)\(|\bsleep\(")


def is_waiting(frame: str) -> bool:
    m = _FRAME.match(frame.strip())
    if not m:
        return False
    func, file, line = m.group("func"), m.group("file"), m.group("line")
    name = func.rsplit(".", 1)[-1]
    if name in _WAIT_FUNCS and any(w in file for w in _WAIT_FILES):
        return True
    if line and any(w in file for w in _WAIT_FILES):
        text = linecache.getline(file, int(line))
        return bool(_WAIT_CALL.search(text))
    return False


def summarise(raw: Path, top: int, focus: list[str] | None = None) -> tuple[str, int]:
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    by_package: Counter[str] = Counter()
    by_service: Counter[str] = Counter()
    by_thread: Counter[str] = Counter()
    waiting: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    focused: Counter[str] = Counter({pattern: 0 for pattern in focus or []})
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        while frames and frames[0].startswith(("process ", "thread ")):
            frames = frames[1:]
        if not frames:
            continue
        if is_waiting(frames[-1]):
            waiting[_thread_kind([parse_frame(f) for f in frames])] += count
            continue
        total += count
        for pattern in focused:
            if any(pattern in frame for frame in frames):
                focused[pattern] += count
        parsed = [parse_frame(f) for f in frames]
        leaf, leaf_pkg = parsed[-1]
        leaf = leaf + _c_call_note(frames[-1])
        self_time[leaf] += count
        by_package[leaf_pkg] += count
        for name, pkg in {(name, pkg) for name, pkg in parsed}:
            if pkg in _TRUNK or name.endswith(_TRUNK_FUNCS):
                continue
            inclusive[name] += count
            if pkg.startswith("shoal_") and pkg != "shoal_cli":
                ours[name] += count
        service = next(
            (pkg for _, pkg in reversed(parsed) if pkg.startswith("shoal_") and pkg != "shoal_cli"),
            "(no service frame: event loop, servers, drivers)",
        )
        by_service[service] += count
        by_thread[_thread_kind(parsed)] += count

    def table(title: str, counter: Counter[str], n: int) -> str:
        rows = [f"{100 * c / total:6.1f}%  {name}" for name, c in counter.most_common(n)]
        return f"## {title}\n" + "\n".join(rows) + "\n"

    if total == 0:
        return "no samples\n", 0
    idle = sum(waiting.values())
    text = "\n".join(
        [
            f"samples working: {total}; waiting (blocked in select/queue/lock, left out): "
            f"{idle} ({', '.join(f'{k}: {v}' for k, v in waiting.most_common(5))})\n",
            *([table("Focus: samples with a frame containing", focused, 100)] if focus else []),
            table("Self time by function", self_time, top),
            table("Inclusive time by function (entry frames left out)", inclusive, top),
            table("Inclusive time by Shoal function", ours, top),
            table("Self time by package", by_package, 20),
            table("By service (innermost shoal_* frame)", by_service, 10),
            table("By thread (kind, from the stack)", by_thread, 10),
        ]
    )
    return text, total


def _thread_kind(parsed: list[tuple[str, str]]) -> str:
    """What a thread is, from its stack (py-spy's thread names go stale as ids are reused)."""
    names = [name for name, _ in parsed]
    if any(n.endswith("aiosqlite/core.py:_connection_worker_thread") for n in names):
        return "aiosqlite connection threads (compute/verifier/publisher stores, outbox relays)"
    if any("SqlRequesterStore._commit" in n for n in names):
        return "requester SQLite writer thread (group commit)"
    if any(n.endswith("concurrent/futures/thread.py:_worker") for n in names):
        return "thread pools (requester SQLite reads, to_thread)"
    if any("threading.py:Thread._bootstrap" in n for n in names):
        return "other threads"
    return "event loop (main thread)"


# Wrapper lines that call a callable they were given: a leaf here is time in C code (for
# aiosqlite: the sqlite3 call itself, execute or commit, fsync included).
_C_CALLERS = ("aiosqlite/core.py", "concurrent/futures/thread.py")


def _c_call_note(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m or not m.group("line") or not any(c in m.group("file") for c in _C_CALLERS):
        return ""
    text = linecache.getline(m.group("file"), int(m.group("line"))).strip()
    return f"  [in `{text}`: C code]" if text else ""


async def load(stack: DevstackProcess, args: argparse.Namespace, raw: Path) -> dict[str, Any]:
    key = bench_key()
    warm = signed_submits(0, args.warmup)
    bodies = signed_submits(args.warmup, args.jobs)
    watcher = await JobWatcher(stack.api_url).start()
    try:
        await closed_loop(
            stack.api_url, warm, args.concurrency, client_id=key.client_id, watcher=watcher
        )
        spy = await asyncio.create_subprocess_exec(
            *py_spy(),
            "record",
            "--pid",
            str(stack.pid),
            "--rate",
            str(args.rate),
            "--format",
            "raw",
            "--threads",
            "--full-filenames",
            *([] if args.blocking else ["--nonblocking"]),
            *(["--gil"] if args.gil else []),
            "--output",
            str(raw),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        await asyncio.sleep(2)  # let py-spy attach
        with Environment(devstack=stack.pids()) as env:
            result = await closed_loop(
                stack.api_url, bodies, args.concurrency, client_id=key.client_id, watcher=watcher
            )
        spy.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(spy.communicate(), 120)
        if spy.returncode not in (0, -signal.SIGINT):
            print(f"py-spy exited {spy.returncode}: {err.decode()[-2000:]}", file=sys.stderr)
    finally:
        await watcher.stop()
    return {
        "jobs": len(bodies),
        "concurrency": args.concurrency,
        "success_rate": round(len(result.latencies) / len(bodies), 4),
        **summary_ms(result.latencies),
        "jobs_per_s": round(len(bodies) / result.wall, 1),
        **env.figures(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--jobs", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=10)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--rate", type=int, default=100, help="py-spy samples per second.")
    p.add_argument(
        "--blocking",
        action="store_true",
        help="Pause the devstack for each sample (exact stacks, but slows a threaded process).",
    )
    p.add_argument(
        "--gil",
        action="store_true",
        help="Sample only the thread holding the GIL: Python CPU, without I/O waits in C.",
    )
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--name", default="stress")
    p.add_argument(
        "--focus",
        action="append",
        default=[],
        metavar="TEXT",
        help="Also report the share of samples with a frame containing TEXT (inclusive time of\n"
        "e.g. 'MetricsMiddleware' or 'store/sql.py:_run'); repeatable.",
    )
    p.add_argument(
        "--stacks",
        type=Path,
        help="Summarise this raw stacks file of an earlier run instead of running the load\n"
        "(to compare two runs with the same --focus).",
    )
    args = p.parse_args()
    if args.stacks is not None:
        text, _ = summarise(args.stacks, args.top, args.focus)
        print(f"raw collapsed stacks: {args.stacks}\n\n{text}")
        return
    raw = Path(tempfile.mkdtemp(prefix="shoal-profile-")) / "stacks.txt"
    # Every service in the one process py-spy samples (the default layout puts the requester
    # in a child process of its own: ADR 0012).
    with DevstackProcess.start("--noop", "--compute-nodes", "3", "--processes", "1") as stack:
        figures = asyncio.run(load(stack, args, raw))
    text, samples = summarise(raw, args.top, args.focus)
    if figures.get("jobs_per_s") and "devstack_cpu_cores" in figures:
        # Python and nats-server together (the devstack's process tree), per job.
        per_job = 1000 * figures["devstack_cpu_cores"] / figures["jobs_per_s"]
        figures["devstack_cpu_ms_per_job"] = round(per_job, 1)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    PROFILES.mkdir(exist_ok=True)
    out = PROFILES / f"{args.name}-{stamp}.txt"
    header = [
        f"# py-spy profile of the devstack under the stress load ({stamp})",
        f"command: {command_line()}",
        f"git: {git_commit()}",
        f"samples (non-idle, {args.rate}/s): {samples}",
        "load: " + ", ".join(f"{k}={v}" for k, v in figures.items()),
        f"raw collapsed stacks: {raw}",
        "",
    ]
    out.write_text("\n".join(header) + text)
    print(out.read_text())
    print(f"written to {out}")


if __name__ == "__main__":
    main()
