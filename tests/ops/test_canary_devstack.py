"""`shoal canary --once` against a devstack, as CI runs it: exit 0 on a healthy cluster, non-zero
when jobs fail; canary jobs stay out of the user's `shoal list`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from shoal_cli.main import cli
from tests.conftest import StackFactory
from tests.support import DevstackThread

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

# cid_input needs a real executor (md5sum of a mounted file); the rest run on the noop engine.
NOOP_SCENARIOS = ("list", "submit", "submit_describe", "submit_get", "submit_concurrency")


def shoal(stack: DevstackThread, home: Path, *args: str) -> Result:
    port = stack.api_url.rsplit(":", 1)[1]
    env = {"SHOAL_API_HOST": "127.0.0.1", "SHOAL_API_PORT": port, "SHOAL_DIR": str(home)}
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def canary_once(stack: DevstackThread, home: Path) -> Result:
    args = ["canary", "--once", "--job-timeout", "30s", "--max-latency", "30s"]
    for scenario in NOOP_SCENARIOS:
        args += ["--scenario", scenario]
    return shoal(stack, home, *args)


def test_canary_once_passes_on_a_healthy_devstack(
    make_devstack: StackFactory, tmp_path: Path
) -> None:
    stack = make_devstack(compute_nodes=3)
    home = tmp_path / "home"
    ran = canary_once(stack, home)
    assert ran.exit_code == 0, ran.output
    assert f"canary: {len(NOOP_SCENARIOS)} passed, 0 failed" in ran.stderr
    listed = shoal(stack, home, "list", "--output", "json")
    assert json.loads(listed.stdout) == []  # tagged shoal-canary: hidden by default
    tagged = shoal(stack, home, "list", "--include-tag", "shoal-canary", "--output", "json")
    assert len(json.loads(tagged.stdout)) >= len(NOOP_SCENARIOS) - 1  # list submits nothing


def test_canary_once_exits_non_zero_when_jobs_fail(
    make_devstack: StackFactory, tmp_path: Path
) -> None:
    # Every node refuses every job: each submitting scenario's job ends in Error.
    stack = make_devstack(compute_nodes=3, extra_compute={"reject_bids": True})
    ran = canary_once(stack, tmp_path / "home")
    assert ran.exit_code == 1, ran.output
    assert "canary: 1 passed, 4 failed" in ran.stderr  # only `list` needs no job to succeed
