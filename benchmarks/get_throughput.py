"""Throughput of getting a 1 GiB result back from a devstack, with its CID verified.

A devstack (1 compute node, real Docker) runs in a child process. One job writes ``--size-mib``
(zeros, or random bytes with ``--data urandom``) to an output volume; once it is published, each
path below fetches it ``--repeat`` times (best and median reported, in MB/s of 10^6 bytes):

  get_file     ``ShoalClient.download`` of the output file's own CID through the requester:
               streamed to disk, CID computed while it arrives (the issue's target, >= 200 MB/s)
  get_result   ``ShoalClient.download`` of the whole result folder (a tar stream, extracted
               and hashed as it arrives): what ``shoal get`` calls per execution
  shoal_get    ``shoal get``'s own function (``download_results``: the above plus laying out
               ``job-<id8>/``)

The time to produce the result is reported too, split by the job's history (the run with the
node addressing the result folder, then the publisher copying it into the content store).
  proxy_raw    a raw GET through the requester's proxy, bytes discarded (no hashing, no disk)
  publisher_raw  a raw GET straight from the publisher's content store, bytes discarded: the
               server's own speed, so the other rows show what the proxy and the client add

Each path also reports the CPU seconds this (client) process and the devstack process spent
on it: on a busy machine the wall clock says more about the neighbours than about Shoal.

Needs the Docker engine and images from scripts/docker-setup.sh. Appends one JSON line to
benchmarks/results/get_throughput.jsonl.

    uv run python benchmarks/get_throughput.py [--size-mib 1024] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from shoal_cli.results import download_results
from shoal_client.client import ShoalClient
from shoal_common.cid import cid_of_path
from shoal_common.signing import ClientKey
from shoal_common.spec import (
    Deal,
    DockerSpec,
    Engine,
    ResourcesSpec,
    Spec,
    StorageSourceType,
    StorageSpec,
)

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import DevstackProcess, record

IMAGE = "shoal-test/busybox:latest"
TARGET_MB_S = 200.0
CHUNK = 1 << 20


def mb_s(size: int, seconds: float) -> float:
    return round(size / seconds / 1e6, 1)


def raw_get(url: str) -> int:
    """Stream ``url`` and throw the bytes away; returns how many arrived."""
    got = 0
    with (
        httpx.Client(timeout=httpx.Timeout(30.0, read=None)) as http,
        http.stream("GET", url) as response,
    ):
        response.raise_for_status()
        for chunk in response.iter_raw(CHUNK):
            got += len(chunk)
    return got


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, every thread) a process has used so far (Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(repeat: int, size: int, once: Callable[[int], None], server_pid: int) -> dict[str, Any]:
    """Wall-clock speed, plus CPU spent per byte on each side. On a shared machine the wall
    clock mostly shows the other load; ``client_cpu_mb_s`` (bytes per CPU-second of this
    process, all its threads) shows what the client path itself costs."""
    speeds, client_cpu, server_cpu = [], [], []
    for i in range(repeat):
        cpu, server = time.process_time(), cpu_seconds(server_pid)
        started = time.perf_counter()
        once(i)
        speeds.append(mb_s(size, time.perf_counter() - started))
        client_cpu.append(time.process_time() - cpu)
        server_cpu.append(cpu_seconds(server_pid) - server)
    return {
        "best_mb_s": max(speeds),
        "median_mb_s": statistics.median(speeds),
        "runs": speeds,
        "client_cpu_s": round(statistics.median(client_cpu), 2),
        "client_cpu_mb_s": mb_s(size, statistics.median(client_cpu)),
        "server_cpu_s": round(statistics.median(server_cpu), 2),
    }


def phases(client: ShoalClient, job_id: str) -> dict[str, float]:
    """Seconds between the job's history entries: where producing the result went."""
    at: dict[str, float] = {}
    for entry in client.events(job_id):
        at.setdefault(entry.comment, entry.time.timestamp())
    marks = [
        ("schedule_s", "Job created", "bid accepted"),
        ("run_and_address_s", "bid accepted", "result proposed"),
        ("verify_s", "result proposed", "result accepted"),
        ("publish_s", "result accepted", "result published"),
    ]
    return {
        name: round(at[end] - at[start], 2)
        for name, start, end in marks
        if start in at and end in at
    }


def produce(client: ShoalClient, size_mib: int, data: str) -> tuple[str, str, float]:
    """Run the job that writes the big output; returns (job id, result CID, seconds taken)."""
    spec = Spec(
        Engine=Engine.DOCKER,
        Docker=DockerSpec(
            Image=IMAGE,
            Entrypoint=["sh", "-c", f"head -c {size_mib}m /dev/{data} > /outputs/blob"],
        ),
        # The defaults (0.1 CPU, 100 MiB) make writing 1 GiB take minutes, and on cgroup v1
        # dirty page cache counts against the memory limit (the writer was OOM-killed).
        Resources=ResourcesSpec(CPU="1", Memory="1Gi"),
        outputs=[
            StorageSpec(StorageSource=StorageSourceType.IPFS, Name="outputs", path="/outputs")
        ],
        Deal=Deal(Concurrency=1),
        Timeout=1800,
    )
    started = time.perf_counter()
    job = client.submit(spec)
    state = client.wait(job.metadata.id, timeout=1800)
    took = time.perf_counter() - started
    if state.state.value != "Completed":
        events = "\n".join(h.comment for h in client.events(job.metadata.id))
        sys.exit(f"the producing job ended {state.state.value}:\n{events}")
    [result] = client.results(job.metadata.id)
    return job.metadata.id, str(result["Data"]["CID"]), took


def bench(args: argparse.Namespace) -> dict[str, Any]:
    size = args.size_mib * 1024 * 1024
    load_before = [round(x, 2) for x in os.getloadavg()]
    work = Path(tempfile.mkdtemp(prefix="shoal-get-bench-", dir=args.work_dir))
    # One process: server_cpu_s reads the devstack's own process, which then holds the
    # requester and the publisher that serve the downloads (ADR 0012).
    stack = DevstackProcess.start("--compute-nodes", "1", "--processes", "1")
    try:
        api_url, publisher_url = stack.info["api_url"], stack.info["publisher_url"]
        client = ShoalClient(api_url, key=ClientKey.load_or_create(work / "key"), timeout=60)
        print(f"producing a {args.size_mib} MiB result ...", flush=True)
        job_id, result_cid, produce_s = produce(client, args.size_mib, args.data)
        produce_phases = phases(client, job_id)

        # The output file's own CID, from a first (untimed) fetch of the whole result.
        first = client.download(result_cid, work / "first")
        blob_cid = cid_of_path(first / "outputs" / "blob")
        got = (first / "outputs" / "blob").stat().st_size
        if got != size:
            sys.exit(
                f"the job wrote {got} bytes, not {size}: exit code "
                f"{(first / 'exitCode').read_text().strip()}, stderr "
                f"{(first / 'stderr').read_text()[:500]!r}"
            )
        shutil.rmtree(first)

        figures: dict[str, Any] = {}

        def get_file(i: int) -> None:
            dest = work / f"file-{i}"
            client.download(blob_cid, dest)  # raises if the CID does not match
            dest.unlink()

        def get_result(i: int) -> None:
            dest = work / f"result-{i}"
            client.download(result_cid, dest)
            shutil.rmtree(dest)

        quiet = Console(quiet=True)

        def shoal_get(i: int) -> None:
            out = work / f"get-{i}"
            out.mkdir()
            download_results(client, job_id, out, raw=False, console=quiet)
            shutil.rmtree(out)

        def proxy_raw(_: int) -> None:
            assert raw_get(f"{api_url}/api/v1/content/{blob_cid}") == size

        def publisher_raw(_: int) -> None:
            assert raw_get(f"{publisher_url}/content/{blob_cid}") == size

        for name, once in (
            ("publisher_raw", publisher_raw),
            ("proxy_raw", proxy_raw),
            ("get_file", get_file),
            ("get_result", get_result),
            ("shoal_get", shoal_get),
        ):
            print(f"timing {name} ...", flush=True)
            figures[name] = timed(args.repeat, size, once, stack.process.pid)
        client.close()
    finally:
        stack.stop()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(stack.state_dir, ignore_errors=True)
    return {
        "size_bytes": size,
        "data": args.data,
        "repeat": args.repeat,
        "produce_and_publish_s": round(produce_s, 2),
        "produce_phases": produce_phases,
        "loadavg_before": load_before,
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        **figures,
        "target_mb_s": TARGET_MB_S,
        "target_met": figures["get_file"]["median_mb_s"] >= TARGET_MB_S,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--data", choices=["zero", "urandom"], default="zero", help="What the job writes."
    )
    parser.add_argument("--work-dir", type=Path, default=None, help="Where downloads land.")
    parser.add_argument("--no-record", action="store_true", help="Print only.")
    args = parser.parse_args()
    figures = bench(args)
    print(
        f"{'path':16}{'best MB/s':>12}{'median MB/s':>14}{'client CPU s':>14}"
        f"{'client MB/CPU-s':>17}{'server CPU s':>14}"
    )
    for name in ("publisher_raw", "proxy_raw", "get_file", "get_result", "shoal_get"):
        f = figures[name]
        print(
            f"{name:16}{f['best_mb_s']:>12.1f}{f['median_mb_s']:>14.1f}{f['client_cpu_s']:>14.2f}"
            f"{f['client_cpu_mb_s']:>17.1f}{f['server_cpu_s']:>14.2f}"
        )
    print(f"produce + publish: {figures['produce_and_publish_s']} s {figures['produce_phases']}")
    print(f"load average before/after: {figures['loadavg_before']} / {figures['loadavg_after']}")
    print(
        f"target >= {TARGET_MB_S:.0f} MB/s for get_file (median): "
        f"{'met' if figures['target_met'] else 'NOT met'}"
    )
    if not args.no_record:
        record("get_throughput", figures)


if __name__ == "__main__":
    main()
