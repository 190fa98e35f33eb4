"""`shoal describe` says why a job waits, in plain words, on a devstack whose GPUs are all busy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from shoal_cli.main import cli
from shoal_client.client import ShoalClient
from tests.conftest import StackFactory
from tests.support import DevstackThread, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

REASON = "no node with 2 GPUs free; 3 nodes match the selector"


def shoal(stack: DevstackThread, home: Path, *args: str) -> Result:
    port = stack.api_url.rsplit(":", 1)[1]
    env = {"SHOAL_API_HOST": "127.0.0.1", "SHOAL_API_PORT": port, "SHOAL_DIR": str(home)}
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def submit(stack: DevstackThread, home: Path, *args: str) -> str:
    ran = shoal(stack, home, "docker", "run", "--no-wait", "--id-only", *args, "busybox", "true")
    assert ran.exit_code == 0, ran.output
    return ran.stdout.strip().splitlines()[0]


def in_state(client: ShoalClient, job_id: str, state: str) -> bool:
    return client.state(job_id).state.value == state


def gpus_reported_free(client: ShoalClient, zone: str) -> int:
    nodes = [n for n in client.nodes() if n["labels"].get("zone") == zone]
    return sum(int(n["capacity"]["reported_available"]["gpu"]) for n in nodes)


def test_describe_says_why_a_job_is_queued(make_devstack: StackFactory, tmp_path: Path) -> None:
    # Three eu nodes with 2 GPUs each, one us node; every run lasts until it is cancelled.
    stack = make_devstack(
        compute_nodes=4,
        compute_gpus=2,
        labels=["zone=eu", "zone=eu", "zone=eu", "zone=us"],
        extra_compute={"noop_delay_s": 600.0},
    )
    home = tmp_path / "home"
    client = stack.client(home)
    blockers = [submit(stack, home, "--gpu", "2", "-s", "zone=eu") for _ in range(3)]
    for job_id in blockers:
        wait_until(lambda j=job_id: in_state(client, j, "InProgress"), what=f"{job_id} running")
    # Until every eu node has reported its GPUs taken, an older heartbeat could still show them
    # free, and a node would take the job into its own queue instead.
    wait_until(lambda: gpus_reported_free(client, "eu") == 0, what="eu GPUs reported busy")

    # The us node has 2 GPUs free, but the selector rules it out: the job waits, not fails.
    waiting = submit(stack, home, "--gpu", "2", "-s", "zone=eu")
    wait_until(lambda: in_state(client, waiting, "Queued"), what="the job queued")

    described = shoal(stack, home, "describe", waiting)
    assert described.exit_code == 0, described.output
    assert described.stdout.splitlines()[0] == f"# Job {waiting} is Queued: {REASON}"
    data = json.loads(shoal(stack, home, "describe", waiting, "--output", "json").stdout)
    assert data["State"]["State"] == "Queued"
    assert data["State"]["Status"] == REASON
    queued = [h for h in data["History"] if (h.get("JobState") or {}).get("New") == "Queued"]
    assert [h["Comment"] for h in queued] == [REASON]

    # Capacity frees on one eu node: the job leaves the queue and says no more about waiting.
    client.cancel(blockers[0])
    wait_until(lambda: in_state(client, waiting, "InProgress"), what="the job placed")
    data = json.loads(shoal(stack, home, "describe", waiting, "--output", "json").stdout)
    assert "Status" not in data["State"]
    for job_id in [waiting, *blockers[1:]]:
        client.cancel(job_id)
