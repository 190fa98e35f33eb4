"""Crash: ``kill -9`` of each service at a random moment with 1,000 jobs in flight (issue 8, F3).

    uv run --frozen python -m benchmarks.crash                          # every victim, 1,000 jobs
    uv run --frozen python -m benchmarks.crash --victims none          # the baseline: no kill
    uv run --frozen python -m benchmarks.crash --jobs 200 --victims verifier,nats   # a short run

For each victim (requester, compute, verifier, publisher, nats) a fresh cluster of real
processes starts (``shoal serve`` per service, nats-server with JetStream fsync always, SQLite;
benchmarks/common.py ``Cluster``). ``--jobs`` pre-signed jobs are submitted open loop by
``--concurrency`` submitters, as fast as the requester acknowledges them. Every job goes through
every service: a noop run on a compute node, its result sealed to the deterministic verifier
(Deal concurrency 1: that one proposal is verified and decided on), then published to the local
content store (the publisher fetches the result from the node and stores it).

Once a seeded random number of jobs (between half and all of them) is acknowledged, and after a
further random 0-``--kill-jitter`` s, the victim gets SIGKILL; ``--down`` s after the kill it is
started again on the same state (NATS: the same port and JetStream store). Then the run waits
until every acknowledged job is terminal.

Submits refused while the requester is down (connection refused or reset, 5xx) are not lost:
the submitters retry them with the same signed body, as a real client would, until
``--submit-deadline``; a replayed body is the same job, so a submit whose answer was lost in the
crash is not doubled. They are counted apart (``submit_attempts_refused``,
``jobs_acked_after_retry``, ``never_acknowledged``).

Figures per victim: acknowledged, completed, lost (acknowledged, never terminal), the other end
states, duplicates (a job with more than one completed execution, or more than one result
through /requester/results), jobs in flight at the kill, time to detect (compute: kill -> the
requester lists the node as not live; requester and NATS: kill -> the first failed probe of
its port; none for the verifier and the publisher, whose absence nothing tracks: their work
waits in JetStream), restart -> the victim ready again, time to recover (restart -> all jobs
terminal, and kill -> all terminal, from the requester's own timestamps), and latency p50/p99
(created -> terminal as the requester recorded them, so jobs that ended while the event stream
was down count too). The victim ``none`` (run first by default) kills nothing: its "recover"
times, from the moment a kill would have been, are how long the backlog takes to drain anyway.
One line per victim in results/crash.jsonl, then one ``scenario: all`` line (figures prefixed
``<victim>_``) that run_all.py reads.

Target (issue 8): 0 lost, all terminal, no duplicates, for every victim.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    TERMINAL,
    Cluster,
    HttpConnection,
    HttpPool,
    JobWatcher,
    add_common_args,
    bench_key,
    emit,
    epoch,
    final_states,
    job_id_of,
    loadavg,
    node_states,
    record,
    results_count,
    signed_submits,
    summary_ms,
    wait_nodes,
)

NAME = "crash"
VICTIMS = ("requester", "compute", "verifier", "publisher", "nats")
# The same run with no kill: how long the 1,000 jobs take to drain anyway, to read the
# victims' recovery times against (its "kill" is only the moment a kill would have been).
BASELINE = "none"
# Per-victim figures repeated, prefixed, in the ``scenario: all`` line.
SUMMARY_KEYS = (
    "acknowledged",
    "completed",
    "lost",
    "duplicates",
    "in_flight_at_kill",
    "detect_s",
    "ready_s",
    "recover_from_restart_s",
    "recover_from_kill_s",
    "p50_ms",
    "p99_ms",
    "submit_attempts_refused",
)


# --- the load: open loop, refused submits retried -----------------------------------------------


@dataclass
class Submitter:
    """Sends every body once a submitter is free; a refused submit is retried (same body)."""

    api_url: str
    bodies: list[bytes]
    concurrency: int
    deadline_s: float
    acked: dict[str, float] = field(default_factory=dict)  # job id -> time.monotonic() of the ack
    refused_attempts: int = 0
    acked_after_retry: int = 0
    never_acknowledged: list[str] = field(default_factory=list)  # why, per body given up
    notify_at: int = 0  # ``reached`` is set once this many are acknowledged (or all sent)
    reached: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        pool = HttpPool(self.api_url, limit=self.concurrency)
        queue = list(reversed(self.bodies))
        give_up = time.monotonic() + self.deadline_s

        async def submit(body: bytes) -> None:
            request = pool.build("POST", "/requester/submit", body)
            attempts = 0
            why = ""
            while time.monotonic() < give_up:
                attempts += 1
                try:
                    resp = await pool.request(request)
                except (OSError, asyncio.IncompleteReadError) as exc:
                    why = f"{type(exc).__name__}: {exc}"
                else:
                    if resp.status == 200:
                        self.acked.setdefault(job_id_of(resp), time.monotonic())
                        self.acked_after_retry += attempts > 1
                        if len(self.acked) >= self.notify_at:
                            self.reached.set()
                        return
                    why = f"HTTP {resp.status}: {resp.body[:200]!r}"
                    if resp.status < 500 and resp.status != 429:
                        break  # refused for good: not a crash's doing
                self.refused_attempts += 1
                await asyncio.sleep(min(1.0, 0.1 * attempts))
            self.never_acknowledged.append(why)

        async def worker() -> None:
            while queue:
                await submit(queue.pop())

        try:
            await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        finally:
            self.reached.set()
            await pool.close()


# --- probes --------------------------------------------------------------------------------------


async def http_ok(url_host: str, port: int, path: str) -> bool:
    """One GET on a fresh connection (a crashed server's keep-alive ones are gone)."""
    try:
        conn = await asyncio.wait_for(HttpConnection.open(url_host, port), 1.0)
    except (OSError, TimeoutError):
        return False
    try:
        req = f"GET {path} HTTP/1.1\r\nHost: {url_host}:{port}\r\n\r\n".encode()
        resp = await asyncio.wait_for(conn.request(req), 2.0)
        return resp.status == 200
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
        return False
    finally:
        conn.close()


async def tcp_ok(port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


async def wait_for(check: Callable[[], Awaitable[bool]], want: bool, timeout: float) -> float:
    """Seconds until ``check()`` answers ``want`` (probing every 20 ms)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if await check() is want:
            return time.monotonic() - t0
        await asyncio.sleep(0.02)
    raise TimeoutError(f"probe did not answer {want} within {timeout} s")


def ready_check(cluster: Cluster, pool: HttpPool, victim: str) -> Callable[[], Awaitable[bool]]:
    """Whether the victim is back: its /readyz, NATS's port, a compute node live again."""
    if victim == "nats":
        return lambda: tcp_ok(cluster.nats_port)
    if victim.startswith("compute-"):

        async def live() -> bool:
            return (await node_states(pool)).get(victim) == "live"

        return live
    return lambda: http_ok("127.0.0.1", cluster.ports[victim], "/readyz")


def down_check(cluster: Cluster, victim: str) -> Callable[[], Awaitable[bool]] | None:
    """The probe whose first failure is 'detected', where that means something."""
    if victim == "nats":
        return lambda: tcp_ok(cluster.nats_port)
    if victim == "requester":
        return lambda: http_ok("127.0.0.1", cluster.api_port, "/livez")
    return None


# --- one victim ----------------------------------------------------------------------------------


@dataclass
class Crash:
    victim: str
    at_wall: float = 0.0
    at_mono: float = 0.0
    restarted_wall: float = 0.0
    detect_s: float | None = None
    ready_s: float | None = None
    acked: int = 0
    terminal: int = 0


async def kill_and_restart(cluster: Cluster, pool: HttpPool, crash: Crash, *, down: float) -> None:
    victim = crash.victim
    crash.at_wall, crash.at_mono = time.time(), time.monotonic()
    if victim == BASELINE:
        crash.restarted_wall = crash.at_wall + down  # when a victim would have come back
        return
    if victim == "nats":
        assert cluster.nats is not None
        await asyncio.to_thread(cluster.nats.kill)
    else:
        await asyncio.to_thread(cluster.services[victim].kill)
    probe = down_check(cluster, victim)
    with contextlib.suppress(TimeoutError):
        if probe is not None:
            await wait_for(probe, False, 10)
            crash.detect_s = round(time.monotonic() - crash.at_mono, 3)
        elif victim.startswith("compute-"):
            await wait_nodes(pool, lambda s: s.get(victim, "live") != "live", 60)
            crash.detect_s = round(time.monotonic() - crash.at_mono, 2)
    await asyncio.sleep(max(0.0, crash.at_mono + down - time.monotonic()))
    crash.restarted_wall = time.time()
    restarted = time.monotonic()
    if victim == "nats":
        await asyncio.to_thread(cluster.start_nats)
    else:
        await asyncio.to_thread(cluster.services[victim].start)
    with contextlib.suppress(TimeoutError):
        await wait_for(ready_check(cluster, pool, victim), True, 120)
        crash.ready_s = round(time.monotonic() - restarted, 2)


async def wait_terminal(
    watcher: JobWatcher, pool: HttpPool, client_id: str, job_ids: list[str], settle: float
) -> None:
    """Until every job is terminal (the event stream, and polling what it may have missed)."""
    deadline = time.monotonic() + settle
    last_poll = 0.0
    while time.monotonic() < deadline:
        missing = [j for j in job_ids if j not in watcher.ended]
        if not missing:
            return
        stream_gaps = watcher.disconnects or watcher.overflows
        if time.monotonic() - last_poll > 3 and (stream_gaps or len(missing) <= 50):
            last_poll = time.monotonic()
            for job_id, state in (await final_states(pool, client_id, missing)).items():
                if state.get("State") in TERMINAL:
                    watcher.ended.setdefault(job_id, (float("nan"), state["State"]))
        await asyncio.sleep(0.5)


async def visible_results(pool: HttpPool, client_id: str, job_ids: list[str]) -> dict[str, int]:
    slots = asyncio.Semaphore(8)

    async def one(job_id: str) -> int:
        async with slots:
            for _ in range(3):
                with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                    return await results_count(pool, client_id, job_id)
            return -1

    counts = await asyncio.gather(*(one(j) for j in job_ids))
    return dict(zip(job_ids, counts, strict=True))


async def scenario(args: argparse.Namespace, victim: str, rng: random.Random) -> dict[str, Any]:
    key = bench_key()
    bodies = signed_submits(0, args.jobs, kind="verified")
    root = Path(tempfile.mkdtemp(prefix=f"shoal-crash-{victim}-"))
    env = {"SHOAL_COMPUTE_NOOP_DELAY_S": str(args.job_seconds)} if args.job_seconds else {}
    cluster = Cluster(root, args.compute_nodes, compute_env=env).start()
    print(f"[{victim}] cluster in {root}; API {cluster.api_url}", flush=True)
    pool = HttpPool(cluster.api_url, limit=16)
    name = rng.choice(cluster.compute_names()) if victim == "compute" else victim
    crash = Crash(name)
    kill_at = rng.randint(args.jobs // 2, args.jobs)
    jitter = rng.uniform(0.0, args.kill_jitter)
    submitter = Submitter(
        cluster.api_url, bodies, args.concurrency, args.submit_deadline, notify_at=kill_at
    )
    try:
        await wait_nodes(
            pool, lambda s: sum(v == "live" for v in s.values()) == args.compute_nodes, 180
        )
        for service in ("verifier", "publisher"):
            await wait_for(ready_check(cluster, pool, service), True, 120)
        watcher = await JobWatcher(cluster.api_url).start()
        load_before = loadavg()
        t0 = time.monotonic()
        try:
            load = asyncio.create_task(submitter.run())
            await submitter.reached.wait()
            await asyncio.sleep(jitter)
            crash.acked = len(submitter.acked)
            crash.terminal = sum(1 for j in submitter.acked if j in watcher.ended)
            kill_after = time.monotonic() - t0
            what = "no kill (baseline)" if victim == BASELINE else f"SIGKILL {name}"
            print(
                f"[{victim}] {what} at {kill_after:.1f} s: {crash.acked} acknowledged, "
                f"{crash.acked - crash.terminal} in flight",
                flush=True,
            )
            await kill_and_restart(cluster, pool, crash, down=args.down)
            await load
            job_ids = list(submitter.acked)
            await wait_terminal(watcher, pool, key.client_id, job_ids, args.settle)
            wall = time.monotonic() - t0
            load_after = loadavg()
        finally:
            await watcher.stop()
        states = await final_states(pool, key.client_id, job_ids)
        shown = await visible_results(pool, key.client_id, job_ids)
    finally:
        await pool.close()
        cluster.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    final = {j: (states.get(j) or {}).get("State", "unread") for j in job_ids}
    completed = [j for j, s in final.items() if s == "Completed"]
    lost = [j for j, s in final.items() if s not in TERMINAL]
    multi_completed = [
        j
        for j, s in states.items()
        if sum(ex.get("State") == "Completed" for ex in s.get("Executions") or []) > 1
    ]
    multi_results = [j for j, n in shown.items() if n > 1]
    missing_results = [j for j in completed if shown.get(j, 0) < 1]
    ends = [epoch(s["UpdateTime"]) for j, s in states.items() if final[j] in TERMINAL]
    last_end = max(ends) if ends else float("nan")
    latencies = [epoch(states[j]["UpdateTime"]) - epoch(states[j]["CreateTime"]) for j in completed]
    figures: dict[str, Any] = {
        "scenario": victim,
        "victim": name,
        "jobs": len(bodies),
        "compute_nodes": args.compute_nodes,
        "concurrency": args.concurrency,
        "down_s": args.down,
        "acknowledged": len(job_ids),
        "never_acknowledged": len(submitter.never_acknowledged),
        "submit_attempts_refused": submitter.refused_attempts,
        "jobs_acked_after_retry": submitter.acked_after_retry,
        "acked_at_kill": crash.acked,
        "in_flight_at_kill": crash.acked - crash.terminal,
        "kill_after_s": round(kill_after, 2),
        "completed": len(completed),
        "lost": len(lost),
        "non_completed_states": {
            s: sum(1 for v in final.values() if v == s) for s in set(final.values()) - {"Completed"}
        },
        "duplicates": len(set(multi_completed) | set(multi_results)),
        "jobs_with_two_completed_executions": len(multi_completed),
        "jobs_with_two_results": len(multi_results),
        "completed_without_result": len(missing_results),
        "detect_s": crash.detect_s,
        "ready_s": crash.ready_s,
        "recover_from_restart_s": round(max(0.0, last_end - crash.restarted_wall), 2),
        "recover_from_kill_s": round(last_end - crash.at_wall, 2),
        "all_terminal_before_restart": bool(last_end < crash.restarted_wall),
        **summary_ms(latencies),
        "wall_s": round(wall, 1),
        "event_stream_disconnects": watcher.disconnects,
        "lost_sample": lost[:5],
        "not_completed_sample": [
            f"{final[j]}: {(states.get(j) or {}).get('Status')}"
            for j in [j for j in job_ids if final[j] != "Completed"][:5]
        ],
        "never_acknowledged_sample": submitter.never_acknowledged[:3],
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "loadavg": load_after,
    }
    figures["target_met"] = bool(
        figures["lost"] == 0
        and figures["duplicates"] == 0
        and figures["completed_without_result"] == 0
        and figures["never_acknowledged"] == 0
    )
    return figures


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    per_victim: dict[str, dict[str, Any]] = {}
    for victim in args.victims:
        figures = await scenario(args, victim, rng)
        figures["seed"] = args.seed
        record(NAME, figures)
        print(
            f"[{victim}] " + ", ".join(f"{k} {figures[k]}" for k in SUMMARY_KEYS if k in figures),
            flush=True,
        )
        per_victim[victim] = figures
    summary: dict[str, Any] = {
        "scenario": "all",
        "victims": list(per_victim),
        "jobs": args.jobs,
        "down_s": args.down,
        "acknowledged": sum(f["acknowledged"] for f in per_victim.values()),
        "completed": sum(f["completed"] for f in per_victim.values()),
        "lost": sum(f["lost"] for f in per_victim.values()),
        "duplicates": sum(f["duplicates"] for f in per_victim.values()),
        "never_acknowledged": sum(f["never_acknowledged"] for f in per_victim.values()),
        "loadavg": loadavg(),
        "target": "0 lost, all terminal, 0 duplicates, for every victim",
        "target_met": all(f["target_met"] for f in per_victim.values()),
    }
    for victim, figures in per_victim.items():
        summary.update({f"{victim}_{k}": figures[k] for k in SUMMARY_KEYS if k in figures})
        summary[f"{victim}_loadavg"] = figures["loadavg"]
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--jobs", type=int, default=1000)
    p.add_argument(
        "--victims",
        type=lambda s: [v.strip() for v in s.split(",") if v.strip()],
        default=[BASELINE, *VICTIMS],
        help=f"Comma-separated, of {', '.join(VICTIMS)}, and {BASELINE} (no kill: the baseline).",
    )
    p.add_argument("--concurrency", type=int, default=64, help="Submitters (open loop).")
    p.add_argument("--compute-nodes", type=int, default=2)
    p.add_argument("--down", type=float, default=3.0, help="Seconds the victim stays down.")
    p.add_argument("--kill-jitter", type=float, default=1.0, help="Random extra delay, s.")
    p.add_argument("--job-seconds", type=float, default=0.0, help="How long each noop run lasts.")
    p.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(2), "big"))
    p.add_argument("--submit-deadline", type=float, default=180.0)
    p.add_argument("--settle", type=float, default=600.0, help="Max wait for all terminal.")
    p.add_argument("--keep", action="store_true", help="Keep each cluster's state and logs.")
    add_common_args(p)
    args = p.parse_args()
    unknown = set(args.victims) - {BASELINE, *VICTIMS}
    if unknown:
        p.error(f"unknown victims {sorted(unknown)}; choose from {BASELINE}, {', '.join(VICTIMS)}")
    figures = asyncio.run(measure(args))
    figures["seed"] = args.seed
    emit(NAME, figures, args.json_out)


if __name__ == "__main__":
    main()
