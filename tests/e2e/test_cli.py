"""The `shoal` CLI against a devstack, the way a user drives it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from shoal_cli.main import cli
from shoal_client.client import short_id
from tests.conftest import StackFactory
from tests.support import DevstackThread

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


def shoal(stack: DevstackThread, home: Path, *args: str) -> Result:
    port = stack.api_url.rsplit(":", 1)[1]
    env = {"SHOAL_API_HOST": "127.0.0.1", "SHOAL_API_PORT": port, "SHOAL_DIR": str(home)}
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def test_docker_run_on_noop_then_list_describe_get(
    make_devstack: StackFactory, tmp_path: Path
) -> None:
    stack = make_devstack(compute_nodes=2)
    home = tmp_path / "home"
    ran = shoal(stack, home, "docker", "run", "--id-only", "busybox", "echo", "hi")
    assert ran.exit_code == 0, ran.output
    job_id = ran.stdout.strip().splitlines()[0]

    listed = shoal(stack, home, "list", "--output", "json")
    assert listed.exit_code == 0
    assert [j["Job"]["Metadata"]["ID"] for j in json.loads(listed.stdout)] == [job_id]

    described = shoal(stack, home, "describe", job_id, "--output", "json")
    assert described.exit_code == 0
    data = json.loads(described.stdout)
    assert data["State"]["State"] == "Completed"
    assert data["History"][0]["Comment"] == "Job created"

    got = shoal(stack, home, "get", job_id, "--output-dir", str(tmp_path / "out"))
    assert got.exit_code == 0, got.output
    folder = tmp_path / "out" / f"job-{short_id(job_id)}"
    assert (folder / "exitCode").read_text().strip() == "0"
    assert (folder / "stdout").exists()


def test_bad_input_gets_a_clear_error_not_a_traceback(
    make_devstack: StackFactory, tmp_path: Path
) -> None:
    stack = make_devstack(compute_nodes=1)
    home = tmp_path / "home"
    bad = shoal(stack, home, "docker", "run", "--concurrency", "2", "--confidence", "3", "busybox")
    assert bad.exit_code == 2
    assert "confidence" in bad.stderr
    assert "Traceback" not in bad.output
    spec = tmp_path / "spec.yaml"
    spec.write_text("Engine: Docker\nDeal:\n  Concurrency: lots\n")
    invalid = shoal(stack, home, "validate", str(spec))
    assert invalid.exit_code == 2
    assert "Concurrency" in invalid.stderr
    missing = shoal(stack, home, "describe", "00000000-not-a-job")
    assert missing.exit_code == 1
    assert "Error" in missing.stderr


def test_create_from_spec_file_and_cancel_finished_job(
    make_devstack: StackFactory, tmp_path: Path
) -> None:
    stack = make_devstack(compute_nodes=1)
    home = tmp_path / "home"
    spec = tmp_path / "job.yaml"
    spec.write_text(
        "APIVersion: V1beta1\nSpec:\n  engine: noop\n  publisher: noop\n"
        "  docker: {image: busybox, entrypoint: [echo, done]}\n  deal: {concurrency: 1}\n"
    )
    created = shoal(stack, home, "create", "--id-only", str(spec))
    assert created.exit_code == 0, created.output
    job_id = created.stdout.strip().splitlines()[0]
    cancelled = shoal(stack, home, "cancel", job_id)
    assert cancelled.exit_code == 1
    assert "Traceback" not in cancelled.output


def test_id_is_the_key_files_client_id(tmp_path: Path) -> None:
    from shoal_common.signing import ClientKey

    result = CliRunner().invoke(cli, ["id"], env={"SHOAL_DIR": str(tmp_path)})
    assert result.exit_code == 0
    assert result.stdout.strip() == ClientKey.load_or_create(tmp_path).client_id
