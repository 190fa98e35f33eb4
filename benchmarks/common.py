"""Shared pieces of the benchmarks.

* ``DevstackProcess``: ``shoal devstack`` in a child process (the load generator gets its own
  core), with its process tree's RSS and CPU time (psutil).
* ``HttpPool``: a minimal keep-alive HTTP/1.1 client on asyncio streams. Requests are built as
  bytes up front, so a request costs one write and one read in the load generator (httpx costs
  ~1 ms of CPU per request, which at 500 req/s would make the generator the bottleneck).
* ``JobWatcher``: one Server-Sent Events connection to ``/api/v1/events/stream`` that timestamps
  every job's terminal state as the requester commits it. Latency = submit sent -> terminal state
  observed, without polling (polling adds load and up to a poll interval of error).
* ``signed_submits``: pre-signed submit bodies (RSA signing is the client's cost, not the
  system's), cached on disk so the 300,000 bodies of a 10-minute run at 500 jobs/s are signed
  once per machine.
* ``Environment``: load average and the CPU other processes used during a run (the machine has
  2 cores and is shared), recorded next to every figure.
* ``record``/``emit``: one JSON line per run in ``results/<name>.jsonl`` with the command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import psutil  # type: ignore[import-untyped]

from shoal_common.childproc import die_with_parent
from shoal_common.natsserver import NatsServer, free_port, start_nats_server

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
CACHE = Path(os.environ.get("SHOAL_BENCH_CACHE") or Path.home() / ".cache" / "shoal-bench")
TERMINAL = frozenset({"Completed", "Error", "Cancelled", "CompletedPartially"})


# --- statistics ------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: a p99 is a latency some job really had)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def summary_ms(latencies_s: Sequence[float], prefix: str = "") -> dict[str, float]:
    ms = [x * 1000 for x in latencies_s]
    nan = float("nan")
    return {
        f"{prefix}mean_ms": round(statistics.fmean(ms), 2) if ms else nan,
        f"{prefix}p50_ms": round(percentile(ms, 50), 2),
        f"{prefix}p90_ms": round(percentile(ms, 90), 2),
        f"{prefix}p99_ms": round(percentile(ms, 99), 2),
        f"{prefix}max_ms": round(max(ms), 2) if ms else nan,
    }


# --- recording -------------------------------------------------------------------------------


@cache
def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "services", "libs"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def command_line() -> str:
    script = sys.argv[0]
    with contextlib.suppress(ValueError):
        script = str(Path(script).resolve().relative_to(ROOT))
    return " ".join(shlex.quote(a) for a in ["uv", "run", "python", script, *sys.argv[1:]])


def record(name: str, figures: dict[str, Any]) -> dict[str, Any]:
    """Append one result line (with the command that produced it) to results/<name>.jsonl."""
    RESULTS.mkdir(exist_ok=True)
    line = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command_line(),
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "git_commit": git_commit(),
        **figures,
    }
    with (RESULTS / f"{name}.jsonl").open("a") as out:
        out.write(json.dumps(line) + "\n")
    return line


def emit(name: str, figures: dict[str, Any], json_out: Path | None) -> None:
    """Record, print, and hand the figures to ``run_all`` (``--json-out``)."""
    line = record(name, figures)
    for k, v in figures.items():
        print(f"{k:>26}: {v}")
    if json_out is not None:
        json_out.write_text(json.dumps(line))


def skipped(name: str, needs: str, json_out: Path | None, **extra: Any) -> None:
    """A target that cannot run yet: say exactly what it needs (not recorded as a result)."""
    print(f"SKIPPED {name}: needs {needs}")
    if json_out is not None:
        json_out.write_text(json.dumps({"skipped": True, "needs": needs, **extra}))


def add_common_args(parser: Any) -> None:
    parser.add_argument(
        "--json-out", type=Path, default=None, help="Also write the figures here (run_all)."
    )


# --- the machine -----------------------------------------------------------------------------


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class Environment:
    """Samples the load average and machine CPU during a run, in a thread (1 s period).

    CPU is reported per named group of process trees (e.g. ``devstack``, ``generator``), in
    cores, and ``other_cpu_cores`` is what every other process on the machine used meanwhile:
    the noise figure on a shared 2-core machine. This process counts as ``generator`` unless it
    is named in another group.
    """

    def __init__(self, **groups: Iterable[int]) -> None:
        self._groups = {name: set(pids) for name, pids in groups.items()}
        self._groups.setdefault("generator", set()).add(os.getpid())
        self._samples: list[float] = []
        # (seconds since start, steal cores, iowait cores) per 1 s sample: where a run stalled,
        # whether the hypervisor or the disk was the cause.
        self.timeline: list[tuple[float, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._start_load = loadavg()
        self._t0 = 0.0
        self._busy0 = 0.0
        self._cpu0: dict[str, float] = {}
        self.elapsed = 0.0
        self.busy = 0.0
        self.cpu: dict[str, float] = {}

    def _group_cpu(self) -> dict[str, float]:
        seen: set[int] = set()
        out: dict[str, float] = {}
        # Named trees first, so the generator's own tree does not swallow them.
        for name in sorted(self._groups, key=lambda n: n == "generator"):
            total = 0.0
            for pid in list(self._groups[name]):
                try:
                    proc = psutil.Process(pid)
                    procs = [proc, *proc.children(recursive=True)]
                except psutil.Error:
                    continue
                for p in procs:
                    if p.pid in seen:
                        continue
                    seen.add(p.pid)
                    with contextlib.suppress(psutil.Error):
                        t = p.cpu_times()
                        total += t.user + t.system + t.children_user + t.children_system
            out[name] = total
        return out

    @staticmethod
    def _machine_busy() -> float:
        t = psutil.cpu_times()
        return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))

    @property
    def started(self) -> float:
        """``time.monotonic()`` when sampling began (the timeline's zero)."""
        return self._t0

    def __enter__(self) -> Environment:
        self._t0 = time.monotonic()
        self._busy0 = self._machine_busy()
        self._cpu0 = self._group_cpu()
        self._thread.start()
        return self

    def _run(self) -> None:
        before, at = psutil.cpu_times(), time.monotonic()
        while not self._stop.wait(1.0):
            self._samples.append(os.getloadavg()[0])
            now, t = psutil.cpu_times(), time.monotonic()
            span = max(1e-9, t - at)
            self.timeline.append(
                (
                    t - self._t0,
                    (getattr(now, "steal", 0.0) - getattr(before, "steal", 0.0)) / span,
                    (getattr(now, "iowait", 0.0) - getattr(before, "iowait", 0.0)) / span,
                )
            )
            before, at = now, t
            # Children that exit are not counted by cpu_times of a live tree: sample them late.
            self._last = self._group_cpu()

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.elapsed = max(1e-9, time.monotonic() - self._t0)
        self.busy = self._machine_busy() - self._busy0
        now = self._group_cpu()
        last = getattr(self, "_last", now)
        # A process that exited during the run (a load-generator worker) is only in ``last``.
        self.cpu = {k: max(now.get(k, 0.0), last.get(k, 0.0)) - self._cpu0.get(k, 0.0) for k in now}

    def figures(self) -> dict[str, Any]:
        samples = self._samples or [os.getloadavg()[0]]
        own = sum(self.cpu.values())
        return {
            "loadavg_start": self._start_load,
            "loadavg_1m_mean": round(statistics.fmean(samples), 2),
            "loadavg_1m_max": round(max(samples), 2),
            **{f"{k}_cpu_cores": round(v / self.elapsed, 2) for k, v in self.cpu.items()},
            "other_cpu_cores": round(max(0.0, self.busy - own) / self.elapsed, 2),
            "steal_cores_max_1s": round(max((s for _, s, _ in self.timeline), default=0.0), 2),
            "iowait_cores_max_1s": round(max((w for _, _, w in self.timeline), default=0.0), 2),
        }

    def around(self, at: float, width: float = 2.0) -> dict[str, float]:
        """The most steal and iowait (cores) sampled within ``width`` s of ``at`` (run time)."""
        near = [(s, w) for t, s, w in self.timeline if abs(t - at) <= width]
        return {
            "steal_cores": round(max((s for s, _ in near), default=0.0), 2),
            "iowait_cores": round(max((w for _, w in near), default=0.0), 2),
        }


# --- the devstack ----------------------------------------------------------------------------


@cache
def devstack_help() -> str:
    out = subprocess.run(
        [sys.executable, "-m", "shoal_cli", "devstack", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return out.stdout


def devstack_supports(flag: str) -> bool:
    """Whether ``shoal devstack`` has this flag yet (service-side features land separately)."""
    return flag in devstack_help()


# A devstack's state folder holds every execution's files (about 22 KB a job: 6.5 GB for a
# ten-minute run at 500 jobs/s), so it is removed when the devstack stops after a run that did
# not fail. Deleting that many files slows the file creations after it down for minutes on this
# VM (docs/benchmarks.md), so run_all.py gathers its runs' folders under one folder of its own
# (this variable) and removes that once, at its end; SHOAL_BENCH_KEEP_STATE=1 keeps them all.
STATE_ROOT_ENV = "SHOAL_BENCH_STATE_ROOT"
KEEP_STATE_ENV = "SHOAL_BENCH_KEEP_STATE"


@dataclass
class DevstackProcess:
    """``shoal devstack`` in a child process, so the load generator gets its own core."""

    process: subprocess.Popen[bytes]
    state_dir: Path
    info: dict[str, Any]

    @classmethod
    def start(cls, *args: str, timeout: float = 120) -> DevstackProcess:
        state_dir = Path(
            tempfile.mkdtemp(prefix="shoal-bench-", dir=os.environ.get(STATE_ROOT_ENV) or None)
        )
        command = [sys.executable, "-m", "shoal_cli", "devstack", "--state-dir", str(state_dir)]
        with (state_dir / "devstack.log").open("wb") as log:  # the child keeps its own copy
            proc = subprocess.Popen(
                [*command, *args],
                stdout=log,
                stderr=log,
                start_new_session=True,
                # A benchmark killed (SIGTERM, SIGKILL) takes its devstack with it: otherwise
                # the cluster runs on, loading the machine for the next run.
                preexec_fn=die_with_parent(),
            )
        deadline = time.monotonic() + timeout
        info_file = state_dir / "devstack.json"
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"devstack exited; see {state_dir / 'devstack.log'}")
            if info_file.exists() and (state_dir / "ready").exists():
                return cls(proc, state_dir, json.loads(info_file.read_text()))
            time.sleep(0.05)
        proc.kill()
        raise RuntimeError("devstack did not start in time")

    @property
    def api_url(self) -> str:
        return str(self.info["api_url"])

    @property
    def pid(self) -> int:
        return self.process.pid

    def tree(self) -> list[psutil.Process]:
        root = psutil.Process(self.process.pid)
        return [root, *root.children(recursive=True)]

    def pids(self) -> list[int]:
        with contextlib.suppress(psutil.Error):
            return [p.pid for p in self.tree()]
        return [self.process.pid]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def remove_state(self) -> None:
        """Delete the state folder, unless kept (see STATE_ROOT_ENV) or a run_all owns it."""
        if os.environ.get(KEEP_STATE_ENV) or os.environ.get(STATE_ROOT_ENV):
            return
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self) -> DevstackProcess:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self.stop()
        if exc_type is None:  # a failed run keeps its devstack.log and state to look at
            self.remove_state()


def nats_varz(monitor_url: str | None) -> dict[str, Any]:
    if not monitor_url:
        return {}
    import httpx

    data: dict[str, Any] = httpx.get(f"{monitor_url}/varz", timeout=5).json()
    return data


def nats_in_msgs(monitor_url: str | None) -> int:
    """Messages published into the NATS server so far (client publishes, incl. JetStream acks)."""
    return int(nats_varz(monitor_url).get("in_msgs", 0))


class HeartbeatCounter:
    """Counts heartbeat messages (a NATS subscriber), to take them out of messages-per-job.

    With 1,000 nodes heartbeats are 1,000 messages a second: they are the cluster's fixed cost,
    not the job's, and the issue's "messages per job" is about what a job adds.
    """

    def __init__(self, nats_url: str) -> None:
        self._url = nats_url
        self.count = 0
        self._nc: Any = None

    async def __aenter__(self) -> HeartbeatCounter:
        import nats

        self._nc = await nats.connect(self._url, name="bench-heartbeat-counter")

        async def on(_msg: Any) -> None:
            self.count += 1

        await self._nc.subscribe("shoal.node.heartbeat.>", cb=on)
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.flush(timeout=2)
            await self._nc.close()


def subject_class(subject: str) -> str:
    """A subject with its ids taken out, e.g. ``shoal.compute.*.ask_bid``, ``_INBOX``."""
    t = subject.split(".")
    if t[0] == "_INBOX":
        return "_INBOX (replies)"
    if t[:2] == ["shoal", "compute"] and len(t) >= 4:
        return f"shoal.compute.*.{t[3]}"
    if t[:3] == ["shoal", "node", "heartbeat"]:
        return "shoal.node.heartbeat.*"
    if t[:2] == ["$JS", "ACK"] and len(t) >= 4:
        return f"$JS.ACK.{t[2]}.{t[3]}"
    if t[:3] == ["$JS", "API", "CONSUMER"] and len(t) >= 5:
        return ".".join(t[:6])
    if t[0] == "$JS":
        return ".".join(t[:4])
    if t[:2] == ["shoal", "logs"]:
        return "shoal.logs.*"
    return subject


class NatsTap:
    """Counts every message the server routes, by subject class (a ``>`` subscriber).

    It sees client publishes, request/reply answers and JetStream deliveries alike, so its
    total is above the server's ``in_msgs``; its use is the breakdown (what a job sends).
    """

    def __init__(self, nats_url: str) -> None:
        self._url = nats_url
        self.counts: dict[str, int] = {}
        self._nc: Any = None

    async def __aenter__(self) -> NatsTap:
        import nats

        self._nc = await nats.connect(self._url, name="bench-tap", pending_size=1 << 28)

        async def on(msg: Any) -> None:
            key = subject_class(msg.subject)
            self.counts[key] = self.counts.get(key, 0) + 1

        await self._nc.subscribe(">", cb=on, pending_msgs_limit=1_000_000)
        await self._nc.flush()
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.flush(timeout=2)
            await asyncio.sleep(0.2)
            await self._nc.close()

    def per_job(self, jobs: int) -> dict[str, float]:
        items = sorted(self.counts.items(), key=lambda kv: -kv[1])
        return {k: round(v / jobs, 2) for k, v in items if "heartbeat" not in k}


# --- pre-signed submits ----------------------------------------------------------------------

_BODIES_VERSION = 1


def _bench_key_pem() -> bytes:
    """The benchmarks' own client key (never the user's), kept so cached bodies stay valid."""
    from shoal_common.signing import ClientKey

    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / "bench_key.pem"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(ClientKey.generate().to_pem())
        os.chmod(tmp, 0o600)
        tmp.replace(path)
    return path.read_bytes()


def bench_key() -> Any:
    from shoal_common.signing import ClientKey

    return ClientKey.from_pem(_bench_key_pem())


SUBMIT_KINDS = ("noop", "verified")


def submit_payload(client_id: str, index: int, kind: str = "noop") -> dict[str, Any]:
    """Job ``index``: a noop job (unique by its argument, so no two bodies are replays).

    ``verified``: the same job through the whole pipeline: its result sealed to and decided on
    by the deterministic verifier (Deal concurrency 1: one proposal settles it), then published
    to the local content store (the publisher fetches it from the node and stores it).
    """
    from shoal_common import spec as js

    if kind not in SUBMIT_KINDS:
        raise ValueError(f"unknown submit kind {kind!r} (one of {SUBMIT_KINDS})")
    verified = kind == "verified"
    spec = js.Spec(
        Engine=js.Engine.NOOP,
        Verifier=js.VerifierType.DETERMINISTIC if verified else None,
        Publisher=js.PublisherType.LOCAL if verified else js.PublisherType.NOOP,
        Docker=js.DockerSpec(Image="busybox", Entrypoint=["echo", str(index)]),
        Deal=js.Deal(Concurrency=1),
    )
    return {"APIVersion": js.API_VERSION, "ClientID": client_id, "Spec": js.to_wire(spec)}


def _sign_range(pem: bytes, start: int, stop: int, kind: str = "noop") -> list[bytes]:
    from shoal_common.signing import ClientKey, sign_envelope

    key = ClientKey.from_pem(pem)
    return [sign_envelope(key, submit_payload(key.client_id, i, kind)) for i in range(start, stop)]


def signed_submits(
    start: int, count: int, *, processes: int | None = None, kind: str = "noop"
) -> list[bytes]:
    """Signed submit bodies ``start .. start+count-1`` of the benchmark key (cached on disk),
    of noop jobs or (``kind="verified"``) verified and published ones (:func:`submit_payload`).

    Each run starts a fresh devstack, so reusing bodies across runs is not a replay; within a
    run, callers use disjoint index ranges (warm-up vs measured).
    """
    pem = _bench_key_pem()
    prefix = "submits" if kind == "noop" else f"submits-{kind}"
    path = CACHE / f"{prefix}-v{_BODIES_VERSION}.bin"
    bodies: list[bytes] = []
    with contextlib.suppress(OSError), path.open("rb") as f:
        data = f.read()
        pos = 0
        while pos + 4 <= len(data) and len(bodies) < start + count:
            (n,) = struct.unpack_from("<I", data, pos)
            if pos + 4 + n > len(data):
                break
            bodies.append(data[pos + 4 : pos + 4 + n])
            pos += 4 + n
    missing = start + count - len(bodies)
    if missing > 0:
        have = len(bodies)
        t0 = time.monotonic()
        print(f"signing {missing} submit bodies (cached in {path}) ...", file=sys.stderr)
        workers = processes or (os.cpu_count() or 1)
        step = max(200, missing // (workers * 8) + 1)
        ranges = [(i, min(i + step, have + missing)) for i in range(have, have + missing, step)]
        if workers > 1 and missing > 2000:
            with ProcessPoolExecutor(workers) as pool:
                starts, stops = zip(*ranges, strict=True)
                chunks = list(
                    pool.map(_sign_range, [pem] * len(ranges), starts, stops, [kind] * len(ranges))
                )
        else:
            chunks = [_sign_range(pem, a, b, kind) for a, b in ranges]
        new = [b for chunk in chunks for b in chunk]
        with path.open("ab") as f:
            f.write(b"".join(struct.pack("<I", len(b)) + b for b in new))
        bodies.extend(new)
        print(f"signed in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return bodies[start : start + count]


# --- a lean HTTP/1.1 client ------------------------------------------------------------------


def http_request(method: str, path: str, host: str, body: bytes = b"", **headers: str) -> bytes:
    """A whole request as bytes (built once, sent many times)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    if body or method in ("POST", "PUT"):
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class HttpResponse:
    status: int
    headers: dict[bytes, bytes]
    body: bytes


class HttpConnection:
    """One keep-alive connection; ``request`` sends prepared bytes and reads one response."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, host: str, port: int) -> HttpConnection:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 22)
        return cls(reader, writer)

    async def read_head(self) -> tuple[int, dict[bytes, bytes]]:
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(b":")
                headers[k.strip().lower()] = v.strip()
        return status, headers

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body of a chunked response, chunk by chunk (the event stream)."""
        while True:
            size_line = await self.reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")
                return
            data = await self.reader.readexactly(size + 2)
            yield data[:-2]

    async def request(self, data: bytes) -> HttpResponse:
        self.writer.write(data)
        status, headers = await self.read_head()
        if headers.get(b"transfer-encoding") == b"chunked":
            body = b"".join([c async for c in self.chunks()])
        else:
            body = await self.reader.readexactly(int(headers.get(b"content-length", b"0")))
        return HttpResponse(status, headers, body)

    def close(self) -> None:
        self.writer.close()


class HttpPool:
    """Keep-alive connections to one server, opened on demand up to ``limit``."""

    def __init__(self, url: str, *, limit: int = 256) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.authority = f"{self.host}:{self.port}"
        self.limit = limit
        self._idle: deque[HttpConnection] = deque()
        self._open = 0
        self._freed = asyncio.Condition()
        self.peak_open = 0

    def build(self, method: str, path: str, body: bytes = b"") -> bytes:
        return http_request(method, path, self.authority, body)

    async def _get(self, *, fresh: bool = False) -> HttpConnection:
        while True:
            if self._idle and not fresh:
                return self._idle.pop()
            if self._idle and fresh:
                self._idle.popleft().close()  # make room: the oldest idle is the likeliest stale
                self._open -= 1
            if self._open < self.limit:
                self._open += 1
                self.peak_open = max(self.peak_open, self._open)
                try:
                    return await HttpConnection.open(self.host, self.port)
                except BaseException:
                    self._open -= 1
                    raise
            async with self._freed:
                await self._freed.wait()

    async def _put(self, conn: HttpConnection | None) -> None:
        if conn is None:
            self._open -= 1
        else:
            self._idle.append(conn)
        async with self._freed:
            self._freed.notify()

    async def request(self, data: bytes) -> HttpResponse:
        reused = bool(self._idle)
        conn = await self._get()
        try:
            resp = await conn.request(data)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            conn.close()
            await self._put(None)
            partial = getattr(exc, "partial", b"")
            if not reused or partial:
                raise
            # The server closed this idle keep-alive connection (uvicorn: after 5 s) before
            # reading the request, so it was not processed: send it again on a new connection,
            # as HTTP clients do with stale pooled connections.
            conn = await self._get(fresh=True)
            try:
                resp = await conn.request(data)
            except BaseException:
                conn.close()
                await self._put(None)
                raise
        except BaseException:
            conn.close()
            await self._put(None)
            raise
        await self._put(conn)
        return resp

    async def close(self) -> None:
        while self._idle:
            self._idle.pop().close()


# --- watching jobs end -----------------------------------------------------------------------


@dataclass
class JobWatcher:
    """Terminal states of all jobs, timestamped (``time.monotonic``) as the stream delivers them.

    ``time.monotonic`` is CLOCK_MONOTONIC, one clock for every process on the machine, so times
    taken in load-generator processes compare with these.
    """

    api_url: str
    ended: dict[str, tuple[float, str]] = field(default_factory=dict)
    rows: int = 0
    overflows: int = 0
    disconnects: int = 0  # the stream broke (the requester died) and was opened again
    _waiters: dict[str, asyncio.Future[tuple[float, str]]] = field(default_factory=dict)
    _task: asyncio.Task[None] | None = None
    _connected: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> JobWatcher:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._connected.wait(), 30)
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def wait(self, job_id: str, timeout: float) -> tuple[float, str]:
        """(monotonic time the job ended, its terminal state)."""
        done = self.ended.get(job_id)
        if done is not None:
            return done
        fut = self._waiters.get(job_id)
        if fut is None:
            fut = self._waiters[job_id] = asyncio.get_running_loop().create_future()
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        finally:
            if fut.done():
                self._waiters.pop(job_id, None)

    def _ended(self, job_id: str, state: str, at: float) -> None:
        if job_id in self.ended:
            return
        self.ended[job_id] = (at, state)
        fut = self._waiters.pop(job_id, None)
        if fut is not None and not fut.done():
            fut.set_result((at, state))

    async def _run(self) -> None:
        pool = HttpPool(self.api_url, limit=1)
        # Job-level rows only: the terminal states are all it wants (a third of the rows).
        request = pool.build("GET", "/api/v1/events/stream?level=job")
        while True:
            try:
                conn = await HttpConnection.open(pool.host, pool.port)
            except OSError:
                # The requester is down (a crash test): try again until it is back.
                await asyncio.sleep(0.2)
                continue
            try:
                conn.writer.write(request)
                status, _ = await conn.read_head()
                if status != 200:
                    raise RuntimeError(f"event stream answered HTTP {status}")
                buf = b""
                async for chunk in conn.chunks():
                    now = time.monotonic()
                    buf += chunk
                    *events, buf = buf.split(b"\n\n")
                    for ev in events:
                        self._event(ev, now)
            except (OSError, asyncio.IncompleteReadError):
                # The requester died mid-stream: reconnect once it is back; jobs that ended
                # meanwhile are found by polling (``settle``).
                self.disconnects += 1
                await asyncio.sleep(0.2)
                continue
            finally:
                conn.close()
            # The requester cut the stream (this reader fell too far behind): reconnect; jobs
            # that ended meanwhile are found by polling at the end (``settle``).
            self.overflows += 1

    def _event(self, ev: bytes, now: float) -> None:
        if ev.startswith(b": connected"):
            self._connected.set()
            return
        if b'"JobState"' not in ev:
            self.rows += 1
            return
        self.rows += 1
        data = ev[ev.index(b"data: ") + 6 :]
        row = orjson.loads(data.split(b"\n", 1)[0])
        new = row["JobState"]["New"]
        if new in TERMINAL:
            self._ended(row["JobID"], new, now)

    async def settle(self, pool: HttpPool, job_ids: Iterable[str], client_id: str) -> int:
        """Poll the states of jobs the stream missed (after an overflow); returns how many."""
        missing = [j for j in job_ids if j not in self.ended]
        for job_id in missing:
            body = orjson.dumps({"client_id": client_id, "job_id": job_id})
            resp = await pool.request(pool.build("POST", "/requester/states", body))
            if resp.status == 200:
                state = orjson.loads(resp.body)["state"]["State"]
                if state in TERMINAL:
                    # Ended, but when is unknown: counted, with no latency (see callers).
                    self.ended[job_id] = (float("nan"), state)
        return len(missing)


def job_id_of(resp: HttpResponse) -> str:
    job_id = resp.headers.get(b"x-bacalhau-job-id")
    if job_id:
        return job_id.decode()
    return str(orjson.loads(resp.body)["job"]["Metadata"]["ID"])


# --- process trees ---------------------------------------------------------------------------


def tree_memory(procs: Sequence[psutil.Process]) -> dict[str, float]:
    """RSS (and PSS/USS where readable) of processes, in MiB, with a per-process breakdown."""
    rss = pss = uss = 0.0
    parts: dict[str, float] = {}
    for p in procs:
        try:
            full = p.memory_full_info()
            name = p.name()
        except psutil.Error:
            continue
        rss += full.rss
        pss += getattr(full, "pss", 0)
        uss += getattr(full, "uss", 0)
        key = f"{name}:{p.pid}"
        parts[key] = round(full.rss / 2**20, 1)
    return {
        "rss_mib": round(rss / 2**20, 1),
        "pss_mib": round(pss / 2**20, 1),
        "uss_mib": round(uss / 2**20, 1),
        "by_process_rss_mib": parts,  # type: ignore[dict-item]
    }


def tree_cpu_seconds(procs: Sequence[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


# --- closed-loop load (C clients, each submit -> wait for the end -> next) ---------------------


@dataclass
class ClosedLoopResult:
    latencies: list[float]  # submit sent -> terminal state observed (Completed only)
    submit_latencies: list[float]  # submit sent -> HTTP response
    failures: list[str]
    job_ids: list[str]
    wall: float
    unknown_latency: int = 0  # completed, but seen only by the final poll


async def closed_loop(
    api_url: str,
    bodies: Sequence[bytes],
    concurrency: int,
    *,
    client_id: str,
    watcher: JobWatcher | None,
    job_timeout: float = 300.0,
) -> ClosedLoopResult:
    """``concurrency`` clients, each submitting its next job once its previous one ended.

    With a ``watcher`` the end is the event-stream timestamp; without one each client polls
    ``/requester/states`` (1 ms, growing 1.5x to 50 ms), as a legacy client would.
    """
    pool = HttpPool(api_url, limit=concurrency * 2 + 2)
    out = ClosedLoopResult([], [], [], [], 0.0)
    queue = deque(bodies)

    async def poll_end(job_id: str) -> tuple[float, str]:
        delay = 0.001
        request = pool.build(
            "POST", "/requester/states", orjson.dumps({"client_id": client_id, "job_id": job_id})
        )
        deadline = time.monotonic() + job_timeout
        while time.monotonic() < deadline:
            resp = await pool.request(request)
            state = orjson.loads(resp.body)["state"]["State"]
            if state in TERMINAL:
                return time.monotonic(), state
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.05)
        raise TimeoutError

    async def client() -> None:
        while queue:
            body = queue.popleft()
            request = pool.build("POST", "/requester/submit", body)
            start = time.monotonic()
            try:
                resp = await pool.request(request)
                out.submit_latencies.append(time.monotonic() - start)
                if resp.status != 200:
                    out.failures.append(f"submit HTTP {resp.status}: {resp.body[:200]!r}")
                    continue
                job_id = job_id_of(resp)
                out.job_ids.append(job_id)
                if watcher is not None:
                    ended, state = await watcher.wait(job_id, job_timeout)
                else:
                    ended, state = await poll_end(job_id)
            except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
                out.failures.append(f"{type(exc).__name__}: {exc}")
                continue
            if state == "Completed":
                out.latencies.append(ended - start)
            else:
                out.failures.append(f"job {job_id} ended {state}")

    t0 = time.monotonic()
    try:
        await asyncio.gather(*(client() for _ in range(concurrency)))
    finally:
        out.wall = time.monotonic() - t0
        await pool.close()
    return out


# --- a cluster of processes (chaos, crash) ---------------------------------------------------


@dataclass
class Service:
    """One ``shoal serve`` process that can be SIGKILLed and started again on its state."""

    name: str
    args: list[str]
    log: Path
    env: dict[str, str] | None = None
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.args,
                stdout=out,
                stderr=out,
                start_new_session=True,
                env={**os.environ, **self.env} if self.env else None,
            )

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()

    def wait(self) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclass
class Cluster:
    """NATS, requester, verifier, publisher and ``nodes`` compute nodes as processes.

    NATS listens on a port fixed at start (``start_nats`` brings it back there, on the same
    JetStream store); every service serves HTTP on a port of its own, kept across restarts.
    ``compute_env``: extra environment of the compute nodes (e.g. SHOAL_COMPUTE_NOOP_DELAY_S).
    """

    root: Path
    nodes: int
    compute_env: dict[str, str] = field(default_factory=dict)
    nats: NatsServer | None = None
    services: dict[str, Service] = field(default_factory=dict)
    api_port: int = field(default_factory=free_port)
    nats_port: int = field(default_factory=free_port)
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def url_of(self, name: str) -> str:
        """The HTTP base URL of a service that serves one (requester, verifier, publisher)."""
        return f"http://127.0.0.1:{self.ports[name]}"

    def _serve(
        self, node_type: str, name: str, *extra: str, env: dict[str, str] | None = None
    ) -> Service:
        args = [sys.executable, "-m", "shoal_cli", "serve", "--node-type", node_type]
        args += ["--nats-url", f"nats://127.0.0.1:{self.nats_port}"]
        args += ["--state-dir", str(self.root / name), *extra]
        return Service(name, args, self.root / f"{name}.log", env)

    def start_nats(self) -> None:
        """Start NATS (again, after a kill) on the same port and JetStream store."""
        self.nats = start_nats_server(
            self.root / "nats", port=self.nats_port, log_file=self.root / "nats.log"
        )

    def start(self) -> Cluster:
        self.root.mkdir(parents=True, exist_ok=True)
        self.start_nats()
        self.ports = {"requester": self.api_port, "publisher": free_port(), "verifier": free_port()}
        publisher_url = self.url_of("publisher")
        wanted = [
            self._serve("publisher", "publisher", "--port", str(self.ports["publisher"])),
            self._serve("verifier", "verifier", "--port", str(self.ports["verifier"])),
            self._serve(
                "requester",
                "requester",
                "--port",
                str(self.api_port),
                "--publisher-url",
                publisher_url,
            ),
        ]
        for i in range(self.nodes):
            name = f"compute-{i}"
            # A fixed port, as in production: results it proposed before a crash stay
            # reachable at the same URL after its restart (with port 0 it would get a new one).
            self.ports[name] = free_port()
            wanted.append(
                self._serve(
                    "compute",
                    name,
                    "--node-id",
                    name,
                    "--port",
                    str(self.ports[name]),
                    "--noop",
                    "--content-store-url",
                    publisher_url,
                    env=self.compute_env,
                )
            )
        for service in wanted:
            self.services[service.name] = service
            service.start()
        return self

    def compute_names(self) -> list[str]:
        return [n for n in self.services if n.startswith("compute-")]

    def stop(self) -> None:
        for service in self.services.values():
            service.terminate()
        for service in self.services.values():
            service.wait()
        if self.nats is not None:
            self.nats.stop()


async def node_states(pool: HttpPool) -> dict[str, str]:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError, ValueError):
        resp = await pool.request(pool.build("GET", "/api/v1/nodes"))
        if resp.status == 200:
            return {str(n.get("id")): str(n.get("state")) for n in orjson.loads(resp.body)}
    return {}


async def wait_nodes(pool: HttpPool, check: Any, timeout: float) -> float:
    """Poll the node list (every 50 ms) until ``check(states)``; the seconds it took."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if check(await node_states(pool)):
            return time.monotonic() - t0
        await asyncio.sleep(0.05)
    raise TimeoutError(f"node states not as expected within {timeout} s")


def epoch(stamp: str) -> float:
    """A wire timestamp (RFC 3339) as a unix time."""
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


async def final_states(
    pool: HttpPool, client_id: str, job_ids: list[str], parallel: int = 8
) -> dict[str, dict[str, Any]]:
    """Every job's state document (/requester/states), read after the run."""
    out: dict[str, dict[str, Any]] = {}
    queue = list(job_ids)

    async def reader() -> None:
        while queue:
            job_id = queue.pop()
            body = orjson.dumps({"client_id": client_id, "job_id": job_id})
            for _ in range(3):
                with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                    resp = await pool.request(pool.build("POST", "/requester/states", body))
                    if resp.status == 200:
                        out[job_id] = orjson.loads(resp.body)["state"]
                        break

    await asyncio.gather(*(reader() for _ in range(parallel)))
    return out


async def results_count(pool: HttpPool, client_id: str, job_id: str) -> int:
    """How many results /requester/results shows for a job (-1: the request failed)."""
    body = orjson.dumps({"client_id": client_id, "job_id": job_id})
    resp = await pool.request(pool.build("POST", "/requester/results", body))
    return len(orjson.loads(resp.body).get("results") or []) if resp.status == 200 else -1


# --- where a job's time goes (the requester's own history timestamps) -------------------------

# (stage, from-state, to-state); job-level states are prefixed "job:", execution-level "ex:".
STAGES = (
    ("placement", "job:New", "job:InProgress"),  # filter, rank, ask for a bid, accept
    ("execution", "job:InProgress", "ex:WaitingVerification"),  # compute -> ResultProposed
    ("verification", "ex:WaitingVerification", "ex:ResultAccepted"),  # verifier -> accepted
    ("publishing", "ex:ResultAccepted", "ex:Completed"),  # publisher -> ResultPublished
)


async def stage_breakdown(
    api_url: str, client_id: str, job_ids: Sequence[str], *, sample: int = 200
) -> dict[str, float]:
    """p50/p99 of each stage of a job's life, from the history the requester recorded.

    Each time is when the requester committed that transition, so a stage includes the event's
    trip (producer's outbox, JetStream, the requester's consumer) as well as the work.
    """
    step = max(1, len(job_ids) // sample)
    picked = list(job_ids)[::step][:sample]
    pool = HttpPool(api_url, limit=4)
    spans: dict[str, list[float]] = {name: [] for name, _, _ in STAGES}
    spans["created_to_completed"] = []
    try:
        for job_id in picked:
            body = orjson.dumps({"client_id": client_id, "job_id": job_id})
            resp = await pool.request(pool.build("POST", "/requester/events", body))
            if resp.status != 200:
                continue
            first: dict[str, datetime] = {}
            for ev in orjson.loads(resp.body).get("events", []):
                if "JobState" in ev:
                    key = "job:" + ev["JobState"]["New"]
                else:
                    key = "ex:" + ev["ExecutionState"]["New"]
                first.setdefault(key, datetime.fromisoformat(ev["Time"]))
            for name, a, b in STAGES:
                if a in first and b in first:
                    spans[name].append((first[b] - first[a]).total_seconds())
            if "job:New" in first and "job:Completed" in first:
                spans["created_to_completed"].append(
                    (first["job:Completed"] - first["job:New"]).total_seconds()
                )
    finally:
        await pool.close()
    out: dict[str, float] = {}
    for name, values in spans.items():
        if values:
            out[f"{name}_p50_ms"] = round(percentile(values, 50) * 1000, 2)
            out[f"{name}_p99_ms"] = round(percentile(values, 99) * 1000, 2)
    return out
