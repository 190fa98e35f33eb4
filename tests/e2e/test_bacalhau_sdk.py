"""Bacalhau's own Python SDK (bacalhau-sdk 1.2.2, apiclient 1.0.0) against a devstack."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import StackFactory

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


def test_sdk_submits_polls_lists_and_cancels(make_devstack: StackFactory, tmp_path: Path) -> None:
    # The second job must still be running when cancelled: the noop run takes a while.
    stack = make_devstack(compute_nodes=1, extra_compute={"noop_delay_s": 1.0})
    port = stack.api_url.rsplit(":", 1)[1]
    sdk_dir = tmp_path / "bacalhau"
    sdk_dir.mkdir()
    env = {
        **os.environ,
        "BACALHAU_DIR": str(sdk_dir),
        "BACALHAU_API_HOST": "127.0.0.1",
        "BACALHAU_API_PORT": port,
    }
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("sdk_session.py"))],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["state"] == "Completed"
    assert report["events"][0] == ["JobLevel", "New"]
    assert ["JobLevel", "Completed"] in report["events"]
    assert len(report["results"]) == 1
    assert report["results"][0]["cid"].startswith(("Qm", "b"))
    assert report["listed"] == [report["submit_id"]]
    assert report["cancelled_state"] == "Cancelled"
    # The SDK's key file is the same format as ours: shoal reads it and finds the same id.
    from shoal_common.signing import ClientKey

    assert ClientKey.load_or_create(sdk_dir).client_id == report["submit_client_id"]
