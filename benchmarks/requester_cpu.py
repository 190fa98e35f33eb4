"""The requester's CPU per job, in one process: a steadier A/B figure than the devstack's.

    uv run python benchmarks/requester_cpu.py --jobs 3000
    uv run python benchmarks/ab_stress.py --load requester-cpu --a /tmp/ab-old --b . --rounds 4

The requester service runs with its real HTTP app (signed submits through the ASGI app, the
same path uvicorn calls), its SQLite store (group commit, fsync) in a temporary folder, and
three in-process compute nodes and the noop verifier on the in-memory bus
(``shoal_requester.testing.harness``). ``concurrency`` clients submit pre-signed bodies, and the
process's CPU time (every thread) is divided by the jobs that completed.

What it leaves out: uvicorn's sockets, NATS and the other processes. What it shows: the work
the requester's own code does per job, which on a devstack is the serial bottleneck (ADR
0031). One process on one core drifts far less with this VM's speed than a devstack of five
processes on two, so changes of a few percent show in A B B A rounds. It is not a run of
record: it measures no target.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from shoal_common.logging import configure_logging
from shoal_common.signing import ClientKey, sign_envelope
from shoal_common.spec import JobStateType
from shoal_common.testing import wait_for
from shoal_requester.metrics import JOBS_FINISHED
from shoal_requester.settings import RequesterSettings
from shoal_requester.store.sql import SqlRequesterStore
from shoal_requester.testing import harness, make_spec, submit_payload

SUBMIT = "/api/v1/requester/submit"
COMPLETED = JobStateType.COMPLETED.value


def _scope(app: Any, body: bytes) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": SUBMIT,
        "raw_path": SUBMIT.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"requester"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("requester", 80),
        "app": app,
    }


async def _submit(app: Any, body: bytes) -> None:
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if delivered:  # the app asks again only to watch for a disconnect
            await asyncio.Event().wait()
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    status: list[int] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app(_scope(app, body), receive, send)
    if status != [200]:
        raise SystemExit(f"submit answered {status}")


def _completed() -> float:
    """Jobs the requester has seen complete, from its own counter: collecting only this metric
    (the whole registry reads /proc and every histogram, which would count against the jobs)."""
    for family in JOBS_FINISHED.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels["state"] == COMPLETED:
                return sample.value
    return 0.0


async def measure(jobs: int, concurrency: int, warmup: int) -> dict[str, Any]:
    key = ClientKey.generate()
    spec = make_spec()
    bodies = [
        sign_envelope(key, submit_payload(spec, key.client_id, nonce=str(i)))
        for i in range(warmup + jobs)
    ]
    with tempfile.TemporaryDirectory(prefix="shoal-requester-cpu-") as folder:
        store = SqlRequesterStore(f"sqlite+aiosqlite:///{folder}/requester.sqlite")
        # The service's own intervals and timeouts, not the harness's quick test settings.
        async with harness(
            store=store,
            **RequesterSettings.model_construct().model_dump(
                include={
                    "housekeeping_interval",
                    "reconcile_interval",
                    "bid_timeout",
                    "rpc_timeout",
                }
            ),
        ) as h:
            for i in range(3):
                # Room for every job at once: jobs never wait in Queued, as on a devstack
                # (placement lanes, not capacity, bound what is in flight there).
                node = await h.node(f"compute-{i}", cpu=1e6, memory=2**50)
                node.start_heartbeats(0.5)
            app = h.service.app

            async def client(share: list[bytes]) -> None:
                for body in share:
                    await _submit(app, body)

            async def run(batch: list[bytes]) -> None:
                await asyncio.gather(*(client(batch[i::concurrency]) for i in range(concurrency)))

            start = _completed()

            async def all_done(count: int) -> bool:
                return _completed() - start >= count

            await run(bodies[:warmup])
            await wait_for(lambda: all_done(warmup), timeout=600)
            wall, cpu = time.perf_counter(), time.process_time()
            await run(bodies[warmup:])
            await wait_for(lambda: all_done(warmup + jobs), timeout=600, interval=0.01)
            cpu = time.process_time() - cpu
            wall = time.perf_counter() - wall
    return {
        "jobs": jobs,
        "concurrency": concurrency,
        "cpu_us_per_job": round(cpu / jobs * 1e6, 1),
        "jobs_per_s": round(jobs / wall, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--jobs", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=20)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--json-out", type=Path, help="Also write the figures here (ab_stress).")
    args = p.parse_args()
    configure_logging(level="WARNING")  # as a devstack's services log: not a line per job
    figures = asyncio.run(measure(args.jobs, args.concurrency, args.warmup))
    for name, value in figures.items():
        print(f"{name:>16}: {value}")
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(figures))


if __name__ == "__main__":
    main()
