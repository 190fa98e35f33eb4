"""Open-loop load: requests sent on a schedule, whatever the server's answers are doing.

A closed loop (C clients, each waiting for its answer) slows down with the server and so hides
overload ("coordinated omission"). Here each request has a scheduled send time fixed before the
run (paced: ``i / rate``; or Poisson arrivals), and its latency is counted from that time, so a
server that falls behind shows it in the figures.

The senders run in worker processes (``--procs``), each taking every P-th request of each
stream, on keep-alive connections opened as needed (``benchmarks.common.HttpPool``); request
bytes are built before the clock starts. ``lag`` (actual send - scheduled send) says whether the
generator kept up: a p99 lag of a few milliseconds means the figures are the server's.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.synchronize
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from benchmarks.common import HttpPool, job_id_of, signed_submits


@dataclass(frozen=True)
class Stream:
    """One kind of request at one rate.

    ``kind`` "submit": pre-signed submit bodies ``body_start .. body_start+count-1``;
    "state": ``/requester/states`` of the job ids in ``ids`` (cycled, random order).
    """

    name: str
    kind: str
    rate: float
    count: int
    body_start: int = 0
    ids: tuple[str, ...] = ()
    client_id: str = ""


@dataclass(frozen=True)
class Plan:
    api_url: str
    streams: tuple[Stream, ...]
    procs: int
    poisson: bool = False
    max_connections: int = 512
    seed: int = 1


@dataclass
class Sent:
    """One request: (stream, index, scheduled, sent, answered, HTTP status, job id)."""

    stream: str
    index: int
    scheduled: float
    sent: float
    answered: float
    status: int
    job_id: str = ""


def schedule(stream: Stream, t0: float, *, poisson: bool, seed: int) -> list[float]:
    """Send times of every request of a stream (identical in every worker)."""
    if not poisson:
        return [t0 + i / stream.rate for i in range(stream.count)]
    rng = random.Random(f"{seed}:{stream.name}")
    t, out = t0, []
    for _ in range(stream.count):
        out.append(t)
        t += rng.expovariate(stream.rate)
    return out


def _requests(pool: HttpPool, stream: Stream, indices: range) -> list[bytes]:
    if stream.kind == "submit":
        bodies = signed_submits(stream.body_start, stream.count)
        return [pool.build("POST", "/requester/submit", bodies[i]) for i in indices]
    rng = random.Random(stream.name)
    return [
        pool.build(
            "POST",
            "/requester/states",
            orjson.dumps({"client_id": stream.client_id, "job_id": rng.choice(stream.ids)}),
        )
        for _ in indices
    ]


@dataclass
class _Sync:
    """Workers build their requests, then all start on one clock (``t0``, set by the parent)."""

    ready: multiprocessing.synchronize.Barrier
    go: multiprocessing.synchronize.Barrier
    t0: Any  # multiprocessing.Value("d"): time.monotonic() of the first scheduled send
    stop: multiprocessing.synchronize.Event


async def _run_worker(plan: Plan, worker: int, sync: _Sync) -> list[Sent]:
    pool = HttpPool(plan.api_url, limit=plan.max_connections)
    built: list[tuple[Stream, range, list[bytes]]] = []
    for stream in plan.streams:
        indices = range(worker, stream.count, plan.procs)
        built.append((stream, indices, _requests(pool, stream, indices)))
    sync.ready.wait(timeout=600)
    sync.go.wait(timeout=60)
    t0 = float(sync.t0.value)
    work: list[tuple[float, Stream, int, bytes]] = []
    for stream, indices, requests in built:
        times = schedule(stream, t0, poisson=plan.poisson, seed=plan.seed)
        work += [(times[i], stream, i, r) for i, r in zip(indices, requests, strict=True)]
    del built
    work.sort(key=lambda w: w[0])
    stop = sync.stop
    out: list[Sent] = []
    tasks: set[asyncio.Task[None]] = set()

    async def send(scheduled: float, stream: Stream, index: int, request: bytes) -> None:
        sent = time.monotonic()
        try:
            resp = await pool.request(request)
        except (OSError, asyncio.IncompleteReadError) as exc:
            out.append(Sent(stream.name, index, scheduled, sent, time.monotonic(), 0, repr(exc)))
            return
        answered = time.monotonic()
        job_id = ""
        if stream.kind == "submit" and resp.status == 200:
            job_id = job_id_of(resp)
        out.append(Sent(stream.name, index, scheduled, sent, answered, resp.status, job_id))

    for n, (at, stream, index, request) in enumerate(work):
        delay = at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if n % 64 == 0 and stop.is_set():
            break
        task = asyncio.create_task(send(at, stream, index, request))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=120)
    await pool.close()
    return out


def worker_main(plan: Plan, worker: int, sync: _Sync, out: str) -> None:
    sent = asyncio.run(_run_worker(plan, worker, sync))
    Path(out).write_bytes(orjson.dumps([s.__dict__ for s in sent]))


@dataclass
class Run:
    """Worker processes running a plan (start, then ``join``)."""

    plan: Plan
    procs: list[multiprocessing.process.BaseProcess] = field(default_factory=list)
    outs: list[str] = field(default_factory=list)
    sync: _Sync | None = None
    t0: float = 0.0
    _dir: str = ""

    async def start(self) -> float:
        """Start the workers, wait until they are ready, and return the common ``t0``."""
        ctx = multiprocessing.get_context("spawn")
        n = self.plan.procs
        self.sync = _Sync(
            ready=ctx.Barrier(n + 1),
            go=ctx.Barrier(n + 1),
            t0=ctx.Value("d", 0.0),
            stop=ctx.Event(),
        )
        self._dir = tempfile.mkdtemp(prefix="shoal-openloop-")
        for w in range(n):
            out = os.path.join(self._dir, f"worker-{w}.json")
            p = ctx.Process(target=worker_main, args=(self.plan, w, self.sync, out), daemon=True)
            p.start()
            self.procs.append(p)
            self.outs.append(out)
        await asyncio.to_thread(self.sync.ready.wait, 600)
        self.t0 = time.monotonic() + 0.2
        self.sync.t0.value = self.t0
        await asyncio.to_thread(self.sync.go.wait, 60)
        return self.t0

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def alive(self) -> bool:
        return any(p.is_alive() for p in self.procs)

    def request_stop(self) -> None:
        if self.sync is not None:
            self.sync.stop.set()

    async def join(self) -> list[Sent]:
        for p in self.procs:
            await asyncio.to_thread(p.join)
        return await asyncio.to_thread(self._collect)

    def _collect(self) -> list[Sent]:
        sent: list[Sent] = []
        for out in self.outs:
            with contextlib.suppress(OSError):
                sent += [Sent(**d) for d in orjson.loads(Path(out).read_bytes())]
        return sent


def stream_figures(sent: list[Sent], name: str) -> dict[str, Any]:
    """Answer latency (from the scheduled time) and generator lag of one stream."""
    from benchmarks.common import summary_ms

    mine = [s for s in sent if s.stream == name]
    ok = [s for s in mine if 200 <= s.status < 300]
    return {
        f"{name}_requests": len(mine),
        f"{name}_errors": len(mine) - len(ok),
        **summary_ms([s.answered - s.scheduled for s in ok], prefix=f"{name}_"),
        f"{name}_lag_p99_ms": summary_ms([s.sent - s.scheduled for s in mine])["p99_ms"],
    }
