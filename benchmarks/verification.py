"""Verification under malicious compute nodes (issue 4): deterministic jobs on 10 noop nodes.

    uv run --frozen python -m benchmarks.verification                   # 0, 1, 3 and 4 of 10
    uv run --frozen python -m benchmarks.verification --jobs 200 --malicious 0,3
    uv run --frozen python -m benchmarks.verification --no-reputation   # ranking ignores records

For each number K of malicious nodes a fresh devstack runs (``--noop --compute-nodes 10
--bad-compute-actors K``): nodes compute-0 .. compute-(K-1) return wrong results, each its own
(non-colluding: no two bad nodes agree). ``--clients`` closed-loop clients submit ``--jobs``
deterministic jobs (Deal concurrency 3, confidence: a strict majority, so 2) and wait for each
to end (event stream timestamps, as in stress.py).

Afterwards every job's executions are read back (/requester/states) and checked:

* ``wrong_accepted``: executions of a bad node whose result was accepted or published. The
  bad nodes always return wrong bytes, so this counts wrong results accepted (target 0).
* ``success_rate``: jobs Completed (targets: >= 99% with 1 bad node, >= 95% with 33%).
* latency p50/p99 of completed jobs, beside the 0-malicious run (the cost of faults).
* ``escalated_jobs``: jobs that needed more than 3 executions (two bad nodes in a job's first
  three disagree with each other and with the good one: no majority, the verifier escalates).
* how often the scheduler still picked bad nodes early on and late (node reputation at work),
  and the reputations the requester ended with (/api/v1/nodes).

Each K is one line in benchmarks/results/verification.jsonl; the whole run is one more line
(``scenario: "all"``) with every figure prefixed ``m<K>_``, which run_all.py reads.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import orjson

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    DevstackProcess,
    Environment,
    HttpPool,
    JobWatcher,
    add_common_args,
    bench_key,
    closed_loop,
    emit,
    record,
    summary_ms,
)

NAME = "verification"
ACCEPTED = frozenset({"ResultAccepted", "Completed"})
# Executions that ran (or were about to): what the scheduler chose, as opposed to asks refused.
RAN = frozenset(
    {"BidAccepted", "WaitingVerification", "ResultAccepted", "ResultRejected", "Completed"}
)


def signed_bodies(count: int, *, concurrency: int, tag: str) -> list[bytes]:
    """``count`` signed deterministic submits (unique by their argument: none is a replay)."""
    from shoal_common.signing import sign_envelope
    from shoal_common.spec import (
        API_VERSION,
        Deal,
        DockerSpec,
        Engine,
        PublisherType,
        Spec,
        VerifierType,
        to_wire,
    )

    key = bench_key()
    bodies = []
    for i in range(count):
        spec = Spec(
            Engine=Engine.NOOP,
            Verifier=VerifierType.DETERMINISTIC,
            Publisher=PublisherType.NOOP,
            Docker=DockerSpec(Image="busybox", Entrypoint=["echo", f"{tag}-{i}"]),
            Deal=Deal(Concurrency=concurrency),
        )
        payload = {"APIVersion": API_VERSION, "ClientID": key.client_id, "Spec": to_wire(spec)}
        bodies.append(sign_envelope(key, payload))
    return bodies


async def job_states(api_url: str, client_id: str, job_ids: list[str]) -> list[dict[str, Any]]:
    pool = HttpPool(api_url, limit=8)
    sem = asyncio.Semaphore(8)

    async def one(job_id: str) -> dict[str, Any]:
        body = orjson.dumps({"client_id": client_id, "job_id": job_id})
        async with sem:
            resp = await pool.request(pool.build("POST", "/requester/states", body))
        state: dict[str, Any] = orjson.loads(resp.body)["state"]
        return state

    try:
        return list(await asyncio.gather(*(one(j) for j in job_ids)))
    finally:
        await pool.close()


async def node_reputations(api_url: str) -> dict[str, dict[str, Any]]:
    pool = HttpPool(api_url, limit=1)
    try:
        resp = await pool.request(pool.build("GET", "/api/v1/nodes"))
    finally:
        await pool.close()
    return {n["id"]: n.get("reputation", {}) for n in orjson.loads(resp.body)}


def bad_share(states: list[dict[str, Any]], bad: set[str]) -> float:
    """Of the executions that ran in these jobs, the share on bad nodes."""
    ran = [e for s in states for e in s["Executions"] if e["State"] in RAN]
    if not ran:
        return float("nan")
    return round(sum(e["NodeId"] in bad for e in ran) / len(ran), 4)


async def scenario(args: argparse.Namespace, malicious: int) -> dict[str, Any]:
    key = bench_key()
    bodies = signed_bodies(args.jobs, concurrency=args.deal_concurrency, tag=f"m{malicious}")
    bad = {f"compute-{i}" for i in range(malicious)}
    devstack_args = [
        "--noop",
        "--compute-nodes",
        str(args.nodes),
        "--bad-compute-actors",
        str(malicious),
        *args.devstack_arg,
    ]
    with DevstackProcess.start(*devstack_args) as stack:
        watcher = await JobWatcher(stack.api_url).start()
        try:
            with Environment(devstack=stack.pids()) as env:
                result = await closed_loop(
                    stack.api_url,
                    bodies,
                    args.clients,
                    client_id=key.client_id,
                    watcher=watcher,
                    job_timeout=args.job_timeout,
                )
            states = await job_states(stack.api_url, key.client_id, result.job_ids)
            reputations = await node_reputations(stack.api_url)
        finally:
            await watcher.stop()

    total = len(bodies)
    executions = [e for s in states for e in s["Executions"]]
    wrong = [e for e in executions if e["NodeId"] in bad and e["State"] in ACCEPTED]
    wrong_verified = [
        e
        for e in executions
        if e["NodeId"] in bad and (e.get("VerificationResult") or {}).get("Result") is True
    ]
    completed = sum(s["State"] == "Completed" for s in states)
    ran_per_job = [sum(e["State"] in RAN for e in s["Executions"]) for s in states]
    # Jobs in the order they were submitted (closed_loop records ids as submits return).
    tenth = max(1, len(states) // 10)
    ends = sorted({s["State"] for s in states})
    return {
        "malicious": malicious,
        "nodes": args.nodes,
        "jobs": total,
        "deal_concurrency": args.deal_concurrency,
        "clients": args.clients,
        "rank_by_reputation": not args.no_reputation,
        "wrong_accepted": len({e["ComputeReference"] for e in [*wrong, *wrong_verified]}),
        "jobs_with_wrong_accepted": len({e["JobID"] for e in [*wrong, *wrong_verified]}),
        "success_rate": round(completed / total, 5),
        **summary_ms(result.latencies),
        "wall_s": round(result.wall, 2),
        "jobs_per_s": round(total / result.wall, 1),
        "escalated_jobs": sum(n > args.deal_concurrency for n in ran_per_job),
        "executions_per_job": round(sum(ran_per_job) / max(1, len(ran_per_job)), 3),
        "rejected_executions": sum(e["State"] == "ResultRejected" for e in executions),
        "bad_share_first_10pct": bad_share(states[:tenth], bad),
        "bad_share_last_50pct": bad_share(states[len(states) // 2 :], bad),
        "bad_share_fair": round(malicious / args.nodes, 4),
        "bad_reputation_weights": sorted(reputations.get(n, {}).get("weight") for n in bad),
        "bad_rejected_counts": sorted(reputations.get(n, {}).get("rejected") for n in bad),
        "good_min_weight": min(
            (r.get("weight", 1.0) for n, r in reputations.items() if n not in bad),
            default=float("nan"),
        ),
        "job_end_states": {s: sum(x["State"] == s for x in states) for s in ends},
        **env.figures(),
        "failures": len(result.failures),
        "failures_sample": result.failures[:5],
        "not_completed_sample": [
            s.get("Status", "") or s["State"] for s in states if s["State"] != "Completed"
        ][:5],
    }


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    if args.no_reputation:
        # The devstack child reads requester settings from the environment.
        os.environ["SHOAL_REQUESTER_RANK_BY_REPUTATION"] = "false"
    combined: dict[str, Any] = {"scenario": "all", "jobs": args.jobs, "nodes": args.nodes}
    combined["rank_by_reputation"] = not args.no_reputation
    for k in args.malicious:
        figures = await scenario(args, k)
        record(NAME, {"scenario": f"{k} of {args.nodes} malicious", **figures})
        print(
            f"{k} malicious: success {figures['success_rate']:.2%}, wrong accepted "
            f"{figures['wrong_accepted']}, p50 {figures['p50_ms']} ms, p99 {figures['p99_ms']} ms",
            flush=True,
        )
        for name in (
            "success_rate",
            "wrong_accepted",
            "p50_ms",
            "p99_ms",
            "mean_ms",
            "escalated_jobs",
            "executions_per_job",
            "bad_share_first_10pct",
            "bad_share_last_50pct",
            "wall_s",
            "failures",
            "loadavg_1m_mean",
            "other_cpu_cores",
        ):
            combined[f"m{k}_{name}"] = figures.get(name)
    wrong = [combined.get(f"m{k}_wrong_accepted") or 0 for k in args.malicious]
    combined["wrong_accepted"] = sum(wrong)
    base = combined.get("m0_p99_ms")
    for k in args.malicious:
        if k and base:
            combined[f"m{k}_p99_vs_m0"] = round(combined[f"m{k}_p99_ms"] / base, 2)
            combined[f"m{k}_p50_vs_m0"] = round(combined[f"m{k}_p50_ms"] / combined["m0_p50_ms"], 2)
    # run_all.py reads these: the worst 33% case among the runs (3 or 4 of 10).
    third = [k for k in args.malicious if 0.3 <= k / args.nodes <= 0.4]
    if third:
        worst = min(third, key=lambda k: combined[f"m{k}_success_rate"])
        combined["third_malicious"] = worst
        combined["third_success_rate"] = combined[f"m{worst}_success_rate"]
        combined["third_p99_ms"] = combined[f"m{worst}_p99_ms"]
    if combined.get("m0_loadavg_1m_mean") is not None:
        combined["loadavg_1m_mean"] = combined["m0_loadavg_1m_mean"]
        combined["other_cpu_cores"] = combined["m0_other_cpu_cores"]
    return combined


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--jobs", type=int, default=1000)
    p.add_argument("--nodes", type=int, default=10)
    p.add_argument(
        "--malicious",
        type=lambda s: [int(x) for x in s.split(",") if x.strip()],
        default=[0, 1, 3, 4],
        help="Numbers of malicious nodes, one devstack each (default 0,1,3,4).",
    )
    p.add_argument("--deal-concurrency", type=int, default=3, help="Executions per job.")
    p.add_argument("--clients", type=int, default=10, help="Closed-loop clients.")
    p.add_argument("--job-timeout", type=float, default=120.0)
    p.add_argument(
        "--no-reputation",
        action="store_true",
        help="Rank nodes without their records (SHOAL_REQUESTER_RANK_BY_REPUTATION=false).",
    )
    p.add_argument("--devstack-arg", action="append", default=[], help="Extra devstack flag.")
    add_common_args(p)
    args = p.parse_args()
    figures = asyncio.run(measure(args))
    emit(NAME, figures, args.json_out)


if __name__ == "__main__":
    main()
